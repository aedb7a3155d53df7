from __future__ import annotations

import asyncio
import os
from concurrent.futures import Future
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import cryptoplane as cp
from cryptoplane.engines import InlineEngine
from cryptoplane.requests import Request

NONCE = bytes(range(12))


@pytest.mark.parametrize("name", ["aes-128-gcm", "aes-192-gcm", "aes-256-gcm",
                                  "chacha20-poly1305"])
def test_aead_round_trip_and_layout(plane: cp.Plane, name: str) -> None:
    key = cp.Key.generate(name)
    data = os.urandom(1000)
    ct = plane.encrypt(key, data, nonce=NONCE, aad=b"hdr")
    assert len(ct) == len(data) + 16
    assert plane.decrypt(key, ct, nonce=NONCE, aad=b"hdr") == data
    if name.startswith("aes"):
        assert ct == AESGCM(key.export_raw()).encrypt(NONCE, data, b"hdr")


@pytest.mark.parametrize("name", ["aes-128-ctr", "aes-256-ctr"])
def test_ctr(plane: cp.Plane, name: str) -> None:
    key = cp.Key.generate(name)
    iv = os.urandom(16)
    data = os.urandom(777)
    ct = plane.encrypt(key, data, nonce=iv)
    enc = Cipher(algorithms.AES(key.export_raw()), modes.CTR(iv)).encryptor()
    assert ct == enc.update(data) + enc.finalize()
    assert plane.decrypt(key, ct, nonce=iv) == data
    with pytest.raises(cp.InvalidRequest, match="initial counter block of 16"):
        plane.encrypt(key, data, nonce=iv[:12])


def test_cbc_padding_is_explicit(plane: cp.Plane) -> None:
    key = cp.Key.generate("aes-256-cbc")
    iv = os.urandom(16)
    with pytest.raises(cp.InvalidRequest, match="padding=True"):
        plane.encrypt(key, b"not a block multiple", nonce=iv)
    ct = plane.encrypt(key, b"not a block multiple", nonce=iv, padding=True)
    assert len(ct) == 32
    assert plane.decrypt(key, ct, nonce=iv, padding=True) == b"not a block multiple"
    raw = plane.decrypt(key, ct, nonce=iv)  # without padding: the padded block comes back
    assert raw.endswith(bytes([12]) * 12)
    with pytest.raises(cp.InvalidRequest, match="padding does not apply"):
        plane.encrypt(cp.Key.generate("aes-256-gcm"), b"x", nonce=NONCE, padding=True)


def test_xts_single_unit(plane: cp.Plane) -> None:
    key = cp.Key.generate("aes-256-xts")
    tweak = os.urandom(16)
    data = os.urandom(100)  # ciphertext stealing: not a block multiple
    ct = plane.encrypt(key, data, nonce=tweak)
    assert plane.decrypt(key, ct, nonce=tweak) == data
    with pytest.raises(cp.InvalidRequest):
        plane.encrypt(key, b"short", nonce=tweak)


def test_encrypt_sectors_matches_per_sector_xts(plane: cp.Plane) -> None:
    key = cp.Key.generate("aes-256-xts")
    data = os.urandom(8 * 4096)
    out = plane.encrypt_sectors(key, data, sector=5, sector_size=4096)
    for i in range(8):
        tweak = (5 + i).to_bytes(16, "little")
        enc = Cipher(algorithms.AES(key.export_raw()), modes.XTS(tweak)).encryptor()
        assert out[i * 4096:(i + 1) * 4096] == enc.update(data[i * 4096:(i + 1) * 4096])
    assert plane.decrypt_sectors(key, out, sector=5, sector_size=4096) == data
    buf = bytearray(data)
    plane.encrypt_sectors(key, buf, sector=5, out=buf)
    assert bytes(buf) == out


@pytest.mark.parametrize("kwargs,match", [
    ({"sector_size": 1000}, "sector_size must be one of"),
    ({"sector": -1}, "sector must be"),
    ({"tweak": "essiv"}, "tweak layout"),
])
def test_sector_arguments_checked(plane: cp.Plane, kwargs: dict[str, Any], match: str) -> None:
    key = cp.Key.generate("aes-128-xts")
    with pytest.raises(cp.InvalidRequest, match=match):
        plane.encrypt_sectors(key, bytes(4096), **kwargs)


def test_odd_sector_run_rejected(plane: cp.Plane) -> None:
    key = cp.Key.generate("aes-128-xts")
    with pytest.raises(cp.InvalidRequest, match="non-zero multiple of 512"):
        plane.encrypt_sectors(key, bytes(1000), sector_size=512)
    with pytest.raises(cp.InvalidRequest):
        plane.encrypt_sectors(key, b"", sector_size=512)


