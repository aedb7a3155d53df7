"""Keys over their life: create, rotate, min versions, trim, rewrap, data keys, derived
and convergent keys, BYOK import, export and delete rules, config, auditing."""

from __future__ import annotations

import os
import threading
import time

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from transitkit import TENANT

from cryptoplane.exceptions import AuthenticationFailed, InvalidRequest, KeyRejected
from cryptoplane.fabric.errors import (
    KeyExists,
    KeyNotFound,
    KeyVersionRejected,
    PolicyViolation,
)
from cryptoplane.fabric.keytypes import KeyType
from cryptoplane.fabric.transit import (
    MemoryKeySource,
    Transit,
    Use,
    ciphertext_version,
    derive,
    parse_ciphertext,
    parse_signature,
    wrap_for_import,
)

AES = "aes256-gcm96"


def test_create_read_list(transit: Transit) -> None:
    info = transit.create_key(TENANT, "k", AES)
    assert info["type"] == AES and info["latest_version"] == 1 and info["versions"] == [1]
    assert "public_keys" not in info
    assert transit.read_key(TENANT, "k") == info
    transit.create_key(TENANT, "e", "ed25519")
    assert transit.list_keys(TENANT) == ["e", "k"]
    with pytest.raises(KeyExists):
        transit.create_key(TENANT, "k", "hmac")
    with pytest.raises(InvalidRequest):
        transit.create_key(TENANT, "bad name", AES)
    with pytest.raises(InvalidRequest):
        transit.create_key(TENANT, "x", "des")
    with pytest.raises(PolicyViolation):
        transit.create_key(TENANT, "x", AES, convergent=True)  # needs derived
    with pytest.raises(PolicyViolation):
        transit.create_key(TENANT, "x", "ed25519", derived=True)


def test_read_key_never_shows_private_material(ring: Transit) -> None:
    for kt in KeyType:
        info = ring.read_key(TENANT, kt.value)
        text = repr(info)
        assert "PRIVATE" not in text
        mat = ring.export(TENANT, kt.value)["keys"][1]
        assert mat.hex() not in text and repr(mat) not in text
        if not kt.symmetric:
            assert info["public_keys"][1].startswith("-----BEGIN PUBLIC KEY-----")


def test_rotation_keeps_old_ciphertexts_and_signatures(transit: Transit) -> None:
    transit.create_key(TENANT, "k", AES)
    transit.create_key(TENANT, "s", "ecdsa-p256")
    old_ct = transit.encrypt(TENANT, "k", b"old")
    old_sig = transit.sign(TENANT, "s", b"m")
    assert transit.rotate(TENANT, "k")["latest_version"] == 2
    transit.rotate(TENANT, "s")
    new_ct = transit.encrypt(TENANT, "k", b"new")
    assert ciphertext_version(new_ct) == 2 and ciphertext_version(old_ct) == 1
    assert transit.decrypt(TENANT, "k", old_ct) == b"old"
    assert transit.decrypt(TENANT, "k", new_ct) == b"new"
    assert parse_signature(transit.sign(TENANT, "s", b"m"))[0] == 2
    assert transit.verify(TENANT, "s", b"m", old_sig)
    assert set(transit.read_key(TENANT, "s")["public_keys"]) == {1, 2}
    # explicit older version for encrypt, batch too
    assert ciphertext_version(transit.encrypt(TENANT, "k", b"x", version=1)) == 1
    out = transit.encrypt_batch(TENANT, "k", [{"plaintext": b"a"}, {"plaintext": b"b",
                                                                     "version": 1}])
    assert [ciphertext_version(o) for o in out] == [2, 1]
    with pytest.raises(KeyVersionRejected):
        transit.encrypt(TENANT, "k", b"x", version=3)
    with pytest.raises(KeyVersionRejected):
        transit.decrypt(TENANT, "k", b"\xc7\x00\x00\x00\x09" + bytes(28))


