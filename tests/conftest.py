from __future__ import annotations

from collections.abc import Iterator

import pytest

import cryptoplane as cp


@pytest.fixture(scope="session")
def plane() -> Iterator[cp.Plane]:
    with cp.Plane() as p:
        yield p
