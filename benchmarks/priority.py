"""Priorities under saturation: p99 latency of `high` vs `bulk` while bulk work keeps the
pool busy (issue 4, acceptance 3: high p99 <= 1/5 of bulk p99, and bulk progresses).

    .venv/bin/python benchmarks/priority.py [--seconds 5] [--engine pool]

A feeder keeps `--depth` bulk requests (RSA-2048 signatures) outstanding; a second thread
submits one `high` request every few milliseconds. Latency is submit -> completion,
measured on the futures.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from concurrent.futures import Future
from typing import Any

import cryptoplane as cp


def p99(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=100)[98] if len(xs) >= 2 else (xs[0] if xs else 0.0)


def measure(seconds: float, engine: str, depth: int) -> dict[str, Any]:
    with cp.Plane(engines=[engine], max_queued=depth * 2) as plane:
        key = cp.Key.generate("rsa-pss-sha256")
        lat: dict[str, list[float]] = {"high": [], "bulk": []}
        lock = threading.Lock()
        stop = time.monotonic() + seconds
        outstanding = threading.Semaphore(depth)

        def on_done(kind: str, t0: float) -> Any:
            def cb(f: Future[Any]) -> None:
                if f.exception() is None:
                    with lock:
                        lat[kind].append(time.monotonic() - t0)
                if kind == "bulk":
                    outstanding.release()
            return cb

        def feed_bulk() -> None:
            while time.monotonic() < stop:
                if not outstanding.acquire(timeout=0.1):
                    continue
                t0 = time.monotonic()
                plane.submit(cp.Sign(key, b"bulk"), priority="bulk").add_done_callback(
                    on_done("bulk", t0))

        def feed_high() -> None:
            time.sleep(0.2)  # let bulk saturate the engine first
            while time.monotonic() < stop:
                t0 = time.monotonic()
                plane.submit(cp.Sign(key, b"high"), priority="high").add_done_callback(
                    on_done("high", t0))
                time.sleep(0.005)

        threads = [threading.Thread(target=feed_bulk), threading.Thread(target=feed_high)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        deadline = time.monotonic() + 30
        while plane.stats()["engines"][engine]["inflight"] and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        with lock:
            high, bulk = list(lat["high"]), list(lat["bulk"])
    return {"high_n": len(high), "bulk_n": len(bulk), "high_p99_ms": p99(high) * 1e3,
            "bulk_p99_ms": p99(bulk) * 1e3,
            "bulk_per_s": len(bulk) / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--engine", default="pool")
    ap.add_argument("--depth", type=int, default=200, help="bulk requests kept outstanding")
    args = ap.parse_args()
    r = measure(args.seconds, args.engine, args.depth)
    ratio = r["high_p99_ms"] / r["bulk_p99_ms"] if r["bulk_p99_ms"] else float("inf")
    print(f"engine {args.engine}, {args.seconds:.0f} s, bulk depth {args.depth}")
    print(f"high: {r['high_n']} requests, p99 {r['high_p99_ms']:.2f} ms")
    print(f"bulk: {r['bulk_n']} requests ({r['bulk_per_s']:.0f}/s), "
          f"p99 {r['bulk_p99_ms']:.2f} ms")
    ok = ratio <= 0.2 and r["bulk_n"] > 0
    print(f"high p99 / bulk p99 = {ratio:.3f} (target <= 0.2, bulk progressing): "
          f"{'met' if ok else 'MISSED'}")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
