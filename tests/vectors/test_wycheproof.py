"""Wycheproof, read unmodified from ``../shared/vectors/wycheproof``: one case per file.
Valid vectors give exactly the expected output, invalid ones end in a typed error,
acceptable ones either (never a foreign exception)."""

from __future__ import annotations

import kat
import pytest

import cryptoplane as cp


@pytest.mark.parametrize("name", list(kat.WYCHEPROOF_FILES))
def test_wycheproof_file(plane: cp.Plane, name: str) -> None:
    t = kat.check_wycheproof(plane, name)
    assert t.ok, kat.failure_report(t)
    assert t.valid > 0, f"{name}: no vector was expressible through the API"
