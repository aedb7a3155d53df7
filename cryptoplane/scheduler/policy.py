"""Balancer policies: pure choices from data about the candidate engines.

The scheduler builds an ``EngineView`` per capable engine (its measured estimate for this
kind of request, its backlog, its parallelism) and asks a policy to pick one. Policies
never look at engine classes, only at these numbers (DPDK: capabilities are data).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..engines.meter import Estimate


@dataclass(frozen=True, slots=True)
class EngineView:
    name: str
    priority: int
    parallelism: int  # lanes working at once (workers, threads; 1 for inline)
    backlog: int  # requests inside the engine or queued for it
    estimate: Estimate | None  # None: never measured for this kind of request
    caller_thread: bool = False  # runs it in the asking thread (the inline engine)


class Policy(Protocol):
    name: str

    def choose(self, nbytes: int, candidates: Sequence[EngineView], *,
               explore: bool = True) -> EngineView: ...


def completion_time(v: EngineView) -> float:
    """Estimated seconds until a request handed to ``v`` now completes, counting that
    the caller's own share (copies, hand-off) can not overlap with the caller's next one."""
    e = v.estimate
    assert e is not None
    lanes = max(1, v.parallelism)
    # a free lane starts it at once; beyond that, it waits for its share of the backlog
    queued = max(0, v.backlog - lanes + 1)
    return max(e.caller, e.latency * (1 + queued / lanes))


def _caller(v: EngineView) -> float:
    return v.estimate.caller if v.estimate is not None else 0.0


class LeastCompletion:
    """Default: the smallest estimated completion time (queued work / measured rate).

    Engines never measured for this kind of request are tried first, so the estimates
    exist; one decision in ``explore_every`` goes to the runner-up, so an engine that
    lost once (a cold start, a noisy neighbour) gets measured again. Only the dispatcher
    explores (``explore=True``): a free worker asking "is this mine?" must get a straight
    answer, or it would idle while the work waits for a busier lane.
    """

    name = "least-completion"

    def __init__(self, explore_every: int = 64) -> None:
        self._explore_every = explore_every
        self._n = itertools.count(1)

    def choose(self, nbytes: int, candidates: Sequence[EngineView], *,
               explore: bool = True) -> EngineView:
        unknown = [c for c in candidates if c.estimate is None]
        if unknown:
            return min(unknown, key=lambda c: (c.backlog, -c.priority))
        # equal times: the engine that costs the caller less leaves it free for the next
        ranked = sorted(candidates, key=lambda c: (completion_time(c), _caller(c), -c.priority))
        if explore and len(ranked) > 1 and next(self._n) % self._explore_every == 0:
            return ranked[1]
        return ranked[0]


class RoundRobin:
    name = "round-robin"

    def __init__(self) -> None:
        self._n = itertools.count()

    def choose(self, nbytes: int, candidates: Sequence[EngineView], *,
               explore: bool = True) -> EngineView:
        ordered = sorted(candidates, key=lambda c: c.name)
        return ordered[next(self._n) % len(ordered)]


class SizeSplit:
    """Small requests inline (when inline may serve them), large ones to the engine with
    the most parallelism."""

    name = "size-split"

    def __init__(self, threshold: int = 64 * 1024) -> None:
        self.threshold = threshold

    def choose(self, nbytes: int, candidates: Sequence[EngineView], *,
               explore: bool = True) -> EngineView:
        if nbytes <= self.threshold:
            for c in candidates:
                if c.caller_thread:
                    return c
        others = [c for c in candidates if not c.caller_thread] or list(candidates)
        return max(others, key=lambda c: (c.parallelism, c.priority, -c.backlog))


POLICIES: dict[str, type[LeastCompletion] | type[RoundRobin] | type[SizeSplit]] = {
    LeastCompletion.name: LeastCompletion,
    RoundRobin.name: RoundRobin,
    SizeSplit.name: SizeSplit,
}
