"""The scheduler: the slow path, for work that should not run in the caller.

A submitted request becomes a ``Ticket`` in per-priority queues (bounded: a full plane
makes ``submit`` wait or raise ``Busy``); one dispatcher thread hands tickets to engines
in bursts, as each engine has room (its ``capacity`` of requests in flight), choosing
among capable engines with the balancer policy. QoS limits hold a ticket back until its
token bucket allows it. Completions come back on engine threads; each ticket finishes
exactly once, whichever comes first of its result, its deadline or its cancellation.
An engine that breaks hands back its unfinished jobs, which are queued again for the
other capable engines (rehash) when that is safe, or fail with ``EngineFailed``.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from ..engines.base import (
    Engine,
    Health,
    Job,
    Work,
    record,
    releases_gil,
    requests_in,
    run_measured,
)
from ..exceptions import Busy, EngineFailed, NotSupported, Timeout
from ..stats import Registry
from .bucket import Clock, Limit
from .lanes import count_done
from .policy import EngineView, LeastCompletion, Policy
from .queues import PriorityQueues

CORES = os.cpu_count() or 1
BURST = 32  # tickets handed to one engine per dispatch round
MAX_ATTEMPTS = 3  # a request is tried on at most this many engine failures
RECHECK_SECONDS = 0.01  # the dispatcher's longest sleep while work is queued
CHEAP_SECONDS = 60e-6  # work shorter than ~2-3 thread hand-offs stays where it is

QUEUED, DISPATCHED, FINISHED = 0, 1, 2


class Ticket:
    __slots__ = ("attempts", "client", "deadline", "engines", "future", "pinned",
                 "priority", "request", "state", "t_submit", "target")

    def __init__(self, request: Work, future: Future[Any], priority: str, client: str,
                 engines: tuple[str, ...], deadline: float | None, now: float) -> None:
        self.request = request
        self.future = future
        self.priority = priority
        self.client = client
        self.engines = engines  # capable engines, in no order; shrinks on failures
        self.deadline = deadline
        self.attempts = 0
        self.state = QUEUED
        self.t_submit = now
        self.target: str | None = None  # the engine the balancer chose last
        self.pinned: str | None = None  # an exploring choice every taker must honour


class TicketDone:
    """The completion an engine calls for one ticket (a class, so failover can find the
    ticket behind a job an engine hands back)."""

    __slots__ = ("engine", "scheduler", "t_dispatch", "ticket")

    def __init__(self, scheduler: Scheduler, ticket: Ticket, engine: Engine, now: float):
        self.scheduler = scheduler
        self.ticket = ticket
        self.engine = engine
        self.t_dispatch = now

    def __call__(self, result: Any, error: BaseException | None) -> None:
        self.scheduler._completed(self, result, error)


class Scheduler:
    def __init__(self, engines: dict[str, Engine], registry: Registry, *,
                 policy: Policy | None = None, max_queued: int = 10_000,
                 clock: Clock = time.monotonic) -> None:
        self.engines = engines
        self.registry = registry
        self.policy: Policy = policy or LeastCompletion()
        self.max_queued = max_queued
        self._clock = clock
        self._queues: PriorityQueues[Ticket] = PriorityQueues()
        # one lock, and a condition per kind of waiter, so a completion wakes only who
        # can use it (each needless wake-up costs a thread switch's CPU time, and a turn
        # of the GIL)
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)  # the dispatcher
        self._pull_cv = threading.Condition(self._lock)  # pulling engines' workers
        self._help_cv = threading.Condition(self._lock)  # callers lending their thread
        self._space_cv = threading.Condition(self._lock)  # submitters blocked on room
        self._space_waiters = 0
        self._deadlines: list[tuple[float, int, Ticket]] = []  # dispatched, with deadline
        self._seq = itertools.count()
        self._assigned: dict[str, int] = dict.fromkeys(engines, 0)
        self.limits: dict[str, Limit] = {}
        self.counters = dict.fromkeys(
            ("submitted", "completed", "failed", "timeouts", "cancelled", "busy",
             "failovers", "requeued"), 0)
        self._closed = False
        self._helpers = 0  # callers lending their thread (run/map waiting): inline lanes
        # the engine that runs work in the thread that asks (the inline engine), if any
        self.inline = next((e for e in engines.values() if e.traits.caller_thread), None)
        self._inline_name = self.inline.name if self.inline is not None else None
        # engines the dispatcher may have to act for: those it feeds, and inline
        self._dispatchable = frozenset(n for n, e in engines.items()
                                       if e.traits.caller_thread or not e.traits.pulls)
        for e in engines.values():
            e.on_broken = self._rehash
            if e.traits.pulls:
                e.attach(self.pull)
        self._thread = threading.Thread(target=self._run, name="cryptoplane-scheduler",
                                        daemon=True)
        self._thread.start()

    def now(self) -> float:
        return self._clock()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- QoS ----------------------------------------------------------------------------

    def limit(self, client: str, ops: float | None = None,
              nbytes: float | None = None) -> Limit:
        with self._cv:
            lim = self.limits.get(client)
            if lim is None:
                lim = self.limits[client] = Limit(ops or 0, nbytes or 0, clock=self._clock)
            else:
                lim.set(ops, nbytes)
            return lim

    def qos_wait(self, client: str, nbytes: int) -> float:
        """Seconds a request of ``client`` must wait under its limit (0: none)."""
        lim = self.limits.get(client)
        if lim is None or lim.unlimited:
            return 0.0
        with self._cv:
            return lim.reserve(nbytes)

    # -- choosing -----------------------------------------------------------------------

    def views(self, request: Work, engines: Sequence[Engine]) -> list[EngineView]:
        """What the policy sees. Engines of this machine share its cores: a pool of
        processes and a pool of threads are not two machines' worth of lanes, so their
        backlog is counted together and their parallelism capped at the core count;
        then what separates them is each one's own cost (latency, caller's share)."""
        # per request: a lane is compared engine to engine by what each of its requests costs
        alg, op = request.algorithm.name, request.op.value
        n = request.nbytes // max(1, requests_in(request))
        queued = len(self._queues)
        # work that holds the GIL runs one at a time in this process, however many
        # threads offer to run it: for it, in-process engines have a single lane
        serial = not releases_gil(request)
        local_busy = sum(e.inflight + self._assigned.get(e.name, 0)
                         for e in self.engines.values()
                         if e.traits.local and not e.traits.caller_thread)
        views = []
        for e in engines:
            traits = e.traits
            own = e.inflight + self._assigned.get(e.name, 0)
            # inline's lane is whichever thread runs it: only its own claims queue there
            shared = traits.local and not traits.caller_thread
            backlog = (local_busy if shared else own) + queued
            lanes = min(e.parallelism, CORES) if traits.local else e.parallelism
            if serial and traits.in_process:
                lanes = 1
            views.append(EngineView(e.name, e.priority, lanes, backlog,
                                    e.meter.estimate(alg, op, n), traits.caller_thread))
        return views

    def choose(self, request: Work, engines: Sequence[Engine], *,
               explore: bool = True) -> Engine:
        if len(engines) == 1:
            return engines[0]
        pick = self.policy.choose(request.nbytes, self.views(request, engines),
                                  explore=explore)
        return self.engines[pick.name]

    # -- submitting ---------------------------------------------------------------------

    def enqueue(self, request: Work, future: Future[Any], *, engines: Sequence[str],
                priority: str = "normal", client: str = "-", timeout: float | None = None,
                block: bool = True, not_before: float = 0.0) -> Ticket:
        if not engines:
            raise NotSupported(f"no engine of this plane can serve {request!r}")
        now = self._clock()
        deadline = now + timeout if timeout is not None else None
        ticket = Ticket(request, future, priority, client, tuple(engines), deadline, now)
        with self._cv:
            while len(self._queues) >= self.max_queued and not self._closed:
                if not block:
                    self.counters["busy"] += 1
                    raise Busy(f"the plane's queues are full ({self.max_queued} requests)")
                remaining = None if deadline is None else deadline - self._clock()
                if remaining is not None and remaining <= 0:
                    self.counters["timeouts"] += 1
                    raise Timeout("timed out waiting for room in the plane's queues")
                self._space_waiters += 1
                try:
                    self._space_cv.wait(remaining)
                finally:
                    self._space_waiters -= 1
            if self._closed:
                raise EngineFailed("the plane is closed")
            self.counters["submitted"] += requests_in(request)
            self._queues.put(priority, ticket, not_before=not_before, now=now)
            if deadline is not None:  # expired by the dispatcher, queued or in flight
                heapq.heappush(self._deadlines, (deadline, next(self._seq), ticket))
            self._wake_takers(ticket)
        return ticket

    def _wake_takers(self, t: Ticket) -> None:
        """New work queued (the lock is held): one of each kind of taker that could run
        it looks at it. Waking the dispatcher for work only pulling workers can take
        would cost a context switch and a turn of the GIL per request for nothing."""
        engines = [self.engines[n] for n in t.engines]
        if any(not e.traits.pulls and not e.traits.caller_thread for e in engines) or (
                self._inline_name in t.engines
                and not self._threads_cover_cores(t, engines)):
            self._cv.notify()
        self._pull_cv.notify()
        if self._helpers:
            self._help_cv.notify()

    # -- finishing ----------------------------------------------------------------------

    def _finish(self, t: Ticket) -> bool:
        """Claim the right to complete ``t``: true exactly once per ticket."""
        with self._lock:
            if t.state == FINISHED:
                return False
            t.state = FINISHED
            return True

    def _fail(self, t: Ticket, error: BaseException, engine: str = "-") -> None:
        if not self._finish(t):
            return
        key = "timeouts" if isinstance(error, Timeout) else "failed"
        self.counters[key] += 1
        req = t.request
        self.registry.get(engine, req.algorithm.name, req.op.value, t.client).error(error)
        _settle(t.future, None, error)

    def _completed(self, done: TicketDone, result: Any, error: BaseException | None) -> None:
        t, engine = done.ticket, done.engine
        failed_engine = isinstance(error, EngineFailed)
        with self._lock:
            self._assigned[engine.name] = max(0, self._assigned[engine.name] - 1)
            if (not engine.traits.pulls and not engine.traits.caller_thread
                    and len(self._queues)):
                # room in a dispatched-to engine, for work that waits; with none queued
                # the wake-up would only cost a thread switch and a turn of the GIL
                self._cv.notify()
            if t.state == FINISHED:
                return  # already timed out or failed over: this late answer is dropped
            if not failed_engine:
                t.state = FINISHED
        if failed_engine and (self._retry(t, engine.name) or not self._finish(t)):
            return
        now = self._clock()
        req = t.request
        stats = self.registry.get(engine.name, req.algorithm.name, req.op.value, t.client)
        if error is None:
            ok, failed = count_done(stats, req, now - t.t_submit)
            self.counters["completed"] += ok
            self.counters["failed"] += failed
        else:
            stats.latency.record(now - t.t_submit)
            stats.error(error)
            self.counters["failed"] += requests_in(req)
        _settle(t.future, result, error)
        if self._helpers:  # a caller may be waiting for exactly this one
            with self._lock:
                self._help_cv.notify_all()

    def _retry(self, t: Ticket, failed_engine: str) -> bool:
        """Queue ``t`` again for another engine, if that is safe and one is left."""
        t.attempts += 1
        others = tuple(n for n in t.engines if n != failed_engine
                       and self.engines[n].health is not Health.BROKEN)
        if not t.request.retry_safe or t.attempts >= MAX_ATTEMPTS or not others:
            return False
        with self._cv:
            if t.state == FINISHED:
                return True
            t.engines = others
            t.target = t.pinned = None
            t.state = QUEUED
            self.counters["failovers"] += 1
            self._queues.put_front(t.priority, t)
            self._wake_takers(t)
        return True

    def _rehash(self, jobs: list[Job]) -> None:
        """An engine broke: its unfinished jobs go to the other capable engines."""
        for _, done in jobs:
            if isinstance(done, TicketDone):
                with self._cv:
                    name = done.engine.name
                    self._assigned[name] = max(0, self._assigned[name] - 1)
                if not self._retry(done.ticket, done.engine.name):
                    self._fail(done.ticket, EngineFailed(
                        f"engine {done.engine.name!r} broke and no other engine can take "
                        f"{done.ticket.request!r}"), done.engine.name)
            else:  # not one of ours: fail it plainly, it must still end once
                done(None, EngineFailed("engine broke"))

    # -- the dispatcher -----------------------------------------------------------------

    def _target(self, t: Ticket, *, explore: bool = False) -> str:
        """The engine for ``t`` now: the policy's choice with the backlogs as they are at
        this moment (asked again by each taker that finds ``t`` at the head: a worker
        that just became free may be the best place for it now). When the dispatcher
        explores (sends it to the runner-up to measure that engine again), the choice is
        pinned, or the next taker's straight answer would undo it."""
        if t.pinned is not None and self.engines[t.pinned].health is not Health.BROKEN:
            return t.pinned
        capable = [self.engines[n] for n in t.engines
                   if self.engines[n].health is not Health.BROKEN]
        if not capable:
            capable = [self.engines[n] for n in t.engines]
        if self._threads_cover_cores(t, capable):
            capable = [e for e in capable if not e.traits.caller_thread]
        t.target = self.choose(t.request, capable, explore=False).name
        if explore:
            chosen = self.choose(t.request, capable, explore=True).name
            if chosen != t.target:
                t.target = t.pinned = chosen
        return t.target

    def _threads_cover_cores(self, t: Ticket, engines: Sequence[Engine]) -> bool:
        """GIL-free work worth a hand-off, and in-process workers for every core: the
        caller's thread would be one more runner than there are cores, adding only
        contention (for the cores and for the GIL each runner takes back after its
        work)."""
        return (releases_gil(t.request) and not self.cheap_inline(t.request) and any(
            e.traits.pulls and e.traits.in_process and e.parallelism >= CORES
            for e in engines))

    def cheap_inline(self, request: Work) -> bool:
        """Measured to take less inline than a few thread hand-offs (ECDSA signing,
        RSA verification): not worth sending anywhere. Never measured
        counts as cheap: the first one runs inline, and that measures it.

        Any in-process engine's figure counts, as they all run the same kernel: with
        inline's alone, one slow first call (a key's lazy set-up) sent the work to
        threads for good, where inline was never measured again."""
        inline = self.inline
        if inline is None:
            return False
        alg, op, n = request.algorithm.name, request.op.value, max(1, requests_in(request))
        size = request.nbytes // n
        estimates = {name: e.meter.estimate(alg, op, size)
                     for name, e in self.engines.items() if e.traits.in_process}
        if estimates.get(inline.name) is None:
            return True
        return min(x.latency for x in estimates.values() if x is not None) * n < CHEAP_SECONDS

    def _head(self, now: float) -> tuple[str, Ticket] | None:
        """The ticket the priority rule serves next, dropping finished or expired ones."""
        while True:
            cls = self._queues.next_class()
            if cls is None:
                return None
            t = self._queues.peek(cls)
            if t.state == FINISHED:  # timed out while queued: drop it here
                self._queues.pop(cls)
                continue
            if t.deadline is not None and now >= t.deadline:
                self._queues.pop(cls)
                self._expired(t)
                continue
            return cls, t

    def _claim(self, cls: str, t: Ticket, name: str) -> bool:
        """Take ``t`` out of the queues for engine ``name`` (the lock is held)."""
        self._queues.pop(cls)
        self._queues.served(cls)
        if self._space_waiters:
            self._space_cv.notify()
        if not self._start(t):
            return False
        self._assigned[name] = self._assigned.get(name, 0) + 1
        t.state = DISPATCHED
        return True

    def _take(self, now: float) -> tuple[dict[str, list[Ticket]], list[Ticket]]:
        """Pop the tickets whose chosen engine is one the dispatcher feeds and has room,
        by the priority rule; plus tickets for inline when no caller is lending its
        thread (the dispatcher runs those itself rather than strand them)."""
        batch: dict[str, list[Ticket]] = {}
        here: list[Ticket] = []
        room = {n: e.capacity - e.inflight - self._assigned[n]
                for n, e in self.engines.items()
                if not e.traits.caller_thread and not e.traits.pulls}
        for _ in range(BURST * max(1, len(room))):
            head = self._head(now)
            if head is None:
                break
            cls, t = head
            target = self._target(t, explore=True)
            if target == self._inline_name:
                if self._helpers:
                    break  # a waiting caller will steal it
                if self._claim(cls, t, target):
                    here.append(t)
                continue
            if target not in room or room[target] <= 0:
                break  # a pulling engine's worker takes it, or the head waits for room
            if not self._claim(cls, t, target):
                continue
            room[target] -= 1
            batch.setdefault(target, []).append(t)
        return batch, here

    def pull(self, name: str, timeout: float) -> Job | None:
        """For a pulling engine's worker: the next ticket chosen for ``name``, waiting up
        to ``timeout`` seconds for one."""
        engine = self.engines[name]
        with self._cv:
            end = self._clock() + timeout
            while not self._closed:
                now = self._clock()
                self._queues.release_due(now)
                head = self._head(now)
                if head is not None:
                    cls, t = head
                    target = self._target(t)
                    # inline work with no caller to run it: a free worker thread is as
                    # good a place as the dispatcher's own
                    if target == name or (target == self._inline_name and not self._helpers
                                           and name in t.engines):
                        if self._claim(cls, t, name):
                            return (t.request, TicketDone(self, t, engine, now))
                        continue
                if now >= end:
                    return None
                # queued but not ours: the backlogs change as others finish, look again soon
                nap = min(end - now, RECHECK_SECONDS) if len(self._queues) else end - now
                self._pull_cv.wait(nap)
        return None

    def steal(self, name: str) -> Ticket | None:
        """For a caller waiting on its results: the next ticket it may run itself in its
        own thread (chosen for inline, or any it can run while every pulling worker is
        busy: an idle caller is a free lane)."""
        with self._cv:
            now = self._clock()
            self._queues.release_due(now)
            head = self._head(now)
            if head is None:
                return None
            cls, t = head
            if name not in t.engines:
                return None
            target = self._target(t)
            if target != name:
                e = self.engines[target]
                busy = e.inflight + self._assigned.get(target, 0) >= e.parallelism
                if not (e.traits.pulls and busy) or self._threads_cover_cores(t, [e]):
                    return None
            if not self._claim(cls, t, name):
                return None
            return t

    def helping(self, delta: int) -> None:
        with self._lock:
            self._helpers += delta
            if not self._helpers:
                self._cv.notify()  # inline work no caller will take: the dispatcher's now

    def wait_for_work(self, timeout: float, done: Callable[[], bool]) -> None:
        """For a helping caller with nothing to take: sleep until work is queued, a
        request completes, or the timeout (what is queued may become the caller's when
        the workers get busy). ``done`` is checked under the lock first, so a completion
        between the caller's last look and this wait still wakes it."""
        with self._lock:
            if not done():
                self._help_cv.wait(timeout)

    def _start(self, t: Ticket) -> bool:
        """Mark ``t``'s future running (once: a failed-over ticket already is); false when
        the caller cancelled it while it was queued, which is then its one outcome."""
        if t.future.running() or t.future.set_running_or_notify_cancel():
            return True
        t.state = FINISHED
        self.counters["cancelled"] += 1
        return False

    def _expired(self, t: Ticket) -> None:
        # called with the lock held: finish inline without re-taking it
        if t.state == FINISHED:
            return
        t.state = FINISHED
        self.counters["timeouts"] += 1
        req = t.request
        err = Timeout(f"{req!r} did not complete within its deadline")
        self.registry.get("-", req.algorithm.name, req.op.value, t.client).error(err)
        _settle(t.future, None, err)

    def _run(self) -> None:
        while True:
            with self._cv:
                now = self._clock()
                next_due = self._queues.release_due(now)
                while self._deadlines and (self._deadlines[0][0] <= now
                                           or self._deadlines[0][2].state == FINISHED):
                    _, _, t = heapq.heappop(self._deadlines)
                    if t.state != FINISHED:
                        self._expired(t)
                if self._closed and not len(self._queues):
                    return
                batch, here = self._take(now)
                if not batch and not here:
                    waits = [w - now for w in (next_due, self._deadlines[0][0]
                                               if self._deadlines else None) if w is not None]
                    if self._queues.has_work_for(self._dispatchable):
                        # queued for another taker: look again soon, in case it changed
                        waits.append(RECHECK_SECONDS)
                    self._cv.wait(max(0.0, min(waits)) if waits else None)
                    continue
            for name, tickets in batch.items():
                engine = self.engines[name]
                t0 = self._clock()
                jobs = [(t.request, TicketDone(self, t, engine, t0)) for t in tickets]
                try:
                    accepted = engine.submit(jobs)
                except Exception as e:  # a device that raises instead of completing
                    err = EngineFailed(f"engine {name!r} failed to take work: "
                                       f"{type(e).__name__}")
                    for job in jobs:
                        job[1](None, err)
                    continue
                if accepted < len(jobs):  # backpressure: the rest keep their place
                    with self._cv:
                        self._assigned[name] -= len(jobs) - accepted
                        for t in reversed(tickets[accepted:]):
                            t.state = QUEUED
                            self._queues.put_front(t.priority, t)
                        self.counters["requeued"] += len(jobs) - accepted
            # inline work last: the other engines' share is on its way (a remote
            # server, a pool's workers) while this thread runs it
            inline = self.inline
            for t in here:  # chosen for inline and no caller to run it: run it here
                assert inline is not None
                done = TicketDone(self, t, inline, self._clock())
                req = t.request
                result, error, work = run_measured(req)
                record(inline.meter, req, work, work)
                done(result, error)

    def depth(self) -> dict[str, int]:
        with self._cv:
            return self._queues.depth()

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking work; fail what is still queued; wait for the dispatcher."""
        with self._cv:
            self._closed = True
            leftovers = list(self._queues.drain())
            for cv in (self._cv, self._pull_cv, self._help_cv, self._space_cv):
                cv.notify_all()
        for t in leftovers:
            self._fail(t, EngineFailed("the plane closed before this request ran"))
        self._thread.join(timeout)


def _settle(future: Future[Any], result: Any, error: BaseException | None) -> None:
    """Complete a future that may already be running, cancelled or done; never raises."""
    try:
        if future.done():
            return
        if not future.running() and not future.set_running_or_notify_cancel():
            return  # cancelled while queued
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except Exception:  # a racing completion: the first outcome stands
        pass

