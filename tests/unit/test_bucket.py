from __future__ import annotations

import pytest

from cryptoplane.scheduler.bucket import Limit, TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_unlimited_never_waits() -> None:
    b = TokenBucket(0, clock=FakeClock())
    assert all(b.reserve(10**9) == 0 for _ in range(100))


def test_rate_is_held_over_time() -> None:
    clock = FakeClock()
    b = TokenBucket(100, clock=clock)  # 100 ops/s, burst 10
    admitted = 0
    # a caller that always proceeds when told it may: count admissions over 10 s
    while clock.now < 1010.0:
        wait = b.reserve(1)
        clock.now += wait
        admitted += 1
    assert 1000 <= admitted <= 1011  # rate x time, plus at most the burst


def test_burst_then_debt() -> None:
    clock = FakeClock()
    b = TokenBucket(10, burst=5, clock=clock)
    assert [b.reserve(1) for _ in range(5)] == [0, 0, 0, 0, 0]
    assert b.reserve(1) == pytest.approx(0.1)
    assert b.reserve(1) == pytest.approx(0.2)


def test_large_request_goes_into_debt() -> None:
    clock = FakeClock()
    b = TokenBucket(1000, burst=100, clock=clock)
    assert b.reserve(5000) == pytest.approx(4.9)  # admitted; the debt is waited off later


def test_live_change() -> None:
    clock = FakeClock()
    b = TokenBucket(10, clock=clock)
    b.reserve(1)
    b.set(0)
    assert b.reserve(10**6) == 0
    b.set(1000)
    clock.now += 1
    assert b.reserve(1) == 0


def test_negative_rate_refused() -> None:
    with pytest.raises(ValueError):
        TokenBucket(-1)


def test_limit_takes_the_stricter_of_ops_and_bytes() -> None:
    clock = FakeClock()
    lim = Limit(ops=1000, bytes=1000, clock=clock)
    lim.reserve(100)  # burst: 100 ops, 100 bytes
    assert lim.reserve(1000) == pytest.approx(1.0)  # bytes bind, not ops
    lim.set(bytes=0)
    assert lim.describe() == {"ops_per_s": 1000.0, "bytes_per_s": 0.0}
