"""Per-tenant and per-token rate limits (ops/s and bytes/s), changeable live.

The plane's token buckets (``scheduler/bucket.py``, QEMU throttle-ops/throttle-bps
semantics) do the counting. A server cannot make a remote client wait the way the plane
makes a local caller wait, so a request over its rate is refused (THROTTLED, with the time
to wait) and does *not* run; it is charged nothing (``TokenBucket.try_take``, never the
debt-taking ``reserve``), and a request admitted is charged to every limit that applies
(its tenant's and its token's) or, when one of them refuses, to none.

The burst: a client honouring ``retry_after`` comes back a little late (timer slack, the
wire's round trip, the millisecond the codec rounds RETRY_AFTER up by). Tokens that
accrue while it is late are kept up to the burst, so lateness shorter than the burst's
worth of time costs the client nothing and the long-run rate stays exact. Against that,
a fresh client may spend the whole burst at once, which is over-admission over any
window. ``BURST_SECONDS`` = 20 ms balances the two: it absorbs 20 ms of lateness per
retry, and over-admits at most 1 % in 2 s, 0.2 % in 10 s (the bucket's own default, a
tenth of a second, would already be 5 % over 2 s).

Cheap when nothing limits a principal: one dict lookup, cached per (tenant, token).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from ..scheduler.bucket import Limit, TokenBucket
from .errors import Throttled

Clock = Callable[[], float]

# seconds' worth of the rate a bucket holds; the module docstring says why 20 ms
BURST_SECONDS = 0.02
# the per-principal cache is only a cache: past this many entries it starts again, so
# token churn cannot grow it without bound
_CACHE_MAX = 65_536


class Subject(Protocol):
    """What a rate limit is keyed by (``auth.Principal`` is one)."""

    @property
    def tenant(self) -> str: ...

    @property
    def token_id(self) -> str | None: ...


class RateLimits:
    """The server's live table of rate limits: per tenant, per token, ops/s and bytes/s.

    A rate of 0 lifts that limit; a limit with both rates 0 is dropped entirely. Changes
    take effect on the next request (the buckets keep their tokens, capped to the new
    burst). Not thread-safe: the server calls it from its event loop.
    """

    def __init__(self, clock: Clock = time.monotonic, *,
                 burst_seconds: float = BURST_SECONDS) -> None:
        if burst_seconds <= 0:
            raise ValueError(f"burst_seconds must be > 0, got {burst_seconds}")
        self._clock = clock
        self._burst_seconds = burst_seconds
        self._tenants: dict[str, Limit] = {}
        self._tokens: dict[str, Limit] = {}
        # (tenant, token_id) -> the limits that apply, () when none: the one lookup
        self._applies: dict[tuple[str, str | None], tuple[Limit, ...]] = {}

    # -- configuration -------------------------------------------------------------

    def set_tenant(self, tenant: str, ops: float | None = None,
                   bytes: float | None = None) -> None:
        """Set a tenant's ops/s and/or bytes/s (None: leave as is; 0: no limit)."""
        self._set(self._tenants, tenant, ops, bytes)

    def set_token(self, token_id: str, ops: float | None = None,
                  bytes: float | None = None) -> None:
        """Set one token's ops/s and/or bytes/s, on top of its tenant's limits."""
        self._set(self._tokens, token_id, ops, bytes)

    def tenant_limits(self, tenant: str) -> dict[str, float]:
        """The limits in force for ``tenant`` (0.0: unlimited), as TENANT_LIMITS answers."""
        limit = self._tenants.get(tenant)
        return limit.describe() if limit else {"ops_per_s": 0.0, "bytes_per_s": 0.0}

    def token_limits(self, token_id: str) -> dict[str, float]:
        limit = self._tokens.get(token_id)
        return limit.describe() if limit else {"ops_per_s": 0.0, "bytes_per_s": 0.0}

    def _set(self, table: dict[str, Limit], name: str, ops: float | None,
             nbytes: float | None) -> None:
        for rate in (ops, nbytes):
            if rate is not None and not rate >= 0:  # also refuses NaN
                raise ValueError(f"a rate must be >= 0, got {rate}")
        limit = table.get(name)
        if limit is None:
            if not ops and not nbytes:
                return  # lifting a limit that is not there
            # created with its rates, so that it starts full (``_configure`` only caps
            # the tokens to the new burst; a bucket made at rate 0 would hold one)
            limit = table[name] = Limit(ops or 0, nbytes or 0, clock=self._clock)
        if ops is not None:
            self._configure(limit.ops, ops)
        if nbytes is not None:
            self._configure(limit.bytes, nbytes)
        if limit.unlimited:
            del table[name]
        self._applies.clear()

    def _configure(self, bucket: TokenBucket, rate: float) -> None:
        # at least one whole op (or byte) of burst; an amount above the burst is still
        # admitted when the bucket is full, so a large request is never starved
        bucket.set(rate, burst=max(1.0, rate * self._burst_seconds) if rate else None)

    # -- the per-request path ------------------------------------------------------

    def _limits_for(self, tenant: str, token_id: str | None) -> tuple[Limit, ...]:
        found = tuple(x for x in (self._tenants.get(tenant),
                                  self._tokens.get(token_id) if token_id else None)
                      if x is not None)
        if len(self._applies) >= _CACHE_MAX:
            self._applies.clear()
        self._applies[tenant, token_id] = found
        return found

    def admit(self, principal: Subject, ops: int, nbytes: int) -> float:
        """0.0: go, and ``ops``/``nbytes`` are charged to the tenant's and the token's
        limits; otherwise the seconds to wait before retrying, and nothing was charged.
        A batch is ``ops`` = its item count, ``nbytes`` = its payload size."""
        key = (principal.tenant, principal.token_id)
        limits = self._applies.get(key)
        if limits is None:
            limits = self._limits_for(*key)
        if not limits:
            return 0.0
        if len(limits) == 1:
            return limits[0].try_take(ops, nbytes)
        wait = max(limit.wait_for(ops, nbytes) for limit in limits)
        if wait == 0.0:
            for limit in limits:  # all said yes, and tokens only grow: none refuses
                limit.try_take(ops, nbytes)
        return wait

    def throttle(self, principal: Subject, ops: int, nbytes: int) -> None:
        """``admit``, raising ``Throttled(retry_after=...)`` instead of returning a wait.
        The wire rounds the wait *up* to whole milliseconds (``codec.error_fields``):
        rounding down would bring the client back early, to be refused again."""
        wait = self.admit(principal, ops, nbytes)
        if wait:
            raise Throttled(f"rate limit exceeded; retry in {wait:.3f} s", retry_after=wait)


__all__ = ["BURST_SECONDS", "RateLimits", "Subject"]
