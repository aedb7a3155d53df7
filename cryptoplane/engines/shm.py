"""Shared-memory arenas: the payloads of the pool engine cross the process boundary here.

One arena per worker process, cut into fixed slots. A slot has an input half (the
request's payload, copied in by the parent with one memcpy) and an output half (the
worker writes the result there; the sector kernel writes straight into it). Pipes carry
only small headers, so a payload is never pickled.

Slices of the arena's memoryview are always released promptly (``with`` blocks): the
segment cannot be closed while any slice of it is alive.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from multiprocessing.shared_memory import SharedMemory
from typing import Any

# Output half = input half + this: AEAD tags, CBC padding, RSA outputs (<= 512 bytes) and
# HKDF output (<= 255 * 64 bytes) of a request whose payload filled the input half.
OUTPUT_SLACK = 16 * 1024


def as_bytes_view(data: Any) -> memoryview:
    """A flat, unsigned-byte view of any buffer (copied only when not C-contiguous)."""
    view = memoryview(data)
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class Arena:
    """``slots`` slots of ``in_size`` input bytes and ``in_size + OUTPUT_SLACK`` output."""

    __slots__ = ("_shm", "buf", "closed", "in_size", "name", "out_size", "owner", "slots",
                 "stride")

    def __init__(self, slots: int, in_size: int, *, name: str | None = None) -> None:
        self.slots = slots
        self.in_size = in_size
        self.out_size = in_size + OUTPUT_SLACK
        self.stride = self.in_size + self.out_size
        self.owner = name is None
        if name is None:
            # A recognisable name: a leak in /dev/shm says whose it is. The kernel fills
            # pages lazily, so a big arena costs memory only for the slots in use.
            name = f"cryptoplane-pool-{os.getpid()}-{secrets.token_hex(4)}"
            self._shm = SharedMemory(name=name, create=True, size=slots * self.stride)
        else:
            self._shm = SharedMemory(name=name)
        self.name = name
        buf = self._shm.buf
        assert buf is not None  # only None after close()
        self.buf: memoryview = buf
        self.closed = False

    def input(self, slot: int, n: int) -> memoryview:
        base = slot * self.stride
        return self.buf[base:base + n]

    def output(self, slot: int, n: int | None = None) -> memoryview:
        base = slot * self.stride + self.in_size
        return self.buf[base:base + (self.out_size if n is None else n)]

    def put(self, slot: int, data: Any) -> int:
        """Copy ``data`` into the slot's input half; returns its size in bytes."""
        src = as_bytes_view(data)
        n = src.nbytes
        if n > self.in_size:
            raise ValueError(f"{n} bytes do not fit a {self.in_size}-byte slot")
        with self.input(slot, n) as dst:
            dst[:] = src
        return n

    def take(self, slot: int, n: int) -> bytes:
        """A copy of the first ``n`` bytes of the slot's output half."""
        with self.output(slot, n) as src:
            return src.tobytes()

    def copy_out(self, slot: int, n: int, dest: Any) -> None:
        """Write the first ``n`` output bytes into the caller's buffer ``dest``."""
        with self.output(slot, n) as src:
            dst = as_bytes_view(dest)
            dst[:n] = src

    def close(self, *, unlink: bool) -> None:
        """Unmap (and, for the creator, remove) the segment; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        # BufferError: a slice is still alive somewhere (a worker's last result); the
        # mapping then goes with the process, and the name, what would leak, goes below
        with contextlib.suppress(BufferError):
            self._shm.close()
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                self._shm.unlink()


__all__ = ["OUTPUT_SLACK", "Arena", "as_bytes_view"]
