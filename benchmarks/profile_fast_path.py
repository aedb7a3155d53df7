"""Where the fast path's time goes: AES-256-GCM 64-byte and 1 KiB encrypts in a loop.

    .venv/bin/py-spy record --native -r 2000 -o /tmp/fast.svg -- \
        .venv/bin/python benchmarks/profile_fast_path.py
    .venv/bin/pyinstrument benchmarks/profile_fast_path.py

It also prints the per-call cost of each layer measured by subtraction: the bare
library call, a plain Python wrapper around it (the floor any Python API pays), and the
plane's fast path.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import cryptoplane as cp


def per_call_ns(fn: Callable[[], object], n: int) -> float:
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter_ns() - t0) / n)
    return best


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300_000
    with cp.Plane(engines=["inline"]) as plane:
        key = cp.Key.generate("aes-256-gcm")
        nonce = os.urandom(12)
        aead = AESGCM(key.export_raw())
        enc = aead.encrypt
        penc = plane.encrypt

        def wrapper(data: bytes) -> bytes:
            return enc(nonce, data, None)

        for size in (64, 1024):
            data = os.urandom(size)
            direct = per_call_ns(lambda d=data: enc(nonce, d, None), n)
            wrapped = per_call_ns(lambda d=data: wrapper(d), n)
            fast = per_call_ns(lambda d=data: penc(key, d, nonce=nonce), n)
            print(f"{size:5d} B  direct {direct:6.0f} ns   python wrapper {wrapped:6.0f} ns "
                  f"(+{wrapped - direct:.0f})   plane {fast:6.0f} ns (+{fast - direct:.0f})  "
                  f"plane/direct throughput {direct / fast:.2f}")


if __name__ == "__main__":
    main()