def test_min_decryption_and_encryption_versions(transit: Transit) -> None:
    transit.create_key(TENANT, "k", AES)
    transit.create_key(TENANT, "h", "hmac")
    v1 = transit.encrypt(TENANT, "k", b"v1")
    t1 = transit.hmac(TENANT, "h", b"d")
    for _ in range(2):
        transit.rotate(TENANT, "k")
    transit.rotate(TENANT, "h")
    transit.config(TENANT, "k", min_decryption_version=2)
    transit.config(TENANT, "h", min_decryption_version=2)
    with pytest.raises(KeyVersionRejected):
        transit.decrypt(TENANT, "k", v1)
    with pytest.raises(KeyVersionRejected):
        transit.verify_hmac(TENANT, "h", b"d", t1)
    (res,) = transit.decrypt_batch(TENANT, "k", [{"ciphertext": v1}])
    assert isinstance(res, KeyVersionRejected)
    # back down: it decrypts again (nothing was deleted)
    transit.config(TENANT, "k", min_decryption_version=1)
    assert transit.decrypt(TENANT, "k", v1) == b"v1"
    # min_encryption_version is a floor (Vault's meaning): latest stays the default
    transit.config(TENANT, "k", min_encryption_version=2)
    assert ciphertext_version(transit.encrypt(TENANT, "k", b"x")) == 3
    assert ciphertext_version(transit.encrypt(TENANT, "k", b"x", version=2)) == 2
    with pytest.raises(KeyVersionRejected):
        transit.encrypt(TENANT, "k", b"x", version=1)
    for bad in ({"min_decryption_version": 4}, {"min_decryption_version": 0},
                {"min_encryption_version": 4}, {"min_decryption_version": 3},
                {"min_encryption_version": "2"}, {"auto_rotate_period": -1.0}):
        with pytest.raises(InvalidRequest):
            transit.config(TENANT, "k", **bad)
    with pytest.raises(PolicyViolation):
        transit.config(TENANT, "k", derived=True)


def test_trim(transit: Transit) -> None:
    transit.create_key(TENANT, "k", AES, exportable=True)
    cts = [transit.encrypt(TENANT, "k", b"1")]
    for i in (2, 3):
        transit.rotate(TENANT, "k")
        cts.append(transit.encrypt(TENANT, "k", str(i).encode()))
    with pytest.raises(PolicyViolation):  # above min_decryption_version
        transit.trim(TENANT, "k", 2)
    transit.config(TENANT, "k", min_decryption_version=2)
    info = transit.trim(TENANT, "k", 2)
    assert info["versions"] == [2, 3] and info["min_available_version"] == 2
    assert set(transit.export(TENANT, "k")["keys"]) == {2, 3}
    with pytest.raises(KeyVersionRejected):
        transit.decrypt(TENANT, "k", cts[0])
    with pytest.raises(KeyVersionRejected):
        transit.export(TENANT, "k", 1)
    assert transit.decrypt(TENANT, "k", cts[1]) == b"2"
    with pytest.raises(InvalidRequest):  # min_decryption_version below the trimmed
        transit.config(TENANT, "k", min_decryption_version=1)
    with pytest.raises(InvalidRequest):
        transit.trim(TENANT, "k", 0)
    assert transit.trim(TENANT, "k", 1)["versions"] == [2, 3]  # already that far


def test_rewrap_moves_to_the_latest_version(transit: Transit) -> None:
    transit.create_key(TENANT, "k", "chacha20-poly1305")
    old = transit.encrypt(TENANT, "k", b"secret", aad=b"A")
    transit.rotate(TENANT, "k")
    new = transit.rewrap(TENANT, "k", old, aad=b"A")
    assert ciphertext_version(new) == 2
    assert transit.decrypt(TENANT, "k", new, aad=b"A") == b"secret"
    out = transit.rewrap_batch(TENANT, "k", [{"ciphertext": old, "aad": b"A"},
                                             {"ciphertext": old}])
    assert ciphertext_version(out[0]) == 2 and isinstance(out[1], AuthenticationFailed)
    assert parse_ciphertext(out[0])[1] != parse_ciphertext(new)[1]


