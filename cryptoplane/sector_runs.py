"""Sector batches where the plane's fast path does not serve the key (it is bound to
another engine): one ``decrypt_sectors``/``encrypt_sectors`` per item, with what the
native batch promises kept: every item checked before any runs, writes in item order,
and a failed ``pwrite`` reported as that item's errno. On the fast path the kernel does
all of this in one call (``Plane.decrypt_sectors_gather``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._native.fallback import batch_runs, pwrite_all
from .exceptions import InvalidRequest


def gather_per_item(plane: Any, key: Any, src: Any, items: Sequence[tuple[int, int, Any]],
                    sector_size: int, tweak: str, tweak_unit: int | None) -> None:
    data = _byte_view(src, "src")
    runs = _checked(items, sector_size, len(data), gather=True)
    for (offset, first, out), n in zip(items, runs, strict=True):
        plane.decrypt_sectors(key, data[offset:offset + n], sector=first,
                              sector_size=sector_size, out=out, tweak=tweak,
                              tweak_unit=tweak_unit)


def scatter_per_item(plane: Any, key: Any, fd: int, items: Sequence[tuple[int, int, Any]],
                     scratch: Any, sector_size: int, tweak: str,
                     tweak_unit: int | None) -> tuple[int, int]:
    buf = _byte_view(scratch, "scratch")
    runs = _checked(items, sector_size, len(buf), gather=False)
    for done, ((offset, first, data), n) in enumerate(zip(items, runs, strict=True)):
        plane.encrypt_sectors(key, data, sector=first, sector_size=sector_size,
                              out=buf[:n], tweak=tweak, tweak_unit=tweak_unit)
        err = pwrite_all(fd, buf[:n], offset)
        if err:
            return done, err
    return len(items), 0


def _checked(items: Sequence[tuple[int, int, Any]], sector_size: int, room: int, *,
             gather: bool) -> list[int]:
    """The items' lengths, all checked before any runs by the kernel's own rules
    (``batch_runs``), refused as the kernel wrapper refuses them: ``InvalidRequest``."""
    try:
        return batch_runs(items, sector_size, room, gather=gather)
    except (ValueError, TypeError, OverflowError) as e:
        raise InvalidRequest(f"sectors: {e}") from None


def _byte_view(obj: Any, what: str) -> memoryview:
    try:
        return memoryview(obj).cast("B")
    except (TypeError, ValueError):
        raise InvalidRequest(f"{what} must be a contiguous buffer") from None
