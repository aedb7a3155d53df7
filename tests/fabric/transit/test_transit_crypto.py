"""Known answers: every data operation checked against ``cryptography`` itself, with
the material from ``export`` and the public keys from ``read_key``, single and batch."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from transitkit import AEAD_TYPES, SIGNING_TYPES, TENANT

from cryptoplane.exceptions import AuthenticationFailed, InvalidRequest
from cryptoplane.fabric.keytypes import KeyType
from cryptoplane.fabric.transit import Transit, parse_ciphertext, parse_signature, parse_tag

HASHES = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}
RSA = [KeyType.RSA_2048, KeyType.RSA_3072, KeyType.RSA_4096]
EC = [KeyType.ECDSA_P256, KeyType.ECDSA_P384]


def material(t: Transit, kt: KeyType, version: int = 1) -> bytes:
    keys: dict[int, bytes] = t.export(TENANT, kt.value, version)["keys"]
    return keys[version]


def aead(kt: KeyType, key: bytes) -> Any:
    return AESGCM(key) if kt is KeyType.AES256_GCM else ChaCha20Poly1305(key)


def public(t: Transit, kt: KeyType) -> Any:
    pem = t.read_key(TENANT, kt.value)["public_keys"][1]
    assert pem.encode() == t.public_key(TENANT, kt.value)
    return serialization.load_pem_public_key(pem.encode())


# -- encrypt / decrypt ----------------------------------------------------------------------

@pytest.mark.parametrize("kt", AEAD_TYPES)
@pytest.mark.parametrize("size", [0, 1, 64, 4096])
def test_encrypt_is_the_aead_under_the_exported_key(ring: Transit, kt: KeyType,
                                                    size: int) -> None:
    pt, aad = os.urandom(size), b"header"
    blob = ring.encrypt(TENANT, kt.value, pt, aad=aad)
    assert len(blob) == 33 + size
    v, nonce, sealed = parse_ciphertext(blob)
    assert v == 1
    assert aead(kt, material(ring, kt)).decrypt(nonce, bytes(sealed), aad) == pt
    assert ring.decrypt(TENANT, kt.value, blob, aad=aad) == pt
    # and the other way: a blob made locally decrypts in transit
    n = os.urandom(12)
    local = b"\xc7\x00\x00\x00\x01" + n + aead(kt, material(ring, kt)).encrypt(n, pt, aad)
    assert ring.decrypt(TENANT, kt.value, local, aad=aad) == pt


@pytest.mark.parametrize("kt", AEAD_TYPES)
def test_nonces_are_fresh_and_aad_binds(ring: Transit, kt: KeyType) -> None:
    blobs = {ring.encrypt(TENANT, kt.value, b"same") for _ in range(50)}
    assert len({parse_ciphertext(b)[1] for b in blobs}) == 50
    blob = ring.encrypt(TENANT, kt.value, b"x", aad=b"a")
    with pytest.raises(AuthenticationFailed):
        ring.decrypt(TENANT, kt.value, blob, aad=b"b")
    with pytest.raises(AuthenticationFailed):
        ring.decrypt(TENANT, kt.value, blob)


def test_caller_nonce_and_explicit_version(ring: Transit) -> None:
    blob = ring.encrypt(TENANT, "aes256-gcm96", b"p", nonce=b"n" * 12, version=1)
    assert parse_ciphertext(blob)[1] == b"n" * 12
    assert AESGCM(material(ring, KeyType.AES256_GCM)).encrypt(b"n" * 12, b"p", b"") == blob[17:]
    for bad in (b"short", "n" * 12):
        with pytest.raises(InvalidRequest):
            ring.encrypt(TENANT, "aes256-gcm96", b"p", nonce=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("kt", AEAD_TYPES)
def test_encrypt_and_decrypt_batches(ring: Transit, kt: KeyType) -> None:
    items: list[Any] = [{"plaintext": os.urandom(i)} for i in range(20)]
    items += [{"plaintext": b"with aad", "aad": b"A"}, {"plaintext": bytearray(b"ba")},
              {"plaintext": "not bytes"}, {"plaintext": b"x", "bogus": 1}, "not a dict",
              {"plaintext": b"v", "version": 1}, {}]
    out = ring.encrypt_batch(TENANT, kt.value, items)
    assert [type(o) for o in out[-5:]] == [InvalidRequest, InvalidRequest, InvalidRequest,
                                          bytes, InvalidRequest]
    key = aead(kt, material(ring, kt))
    for item, blob in zip(items[:22], out[:22], strict=True):
        _, nonce, sealed = parse_ciphertext(blob)
        assert key.decrypt(nonce, bytes(sealed), item.get("aad", b"")) == item["plaintext"]
    back = ring.decrypt_batch(TENANT, kt.value, [
        {"ciphertext": b, "aad": i.get("aad", b"")} for i, b in zip(items[:22], out[:22],
                                                                   strict=True)])
    assert back == [i["plaintext"] for i in items[:22]]
    bad = ring.decrypt_batch(TENANT, kt.value, [
        {"ciphertext": out[0][:-1] + bytes([out[0][-1] ^ 1])}, {"ciphertext": b"junk"},
        {"ciphertext": out[20]}, {"ciphertext": out[1], "context": b"c"},
        {"ciphertext": bytearray(out[1])}])
    assert [type(b) for b in bad[:4]] == [AuthenticationFailed, InvalidRequest,
                                          AuthenticationFailed, InvalidRequest]
    assert bad[4] == items[1]["plaintext"]


# -- sign / verify ----------------------------------------------------------------------------

def _verify_locally(pub: Any, kt: KeyType, data: bytes, sig: bytes, hash: str,
                    prehashed: bool, pad: str) -> None:
    h = HASHES[hash]
    alg: Any = Prehashed(h) if prehashed else h
    if kt in RSA:
        p = (padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size) if pad == "pss"
             else padding.PKCS1v15())
        pub.verify(sig, data, p, alg)
    elif kt in EC:
        pub.verify(sig, data, ec.ECDSA(alg))
    else:
        pub.verify(sig, data)


CASES: list[tuple[KeyType, str, bool, str]] = [
    (kt, h, pre, pad) for kt in SIGNING_TYPES if kt is not KeyType.ED25519
    for h in HASHES for pre in (False, True)
    for pad in (("pss", "pkcs1v15") if kt in RSA else ("pss",))]
CASES.append((KeyType.ED25519, "sha256", False, "pss"))


@pytest.mark.parametrize(("kt", "hash", "prehashed", "pad"), CASES)
def test_signatures_verify_with_cryptography(ring: Transit, kt: KeyType, hash: str,
                                             prehashed: bool, pad: str) -> None:
    msg = b"message to sign"
    data = hashlib.new(hash, msg).digest() if prehashed else msg
    sig = ring.sign(TENANT, kt.value, data, hash=hash, prehashed=prehashed, padding=pad)
    v, raw = parse_signature(sig)
    assert v == 1
    pub = public(ring, kt)
    _verify_locally(pub, kt, data, raw, hash, prehashed, pad)
    if kt is KeyType.ED25519:
        assert isinstance(pub, ed25519.Ed25519PublicKey)
    elif kt in RSA:
        assert isinstance(pub, rsa.RSAPublicKey)
    assert ring.verify(TENANT, kt.value, data, sig, hash=hash, prehashed=prehashed,
                       padding=pad)
    other = hashlib.new(hash, b"other").digest() if prehashed else b"other"
    assert not ring.verify(TENANT, kt.value, other, sig, hash=hash, prehashed=prehashed,
                           padding=pad)
    with pytest.raises(InvalidSignature):
        _verify_locally(pub, kt, other, raw, hash, prehashed, pad)


@pytest.mark.parametrize("kt", SIGNING_TYPES)
def test_default_hash_and_batches(ring: Transit, kt: KeyType) -> None:
    default = "sha384" if kt is KeyType.ECDSA_P384 else "sha256"
    sigs = ring.sign_batch(TENANT, kt.value, [{"data": b"a"}, {"data": b"b"},
                                               {"data": 5}, {"nodata": b""}])
    assert isinstance(sigs[2], InvalidRequest) and isinstance(sigs[3], InvalidRequest)
    _verify_locally(public(ring, kt), kt, b"a", parse_signature(sigs[0])[1], default,
                    False, "pss")
    res = ring.verify_batch(TENANT, kt.value, [
        {"data": b"a", "signature": sigs[0]}, {"data": b"a", "signature": sigs[1]},
        {"data": b"b", "signature": sigs[1]}, {"data": b"b", "signature": b"junk"},
        {"data": b"b"}])
    assert res[:3] == [True, False, True]
    assert isinstance(res[3], InvalidRequest) and isinstance(res[4], InvalidRequest)


def test_signing_refusals(ring: Transit) -> None:
    with pytest.raises(InvalidRequest):
        ring.sign(TENANT, "ed25519", bytes(32), prehashed=True)
    with pytest.raises(InvalidRequest):
        ring.sign(TENANT, "rsa-2048", b"x", hash="md5")
    with pytest.raises(InvalidRequest):
        ring.sign(TENANT, "rsa-2048", b"x", padding="oaep")
    with pytest.raises(InvalidRequest):
        ring.sign(TENANT, "ecdsa-p256", b"too short", prehashed=True)
    for kt in ("aes256-gcm96", "hmac"):
        with pytest.raises(InvalidRequest):
            ring.sign(TENANT, kt, b"x")
        with pytest.raises(InvalidRequest):
            ring.public_key(TENANT, kt)
    with pytest.raises(InvalidRequest):
        ring.encrypt(TENANT, "rsa-2048", b"x")
    # ed25519 ignores the hash (it is part of the scheme)
    sig = ring.sign(TENANT, "ed25519", b"x", hash="sha512")
    assert ring.verify(TENANT, "ed25519", b"x", sig)


# -- hmac, digest, random -----------------------------------------------------------------------

@pytest.mark.parametrize("alg", ["sha256", "sha384", "sha512"])
def test_hmac_is_hmac_under_the_exported_key(ring: Transit, alg: str) -> None:
    key = material(ring, KeyType.HMAC)
    tag = ring.hmac(TENANT, "hmac", b"data", algorithm=alg)
    assert parse_tag(tag) == (1, hmac.new(key, b"data", alg).digest())
    assert ring.verify_hmac(TENANT, "hmac", b"data", tag, algorithm=alg)
    assert not ring.verify_hmac(TENANT, "hmac", b"datA", tag, algorithm=alg)
    out = ring.hmac_batch(TENANT, "hmac", [{"data": b"1", "algorithm": alg}, {"data": 1}])
    assert parse_tag(out[0])[1] == hmac.new(key, b"1", alg).digest()
    assert isinstance(out[1], InvalidRequest)
    ok = ring.verify_hmac_batch(TENANT, "hmac", [
        {"data": b"1", "tag": out[0], "algorithm": alg}, {"data": b"2", "tag": out[0],
                                                          "algorithm": alg}])
    assert ok == [True, False]


def test_hmac_refusals(ring: Transit) -> None:
    with pytest.raises(InvalidRequest):
        ring.hmac(TENANT, "hmac", b"d", algorithm="md5")
    with pytest.raises(InvalidRequest):
        ring.hmac(TENANT, "aes256-gcm96", b"d")  # HMAC keys only (documented)


@pytest.mark.parametrize("alg", ["sha256", "sha384", "sha512", "sha3-256", "blake2b"])
def test_digest(ring: Transit, alg: str) -> None:
    ref = hashlib.blake2b(b"abc").digest() if alg == "blake2b" else hashlib.new(
        alg.replace("-", "_"), b"abc").digest()
    assert ring.digest(alg, b"abc") == ref


def test_digest_and_random_limits(ring: Transit) -> None:
    with pytest.raises(InvalidRequest):
        ring.digest("md5", b"")
    assert len(ring.random(1)) == 1 and len(ring.random(1 << 20)) == 1 << 20
    assert ring.random(32) != ring.random(32)
    for n in (0, -1, (1 << 20) + 1, True):
        with pytest.raises(InvalidRequest):
            ring.random(n)


def test_arguments_of_the_wrong_type_are_invalid_requests(ring: Transit) -> None:
    t: Any = ring  # the wrong types on purpose
    calls: list[Callable[[], object]] = [
        lambda: t.encrypt(TENANT, "aes256-gcm96", b"x", aad="text"),
        lambda: t.encrypt(TENANT, "aes256-gcm96", "text"),
        lambda: t.decrypt(TENANT, "aes256-gcm96", ["list"]),
        lambda: t.sign(TENANT, "rsa-2048", b"x", hash=["sha256"]),
        lambda: t.sign(TENANT, "rsa-2048", b"x", padding=["pss"]),
        lambda: t.sign(TENANT, "ecdsa-p256", b"x", prehashed="yes"),
        lambda: t.verify(TENANT, "ecdsa-p256", b"x", "sig"),
        lambda: t.hmac(TENANT, "hmac", b"x", algorithm=["sha256"]),
        lambda: t.hmac(TENANT, "hmac", b"x", version="1"),
        lambda: t.digest(["sha256"], b"x"),
        lambda: t.digest("sha256", "text"),
        lambda: t.datakey(TENANT, "aes256-gcm96", bits="256"),
        lambda: t.export(TENANT, "aes256-gcm96", version=b"1"),
    ]
    for call in calls:
        with pytest.raises(InvalidRequest):
            call()
