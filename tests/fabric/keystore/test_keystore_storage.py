"""Nothing secret reaches storage in the clear: key material (raw, hex, base64), token
secrets and the master key are absent from the SQLite file and its WAL, and from a
pg_dump of the PostgreSQL database."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from cryptoplane.fabric.keystore import Keystore, MasterKey
from cryptoplane.fabric.keytypes import KeyPolicy, KeyType

Opener = Callable[..., Keystore]


def encodings(secret: bytes) -> list[bytes]:
    out = [secret, secret.hex().encode(), secret.hex().upper().encode(),
           base64.b64encode(secret), base64.urlsafe_b64encode(secret).rstrip(b"=")]
    # base64 of the secret at another alignment inside a longer text
    out += [base64.b64encode(b"\0" + secret)[4:-4], base64.b64encode(b"\0\0" + secret)[4:-4]]
    return out


def raw_storage(url: str, request: pytest.FixtureRequest) -> bytes:
    if url.startswith("postgresql"):
        cluster = request.getfixturevalue("pg_cluster")
        dbname = url.split("?", 1)[0].rsplit("/", 1)[1]
        dump: bytes = cluster.pg_dump(dbname)
        assert b"key_versions" in dump  # the dump is of the right database
        return dump
    path = Path(url.removeprefix("sqlite://"))
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())


def test_no_secret_in_the_clear(open_store: Opener, keystore_url: str,
                                request: pytest.FixtureRequest) -> None:
    master_bytes, new_bytes = os.urandom(32), os.urandom(32)
    master, new = MasterKey(master_bytes), MasterKey(new_bytes)
    s = open_store(master=master)
    materials = [os.urandom(32) for _ in range(3)] + [b"PLAINTEXT-MATERIAL-" + os.urandom(13)]
    s.create_key("acme", "k", KeyPolicy(KeyType.AES256_GCM), materials[0])
    s.rotate_key("acme", "k", materials[1])
    s.create_key("other", "k", KeyPolicy(KeyType.HMAC), materials[2])
    s.create_key("acme", "text", KeyPolicy(KeyType.ED25519), materials[3])
    token = s.create_token("acme", label="ci")
    secret = token.split("_", 2)[2]
    s.record_use("acme", "k", 2, "encrypt", 10)
    s.flush_audit()
    s.rotate_master(new)
    s.rotate_key("acme", "k", materials[0][::-1])
    data = raw_storage(keystore_url, request)
    assert len(data) > 1000
    # the search does see what is stored, in the encodings it is stored in
    assert new.id.encode() in data and new.check_value().encode() in data
    needles = [secret.encode(), token.encode()]
    for m in (*materials, materials[0][::-1], master_bytes, new_bytes):
        needles += encodings(m)
    found = [n[:6] for n in needles if n in data]
    assert not found, f"secrets in storage: {found}"
    assert b"PLAINTEXT-MATERIAL" not in data
