"""Recycled bytearrays for the stream path's big buffers (1 MiB pieces received, sealed
pieces sent).

Why: ``bytearray(n)`` of a MiB zero-fills it, and a fresh one faults its pages in; the
profile of 100 concurrent ``encrypt_stream`` clients showed the two allocations per piece
at ~7% of the server's CPU. A buffer goes back to work once nothing but the pool refers
to it: the transport has written it (uvloop holds a reference to what it has not sent),
the stream's job has read it (a payload view holds its bytearray). That is read off the
reference count, so nothing has to say when it is done, and a buffer still in use is
never handed out twice.

A recycled buffer is not cleared: whoever takes one writes all of it before it is read
(the chunk kernel fills its output, a frame is handed out once all its bytes are in).
The pool tracks at most ``keep`` buffers (enough for a few pieces of each of some
hundred streams); past that, ``take`` gives fresh ones that are not tracked.
"""

from __future__ import annotations

import sys
import threading


def _refs_in_loop() -> int:
    """What ``sys.getrefcount`` says of a list item only the list and the loop hold
    (calibrated: the count differs between Python versions)."""
    items = [bytearray(1)]
    for b in items:
        return sys.getrefcount(b)
    raise AssertionError("unreachable")


class BufferPool:
    """Thread-safe: workers take outputs, the loop takes receive buffers. ``trim`` (the
    server's watchdog calls it) lets go of free buffers past ``spare``, so memory that a
    burst of streams took goes back within a sweep of its end."""

    def __init__(self, keep: int = 512, least: int = 64 * 1024, spare: int = 8) -> None:
        self.keep = keep
        self.least = least  # smaller buffers are cheap enough fresh
        self.spare = spare
        self._bufs: list[bytearray] = []
        self._at = 0  # where the next search starts: the oldest buffers come free first
        self._lock = threading.Lock()
        self._free_refs = _refs_in_loop()

    def take(self, n: int) -> bytearray:
        """A bytearray of ``n`` bytes, its contents undefined."""
        if n < self.least:
            return bytearray(n)
        refs = self._free_refs
        getrefcount = sys.getrefcount
        with self._lock:
            bufs = self._bufs
            count = len(bufs)
            at = self._at
            for _ in range(count):
                if at >= count:
                    at = 0
                b = bufs[at]
                at += 1
                if len(b) == n and getrefcount(b) == refs:  # the list's and ``b``'s alone
                    self._at = at
                    return b
            buf = bytearray(n)
            if count < self.keep:
                bufs.append(buf)
            return buf

    def trim(self) -> None:
        """Drop the free buffers past ``spare``."""
        refs = self._free_refs
        getrefcount = sys.getrefcount
        with self._lock:
            kept: list[bytearray] = []
            free = 0
            for b in self._bufs:  # the same loop as _refs_in_loop's: the same count
                if getrefcount(b) == refs:
                    free += 1
                    if free > self.spare:
                        continue
                kept.append(b)
            self._bufs = kept
            self._at = 0

    def clear(self) -> None:
        with self._lock:
            self._bufs.clear()


# the stream path's two pools: what connections receive, what jobs seal
RECEIVED = BufferPool()
SEALED = BufferPool()
