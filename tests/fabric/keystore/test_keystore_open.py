"""Opening a store: the url forms, a private SQLite file, reopening keeps everything."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cryptoplane.exceptions import InvalidRequest
from cryptoplane.fabric.keystore import MasterKey, open_keystore
from cryptoplane.fabric.keystore.postgres import PostgresKeystore
from cryptoplane.fabric.keystore.sqlite import SqliteKeystore
from cryptoplane.fabric.keytypes import KeyPolicy, KeyType

AES = KeyPolicy(KeyType.AES256_GCM)


def test_sqlite_urls_and_plain_paths(tmp_path: Path, master: MasterKey) -> None:
    path = tmp_path / "ks.db"
    with open_keystore(f"sqlite://{path}", master) as s:
        assert isinstance(s, SqliteKeystore)
        s.create_key("a", "k", AES, b"1" * 32)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # nobody else's business
    for url in (str(path), path):
        with open_keystore(url, master) as s:
            assert s.get_key("a", "k").versions == {1: b"1" * 32}
    with pytest.raises(InvalidRequest):
        open_keystore("mysql://host/db", master)


def test_postgres_urls(pg_dsn: str, master: MasterKey) -> None:
    for url in (pg_dsn, pg_dsn.replace("postgresql://", "postgres://", 1)):
        with open_keystore(url, master) as s:
            assert isinstance(s, PostgresKeystore)
            assert "host" not in repr(s)  # a conninfo may hold a password
            s.create_tenant("a")
            assert s.list_tenants() == ["a"]


def test_everything_survives_a_reopen(keystore_url: str, master: MasterKey) -> None:
    with open_keystore(keystore_url, master) as s:
        s.create_key("a", "k", AES.updated(exportable=True), b"1" * 32)
        s.rotate_key("a", "k", b"2" * 32)
        token = s.create_token("a", keys=["k"], label="x")
        s.set_tenant_limits("a", 10, 20)
        s.record_use("a", "k", 2, "encrypt", 5)  # flushed by close
    with open_keystore(keystore_url, master) as s:
        assert s.get_key("a", "k").versions == {1: b"1" * 32, 2: b"2" * 32}
        assert s.get_key("a", "k").policy.exportable
        assert s.check_token(token).keys == ("k",)
        assert (s.tenant_limits("a").ops, s.tenant_limits("a").bytes) == (10.0, 20.0)
        assert [r["op"] for r in s.audit_rows("a") if r["kind"] == "use"] == ["encrypt"]
