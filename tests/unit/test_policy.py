from __future__ import annotations

from cryptoplane.engines.meter import Estimate, Meter, size_class
from cryptoplane.scheduler.policy import (
    EngineView,
    LeastCompletion,
    RoundRobin,
    SizeSplit,
    completion_time,
)


def view(name: str, latency: float | None, caller: float = 0.0, backlog: int = 0,
         parallelism: int = 1, priority: int = 0) -> EngineView:
    est = None if latency is None else Estimate(latency, caller)
    return EngineView(name, priority, parallelism, backlog, est, name == "inline")


def test_unmeasured_engines_are_tried_first() -> None:
    p = LeastCompletion()
    assert p.choose(100, [view("inline", 1e-6, 1e-6), view("pool", None)]).name == "pool"


def test_least_completion_time_wins() -> None:
    p = LeastCompletion(explore_every=10**9)
    views = [view("inline", 200e-6, 200e-6, priority=100),
             view("threads", 200e-6, 15e-6, backlog=4, parallelism=2)]
    assert p.choose(100, views).name == "inline"  # threads: 200 µs x (1 + 4/2)
    views[1] = view("threads", 200e-6, 15e-6, backlog=0, parallelism=2)
    # equal completion times: the caller's share decides nothing here, priority does
    assert completion_time(views[1]) == completion_time(views[0])


def test_caller_share_counts() -> None:
    # a pool that finishes fast but costs the caller more than the work itself loses
    p = LeastCompletion(explore_every=10**9)
    views = [view("inline", 100e-6, 100e-6), view("pool", 50e-6, 150e-6, parallelism=2)]
    assert p.choose(1 << 20, views).name == "inline"


def test_exploration_revisits_the_runner_up() -> None:
    p = LeastCompletion(explore_every=4)
    views = [view("a", 1e-6, 1e-6), view("b", 2e-6, 2e-6)]
    picks = [p.choose(1, views).name for _ in range(8)]
    assert picks.count("b") == 2


def test_round_robin_and_size_split() -> None:
    rr = RoundRobin()
    views = [view("pool", 1.0), view("threads", 1.0)]
    assert [rr.choose(1, views).name for _ in range(4)] == ["pool", "threads"] * 2
    ss = SizeSplit(threshold=1024)
    views = [view("inline", 1.0), view("pool", 1.0, parallelism=2),
             view("threads", 1.0, parallelism=1)]
    assert ss.choose(100, views).name == "inline"
    assert ss.choose(4096, views).name == "pool"


def test_meter_averages_by_size_class() -> None:
    m = Meter()
    m.record("aes-256-gcm", "encrypt", 1000, 9e-6, 9e-6)  # cold: replaced, not averaged
    assert m.estimate("aes-256-gcm", "encrypt", 1000) is None  # one sample is no estimate
    m.record("aes-256-gcm", "encrypt", 1000, 1e-6, 1e-6)
    m.record("aes-256-gcm", "encrypt", 1023, 2e-6, 2e-6)
    e = m.estimate("aes-256-gcm", "encrypt", 1010)
    assert e is not None and 1e-6 < e.latency < 2e-6 and e.samples == 3
    assert m.estimate("aes-256-gcm", "encrypt", 1 << 20) is None
    assert size_class(1024) != size_class(1000)
    assert "aes-256-gcm/encrypt" in m.rates()
