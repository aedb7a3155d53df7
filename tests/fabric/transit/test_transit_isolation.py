"""Tenant isolation (another tenant's key is exactly as missing as no key, for every
operation) and tampering (no changed ciphertext ever yields plaintext)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from transitkit import TENANT

from cryptoplane.exceptions import AuthenticationFailed, InvalidRequest
from cryptoplane.fabric.errors import KeyNotFound, KeyVersionRejected
from cryptoplane.fabric.keytypes import KeyPolicy, KeyType
from cryptoplane.fabric.transit import MemoryKeySource, Transit

OTHER = "t2"


def _ops(t: Transit, tenant: str, name: str, ct: bytes, sig: bytes,
         tag: bytes) -> list[Callable[[], Any]]:
    return [
        lambda: t.read_key(tenant, name),
        lambda: t.encrypt(tenant, name, b"x"),
        lambda: t.decrypt(tenant, name, ct),
        lambda: t.rewrap(tenant, name, ct),
        lambda: t.datakey(tenant, name),
        lambda: t.sign(tenant, name, b"x"),
        lambda: t.verify(tenant, name, b"x", sig),
        lambda: t.hmac(tenant, name, b"x"),
        lambda: t.verify_hmac(tenant, name, b"x", tag),
        lambda: t.public_key(tenant, name),
        lambda: t.export(tenant, name),
        lambda: t.rotate(tenant, name),
        lambda: t.config(tenant, name, deletion_allowed=True),
        lambda: t.trim(tenant, name, 1),
        lambda: t.delete(tenant, name),
        lambda: t.encrypt_batch(tenant, name, [{"plaintext": b"x"}]),
        lambda: t.decrypt_batch(tenant, name, [{"ciphertext": ct}]),
        lambda: t.sign_batch(tenant, name, [{"data": b"x"}]),
        lambda: t.batch(tenant, "hmac", name, [{"data": b"x"}]),
    ]


@pytest.mark.parametrize("name", ["aes256-gcm96", "ed25519", "hmac"])
def test_another_tenants_key_is_as_missing_as_no_key(ring: Transit, name: str) -> None:
    ct = ring.encrypt(TENANT, "aes256-gcm96", b"x")
    sig = ring.sign(TENANT, "ed25519", b"x")
    tag = ring.hmac(TENANT, "hmac", b"x")
    foreign = _ops(ring, OTHER, name, ct, sig, tag)
    missing = _ops(ring, OTHER, "no-such-key", ct, sig, tag)
    for theirs, nothing in zip(foreign, missing, strict=True):
        with pytest.raises(KeyNotFound) as a:
            theirs()
        with pytest.raises(KeyNotFound) as b:
            nothing()
        assert str(a.value) == str(b.value).replace("no-such-key", name)
        assert type(a.value) is type(b.value)
    assert ring.list_keys(OTHER) == []
    assert name in ring.list_keys(TENANT)


def test_tenants_with_the_same_key_name_are_separate(transit: Transit) -> None:
    transit.create_key("a", "k", "aes256-gcm96")
    transit.create_key("b", "k", "aes256-gcm96")
    ct = transit.encrypt("a", "k", b"for a")
    with pytest.raises(AuthenticationFailed):  # b's key "k" is another key
        transit.decrypt("b", "k", ct)
    transit.rotate("b", "k")
    assert transit.read_key("a", "k")["latest_version"] == 1


def test_source_isolation_and_messages() -> None:
    src = MemoryKeySource()
    src.create_key("a", "k", KeyPolicy(KeyType.HMAC), bytes(32))
    for call in (lambda: src.get_key("b", "k"), lambda: src.rotate_key("b", "k", bytes(32)),
                 lambda: src.update_policy("b", "k", deletion_allowed=True),
                 lambda: src.trim_key("b", "k", 1), lambda: src.delete_key("b", "k")):
        with pytest.raises(KeyNotFound, match=r"^key 'k' not found$"):
            call()
    with pytest.raises(KeyNotFound):
        src.get_key("a", ["unhashable"])  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["aes256-gcm96", "chacha20-poly1305"])
def test_every_flipped_byte_is_refused(ring: Transit, name: str) -> None:
    pt = b"attack at dawn, bring snacks"
    ct = ring.encrypt(TENANT, name, pt, aad=b"hdr")
    for i in range(len(ct)):
        for bit in (0x01, 0x80):
            bad = bytearray(ct)
            bad[i] ^= bit
            with pytest.raises((AuthenticationFailed, InvalidRequest, KeyVersionRejected)):
                ring.decrypt(TENANT, name, bytes(bad), aad=b"hdr")
    results = ring.decrypt_batch(TENANT, name, [
        {"ciphertext": ct[:i] + bytes([ct[i] ^ 1]) + ct[i + 1:], "aad": b"hdr"}
        for i in range(len(ct))])
    assert all(isinstance(r, (AuthenticationFailed, InvalidRequest, KeyVersionRejected))
               for r in results)
    for cut in range(len(ct)):
        with pytest.raises((AuthenticationFailed, InvalidRequest)):
            ring.decrypt(TENANT, name, ct[:cut], aad=b"hdr")
    assert ring.decrypt(TENANT, name, ct, aad=b"hdr") == pt


def test_tampered_signatures_and_tags_are_false(ring: Transit) -> None:
    for name in ("ed25519", "ecdsa-p256", "rsa-2048"):
        sig = ring.sign(TENANT, name, b"m")
        for i in range(5, len(sig), 7):
            bad = sig[:i] + bytes([sig[i] ^ 1]) + sig[i + 1:]
            assert ring.verify(TENANT, name, b"m", bad) is False
    tag = ring.hmac(TENANT, "hmac", b"m")
    for i in range(5, len(tag)):
        assert not ring.verify_hmac(TENANT, "hmac", b"m", tag[:i] + bytes([tag[i] ^ 1])
                                    + tag[i + 1:])
    assert not ring.verify_hmac(TENANT, "hmac", b"m", tag[:-1])


@pytest.mark.parametrize("name", [["list"], None, 7, b"aes256-gcm96"])
def test_names_of_the_wrong_type_are_missing_keys(ring: Transit, name: Any) -> None:
    with pytest.raises(KeyNotFound):
        ring.encrypt(TENANT, name, b"x")
    with pytest.raises(KeyNotFound):
        ring.batch(TENANT, "encrypt", name, [])
