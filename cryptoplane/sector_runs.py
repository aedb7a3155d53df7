"""Sector batches where the plane's fast path does not serve the key (it is bound to
another engine): one ``decrypt_sectors``/``encrypt_sectors`` per item, with what the
native batch promises kept: every item checked before any runs, writes in item order,
and a failed ``pwrite`` reported as that item's errno. On the fast path the kernel does
all of this in one call (``Plane.decrypt_sectors_gather``)."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Any

from .exceptions import InvalidRequest

_U64 = (1 << 64) - 1
_I64 = (1 << 63) - 1  # the largest file offset


def gather_per_item(plane: Any, key: Any, src: Any, items: Sequence[tuple[int, int, Any]],
                    sector_size: int, tweak: str, tweak_unit: int | None) -> None:
    data = _byte_view(src, "src")
    runs = _checked_runs(items, sector_size, len(data), gather=True)
    for (offset, first, out), n in zip(items, runs, strict=True):
        plane.decrypt_sectors(key, data[offset:offset + n], sector=first,
                              sector_size=sector_size, out=out, tweak=tweak,
                              tweak_unit=tweak_unit)


def scatter_per_item(plane: Any, key: Any, fd: int, items: Sequence[tuple[int, int, Any]],
                     scratch: Any, sector_size: int, tweak: str,
                     tweak_unit: int | None) -> tuple[int, int]:
    buf = _byte_view(scratch, "scratch")
    runs = _checked_runs(items, sector_size, len(buf), gather=False)
    for done, ((offset, first, data), n) in enumerate(zip(items, runs, strict=True)):
        plane.encrypt_sectors(key, data, sector=first, sector_size=sector_size,
                              out=buf[:n], tweak=tweak, tweak_unit=tweak_unit)
        err = _pwrite_all(fd, buf[:n], offset)
        if err:
            return done, err
    return len(items), 0


def _checked_runs(items: Sequence[tuple[int, int, Any]], sector_size: int, room: int, *,
                  gather: bool) -> list[int]:
    """Each item's length, all checked before any runs: whole sectors from a sector in
    0..2**64-1, inside the source's ``room`` bytes (gather) or the scratch buffer's and
    the file's offsets (scatter)."""
    runs = []
    for i, item in enumerate(items):
        try:
            off, first, b = item
            n = memoryview(b).nbytes
            whole = n and not n % sector_size and 0 <= first <= _U64
            inside = 0 <= off <= room - n if gather else n <= room and 0 <= off <= _I64
        except (TypeError, ValueError):
            raise InvalidRequest(f"item {i} is not (offset, first sector, buffer)") from None
        if not whole:
            raise InvalidRequest(f"item {i}: {n} bytes from sector {first!r} is not a run "
                                 f"of whole {sector_size}-byte sectors in 0..2**64-1")
        if not inside:
            where = "the source" if gather else "the scratch buffer or the file offsets"
            raise InvalidRequest(f"item {i}: {n} bytes at {off!r} lie outside {where}")
        runs.append(n)
    return runs


def _byte_view(obj: Any, what: str) -> memoryview:
    try:
        return memoryview(obj).cast("B")
    except (TypeError, ValueError):
        raise InvalidRequest(f"{what} must be a contiguous buffer") from None


def _pwrite_all(fd: int, data: memoryview, offset: int) -> int:
    """0 once all of ``data`` is at ``offset``, else the errno that stopped it (EIO for a
    write that took nothing, as the native scatter has it)."""
    put = 0
    try:
        while put < len(data):
            wrote = os.pwrite(fd, data[put:], offset + put)
            if wrote == 0:
                return errno.EIO
            put += wrote
    except OSError as exc:
        return exc.errno or errno.EIO
    return 0
