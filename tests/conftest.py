from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import cryptoplane as cp

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # for ``import support`` from any test module
    sys.path.insert(0, _HERE)


@pytest.fixture(scope="session")
def plane() -> Iterator[cp.Plane]:
    with cp.Plane() as p:
        yield p
