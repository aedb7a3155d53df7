from __future__ import annotations

import pickle

import pytest

import cryptoplane as cp


@pytest.mark.parametrize("name,size", [("aes-256-gcm", 31), ("aes-128-gcm", 32),
                                       ("chacha20-poly1305", 16), ("aes-256-xts", 32),
                                       ("aes-128-xts", 16), ("aes-256-cbc", 0)])
def test_wrong_key_size_rejected(name: str, size: int) -> None:
    with pytest.raises(cp.KeyRejected, match="needs a key of"):
        cp.Key(name, bytes(range(size)))


def test_xts_equal_halves_rejected() -> None:
    half = bytes(range(32))
    with pytest.raises(cp.KeyRejected, match="halves are equal"):
        cp.Key("aes-256-xts", half + half)


def test_hash_takes_no_key() -> None:
    with pytest.raises(cp.KeyRejected):
        cp.Key("sha256", b"x" * 32)


def test_unknown_algorithm() -> None:
    with pytest.raises(cp.NotSupported):
        cp.Key("des-cbc", b"x" * 8)


def test_generate_sizes() -> None:
    assert cp.Key.generate("aes-256-gcm").size == 256
    assert cp.Key.generate("aes-128-xts").size == 256
    assert cp.Key.generate("aes-256-xts").size == 512
    assert cp.Key.generate("rsa-pss-sha256").size == 2048
    with pytest.raises(cp.KeyRejected):
        cp.Key.generate("rsa-pss-sha256", size=1024)


SECRET = bytes.fromhex("00112233445566778899aabbccddeeff" * 2)


def test_repr_str_never_show_material() -> None:
    key = cp.Key("aes-256-gcm", SECRET)
    for text in (repr(key), str(key), f"{key}", repr([key])):
        assert SECRET.hex() not in text
        assert SECRET.hex()[:8] not in text
        assert "aes-256-gcm" in text


def test_pickle_refused() -> None:
    key = cp.Key("aes-256-gcm", SECRET)
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(key)
    priv = cp.Key.generate("ed25519")
    with pytest.raises(TypeError):
        pickle.dumps(priv)


def test_errors_never_carry_material(plane: cp.Plane) -> None:
    key = cp.Key("aes-256-gcm", SECRET)
    with pytest.raises(cp.AuthenticationFailed) as exc:
        plane.decrypt(key, b"\0" * 40, nonce=b"\0" * 12)
    assert SECRET.hex() not in str(exc.value) and SECRET.hex() not in repr(exc.value)


@pytest.mark.parametrize("name", ["rsa-pss-sha256", "ecdsa-p256-sha256", "ecdsa-p384-sha384",
                                  "ed25519", "x25519", "rsa-oaep-sha256"])
def test_pem_der_round_trip(name: str) -> None:
    priv = cp.Key.generate(name)
    pub = priv.public_key()
    assert priv.is_private and not pub.is_private
    for exported, loader in ((priv.export_pem(), cp.Key.load_pem),
                             (priv.export_der(), cp.Key.load_der)):
        again = loader(name, exported)
        assert again.is_private
        assert again.public_key().export_der() == pub.export_der()
    assert cp.Key.load_pem(name, pub.export_pem()).export_der() == pub.export_der()
    enc = priv.export_pem(password=b"pw")
    assert b"ENCRYPTED" in enc
    assert cp.Key.load_pem(name, enc, password=b"pw").public_key().export_der() == \
        pub.export_der()
    with pytest.raises(cp.KeyRejected):
        cp.Key.load_pem(name, enc, password=b"wrong")


def test_raw_asymmetric() -> None:
    k = cp.Key.generate("ed25519")
    again = cp.Key("ed25519", k.export_raw())
    assert again.public_key().export_raw() == k.public_key().export_raw()
    with pytest.raises(cp.KeyRejected, match="32 bytes"):
        cp.Key("x25519", b"\1" * 31)
    with pytest.raises(cp.KeyRejected, match="no raw form"):
        cp.Key("rsa-pss-sha256", b"\1" * 256)


def test_wrong_kind_of_key_rejected() -> None:
    ec_pem = cp.Key.generate("ecdsa-p256-sha256").export_pem()
    with pytest.raises(cp.KeyRejected):
        cp.Key.load_pem("rsa-pss-sha256", ec_pem)
    with pytest.raises(cp.KeyRejected, match="secp384r1"):
        cp.Key.load_pem("ecdsa-p384-sha384", ec_pem)
    with pytest.raises(cp.KeyRejected):
        cp.Key.load_pem("ed25519", b"-----BEGIN GARBAGE-----\n")


def test_symmetric_keys_compare_by_material() -> None:
    assert cp.Key("aes-256-gcm", SECRET) == cp.Key("aes-256-gcm", SECRET)
    assert cp.Key("aes-256-gcm", SECRET) != cp.Key("aes-256-gcm", bytes(32))
