"""How ``plane.map``'s scaling depends on the batch it is given (RSA-2048 signing and
1 MiB runs of 4 KiB XTS sectors), against synchronous calls on an inline-only plane (``cryptoplane
speed``'s inline path) and the same calls from two bare threads (the ceiling here).

    python benchmarks/map_batch.py [--batches 48,96,192,384] [--seconds 1.5]

Each ``map`` call pays a fixed cost (building the batch, waking the lanes, the tail where
lanes finish one after the other, the gap before the next call): about 1 ms here, which
a 48-request RSA batch (~6 ms of work on two cores) feels and a 384-request one does not.
``cryptoplane speed --engine auto`` uses batches of 48; this shows what larger ones give.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cryptoplane import requests as rq
from cryptoplane.keys import Key
from cryptoplane.plane import Plane

MIB = 1 << 20


def rate(run: Callable[[int], object], per_call: int, seconds: float) -> float:
    """Requests per second of ``run(n)``, timed for about ``seconds``."""
    run(per_call)  # warm
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run(per_call)
        n += per_call
    return n / (time.perf_counter() - start)


def two_threads(work: Callable[[int, int], object], n: int) -> None:
    """``work(n // 2, lane)`` in each of two threads at once (GIL-free work: both
    cores); ``lane`` 0 or 1, for work that needs buffers of its own."""
    pool = [threading.Thread(target=work, args=(n // 2, lane)) for lane in range(2)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--batches", default="48,96,192,384")
    ap.add_argument("--seconds", type=float, default=1.5)
    a = ap.parse_args(argv)
    batches = [int(b) for b in a.batches.split(",")]
    rsa, xts = Key.generate("rsa-pss-sha256", size=2048), Key.generate("aes-256-xts")
    msg, run = b"m" * 64, os.urandom(MIB)
    outs = [bytearray(MIB) for _ in range(max(batches))]

    def signs(k: int) -> list[rq.Request]:
        return [rq.Sign(rsa, msg) for _ in range(k)]

    def sectors(k: int) -> list[rq.Request]:
        return [rq.EncryptSectors(xts, run, sector=0, sector_size=4096, out=outs[i])
                for i in range(k)]

    with Plane(engines=["inline"]) as alone:
        # synchronous calls, as `cryptoplane speed`'s inline path makes them (plane.run
        # would queue each for the inline engine: slower, and one at a time)
        def sign_n(n: int, lane: int) -> None:
            for _ in range(n):
                alone.sign(rsa, msg)

        def xts_n(n: int, lane: int) -> None:
            for i in range(n):
                alone.encrypt_sectors(xts, run, sector=0, sector_size=4096,
                                      out=outs[lane * n + i])

        base = {"rsa sign": rate(lambda k: sign_n(k, 0), 8, a.seconds),
                "xts 1 MiB": rate(lambda k: xts_n(k, 0), 8, a.seconds)}
        # the ceiling: the same calls from two bare threads
        ceiling = {"rsa sign": rate(lambda k: two_threads(sign_n, k), 16, a.seconds),
                   "xts 1 MiB": rate(lambda k: two_threads(xts_n, k), 16, a.seconds)}
    with Plane(engines=["inline", "threads", "pool"]) as auto:
        auto.session(rsa)
        auto.session(xts)
        print(f"inline alone: rsa sign {base['rsa sign']:,.0f}/s, "
              f"xts 1 MiB {base['xts 1 MiB']:,.0f}/s")
        print("two threads  " + "  ".join(
            f"{name} {v:,.0f}/s ({v / base[name]:.2f}x)" for name, v in ceiling.items()))
        for b in batches:
            got = {"rsa sign": rate(lambda k: auto.map(signs(k)), b, a.seconds),
                   "xts 1 MiB": rate(lambda k: auto.map(sectors(k)), b, a.seconds)}
            print(f"map x{b:<4} " + "  ".join(
                f"{name} {v:,.0f}/s ({v / base[name]:.2f}x)" for name, v in got.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
