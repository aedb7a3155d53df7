"""Bulk streams over the real transit (``fabric/transit``): it is a ``DataKeys``, its data
keys wrap and unwrap, its typed errors come through the jobs, and each stream is one
audited use of the key under the caller's principal."""

from __future__ import annotations

import os

import pytest

import cryptoplane as cp
from cryptoplane.exceptions import AuthenticationFailed
from cryptoplane.fabric.bulk import (
    CHUNK_SIZE,
    DataKeys,
    StreamDecryptJob,
    StreamEncryptJob,
    decrypt_all,
    encrypt_all,
)
from cryptoplane.fabric.errors import KeyNotFound, KeyVersionRejected
from cryptoplane.fabric.keytypes import KeyType
from cryptoplane.fabric.transit import MemoryKeySource, Transit


@pytest.fixture
def transit(plane: cp.Plane) -> Transit:
    t = Transit(plane, MemoryKeySource())
    t.create_key("acme", "files", KeyType.AES256_GCM)
    t.create_key("acme", "derived", KeyType.CHACHA20_POLY1305, derived=True)
    t.create_key("globex", "files", KeyType.AES256_GCM)
    return t


def test_transit_is_data_keys(transit: Transit, plane: cp.Plane) -> None:
    keys: DataKeys = transit  # checked by mypy: the Protocol matches transit's methods
    data = os.urandom(3 * CHUNK_SIZE + 11)
    ct = encrypt_all(keys, "acme", "files", data, plane)
    assert decrypt_all(keys, "acme", "files", ct, plane) == data


def test_derived_key_needs_its_context(transit: Transit, plane: cp.Plane) -> None:
    ct = encrypt_all(transit, "acme", "derived", b"payload", plane, context=b"user-1")
    assert decrypt_all(transit, "acme", "derived", ct, plane, context=b"user-1") == b"payload"
    with pytest.raises(AuthenticationFailed):
        decrypt_all(transit, "acme", "derived", ct, plane, context=b"user-2")


def test_typed_errors(transit: Transit, plane: cp.Plane) -> None:
    ct = encrypt_all(transit, "acme", "files", b"x" * 100, plane)
    with pytest.raises(KeyNotFound):
        StreamEncryptJob(transit, "acme", "nope", plane=plane).start()
    with pytest.raises(KeyNotFound):
        decrypt_all(transit, "initech", "files", ct, plane)
    with pytest.raises(AuthenticationFailed):  # another tenant's key of that name
        decrypt_all(transit, "globex", "files", ct, plane)
    transit.rotate("acme", "files")
    transit.config("acme", "files", min_decryption_version=2)
    with pytest.raises(KeyVersionRejected):
        decrypt_all(transit, "acme", "files", ct, plane)


def test_uses_are_audited(transit: Transit, plane: cp.Plane) -> None:
    source = transit.source
    assert isinstance(source, MemoryKeySource)
    enc = StreamEncryptJob(transit, "acme", "files", plane=plane, principal="svc-backup")
    ct = enc.start() + b"".join(enc.feed(b"data")) + b"".join(enc.finish())
    dec = StreamDecryptJob(transit, "acme", "files", plane=plane, principal="svc-restore")
    assert b"".join(dec.feed(ct)) + b"".join(dec.finish()) == b"data"
    assert [(u.op, u.principal) for u in source.uses if u.tenant == "acme"][-2:] == [
        ("datakey", "svc-backup"), ("decrypt", "svc-restore")]
