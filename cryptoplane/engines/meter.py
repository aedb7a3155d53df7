"""What an engine has measured about itself: per algorithm, operation and size class,
a moving average of the work's latency and of the time the *calling process* spent on
it (copies, hand-offs, or the whole work for inline).

The balancer needs both: a pool of processes has short latency per request but costs
the caller two copies; if those cost more than doing the work here, the pool does not
pay (AES-GCM on 1 MiB), and only the caller-side figure shows that.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

ALPHA = 0.2  # weight of a new sample: ~10 samples to follow a change


def size_class(nbytes: int) -> int:
    """Requests within a factor of two of each other cost about the same."""
    return nbytes.bit_length()


@dataclass(slots=True)
class Estimate:
    latency: float  # seconds from hand-over to completion, queueing inside excluded
    caller: float  # seconds of the calling process's time (GIL-holding) per request
    samples: int = 1
    ops: int = 0
    nbytes: int = 0

    def add(self, latency: float, caller: float, nbytes: int) -> None:
        self.latency += ALPHA * (latency - self.latency)
        self.caller += ALPHA * (caller - self.caller)
        self.samples += 1
        self.ops += 1
        self.nbytes += nbytes


class Meter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._est: dict[tuple[str, str, int], Estimate] = {}
        self.busy = 0.0  # seconds of work done, for statistics

    def record(self, algorithm: str, op: str, nbytes: int, latency: float,
               caller: float) -> None:
        k = (algorithm, op, size_class(nbytes))
        with self._lock:
            self.busy += latency
            e = self._est.get(k)
            if e is None:
                self._est[k] = Estimate(latency, caller, 1, 1, nbytes)
            elif e.samples == 1:  # the cold first sample is replaced, not averaged in
                e.latency, e.caller = latency, caller
                e.samples, e.ops, e.nbytes = 2, e.ops + 1, e.nbytes + nbytes
            else:
                e.add(latency, caller, nbytes)

    def estimate(self, algorithm: str, op: str, nbytes: int) -> Estimate | None:
        """None until two samples: a first run pays for cold caches and key setup (a
        cold ECDSA signature measured ~3x a warm one), and a balancer that believed it
        would never try that engine again."""
        e = self._est.get((algorithm, op, size_class(nbytes)))
        return e if e is not None and e.samples >= 2 else None

    def rates(self) -> dict[str, dict[str, float]]:
        """Per algorithm: measured ops/s and bytes/s of one lane (from the averages)."""
        out: dict[str, dict[str, float]] = {}
        with self._lock:
            items = list(self._est.items())
        for (alg, op, _), e in items:
            if e.latency <= 0:
                continue
            r = out.setdefault(f"{alg}/{op}", {"ops_per_s": 0.0, "bytes_per_s": 0.0})
            r["ops_per_s"] = max(r["ops_per_s"], 1 / e.latency)
            avg = e.nbytes / e.ops if e.ops else 0
            r["bytes_per_s"] = max(r["bytes_per_s"], avg / e.latency)
        return out