def test_datakeys(transit: Transit) -> None:
    transit.create_key(TENANT, "k", AES)
    for bits in (128, 256, 512):
        pt, wrapped = transit.datakey(TENANT, "k", bits=bits)
        assert pt is not None and len(pt) == bits // 8
        assert transit.decrypt(TENANT, "k", wrapped) == pt
    none, wrapped = transit.datakey(TENANT, "k", plaintext=False)
    assert none is None and len(transit.decrypt(TENANT, "k", wrapped)) == 32
    with pytest.raises(InvalidRequest):
        transit.datakey(TENANT, "k", bits=100)


def test_derived_keys(transit: Transit) -> None:
    transit.create_key(TENANT, "d", AES, derived=True, exportable=True)
    a = transit.encrypt(TENANT, "d", b"p", context=b"user-a")
    assert transit.decrypt(TENANT, "d", a, context=b"user-a") == b"p"
    with pytest.raises(AuthenticationFailed):
        transit.decrypt(TENANT, "d", a, context=b"user-b")
    for call in (lambda: transit.encrypt(TENANT, "d", b"p"),
                 lambda: transit.decrypt(TENANT, "d", a),
                 lambda: transit.datakey(TENANT, "d")):
        with pytest.raises(PolicyViolation):
            call()
    assert ring_free_encrypt_differs(transit)
    # the documented derivation: HKDF-SHA256(material, info=context), first 32 bytes
    mat = transit.export(TENANT, "d")["keys"][1]
    key = HKDF(hashes.SHA256(), 32, None, b"user-a").derive(mat)
    assert derive(mat, b"user-a")[0] == key
    _, nonce, sealed = parse_ciphertext(a)
    assert AESGCM(key).decrypt(nonce, bytes(sealed), b"") == b"p"
    pt, wrapped = transit.datakey(TENANT, "d", context=b"c")
    assert transit.decrypt(TENANT, "d", wrapped, context=b"c") == pt
    # a context on a key that is not derived is refused, not silently ignored
    transit.create_key(TENANT, "plain", AES)
    with pytest.raises(InvalidRequest):
        transit.encrypt(TENANT, "plain", b"p", context=b"c")


def ring_free_encrypt_differs(transit: Transit) -> bool:
    """Derived but not convergent: random nonces, so equal inputs differ."""
    return (transit.encrypt(TENANT, "d", b"p", context=b"c")
            != transit.encrypt(TENANT, "d", b"p", context=b"c"))


@pytest.mark.parametrize("kt", ["aes256-gcm96", "chacha20-poly1305"])
def test_convergent_encryption(transit: Transit, kt: str) -> None:
    transit.create_key(TENANT, "c", kt, derived=True, convergent=True)
    a1 = transit.encrypt(TENANT, "c", b"same", context=b"ctx")
    assert a1 == transit.encrypt(TENANT, "c", b"same", context=b"ctx")
    assert a1 != transit.encrypt(TENANT, "c", b"same", context=b"other")
    assert a1 != transit.encrypt(TENANT, "c", b"diff", context=b"ctx")
    with_aad = transit.encrypt(TENANT, "c", b"same", context=b"ctx", aad=b"A")
    assert parse_ciphertext(with_aad)[1] != parse_ciphertext(a1)[1]  # aad moves the nonce
    assert transit.decrypt(TENANT, "c", with_aad, context=b"ctx", aad=b"A") == b"same"
    out = transit.encrypt_batch(TENANT, "c", [{"plaintext": b"same", "context": b"ctx"},
                                              {"plaintext": b"same"}])
    assert out[0] == a1 and isinstance(out[1], PolicyViolation)
    with pytest.raises(PolicyViolation):
        transit.encrypt(TENANT, "c", b"x", context=b"ctx", nonce=bytes(12))
    transit.rotate(TENANT, "c")
    assert transit.encrypt(TENANT, "c", b"same", context=b"ctx") != a1
    assert transit.decrypt(TENANT, "c", a1, context=b"ctx") == b"same"