@pytest.mark.parametrize("name", ["rsa-pss-sha256", "rsa-pkcs1v15-sha256",
                                  "ecdsa-p256-sha256", "ecdsa-p384-sha384", "ed25519"])
def test_sign_verify(plane: cp.Plane, name: str) -> None:
    priv = cp.Key.generate(name)
    sig = plane.sign(priv, b"message")
    plane.verify(priv.public_key(), b"message", sig)
    plane.verify(priv, b"message", sig)  # the private key verifies too
    with pytest.raises(cp.InvalidSignature):
        plane.verify(priv.public_key(), b"messagf", sig)
    with pytest.raises(cp.KeyRejected, match="private key"):
        plane.sign(priv.public_key(), b"message")


def test_oaep(plane: cp.Plane) -> None:
    priv = cp.Key.generate("rsa-oaep-sha256")
    ct = plane.encrypt(priv.public_key(), b"wrapped key", aad=b"label")
    assert plane.decrypt(priv, ct, aad=b"label") == b"wrapped key"
    with pytest.raises(cp.AuthenticationFailed):
        plane.decrypt(priv, ct, aad=b"other label")
    with pytest.raises(cp.InvalidRequest, match="at most 190 bytes"):
        plane.encrypt(priv.public_key(), bytes(191))


def test_digest_mac_hkdf_x25519_random(plane: cp.Plane) -> None:
    h = hashes.Hash(hashes.SHA256())
    h.update(b"abc")
    assert plane.digest("sha256", b"abc") == h.finalize()
    assert len(plane.digest("blake2b", b"abc")) == 64
    with pytest.raises(cp.InvalidRequest, match="not a hash"):
        plane.digest("aes-256-gcm", b"abc")
    mk = cp.Key.generate("hmac-sha256")
    m = hmac.HMAC(mk.export_raw(), hashes.SHA256())
    m.update(b"data")
    tag = m.finalize()
    assert plane.mac(mk, b"data") == tag
    plane.verify_mac(mk, b"data", tag)
    plane.verify_mac(mk, b"data", tag[:16])
    with pytest.raises(cp.AuthenticationFailed):
        plane.verify_mac(mk, b"datA", tag)
    with pytest.raises(cp.InvalidRequest):
        plane.verify_mac(mk, b"data", tag[:4])  # too short to mean anything
    okm = plane.derive(cp.Key("hkdf-sha256", b"ikm" * 8), length=42, salt=b"s", info=b"i")
    assert len(okm) == 42
    a, b = cp.Key.generate("x25519"), cp.Key.generate("x25519")
    assert plane.derive(a, b.public_key()) == plane.derive(b, a.public_key().export_raw())
    with pytest.raises(cp.KeyRejected, match="low order"):
        plane.derive(a, bytes(32))
    r1, r2 = plane.random(32), plane.random(32)
    assert len(r1) == 32 and r1 != r2
    with pytest.raises(cp.InvalidRequest):
        plane.random(-1)


def test_wrong_operation_for_key(plane: cp.Plane) -> None:
    with pytest.raises(cp.NotSupported, match="does not offer sign"):
        plane.sign(cp.Key.generate("aes-256-gcm"), b"x")
    with pytest.raises(cp.InvalidRequest, match="does not offer"):
        cp.Sign(cp.Key.generate("aes-256-gcm"), b"x")
    with pytest.raises(cp.InvalidRequest, match="needs a cryptoplane Key"):
        cp.Encrypt(b"raw key bytes", b"x", nonce=NONCE)  # type: ignore[arg-type]


def test_nonce_rules_before_any_engine() -> None:
    key = cp.Key.generate("chacha20-poly1305")
    with pytest.raises(cp.InvalidRequest, match="nonce of 12 bytes, got 8"):
        cp.Encrypt(key, b"x", nonce=bytes(8))
    with pytest.raises(cp.InvalidRequest, match="got none"):
        cp.Encrypt(key, b"x")


def test_submit_arun_map(plane: cp.Plane) -> None:
    key = cp.Key.generate("aes-256-gcm")
    signer = cp.Key.generate("ecdsa-p256-sha256")
    fut = plane.submit(cp.Encrypt(key, b"data", nonce=NONCE))
    assert isinstance(fut, Future)
    ct = fut.result(timeout=10)
    assert plane.decrypt(key, ct, nonce=NONCE) == b"data"
    sig = asyncio.run(plane.arun(cp.Sign(signer, b"m")))
    plane.verify(signer, b"m", sig)
    big = os.urandom(1 << 20)  # above the fast-path limit: goes to the threads engine
    reqs: list[Request] = [cp.Encrypt(key, bytes([i]) * 100, nonce=NONCE) for i in range(20)]
    reqs += [cp.Sign(signer, b"m%d" % i) for i in range(5)]
    reqs.append(cp.Encrypt(key, big, nonce=NONCE))
    results = plane.map(reqs)
    assert len(results) == len(reqs)
    for i in range(20):
        assert results[i] == plane.encrypt(key, bytes([i]) * 100, nonce=NONCE)
    for i in range(5):
        plane.verify(signer, b"m%d" % i, results[20 + i])
    assert results[-1] == AESGCM(key.export_raw()).encrypt(NONCE, big, None)


