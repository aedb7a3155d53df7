from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # for ``import nbdclient``
    sys.path.insert(0, _HERE)


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A short directory for Unix sockets (tmp_path can exceed the 108-byte limit)."""
    d = tempfile.mkdtemp(prefix="cpnbd-", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


from nbdtools import make_image  # noqa: E402


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    p = tmp_path / "disk.img"
    return p, make_image(p, 16 << 20)
