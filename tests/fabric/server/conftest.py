"""Fixtures for the fabric server's tests: tokens, a service with keys, a running server."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # for ``from serverwire import ...``
    sys.path.insert(0, _HERE)

from serverwire import Running, Tokens, make_service, running  # noqa: E402

from cryptoplane.fabric.service import Service  # noqa: E402


@pytest.fixture
def tokens() -> Tokens:
    return Tokens()


@pytest.fixture
def service(tokens: Tokens) -> Iterator[Service]:
    svc = make_service(tokens)
    t = svc.transit
    t.create_key("acme", "aes", "aes256-gcm96")
    t.create_key("acme", "chacha", "chacha20-poly1305")
    t.create_key("acme", "mac", "hmac")
    t.create_key("acme", "rsa", "rsa-2048")
    t.create_key("acme", "ec", "ecdsa-p256")
    t.create_key("acme", "gone", "aes256-gcm96", deletion_allowed=True, exportable=True)
    t.create_key("other", "secret", "aes256-gcm96")
    yield svc
    svc.close()


@pytest.fixture
def server(service: Service) -> Iterator[Running]:
    with running(service, frame_timeout=1.0, handshake_timeout=2.0) as r:
        yield r


@pytest.fixture
def token(tokens: Tokens) -> str:
    return tokens.add("acme")