def test_map_errors_in_place(plane: cp.Plane) -> None:
    key = cp.Key.generate("aes-256-gcm")
    good = plane.encrypt(key, b"ok", nonce=NONCE)
    reqs = [cp.Decrypt(key, good, nonce=NONCE), cp.Decrypt(key, b"\0" * 20, nonce=NONCE)]
    out = plane.map(reqs, return_exceptions=True)
    assert out[0] == b"ok" and isinstance(out[1], cp.AuthenticationFailed)
    with pytest.raises(cp.AuthenticationFailed):
        plane.map(reqs)


def test_submit_error_is_typed(plane: cp.Plane) -> None:
    signer = cp.Key.generate("ed25519")
    fut = plane.submit(cp.Verify(signer.public_key(), b"m", b"\0" * 64))
    with pytest.raises(cp.InvalidSignature):
        fut.result(timeout=10)


def test_session_bound_to_threads_engine() -> None:
    with cp.Plane() as plane:
        key = cp.Key.generate("aes-256-gcm")
        s = plane.session(key, engine="threads", priority="high")
        assert s.fast_plane is None and "threads" in repr(s)
        ct = plane.encrypt(key, b"data", nonce=NONCE)
        assert plane.decrypt(key, ct, nonce=NONCE) == b"data"
        st = plane.stats()
        assert st["engines"]["threads"]["requests"] == 2
        assert st["engines"]["inline"]["requests"] == 0
        with pytest.raises(cp.NotSupported, match="no engine named"):
            plane.session(key, engine="gpu")
        with pytest.raises(cp.InvalidRequest, match="priority"):
            plane.session(key, priority="urgent")


def test_stats_count_fast_path_and_errors() -> None:
    with cp.Plane(engines=["inline"]) as plane:
        key = cp.Key.generate("aes-128-gcm")
        for _ in range(10):
            ct = plane.encrypt(key, b"x" * 100, nonce=NONCE)
        with pytest.raises(cp.AuthenticationFailed):
            plane.decrypt(key, ct[:-1] + bytes([ct[-1] ^ 1]), nonce=NONCE)
        st = plane.stats()
        enc = st["algorithms"]["aes-128-gcm"]["encrypt"]
        assert enc["requests"] == 10 and enc["bytes"] == 1000
        assert st["algorithms"]["aes-128-gcm"]["decrypt"]["errors"] == {
            "AuthenticationFailed": 1}
        assert st["sector_kernel"]["backend"] in ("native", "python")
        del key  # a dead session's counts stay in the plane's stats
        import gc

        gc.collect()
        assert plane.stats()["algorithms"]["aes-128-gcm"]["encrypt"]["requests"] == 10


def test_stats_have_no_material() -> None:
    secret = bytes(range(32))
    with cp.Plane(engines=["inline"]) as plane:
        key = cp.Key("aes-256-gcm", secret)
        plane.encrypt(key, b"x", nonce=NONCE)
        assert secret.hex() not in repr(plane.stats())


class CorruptGcmEngine(InlineEngine):
    """An engine whose AES-256-GCM path gives wrong bytes: its self-test must catch it."""

    name = "corrupt"

    def run_one(self, request: Request) -> Any:
        out = super().run_one(request)
        if request.algorithm.name == "aes-256-gcm" and isinstance(out, bytes) and out:
            return bytes([out[0] ^ 1]) + out[1:]
        return out


def test_self_test_withdraws_failing_algorithm() -> None:
    engine = CorruptGcmEngine()
    with cp.Plane(engines=[engine]) as plane:
        assert engine.health.value == "degraded"
        result = engine.self_tests["aes-256-gcm"]
        assert not result.passed and "known answer" in result.detail
        assert "aes-256-gcm" not in engine.capabilities
        assert engine.self_tests["aes-128-gcm"].passed
        with pytest.raises(cp.NotSupported, match="no engine"):
            plane.run(cp.Encrypt(cp.Key.generate("aes-256-gcm"), b"x", nonce=NONCE))


def test_unknown_engine() -> None:
    with pytest.raises(cp.NotSupported, match="unknown engine"):
        cp.Plane(engines=["gpu"])


def test_closed_plane_refuses_queued_work() -> None:
    plane = cp.Plane()
    plane.close()
    with pytest.raises(cp.InvalidRequest, match="closed"):
        plane.submit(cp.Sign(cp.Key.generate("ed25519"), b"m"))
