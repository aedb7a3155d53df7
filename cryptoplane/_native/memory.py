"""Keep large buffers in the heap: glibc's malloc tuned once per process.

A plane returns many large results (1 MiB ciphertexts, sector runs). glibc serves
allocations above its mmap threshold (128 KiB, rising as it sees frees) with fresh mmap
calls, and every fresh mapping is page-faulted in page by page as the cipher writes it:
a 1 MiB AES-GCM result made in a worker thread cost several times the cipher's own work
(benchmarks/README.md, plane_speed). Raising the mmap threshold (and the trim threshold,
so freed memory is kept for the next result) makes such buffers come from reused heap
memory. The price is memory
held after a burst, bounded by the trim threshold. ``CRYPTOPLANE_NO_MALLOPT=1`` skips it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's upper bound for the dynamic threshold
TRIM_THRESHOLD = 256 * 1024 * 1024

_done = False


def tune_allocator() -> str:
    """Apply the tuning once; returns what was done, for ``stats()``."""
    global _done
    if _done:
        return "tuned"
    _done = True
    if os.environ.get("CRYPTOPLANE_NO_MALLOPT") == "1":
        return "skipped (CRYPTOPLANE_NO_MALLOPT=1)"
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return "not glibc: left as is"
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD,
                                                               TRIM_THRESHOLD)
    return "tuned" if ok else "mallopt refused: left as is"