def _material_for(kt: KeyType) -> bytes:
    obj: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    if kt.symmetric:
        return os.urandom(32)
    if kt is KeyType.RSA_2048:
        obj = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif kt is KeyType.ECDSA_P384:
        obj = ec.generate_private_key(ec.SECP384R1())
    elif kt is KeyType.ECDSA_P256:
        obj = ec.generate_private_key(ec.SECP256R1())
    else:
        obj = ed25519.Ed25519PrivateKey.generate()
    return obj.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.mark.parametrize("kt", [KeyType.AES256_GCM, KeyType.CHACHA20_POLY1305, KeyType.HMAC,
                                KeyType.RSA_2048, KeyType.ECDSA_P256, KeyType.ECDSA_P384,
                                KeyType.ED25519])
def test_byok_import_round_trip(transit: Transit, kt: KeyType) -> None:
    mat = _material_for(kt)
    pem = transit.wrapping_key(TENANT)
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    info = transit.import_key(TENANT, "imp", kt, wrap_for_import(pem, mat), exportable=True)
    assert info["type"] == kt.value
    assert transit.export(TENANT, "imp")["keys"][1] == mat
    if kt.aead:
        blob = transit.encrypt(TENANT, "imp", b"p")
        _, n, sealed = parse_ciphertext(blob)
        cls = AESGCM if kt is KeyType.AES256_GCM else ChaCha20Poly1305
        assert cls(mat).decrypt(n, bytes(sealed), b"") == b"p"
    elif not kt.symmetric:
        sig = transit.sign(TENANT, "imp", b"m")
        assert transit.verify(TENANT, "imp", b"m", sig)
        priv = serialization.load_der_private_key(mat, None)
        assert transit.public_key(TENANT, "imp") == priv.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_byok_refusals(transit: Transit) -> None:
    pem = transit.wrapping_key(TENANT)
    with pytest.raises(KeyRejected):  # wrong size for the type
        transit.import_key(TENANT, "a", AES, wrap_for_import(pem, os.urandom(16)))
    with pytest.raises(KeyRejected):  # a P-256 key imported as P-384
        transit.import_key(TENANT, "a", "ecdsa-p384",
                           wrap_for_import(pem, _material_for(KeyType.ECDSA_P256)))
    with pytest.raises(KeyRejected):
        transit.import_key(TENANT, "a", "rsa-2048", wrap_for_import(pem, b"not der" * 9))
    good = wrap_for_import(pem, os.urandom(32))
    for blob in (good[:-1], good[:100], bytes(len(good)), good[:512] + bytes(40)):
        with pytest.raises(InvalidRequest):
            transit.import_key(TENANT, "a", AES, blob)
    with pytest.raises(InvalidRequest):
        transit.import_key(TENANT, "a", AES, good, colour="blue")
    transit.import_key(TENANT, "a", AES, good)
    with pytest.raises(KeyExists):
        transit.import_key(TENANT, "a", AES, good)


def test_export_only_when_exportable(transit: Transit) -> None:
    transit.create_key(TENANT, "k", "hmac")
    with pytest.raises(PolicyViolation):
        transit.export(TENANT, "k")
    transit.config(TENANT, "k", exportable=True)  # off -> on is allowed
    transit.rotate(TENANT, "k")
    assert set(transit.export(TENANT, "k")["keys"]) == {1, 2}
    assert set(transit.export(TENANT, "k", "latest")["keys"]) == {2}
    assert set(transit.export(TENANT, "k", 1)["keys"]) == {1}
    with pytest.raises(PolicyViolation):
        transit.config(TENANT, "k", exportable=False)  # never back


def test_delete_only_when_allowed(transit: Transit) -> None:
    transit.create_key(TENANT, "k", AES)
    transit.encrypt(TENANT, "k", b"warm the cache")
    with pytest.raises(PolicyViolation):
        transit.delete(TENANT, "k")
    transit.config(TENANT, "k", deletion_allowed=True)
    transit.delete(TENANT, "k")
    with pytest.raises(KeyNotFound):
        transit.encrypt(TENANT, "k", b"x")
    assert transit.list_keys(TENANT) == []


