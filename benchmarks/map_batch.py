"""How ``plane.map``'s scaling depends on the batch it is given (RSA-2048 signing and
1 MiB runs of 4 KiB XTS sectors), against synchronous calls on an inline-only plane
(``cryptoplane speed``'s inline path) and the same calls from two bare threads that run
for a whole round (the ceiling on two cores).

    python benchmarks/map_batch.py [--batches 82,205,410] [--rounds 12] [--seconds 0.4]

Every path runs for ``--seconds`` per round, interleaved with the others in ``--rounds``
rounds; each is reported as the median of its per-round ratios to the synchronous calls
of the same round, which is what cancels this shared machine's drift. Each ``map`` call
pays a fixed cost (building the batch, waking the lanes from idle, the last request's
tail, the gap before the next call) that a small batch feels and a big one does not:
``cryptoplane speed --engine`` sizes auto's batches for ~50 ms of inline work.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cryptoplane import requests as rq
from cryptoplane.keys import Key
from cryptoplane.plane import Plane

MIB = 1 << 20


def rate(step: Callable[[], int], seconds: float) -> float:
    """Requests per second of repeated ``step()`` calls (each returns how many it ran)."""
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        n += step()
    return n / (time.perf_counter() - start)


def two_threads(step: Callable[[int], int], seconds: float) -> float:
    """``step(lane)`` in a loop from two threads at once for ``seconds``: requests/s."""
    counts = [0, 0]
    start = threading.Barrier(3)

    def run(lane: int) -> None:
        start.wait()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            counts[lane] += step(lane)

    pool = [threading.Thread(target=run, args=(lane,)) for lane in range(2)]
    for t in pool:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in pool:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--batches", default="82,205,410")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=0.4)
    a = ap.parse_args(argv)
    batches = [int(b) for b in a.batches.split(",")]
    rsa, xts = Key.generate("rsa-pss-sha256", size=2048), Key.generate("aes-256-xts")
    msg, run = b"m" * 64, os.urandom(MIB)
    outs = [bytearray(MIB) for _ in range(max(batches))]  # one per request of a batch
    cursor = [0]

    def out() -> bytearray:  # every path rotates through the same buffers
        cursor[0] = (cursor[0] + 1) % len(outs)
        return outs[cursor[0]]

    with Plane(engines=["inline"]) as alone, \
            Plane(engines=["inline", "threads", "pool"]) as auto:
        auto.session(rsa)
        auto.session(xts)
        def sign(lane: int = 0) -> int:
            alone.sign(rsa, msg)
            return 1

        def sectors(lane: int = 0) -> int:
            alone.encrypt_sectors(xts, run, sector=0, sector_size=4096, out=out())
            return 1

        sync: dict[str, Callable[..., int]] = {"rsa sign": sign, "xts 1 MiB": sectors}

        def mapped(name: str, size: int) -> Callable[[], int]:
            def step() -> int:
                if name == "rsa sign":
                    auto.map([rq.Sign(rsa, msg) for _ in range(size)])
                else:
                    auto.map([rq.EncryptSectors(xts, run, sector=0, sector_size=4096,
                                                out=out()) for _ in range(size)])
                return size
            return step

        for name, one in sync.items():
            paths: dict[str, Callable[[], float]] = {
                "two threads": partial(two_threads, one, a.seconds)}
            for b in batches:
                paths[f"map x{b}"] = partial(rate, mapped(name, b), a.seconds)
            for path in paths.values():  # warm: sessions, pages, the balancer's figures
                path()
            ratios: dict[str, list[float]] = {p: [] for p in paths}
            for rnd in range(a.rounds):
                order = list(paths) if rnd % 2 == 0 else list(paths)[::-1]
                base = rate(one, a.seconds)
                for p in order:
                    ratios[p].append(paths[p]() / base)
            print(f"{name}: " + "  ".join(
                f"{p} {statistics.median(r):.2f}x" for p, r in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
