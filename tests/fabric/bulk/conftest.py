"""Fixtures for the bulk stream tests: ``keys``, fake transit data keys (``bulkfakes``)
holding keys ``files`` and ``other`` for tenant ``acme`` and ``files`` for ``globex``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # for ``from bulkfakes import ...`` in the tests
    sys.path.insert(0, _HERE)

from bulkfakes import FakeKeys  # noqa: E402


@pytest.fixture
def keys() -> FakeKeys:
    k = FakeKeys()
    k.create("acme", "files")
    k.create("acme", "other")
    k.create("globex", "files")
    return k