def test_every_data_operation_is_audited(transit: Transit, source: MemoryKeySource) -> None:
    transit.create_key(TENANT, "k", AES)
    transit.create_key(TENANT, "h", "hmac")
    transit.create_key(TENANT, "s", "ed25519")
    source.uses.clear()
    ct = transit.encrypt(TENANT, "k", b"12345")
    transit.decrypt(TENANT, "k", ct)
    transit.rewrap(TENANT, "k", ct)
    transit.datakey(TENANT, "k")
    transit.encrypt_batch(TENANT, "k", [{"plaintext": b"ab"}, {"plaintext": b"abc"}])
    transit.hmac(TENANT, "h", b"d")
    sig = transit.sign(TENANT, "s", b"dd")
    transit.verify(TENANT, "s", b"dd", sig)
    assert list(source.uses) == [
        Use(TENANT, "k", 1, "encrypt", 5, ""), Use(TENANT, "k", 1, "decrypt", 5, ""),
        Use(TENANT, "k", 1, "rewrap", 5, ""), Use(TENANT, "k", 1, "datakey", 32, ""),
        Use(TENANT, "k", 1, "encrypt", 2, ""), Use(TENANT, "k", 1, "encrypt", 3, ""),
        Use(TENANT, "h", 1, "hmac", 1, ""), Use(TENANT, "s", 1, "sign", 2, ""),
        Use(TENANT, "s", 1, "verify", 2, "")]


def test_the_cache_follows_the_source(transit: Transit, source: MemoryKeySource) -> None:
    """Another server rotating the key through the shared source: this transit sees the
    new record (a new object) at once; ``forget`` drops cached keys."""
    transit.create_key(TENANT, "k", AES)
    transit.encrypt(TENANT, "k", b"x")
    source.rotate_key(TENANT, "k", os.urandom(32))
    assert ciphertext_version(transit.encrypt(TENANT, "k", b"x")) == 2
    transit.forget(TENANT, "k")
    transit.forget(TENANT)
    assert ciphertext_version(transit.encrypt(TENANT, "k", b"x")) == 2


def test_auto_rotation(plane: object, wrapping_der: bytes) -> None:
    now = [1000.0]
    src = MemoryKeySource(clock=lambda: now[0])
    t = Transit(plane, src, wrapping_key=wrapping_der)  # type: ignore[arg-type]
    t.create_key(TENANT, "k", AES, auto_rotate_period=60.0)
    t.create_key(TENANT, "never", AES)
    assert t.rotate_due(TENANT, now[0] + 59) == []
    now[0] += 60
    assert t.rotate_due(TENANT, now[0]) == ["k"]
    assert t.read_key(TENANT, "k")["latest_version"] == 2
    assert t.rotate_due(TENANT, now[0] + 1) == []


def test_principal_reaches_the_audit(transit: Transit, source: MemoryKeySource) -> None:
    transit.create_key(TENANT, "k", AES, exportable=True)
    source.uses.clear()
    ct = transit.encrypt(TENANT, "k", b"x", principal="alice")
    transit.decrypt_batch(TENANT, "k", [{"ciphertext": ct}], principal="bob")
    transit.rewrap_batch(TENANT, "k", [{"ciphertext": ct}], principal="carol")
    transit.export(TENANT, "k", principal="dave")
    assert [(u.op, u.principal) for u in source.uses] == [
        ("encrypt", "alice"), ("decrypt", "bob"), ("rewrap", "carol"), ("export", "dave")]


def test_flags_and_versions_are_typed(transit: Transit) -> None:
    for bad in ({"exportable": "false"}, {"derived": 1}, {"auto_rotate_period": -5.0},
                {"auto_rotate_period": "1h"}):
        with pytest.raises(InvalidRequest):
            transit.create_key(TENANT, "k", AES, **bad)
    transit.create_key(TENANT, "k", AES)
    for change in ({"deletion_allowed": "yes"}, {"exportable": 1},
                   {"min_decryption_version": True}, {"auto_rotate_period": None}):
        with pytest.raises(InvalidRequest):
            transit.config(TENANT, "k", **change)
    with pytest.raises(InvalidRequest):
        transit.encrypt(TENANT, "k", b"x", version=False)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest):
        transit.encrypt(TENANT, "k", b"x", version="2")  # type: ignore[arg-type]
    assert ciphertext_version(transit.encrypt(TENANT, "k", b"x", version=0)) == 1


