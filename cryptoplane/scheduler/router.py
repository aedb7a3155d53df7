"""The router: where each request that is not on the fast path runs.

For every request it finds the capable engines (honouring a session's binding), applies
the client's QoS limit, then either runs it at once in the caller (small work, or work
the balancer judges cheaper here) or queues it for the dispatcher. A caller waiting on a
batch lends its own thread: it takes queued work it could run inline while it waits, so
the caller is one more lane instead of an idle one.

Asking the balancer costs more than a small request's work, so its answer is kept as an
*inline allowance*: when it judges inline the cheapest engine for a kind of GIL-holding
request (``request_kind``: type, algorithm, size class), that many more requests of the
kind run inline without asking again; the first one that finds the allowance used up
takes the measured path (so inline's estimate stays fresh) and asks the balancer anew
(a *review*), which grants a new allowance or none.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from ..algorithms import Kind
from ..engines.base import Engine, LaneJob, Work, record, run_measured
from ..exceptions import CryptoplaneError, InvalidRequest, NotSupported
from ..requests import Request
from ..session import Session
from .core import Scheduler, TicketDone
from .lanes import count_done

# The allowance a review grants: at least REVIEW_EVERY requests, and as many as take
# REVIEW_SECONDS inline. A review (two balancer decisions and the measured path; a
# hand-off when the balancer explores) costs far more than a small request: granted for
# fewer, it was a measurable share of map's time even on 1 MiB AES-GCM
# (benchmarks/README.md, map_batch).
REVIEW_EVERY = 64
REVIEW_SECONDS = 0.05

RequestKind = tuple[type, str, int]


def request_kind(request: Request) -> RequestKind:
    """What an inline allowance is kept per: request type, algorithm and size class (a
    power of two)."""
    return type(request), request.algorithm.name, request.nbytes.bit_length()


class Router:
    def __init__(self, engines: dict[str, Engine], scheduler: Scheduler,
                 fast_path_limit: int) -> None:
        self.engines = engines
        self.inline = scheduler.inline  # the engine whose traits say caller_thread
        self.scheduler = scheduler
        self.fast_path_limit = fast_path_limit
        # per kind of request: how many more may run inline before a review
        self.allowances: dict[RequestKind, int] = {}

    def candidates(self, request: Work, bound: str | None) -> list[Engine]:
        if bound is not None:
            engine = self.engines[bound]
            if not engine.can_serve(request):
                raise NotSupported(f"engine {bound!r} cannot serve {request!r}")
            return [engine]
        found = [e for e in self.engines.values() if e.can_serve(request)]
        if not found:
            raise NotSupported(f"no engine of this plane can serve {request!r}")
        return found

    def small(self, request: Work) -> bool:
        """Work cheaper to do now than to hand over: small symmetric requests (up to the
        fast-path limit, a thread hand-off costs more than the cipher), and asymmetric
        operations measured to be that quick."""
        if request.algorithm.kind not in (Kind.AKCIPHER, Kind.KPP):
            return request.nbytes <= self.fast_path_limit
        return self.scheduler.cheap_inline(request)  # e.g. ECDSA signing, RSA verifying

    def execute(self, request: Work) -> Any:
        """Run in this thread and feed the inline engine's meter (the balancer learns
        what inline costs from here; the sync fast path measures nothing)."""
        assert self.inline is not None
        result, error, work = run_measured(request)
        record(self.inline.meter, request, work, work)
        if error is not None:
            raise error
        return result

    def measured(self, request: Request) -> bool:
        """Whether inline has a figure for requests like ``request``."""
        return self.inline is not None and self.inline.meter.estimate(
            request.algorithm.name, request.op.value, request.nbytes) is not None

    def run_inline_batch(self, requests: Sequence[Request],
                         client: str) -> list[tuple[bool, Any]]:
        """``run_inline`` for requests of one kind, measured as one: per request only
        the call, its latency and its tally; one CPU-time reading for the meter, which
        learns each one's share. For quick GIL-free work (ECDSA signing, RSA verifying)
        the per-request measured path was a large share of each request's cost
        (benchmarks/README.md, map_batch)."""
        assert self.inline is not None and requests
        first = requests[0]
        alg, op = first.algorithm.name, first.op.value
        stats = self.scheduler.registry.get(self.inline.name, alg, op, client)
        kernel, clock, latency = first.kernel(), time.perf_counter, stats.latency
        out: list[tuple[bool, Any]] = []
        work = time.thread_time()
        for r in requests:
            t0 = clock()
            try:
                value = r.apply(kernel)
            except CryptoplaneError as e:
                stats.error(e)
                out.append((False, e))
                continue
            latency.record(clock() - t0)
            stats.add(1, r.nbytes)
            out.append((True, value))
        work = (time.thread_time() - work) / len(requests)
        self.inline.meter.record(alg, op, first.nbytes, work, work)
        return out

    def run_inline(self, request: Work, client: str) -> Any:
        """Run in this thread, counted like any engine's work."""
        assert self.inline is not None
        registry = self.scheduler.registry
        stats = registry.get(self.inline.name, request.algorithm.name, request.op.value,
                             client)
        t0 = time.perf_counter()
        try:
            out = self.execute(request)
        except CryptoplaneError as e:
            stats.error(e)
            raise
        count_done(stats, request, time.perf_counter() - t0)
        return out

    def submit(self, request: Work, session: Session | None, *, priority: str | None,
               client: str | None, timeout: float | None, block: bool, lend: bool,
               session_limit: str | None) -> Future[Any]:
        """``lend``: the caller will wait for this result anyway, so running big work in
        its thread costs it nothing (``run``); otherwise only small work runs here."""
        if not isinstance(request, (Request, LaneJob)):
            raise InvalidRequest(f"expected a request, not {type(request).__name__}")
        if self.scheduler.closed:
            raise InvalidRequest("this plane is closed")
        priority = priority or (session.priority if session is not None else "normal")
        client = client or (session.client if session is not None else "-")
        bound = session.engine if session is not None else None
        engines = self.candidates(request, bound)
        wait = self.scheduler.qos_wait(client, request.nbytes)
        if session_limit is not None:
            wait = max(wait, self.scheduler.qos_wait(session_limit, request.nbytes))
        fut: Future[Any] = Future()
        if engines == [self.inline] and wait:
            time.sleep(wait)  # nothing else can run it: the QoS wait is the caller's
            wait = 0.0
        if wait == 0 and self.inline in engines and (
                len(engines) == 1 or self.small(request)
                or (lend and self._inline_wins(request, engines))):
            fut.set_running_or_notify_cancel()
            try:
                fut.set_result(self.run_inline(request, client))
            except CryptoplaneError as e:
                fut.set_exception(e)
            return fut
        names = [e.name for e in engines]
        self.scheduler.enqueue(request, fut, engines=names, priority=priority, client=client,
                               timeout=timeout, block=block,
                               not_before=self.scheduler.now() + wait if wait else 0.0)
        return fut

    def take_allowance(self, request: Request, count: int) -> bool:
        """Whether ``count`` requests of ``request``'s kind (``request_kind``) may run
        inline on its allowance, which then has that many fewer left. Only GIL-holding
        work is ever granted one. Never reviews: a kind without enough left is decided
        one request at a time (``inline_on_allowance``), and reviewed there."""
        k = request_kind(request)
        left = self.allowances.get(k, 0)
        if left < count:
            return False
        self.allowances[k] = left - count
        return True

    def inline_on_allowance(self, request: Request) -> bool:
        """Whether ``request`` (GIL-holding, on a session the fast path serves) may run
        inline without asking the balancer: its kind's allowance is not used up. One
        that finds it used up gets False, takes the measured path (so inline's estimates
        stay fresh), and this review grants the kind a new allowance, of
        ``REVIEW_EVERY`` requests or ``REVIEW_SECONDS`` of inline work, whichever is
        more, if the balancer now picks inline, or none."""
        k = request_kind(request)
        left = self.allowances.get(k, 0)
        if left > 0:
            self.allowances[k] = left - 1
            return True
        engines = self.candidates(request, None)
        budget = REVIEW_EVERY
        if self.inline not in engines:
            wins = False
        elif len(engines) == 1 or self.small(request):
            wins = True  # what submit() would run here without asking the balancer
        else:
            views = self.scheduler.views(request, engines)
            # an engine not measured yet for this kind must get its turn first
            wins = all(v.estimate is not None for v in views) and self.scheduler.policy.choose(
                request.nbytes, views, explore=False).caller_thread
            inline = next((v.estimate for v in views if v.caller_thread), None)
            if inline is not None and inline.latency > 0:
                budget = max(budget, min(1 << 16, round(REVIEW_SECONDS / inline.latency)))
        self.allowances[k] = budget if wins else 0
        return False

    def _inline_wins(self, request: Work, engines: Sequence[Engine]) -> bool:
        return self.scheduler.choose(request, engines) is self.inline

    def help_while_waiting(self, futures: Sequence[Future[Any]]) -> None:
        """Lend this thread to queued work that may run inline until ``futures`` are done."""
        if self.inline is None:
            return
        pending = [f for f in futures if not f.done()]
        if not pending:
            return
        self.scheduler.helping(+1)
        try:
            while pending:
                ticket = self.scheduler.steal(self.inline.name)
                if ticket is None:
                    # nothing for this thread now: sleep until work is queued (or a
                    # moment passes), then see which of ours are done
                    self.scheduler.wait_for_work(
                        0.002, lambda p=pending: all(f.done() for f in p))  # type: ignore[misc]
                    pending = [f for f in pending if not f.done()]
                    continue
                done = TicketDone(self.scheduler, ticket, self.inline, time.monotonic())
                try:
                    result = self.execute(ticket.request)  # counted by the completion
                except CryptoplaneError as e:
                    done(None, e)
                else:
                    done(result, None)
                pending = [f for f in pending if not f.done()]
        finally:
            self.scheduler.helping(-1)


__all__ = ["Router"]
