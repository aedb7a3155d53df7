"""The schema's migrations: an old store upgrades in place, opening again changes
nothing, and stores opened at once migrate once."""

from __future__ import annotations

import json
import threading
import time

import pytest
from rawsql import execute

from cryptoplane.fabric.keystore import SCHEMA_VERSION, MasterKey, backend, open_keystore
from cryptoplane.fabric.keystore.migrations import MIGRATIONS
from cryptoplane.fabric.keytypes import KeyPolicy, KeyType

AES = KeyPolicy(KeyType.AES256_GCM)


def test_versions_are_consecutive() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))


def test_an_old_schema_upgrades_with_its_data(keystore_url: str, master: MasterKey) -> None:
    with backend(keystore_url) as old:
        assert old.migrate(target=1) == 1
    # a key as version 1 of the schema stored it
    now = time.time()
    execute(keystore_url, "INSERT INTO tenants (name, ops_limit, bytes_limit, created_at) "
            "VALUES ('acme', 7, NULL, ?)", now)
    execute(keystore_url, "INSERT INTO keys VALUES ('acme', 'k', ?, 1, 1, ?, ?)",
            json.dumps(AES.to_json()), now, now)
    execute(keystore_url, "INSERT INTO key_versions VALUES ('acme', 'k', 1, ?, ?, ?)",
            master.id, master.wrap("acme", "k", 1, b"K" * 32), now)
    execute(keystore_url, "INSERT INTO metadata VALUES ('master_current', ?)", master.id)
    with open_keystore(keystore_url, master) as s:
        assert s.schema_version() == SCHEMA_VERSION
        assert s.get_key("acme", "k").versions == {1: b"K" * 32}
        assert s.tenant_limits("acme").ops == 7.0
        s.rotate_key("acme", "k", b"L" * 32)  # tables of later versions work
        s.check_token(s.create_token("acme"))
    with open_keystore(keystore_url, master) as s:  # again: nothing to do, data intact
        assert s.migrate() == SCHEMA_VERSION
        assert sorted(s.get_key("acme", "k").versions) == [1, 2]
    assert execute(keystore_url, "SELECT COUNT(*) FROM schema_version") == [(1,)]


def test_stores_opened_at_once_migrate_once(keystore_url: str, master: MasterKey) -> None:
    errors: list[BaseException] = []

    def opener() -> None:
        try:
            open_keystore(keystore_url, master).close()
        except BaseException as e:
            errors.append(e)

    ts = [threading.Thread(target=opener) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    assert execute(keystore_url, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]


def test_a_newer_schema_is_refused(keystore_url: str, master: MasterKey) -> None:
    open_keystore(keystore_url, master).close()
    execute(keystore_url, "UPDATE schema_version SET version = 99")
    with pytest.raises(RuntimeError, match="newer"):
        open_keystore(keystore_url, master)
