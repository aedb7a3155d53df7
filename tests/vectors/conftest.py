"""Known-answer vectors (NIST CAVP, IEEE 1619, Wycheproof) through the plane API.

The helpers (``loaders``, ``kat``) are plain modules beside the tests, shared with
``scripts/vector_report.py``; this directory is put on ``sys.path`` so they import the
same way under any pytest import mode.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import cryptoplane as cp

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture(scope="module")
def plane() -> Iterator[cp.Plane]:
    with cp.Plane() as p:
        yield p
