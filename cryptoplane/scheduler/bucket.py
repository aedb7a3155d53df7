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

# A wait shorter than this is no wait. A caller that waited exactly the time it was told
# must find its tokens there, not a rounding error short and told to wait a few
# femtoseconds more: added to a clock at 1e3..1e9 s, such a wait does not even move it
# (a livelock). A microsecond is above a float clock's resolution up to ~1e9 s; the
# tokens still owed are taken anyway (a sliver of debt), so the long-run rate is exact.
_SLACK_S = 1e-6


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

    def wait_for(self, amount: float) -> float:
        """Seconds until ``try_take(amount)`` would succeed (0: now); takes nothing."""
        if not self.rate:
            return 0.0
        self._refill()
        tokens = self._tokens + self.rate * _SLACK_S
        if tokens >= amount:
            return 0.0
        # more than the burst can never be in the bucket: such an amount is admitted
        # when the bucket is full, into debt, so a huge batch is slowed, not starved
        if amount > self.burst:
            return 0.0 if tokens >= self.burst else (self.burst - self._tokens) / self.rate
        return (amount - self._tokens) / self.rate

    def try_take(self, amount: float) -> float:
        """Take ``amount`` tokens if they are there (or the bucket is full and the amount
        is more than it can hold: then it goes into debt, as ``reserve``); otherwise take
        nothing and return the seconds until they would be. 0.0 means taken.

        Unlike ``reserve``, a refusal costs the caller nothing: a server that answers
        "retry later" without running the request must not charge for it."""
        wait = self.wait_for(amount)
        if wait == 0.0 and self.rate:
            self._tokens -= amount
        return wait

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

    def wait_for(self, ops: float, nbytes: float) -> float:
        """Seconds until ``try_take(ops, nbytes)`` would succeed; takes nothing."""
        return max(self.ops.wait_for(ops), self.bytes.wait_for(nbytes))

    def try_take(self, ops: float, nbytes: float) -> float:
        """Take ``ops`` and ``nbytes`` from both buckets, or from neither: 0.0 when taken,
        else the seconds until both would allow it (``TokenBucket.try_take``)."""
        wait = self.wait_for(ops, nbytes)
        if wait == 0.0:
            # both said yes just now and tokens only grow with time: these cannot refuse
            self.ops.try_take(ops)
            self.bytes.try_take(nbytes)
        return wait

    def describe(self) -> dict[str, float]:
        return {"ops_per_s": self.ops.rate, "bytes_per_s": self.bytes.rate}
