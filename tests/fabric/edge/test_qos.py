"""Rate limits that refuse instead of queueing: ``TokenBucket.try_take`` and
``RateLimits``, exact under a fake clock and within 5 % in real time."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from cryptoplane.fabric.errors import Throttled
from cryptoplane.fabric.qos import BURST_SECONDS, RateLimits
from cryptoplane.scheduler.bucket import Limit, TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Who:
    tenant: str
    token_id: str | None = None


ACME = Who("acme", "tok1")


# -- TokenBucket.try_take / Limit.try_take ---------------------------------------------


def test_try_take_takes_or_says_when() -> None:
    clock = FakeClock()
    b = TokenBucket(10, burst=2, clock=clock)
    assert b.try_take(1) == 0.0 and b.try_take(1) == 0.0
    assert b.try_take(1) == pytest.approx(0.1)
    assert b.try_take(1) == pytest.approx(0.1)  # a refusal took nothing
    clock.now += 0.1
    assert b.try_take(1) == 0.0
    assert b.try_take(1) == pytest.approx(0.1)


def test_try_take_unlimited() -> None:
    b = TokenBucket(0, clock=FakeClock())
    assert all(b.try_take(10**9) == 0.0 for _ in range(10))


def test_more_than_the_burst_waits_for_a_full_bucket_then_goes_into_debt() -> None:
    clock = FakeClock()
    b = TokenBucket(100, burst=10, clock=clock)
    assert b.try_take(5) == 0.0
    assert b.try_take(50) == pytest.approx(0.05)  # until full, not until 50 are there
    clock.now += 0.05
    assert b.try_take(50) == 0.0  # admitted: 40 in debt
    assert b.try_take(1) == pytest.approx(0.41)
    clock.now += 0.41
    assert b.try_take(1) == 0.0


def test_waiting_exactly_the_answer_always_succeeds() -> None:
    # float rounding must not leave a waiter 1e-16 short, told to wait 1e-19 s more
    clock = FakeClock()
    clock.now = 1.7e9  # at which 1e-19 s cannot even move the clock
    for rate, amount in ((3.0, 1), (7.3, 2.2), (1e6, 1), (0.1, 1), (333.3, 17)):
        b = TokenBucket(rate, clock=clock)
        for _ in range(50):
            wait = b.try_take(amount)
            if wait:
                clock.now += wait
                assert b.try_take(amount) == 0.0


def test_limit_takes_from_both_or_neither() -> None:
    clock = FakeClock()
    lim = Limit(10, 1000, clock=clock)  # ops burst 1, bytes burst 100
    assert lim.try_take(1, 100) == 0.0
    # ops would allow after 0.1 s, bytes after 0.1 s; both empty
    assert lim.try_take(1, 10) == pytest.approx(0.1)
    clock.now += 0.1
    # ops available (1), bytes has 100: take 1 op and 60 bytes
    assert lim.try_take(1, 60) == 0.0
    clock.now += 0.1
    # ops has 1 again, bytes has 40 + 100 capped at 100: a 101-byte request is over the
    # burst and the bucket is full, so it is admitted into debt
    assert lim.try_take(1, 101) == 0.0
    # ops empty now; a refusal on ops must not charge bytes either
    before = lim.bytes.wait_for(1)
    assert lim.try_take(1, 0) > 0
    assert lim.bytes.wait_for(1) == before


# -- RateLimits ------------------------------------------------------------------------


def greedy(limits: RateLimits, clock: FakeClock, who: Who, seconds: float, *,
           ops: int = 1, nbytes: int = 0, wire_ms: bool = False) -> tuple[int, int]:
    """A client that sends again the moment it is told it may, for ``seconds``: returns
    (admitted requests, attempts). ``wire_ms``: it hears the wait as the wire carries
    it, whole milliseconds rounded up (``codec.error_fields``)."""
    end = clock.now + seconds
    admitted = attempts = 0
    while clock.now < end:
        attempts += 1
        wait = limits.admit(who, ops, nbytes)
        if wait == 0.0:
            admitted += 1
        else:
            clock.now += (int(wait * 1000) + 1) / 1000 if wire_ms else wait
    return admitted, attempts


def test_greedy_client_gets_exactly_the_rate() -> None:
    clock = FakeClock()
    limits = RateLimits(clock)
    limits.set_tenant("acme", ops=1000)
    admitted, attempts = greedy(limits, clock, ACME, 10.0)
    burst = 1000 * BURST_SECONDS
    # rate x time plus the burst it started with, give or take the one admission that
    # falls on the window's edge (t = 10 s exactly: in or out by a float's rounding)
    assert abs(admitted - (10_000 + burst)) <= 1
    assert abs(admitted / 10_000 - 1) < 0.05
    assert attempts <= 2 * admitted + 1  # each refusal names a time that then works


@pytest.mark.parametrize("rate", [50, 500, 1000, 5000])
def test_greedy_client_hearing_milliseconds_stays_within_5_percent(rate: int) -> None:
    # the wire rounds the wait up to a millisecond: the client comes back late, and the
    # burst is what keeps that lateness from costing it rate (a burst of 1 op would
    # halve 1000 ops/s: 1 ms of wait heard as 2 ms)
    clock = FakeClock()
    limits = RateLimits(clock)
    limits.set_tenant("acme", ops=rate)
    admitted, _ = greedy(limits, clock, ACME, 10.0, wire_ms=True)
    assert abs(admitted / (rate * 10) - 1) < 0.05, admitted


def test_bytes_per_second() -> None:
    clock = FakeClock()
    limits = RateLimits(clock)
    limits.set_tenant("acme", bytes=1_000_000)
    admitted, _ = greedy(limits, clock, ACME, 10.0, nbytes=4096)
    assert abs(admitted * 4096 / 10_000_000 - 1) < 0.01


def test_large_batches_are_admitted_at_the_rate_not_starved() -> None:
    clock = FakeClock()
    limits = RateLimits(clock)
    limits.set_tenant("acme", ops=100)  # burst 2 ops
    admitted, _ = greedy(limits, clock, ACME, 10.0, ops=500)  # batches of 500 items
    assert admitted in (2, 3)  # 1000 items in 10 s: at t=0 and t≈5 (and ≈10)


def test_token_and_tenant_limits_both_apply_and_refusals_charge_neither() -> None:
    clock = FakeClock()
    limits = RateLimits(clock)
    limits.set_tenant("acme", ops=1000)
    limits.set_token("tok1", ops=100)
    slow, fast = Who("acme", "tok1"), Who("acme", "tok2")
    admitted, _ = greedy(limits, clock, slow, 10.0)
    assert abs(admitted / 1000 - 1) < 0.05  # the token's 100/s, the lower
    # tok1's refusals charged nothing to the tenant: tok2 gets the tenant's whole rate
    start = clock.now
    n = 0
    while clock.now < start + 10:
        if limits.admit(slow, 1, 0) == 0.0:
            n += 1
        wait = limits.admit(fast, 1, 0)
        if wait:
            clock.now += wait
        else:
            n += 1
    assert abs(n / 10_000 - 1) < 0.05  # both together held to the tenant's 1000/s


def test_certificate_principals_have_only_the_tenant_limit() -> None:
    clock = FakeClock()
    limits = RateLimits(clock)
    limits.set_tenant("acme", ops=10)
    limits.set_token("None", ops=1)  # no confusion with a token named "None"
    cert = Who("acme", None)
    admitted, _ = greedy(limits, clock, cert, 10.0)
    assert abs(admitted / 100 - 1) < 0.05


def test_live_change() -> None:
    clock = FakeClock()
    limits = RateLimits(clock)
    limits.set_tenant("acme", ops=100)
    a, _ = greedy(limits, clock, ACME, 5.0)
    limits.set_tenant("acme", ops=1000)  # raised mid-stream
    b, _ = greedy(limits, clock, ACME, 5.0)
    limits.set_tenant("acme", ops=10)  # lowered
    c, _ = greedy(limits, clock, ACME, 5.0)
    assert abs(a / 500 - 1) < 0.05
    assert abs(b / 5000 - 1) < 0.05
    assert abs(c / 50 - 1) < 0.05
    assert limits.tenant_limits("acme") == {"ops_per_s": 10.0, "bytes_per_s": 0.0}


def test_lifting_limits() -> None:
    clock = FakeClock()
    limits = RateLimits(clock)
    limits.set_tenant("acme", ops=1, bytes=10)
    limits.set_token("tok1", ops=1)
    limits.set_tenant("acme", ops=0)
    assert limits.tenant_limits("acme") == {"ops_per_s": 0.0, "bytes_per_s": 10.0}
    limits.set_tenant("acme", bytes=0)
    limits.set_token("tok1", ops=0)
    assert limits.tenant_limits("acme") == {"ops_per_s": 0.0, "bytes_per_s": 0.0}
    assert all(limits.admit(ACME, 1000, 10**9) == 0.0 for _ in range(100))
    limits.set_tenant("other", ops=0)  # lifting what is not there is fine


def test_unlimited_is_free_and_bad_rates_refused() -> None:
    limits = RateLimits(FakeClock())
    assert limits.admit(ACME, 1, 1) == 0.0
    with pytest.raises(ValueError):
        limits.set_tenant("acme", ops=-1)
    with pytest.raises(ValueError):
        limits.set_token("t", bytes=float("nan"))


def test_throttle_raises_with_retry_after() -> None:
    clock = FakeClock()
    limits = RateLimits(clock)
    limits.set_tenant("acme", ops=10)  # burst 1
    limits.throttle(ACME, 1, 0)
    with pytest.raises(Throttled) as e:
        limits.throttle(ACME, 1, 0)
    assert e.value.retry_after == pytest.approx(0.1)
    clock.now += e.value.retry_after
    limits.throttle(ACME, 1, 0)


def _real_time_run(rate: float, seconds: float) -> tuple[int, float]:
    """A client honouring retry_after in real time for ``seconds``: (admitted, the
    seconds it lost by coming back later than the burst can absorb)."""
    limits = RateLimits()  # time.monotonic
    limits.set_tenant("acme", ops=rate)
    admitted, lost = 0, 0.0
    end = time.monotonic() + seconds
    due = time.monotonic()
    while (now := time.monotonic()) < end:
        lost += max(0.0, now - due - BURST_SECONDS)
        wait = limits.admit(ACME, 1, 0)
        if wait:
            time.sleep(min(wait, end - now))
            due = now + wait
        else:
            admitted += 1
            due = time.monotonic()
    return admitted, lost


def test_real_time_client_honouring_retry_after_within_5_percent() -> None:
    # 2 s at 500 ops/s. The limiter absorbs a client's lateness up to the burst (20 ms);
    # time a client spends descheduled beyond that (a loaded test machine) is lost to it
    # through no fault of the limiter: such a run is repeated, and if every run was
    # disturbed, judged against the time the client was actually there
    for _ in range(3):
        admitted, lost = _real_time_run(500, 2.0)
        if lost < 0.01:
            break
    assert abs(admitted / (500 * (2.0 - lost)) - 1) <= 0.05, (admitted, lost)
