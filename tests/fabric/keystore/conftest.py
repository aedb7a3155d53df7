"""Keystore fixtures: every store here is opened on ``keystore_url``, so each test runs
once on SQLite and once on PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cryptoplane.fabric.keystore import Keystore, MasterKey, open_keystore

Opener = Callable[..., Keystore]


@pytest.fixture
def master() -> MasterKey:
    return MasterKey.generate()


@pytest.fixture
def open_store(keystore_url: str, master: MasterKey) -> Iterator[Opener]:
    """Opens more store objects on the same database (other "servers"); all closed at
    the end."""
    opened: list[Keystore] = []

    def opener(**kwargs: Any) -> Keystore:
        kwargs.setdefault("master", master)
        s = open_keystore(keystore_url, **kwargs)
        opened.append(s)
        return s
    yield opener
    for s in opened:
        s.close()


@pytest.fixture
def store(open_store: Opener) -> Keystore:
    return open_store()
