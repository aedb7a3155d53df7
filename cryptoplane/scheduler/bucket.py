"""A token bucket that says how long to wait instead of sleeping (QEMU throttle-ops /
throttle-bps semantics: a rate per second, 0 = unlimited, a burst allowance).

Pure: the clock is an argument, so tests are exact instead of timed. A request larger
than the burst is still admitted, by going into debt; the debt is what later requests
wait off. That keeps the long-run average at the rate whatever the request sizes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]


class TokenBucket:
    __slots__ = ("_clock", "_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, *, burst: float | None = None,
                 clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self.rate = 0.0
        self.burst = 0.0
        self._tokens = 0.0
        self._last = clock()
        self.set(rate, burst=burst)
        self._tokens = self.burst  # a new client may use its burst at once

    def set(self, rate: float, *, burst: float | None = None) -> None:
        """Change the limit live; 0 lifts it. The burst defaults to a tenth of a
        second's worth (at least 1), so a limited client cannot start with a flood."""
        if rate < 0:
            raise ValueError(f"rate must be >= 0, got {rate}")
        self._refill()
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(1.0, rate / 10)
        self._tokens = min(self._tokens, self.burst)

    def _refill(self) -> None:
        now = self._clock()
        if self.rate:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def reserve(self, amount: float) -> float:
        """Take ``amount`` tokens; returns the seconds to wait before proceeding (0: now)."""
        if not self.rate:
            return 0.0
        self._refill()
        self._tokens -= amount
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    @property
    def unlimited(self) -> bool:
        return not self.rate


class Limit:
    """An ops/s and a bytes/s bucket for one client or session."""

    __slots__ = ("bytes", "ops")

    def __init__(self, ops: float = 0, bytes: float = 0, *, clock: Clock = time.monotonic):
        self.ops = TokenBucket(ops, clock=clock)
        self.bytes = TokenBucket(bytes, burst=max(bytes / 10, 1.0) if bytes else None,
                                 clock=clock)

    def set(self, ops: float | None = None, bytes: float | None = None) -> None:
        if ops is not None:
            self.ops.set(ops)
        if bytes is not None:
            self.bytes.set(bytes)

    @property
    def unlimited(self) -> bool:
        return self.ops.unlimited and self.bytes.unlimited

    def reserve(self, nbytes: int) -> float:
        """Seconds until a request of ``nbytes`` may run under both limits."""
        return max(self.ops.reserve(1), self.bytes.reserve(nbytes))

    def describe(self) -> dict[str, float]:
        return {"ops_per_s": self.ops.rate, "bytes_per_s": self.bytes.rate}
