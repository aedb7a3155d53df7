"""Where ``plane.map`` loses to synchronous calls on big GIL-holding work (AES-256-GCM,
1 MiB messages), which the balancer rightly keeps inline.

    python benchmarks/map_footprint.py [--rounds 15]

Every path encrypts the same 64 messages per round, interleaved with the others, and
reports its median rate over ``sync`` (``plane.encrypt`` in a loop, each result dropped
before the next is made, as ``cryptoplane speed``'s inline baseline does):

* ``hold8``: the same calls, results kept in lists of 8 (what any batch must do);
* ``mapN`` on an inline-only plane and on the auto plane (inline, threads, pool).

Measured here in four runs: hold8 at 0.81-0.92 of sync, map8 at 0.79-0.85, map1 on the
auto plane at 0.86-0.93: most of what map loses at x8 is the batch's results leaving the
cache (8 MiB), not the scheduler (which ran every message inline), and the rest is
map's fixed cost per call (~10-15 µs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cryptoplane import requests as rq
from cryptoplane.keys import Key
from cryptoplane.plane import Plane

MESSAGES = 64  # per round, per path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    data, nonce = os.urandom(1 << 20), bytes(12)
    with Plane(engines=["inline"]) as alone, \
            Plane(engines=["inline", "threads", "pool"]) as auto:
        k_alone, k_auto = Key.generate("aes-256-gcm"), Key.generate("aes-256-gcm")
        auto.session(k_auto)  # unbound: the balancer chooses

        def sync() -> None:
            for _ in range(MESSAGES):
                alone.encrypt(k_alone, data, nonce=nonce)

        def hold8() -> None:
            for _ in range(MESSAGES // 8):
                [alone.encrypt(k_alone, data, nonce=nonce) for _ in range(8)]

        def mapped(plane: Plane, key: Key, batch: int) -> Callable[[], None]:
            def run() -> None:
                for _ in range(MESSAGES // batch):
                    plane.map([rq.Encrypt(key, data, nonce=nonce) for _ in range(batch)])
            return run

        paths: dict[str, Callable[[], None]] = {"sync": sync, "hold8": hold8,
                                                "map8 inline-only": mapped(alone, k_alone, 8)}
        for b in (1, 2, 4, 8):
            paths[f"map{b} auto"] = mapped(auto, k_auto, b)
        for run in paths.values():  # warm: caches, the balancer's figures
            for _ in range(10):
                run()
        rates: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, run in paths.items():
                t0 = time.perf_counter()
                run()
                rates[name].append(MESSAGES / (time.perf_counter() - t0))
        base = statistics.median(rates["sync"])
        print(f"sync: {base:,.0f} messages/s (1 MiB each)")
        for name, r in rates.items():
            if name != "sync":
                print(f"{name:18} {statistics.median(r) / base:.2f}x sync")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
