"""Statistics: counters per (engine, algorithm, operation, client) and latency histograms.

Counters are plain ints updated under the GIL; a histogram is a fixed array of
log-spaced buckets (10 per decade, 1 µs to 100 s), so recording is one ``bisect`` and an
increment, and quantiles are read from the buckets (upper bound of the bucket holding
the quantile: an over-estimate by at most 26%). Nothing here ever sees key material.
"""

from __future__ import annotations

import bisect
import threading
from typing import Any

_BOUNDS = [10 ** (e / 10) * 1e-6 for e in range(0, 81)]  # 1 µs .. 100 s


class Histogram:
    __slots__ = ("count", "counts", "max", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BOUNDS) + 1)
        self.count = 0
        self.sum = 0.0
        self.max = 0.0

    def record(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(_BOUNDS, seconds)] += 1
        self.count += 1
        self.sum += seconds
        if seconds > self.max:
            self.max = seconds

    def quantile(self, q: float) -> float:
        if not self.count:
            return 0.0
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank and n:
                return min(_BOUNDS[i] if i < len(_BOUNDS) else self.max, self.max)
        return self.max

    def merge(self, other: Histogram) -> None:
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.count += other.count
        self.sum += other.sum
        self.max = max(self.max, other.max)

    def summary(self) -> dict[str, float]:
        return {"count": self.count, "p50": self.quantile(0.5), "p90": self.quantile(0.9),
                "p99": self.quantile(0.99), "max": self.max,
                "mean": self.sum / self.count if self.count else 0.0}

    def buckets(self) -> list[tuple[float, int]]:
        """Cumulative (upper bound, count) pairs, the Prometheus histogram shape."""
        out, seen = [], 0
        for bound, n in zip(_BOUNDS, self.counts, strict=False):
            seen += n
            out.append((bound, seen))
        return out


class OpStats:
    """One (engine, algorithm, op, client): requests, bytes, errors by type, latency."""

    __slots__ = ("bytes", "errors", "latency", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        self.errors: dict[str, int] = {}
        self.latency = Histogram()

    def add(self, requests: int, nbytes: int) -> None:
        """Count ``requests`` done, with ``nbytes`` of payload between them."""
        self.requests += requests
        self.bytes += nbytes

    def error(self, e: BaseException) -> None:
        name = type(e).__name__
        self.errors[name] = self.errors.get(name, 0) + 1


Key = tuple[str, str, str, str]  # engine, algorithm, op, client


class Registry:
    """All of a plane's counters. ``get`` is lock-free once a counter exists."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ops: dict[Key, OpStats] = {}

    def get(self, engine: str, algorithm: str, op: str, client: str = "-") -> OpStats:
        k = (engine, algorithm, op, client)
        s = self._ops.get(k)
        if s is None:
            with self._lock:
                s = self._ops.setdefault(k, OpStats())
        return s

    def items(self) -> list[tuple[Key, OpStats]]:
        with self._lock:
            return list(self._ops.items())


def aggregate(rows: list[tuple[Key, int, int, dict[str, int], Histogram | None]]
              ) -> dict[str, Any]:
    """Fold rows into the per-engine, per-algorithm, per-client and latency views."""
    engines: dict[str, dict[str, Any]] = {}
    algorithms: dict[str, dict[str, Any]] = {}
    clients: dict[str, dict[str, Any]] = {}
    latency: dict[str, Histogram] = {}
    for (engine, alg, op, client), requests, nbytes, errors, hist in rows:
        for view, name in ((engines, engine), (clients, client)):
            v = view.setdefault(name, {"requests": 0, "bytes": 0, "errors": {}})
            v["requests"] += requests
            v["bytes"] += nbytes
            for err, n in errors.items():
                v["errors"][err] = v["errors"].get(err, 0) + n
        a = algorithms.setdefault(alg, {}).setdefault(
            op, {"requests": 0, "bytes": 0, "errors": {}})
        a["requests"] += requests
        a["bytes"] += nbytes
        for err, n in errors.items():
            a["errors"][err] = a["errors"].get(err, 0) + n
        if hist is not None and hist.count:
            h = latency.setdefault(f"{engine}/{alg}/{op}", Histogram())
            h.merge(hist)
    return {
        "engines": engines,
        "algorithms": algorithms,
        "clients": clients,
        "latency": {k: h.summary() for k, h in sorted(latency.items())},
        "_histograms": latency,
    }