def test_a_key_deleted_elsewhere_leaves_the_cache(transit: Transit,
                                                   source: MemoryKeySource) -> None:
    transit.create_key(TENANT, "k", AES, deletion_allowed=True)
    transit.encrypt(TENANT, "k", b"x")
    source.delete_key(TENANT, "k")  # another server, same keystore
    with pytest.raises(KeyNotFound):
        transit.encrypt(TENANT, "k", b"x")
    transit.create_key(TENANT, "k", AES, exportable=True)  # same name, new material
    blob = transit.encrypt(TENANT, "k", b"new")
    _, n, sealed = parse_ciphertext(blob)
    mat = transit.export(TENANT, "k")["keys"][1]
    assert AESGCM(mat).decrypt(n, bytes(sealed), b"") == b"new"
    # deleted and made again elsewhere, unseen here: the new record's material is used
    transit.config(TENANT, "k", deletion_allowed=True)
    policy = source.get_key(TENANT, "k").policy
    source.delete_key(TENANT, "k")
    source.create_key(TENANT, "k", policy, os.urandom(32))
    blob = transit.encrypt(TENANT, "k", b"newer")
    _, n, sealed = parse_ciphertext(blob)
    mat = transit.export(TENANT, "k")["keys"][1]
    assert AESGCM(mat).decrypt(n, bytes(sealed), b"") == b"newer"


def test_rotation_under_concurrent_use(transit: Transit) -> None:
    """Threads encrypting (single, batch, derived) while another rotates: every
    ciphertext decrypts, and names a version that existed when it was made."""
    transit.create_key(TENANT, "k", AES)
    transit.create_key(TENANT, "d", AES, derived=True, convergent=True)
    made: list[tuple[str, bytes, bytes | None]] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            n = 0
            while not stop.is_set():
                n += 1
                pt = f"{i}-{n}".encode()
                made.append(("k", transit.encrypt(TENANT, "k", pt), None))
                ctx = f"c{n % 300}".encode()  # more contexts than the LRU holds
                made.append(("d", transit.encrypt(TENANT, "d", pt, context=ctx), ctx))
                for blob in transit.encrypt_batch(TENANT, "k", [{"plaintext": pt}] * 3):
                    made.append(("k", blob, None))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for th in threads:
        th.start()
    for _ in range(10):
        seen = len(made)
        deadline = time.monotonic() + 10
        while len(made) < seen + 10 and time.monotonic() < deadline:
            time.sleep(0.001)  # let the workers use this version before the next
        transit.rotate(TENANT, "k")
        transit.rotate(TENANT, "d")
    stop.set()
    for th in threads:
        th.join()
    assert not errors
    assert len(made) >= 50
    assert len({ciphertext_version(b) for n, b, _ in made if n == "k"}) >= 3
    for name, blob, ctx in made:
        transit.decrypt(TENANT, name, blob, context=ctx)
    assert ciphertext_version(transit.encrypt(TENANT, "k", b"x")) == 11


def test_import_version(transit: Transit) -> None:
    transit.create_key(TENANT, "k", "chacha20-poly1305", exportable=True)
    old = transit.encrypt(TENANT, "k", b"old")
    pem = transit.wrapping_key(TENANT)
    mat = os.urandom(32)
    assert transit.import_version(TENANT, "k", wrap_for_import(pem, mat))["versions"] == [1, 2]
    assert transit.export(TENANT, "k", 2)["keys"][2] == mat
    _, n, sealed = parse_ciphertext(transit.encrypt(TENANT, "k", b"new"))
    assert ChaCha20Poly1305(mat).decrypt(n, bytes(sealed), b"") == b"new"
    assert transit.decrypt(TENANT, "k", old) == b"old"
    with pytest.raises(KeyRejected):  # an ed25519 key is no chacha20 key
        transit.import_version(TENANT, "k", wrap_for_import(
            pem, _material_for(KeyType.ED25519)))
    with pytest.raises(KeyNotFound):
        transit.import_version("t2", "k", wrap_for_import(pem, mat))
