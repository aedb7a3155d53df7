from __future__ import annotations

import pytest

import cryptoplane as cp
from cryptoplane.algorithms import CATALOGUE, Kind, SizeRange, lookup

REQUIRED = [
    "aes-128-gcm", "aes-256-gcm", "chacha20-poly1305", "aes-128-ctr", "aes-256-ctr",
    "aes-128-cbc", "aes-256-cbc", "aes-128-xts", "aes-256-xts", "sha256", "sha512",
    "sha3-256", "blake2b", "hmac-sha256", "hmac-sha512", "rsa-pss-sha256",
    "rsa-pkcs1v15-sha256", "rsa-oaep-sha256", "ecdsa-p256-sha256", "ecdsa-p384-sha384",
    "ed25519", "x25519", "hkdf-sha256", "random",
]


@pytest.mark.parametrize("name", REQUIRED)
def test_catalogue_has(name: str) -> None:
    assert lookup(name).name == name


def test_unknown_name_suggests_close_match() -> None:
    with pytest.raises(cp.NotSupported, match="aes-256-gcm"):
        lookup("aes-256-gmc")


def test_lookup_accepts_underscores_and_case() -> None:
    assert lookup("AES_256_GCM") is CATALOGUE["aes-256-gcm"]


def test_size_range() -> None:
    r = SizeRange(8, 16, 4)
    assert 8 in r and 12 in r and 16 in r
    assert 10 not in r and 20 not in r and "x" not in r


def test_every_entry_declares_its_rules() -> None:
    for alg in CATALOGUE.values():
        assert alg.ops, alg.name
        if alg.kind in (Kind.AEAD, Kind.CIPHER):
            assert alg.nonce_sizes is not None and alg.key_sizes is not None, alg.name
        if alg.kind is Kind.AEAD:
            assert alg.tag_size == 16
