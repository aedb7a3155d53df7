"""Transit fixtures. RSA keys are slow to make (RSA-4096: a second or more), so the
wrapping key and one key of every type are made once per session (``ring``, tenant
"t1", all exportable) and tests that change keys make their own cheap ones."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization

import cryptoplane as cp
from cryptoplane.fabric.keytypes import KeyType
from cryptoplane.fabric.transit import MemoryKeySource, Transit
from cryptoplane.fabric.transit.material import new_wrapping_key

TENANT = "t1"
ALL_TYPES = list(KeyType)
AEAD_TYPES = [KeyType.AES256_GCM, KeyType.CHACHA20_POLY1305]
SIGNING_TYPES = [KeyType.RSA_2048, KeyType.RSA_3072, KeyType.RSA_4096,
                 KeyType.ECDSA_P256, KeyType.ECDSA_P384, KeyType.ED25519]


@pytest.fixture(scope="session")
def wrapping_der() -> bytes:
    return new_wrapping_key().private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())


@pytest.fixture(scope="session")
def ring(plane: cp.Plane, wrapping_der: bytes) -> Transit:
    """A transit with one exportable key per type, named by the type's value."""
    t = Transit(plane, MemoryKeySource(), wrapping_key=wrapping_der)
    for kt in ALL_TYPES:
        t.create_key(TENANT, kt.value, kt, exportable=True)
    return t


@pytest.fixture
def source() -> MemoryKeySource:
    return MemoryKeySource()


@pytest.fixture
def transit(plane: cp.Plane, source: MemoryKeySource, wrapping_der: bytes) -> Transit:
    return Transit(plane, source, wrapping_key=wrapping_der)
