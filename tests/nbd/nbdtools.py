"""Helpers the NBD tests share (a module, not conftest: several test directories have a
conftest, and ``from conftest import`` would get whichever was imported first)."""

from __future__ import annotations

import shutil
from pathlib import Path

import support


def make_image(path: Path, size: int, *, seed: int = 1) -> bytes:
    """An image of pseudo-random bytes (so misplaced data shows)."""
    import random

    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data



def tool(name: str) -> str:
    """The path of program ``name``; fails under CI, skips elsewhere, when missing."""
    path = shutil.which(name)
    if path is None:
        support.unavailable(f"{name} is not installed")
    return path
