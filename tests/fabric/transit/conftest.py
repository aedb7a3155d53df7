"""Transit fixtures. RSA keys are slow to make (RSA-4096: a second or more), so the
wrapping key and one key of every type are made once per session (``ring``, tenant
"t1", all exportable) and tests that change keys make their own cheap ones."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from transitkit import ALL_TYPES, TENANT

import cryptoplane as cp
from cryptoplane.fabric.transit import MemoryKeySource, Transit
from cryptoplane.fabric.transit.material import new_wrapping_key


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
