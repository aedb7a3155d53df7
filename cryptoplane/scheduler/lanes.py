"""Runs and lanes: many requests on one key shared by a few jobs (DPDK's burst enqueue,
OpenMP's dynamic schedule).

Every request that goes through the scheduler costs tens of µs of Python under the GIL
(ticket, queue, wake-up, future, completion, statistics), and that GIL-held part is what
the threads serialise on: for RSA signing it is much of the second core's gain.
``plane.map`` therefore puts a batch's consecutive GIL-free requests on one key in a
``Run`` and queues one ``Lane`` job per lane (each thread of the engines that take lanes,
and the caller's own thread when those leave a core free: ``batch.lanes``). A lane takes
the run's next request until none is left, so the lanes end within one request of each
other, however late each started or however fast its core is, for one ticket per lane.
(Bursts cut in advance cost a ticket each and left a lane idle at the end of a batch:
the lane that started late had the same share to do. Figures: benchmarks/README.md.)

Only work that releases the GIL is grouped (GIL-holding work runs inline at submit time
anyway), only for engines whose traits say ``takes_lanes`` (in-process ones: a pool
worker would need the run's payloads in shared memory), and never for a client or
session under a QoS limit (a lane would count as one op).

A lane is the scheduler's job object, not a ``Request``: what only the scheduler counts
(how many requests it stands for, which failed, when each ended) lives here.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from ..algorithms import Algorithm, Op
from ..engines.base import LaneJob, Work
from ..kernels.base import Kernel
from ..requests import Request
from ..stats import OpStats

Outcome = tuple[bool, Any]  # (True, result) or (False, the request's own error)


class Run:
    """Requests of one type on one key, in order, and their outcomes as lanes fill them."""

    __slots__ = ("closed", "largest", "nbytes", "outcomes", "requests", "take")

    def __init__(self, requests: Sequence[Request]) -> None:
        if not requests:
            raise ValueError("an empty run")
        self.requests = tuple(requests)
        self.outcomes: list[Outcome | None] = [None] * len(self.requests)
        # the next index to run; next() on a count is atomic under the GIL
        self.take = itertools.count().__next__
        self.closed = False  # set once the batch has its outcomes: late lanes stop
        sizes = [r.nbytes for r in self.requests]
        self.nbytes, self.largest = sum(sizes), max(sizes)

    @property
    def retry_safe(self) -> bool:
        """Asked only when an engine failed under one of its lanes."""
        return all(r.retry_safe for r in self.requests)

    def __len__(self) -> int:
        return len(self.requests)

    def lanes(self, k: int) -> list[Lane]:
        """``k`` lane jobs (at most one per request), each planned for an equal share."""
        n = len(self.requests)
        k = max(1, min(k, n))
        return [Lane(self, n // k + (i < n % k)) for i in range(k)]

    def collect(self, failure: BaseException | None) -> list[Outcome]:
        """The outcome of every request, in order, once every lane has ended; requests no
        lane ran (its job failed as a whole) end with ``failure``."""
        self.closed = True
        missing: Outcome = (False, failure)
        return [o if o is not None else missing for o in self.outcomes]


class Lane(LaneJob):
    """One lane's job over a ``Run``: runs its next request until none is left; one
    failing request does not stop it (``failed`` lists those, with their payload sizes;
    ``elapsed``: seconds from the job's start to each one's end, for its latency).
    ``count`` and ``nbytes`` are the planned share until it has run (what the balancer
    weighs and the plane counts as submitted), then what it ran (what statistics and
    meters count), so the lanes of a run add up to the run either way."""

    __slots__ = ("_count", "_nbytes", "_op", "elapsed", "failed", "key", "run")

    def __init__(self, run: Run, share: int) -> None:
        first = run.requests[0]
        self.key = first.key
        self._op = first.op
        self.run = run
        self._count = share
        self._nbytes = run.nbytes * share // len(run)
        self.failed: list[tuple[BaseException, int]] = []
        self.elapsed: list[float] = []

    @property
    def op(self) -> Op:
        return self._op

    @property
    def algorithm(self) -> Algorithm:
        return self.run.requests[0].algorithm

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def count(self) -> int:
        return self._count

    @property
    def largest(self) -> int:
        return self.run.largest

    @property
    def retry_safe(self) -> bool:
        return self.run.retry_safe

    def kernel(self) -> Kernel:
        return self.run.requests[0].kernel()

    def apply(self, kernel: Kernel) -> int:
        run = self.run
        requests, outcomes, take, n = run.requests, run.outcomes, run.take, len(run)
        done = nbytes = 0
        clock, ended = time.perf_counter, self.elapsed.append
        start = clock()
        while not run.closed:
            i = take()
            if i >= n:
                break
            r = requests[i]
            try:
                outcomes[i] = (True, r.apply(kernel))
            except Exception as e:  # the request's own outcome, delivered in its place
                outcomes[i] = (False, e)
                self.failed.append((e, r.nbytes))
            ended(clock() - start)
            done += 1
            nbytes += r.nbytes
        self._count, self._nbytes = done, nbytes
        return done

    def __repr__(self) -> str:
        return f"<Lane of a run of {len(self.run)} {self.algorithm.name} {self.op.value}>"


def group(requests: Sequence[Any], groupable: Any) -> list[tuple[int, Any]]:
    """Cut ``requests`` into ``(count, item)``: runs of two or more consecutive requests
    for which ``groupable(r)`` holds and that share type and key become a ``Run``; the
    rest stay as they are (count 1)."""
    out: list[tuple[int, Any]] = []
    run: list[Request] = []

    def flush() -> None:
        if len(run) > 1:
            out.append((len(run), Run(run)))
        elif run:
            out.append((1, run[0]))
        run.clear()

    for r in requests:
        if isinstance(r, Request) and groupable(r):
            if run and (type(r) is not type(run[0]) or r.key is not run[0].key):
                flush()
            run.append(r)
        else:
            flush()
            out.append((1, r))
    flush()
    return out


def failure(futures: Sequence[Future[Any]]) -> BaseException | None:
    """The first error among a run's lane jobs (all done), if any failed as a whole."""
    for f in futures:
        err = f.exception()
        if err is not None:
            return err
    return None


def count_done(stats: OpStats, work: Work, latency: float) -> tuple[int, int]:
    """Count a completed job in ``stats``: its requests done and their bytes, the
    errors of those that failed on their own (a lane's), and a latency sample per
    request (``latency``: the job's, from submission to completion; a lane's requests
    each waited as long as it did before it started, then until they ended). Returns
    (done, failed)."""
    if not isinstance(work, Lane):
        stats.latency.record(latency)
        stats.add(1, work.nbytes)
        return 1, 0
    elapsed = work.elapsed
    if elapsed:
        waited = latency - elapsed[-1]
        for ended in elapsed:
            stats.latency.record(waited + ended)
    else:
        stats.latency.record(latency)
    failed = work.failed
    for error, _ in failed:
        stats.error(error)
    done = work.count - len(failed)
    stats.add(done, work.nbytes - sum(n for _, n in failed))
    return done, len(failed)
