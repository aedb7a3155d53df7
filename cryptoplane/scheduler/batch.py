"""``plane.map``: a batch of requests run with as little per-request work as each allows.

Three lanes, chosen per request:

* GIL-holding work the balancer keeps inline (AES-GCM on 1 MiB) runs in the caller at
  once, like the fast path, on its kind's inline allowance (``router.py``: reviewed on
  a request that takes the measured path once the allowance is used up);
* GIL-free work on one key (RSA, sector runs) goes in runs that a few lane jobs share
  (``lanes.py``), one of which the caller runs itself when the workers leave it a core;
  GIL-free work measured to be quicker than a hand-off (ECDSA signing) runs in the
  caller at once instead;
* everything else is submitted as usual, and the caller lends its thread while it waits.

Order is kept; each request ends in its own result or error.

The plane hands itself over as a ``Host``: its router, its sessions and its public
``submit``; nothing here reaches into it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, wait
from typing import Any, NamedTuple, Protocol, cast

from .. import requests as rq
from ..chain import Chain
from ..engines.base import releases_gil, releases_gil_op
from ..exceptions import CryptoplaneError
from ..session import OP_INDEX, Session, Sessions
from . import lanes
from .router import Router

# read once: os.cpu_count() costs more than a small batch's planning, and lane_count()
# runs per batch
CORES = os.cpu_count() or 1

Submittable = rq.Request | Chain


class Host(Protocol):
    """What a batch is handed of its plane."""

    @property
    def router(self) -> Router: ...

    @property
    def sessions(self) -> Sessions: ...

    def submit(self, request: Submittable, *, priority: str | None = None,
               client: str | None = None, timeout: float | None = None,
               block: bool = True) -> Future[Any]: ...


Plane = Host  # the name this module's functions have always used for their first argument


def run_map(plane: Plane, items: list[Submittable], *, return_exceptions: bool,
            priority: str | None, client: str | None, timeout: float | None) -> list[Any]:
    limits = has_limits(plane)
    # one decision can serve the whole batch (see ``uniform``)
    one_kind = not limits and bool(items) and uniform(items)
    s = batch_allowed_inline(plane, items) if one_kind else None
    if s is not None:
        return _results(run_all_on_session(plane, s, items),  # type: ignore[arg-type]
                        return_exceptions)
    # one kind of GIL-free work measured to be quick here (measured: work never seen
    # counts as quick, and a batch measured as one would run a whole first batch of
    # RSA signatures here before anyone knew better)
    first: rq.Request = items[0] if one_kind else None  # type: ignore[assignment]
    if one_kind and quicker_than_a_hand_off(plane, first) and plane.router.measured(first):
        return _results(plane.router.run_inline_batch(
            items, client or _client_of(first)), return_exceptions)  # type: ignore[arg-type]
    if limits or len(items) < 4:
        plan: list[tuple[int, Any]] = [(1, r) for r in items]
    elif one_kind and runs_in_lanes(plane, first):
        plan = [(len(items), lanes.Run(items))]  # type: ignore[arg-type]  # no grouping
    else:
        plan = lanes.group(items, runs_in_lanes_by_kind(plane))
    width = 0
    # each slot: a future, the outcomes of work already done here, or a run's lane jobs
    slots: list[Future[Any] | list[tuple[bool, Any]] | RunSlot] = []
    callers_lane: lanes.Lane | None = None  # the lane this thread runs itself
    for _, r in plan:
        if isinstance(r, lanes.Run):
            width = width or lane_count(plane)
            jobs = r.lanes(width)
            if callers_lane is None and len(jobs) > 1 and caller_runs_a_lane(plane, r):
                callers_lane = jobs.pop()
            slots.append(RunSlot(r, submit_lanes(plane, r, jobs, priority, client, timeout)))
            continue
        s = None if limits else session_allowed_inline(plane, r)
        if s is not None:
            slots.append([run_on_session(plane, s, cast(rq.Request, r))])
            continue
        if not limits and quicker_than_a_hand_off(plane, r):
            slots.append([run_measured_inline(plane, cast(rq.Request, r), client)])
            continue
        try:
            # GIL-holding work gains nothing from threads: when the balancer says it
            # is cheapest here, run it now rather than queue it for this thread later
            if isinstance(r, rq.Request) and not releases_gil(r):
                session = plane.sessions.of(r)
                slots.append(plane.router.submit(
                    r, session, priority=priority, client=client, timeout=timeout,
                    block=True, lend=True,
                    session_limit=session.limit_name if session else None))
            else:
                slots.append(plane.submit(r, priority=priority, client=client,
                                          timeout=timeout))
        except CryptoplaneError as e:
            slots.append([(False, e)])
    if callers_lane is not None:  # its requests' own errors go in the run: it raises none
        plane.router.run_inline(callers_lane, client or _client_of(callers_lane))
    waiting = [f for slot in slots for f in (
        slot.futures if isinstance(slot, RunSlot) else [slot] if isinstance(slot, Future)
        else [])]
    if len(waiting) > sum(len(slot.futures) for slot in slots if isinstance(slot, RunSlot)) \
            or lane_threads(plane) < CORES:
        plane.router.help_while_waiting(waiting)
    else:  # only lanes, which threads on every core run: nothing for this thread to take
        wait(waiting)
    outcomes: list[tuple[bool, Any]] = []
    for slot in slots:
        if isinstance(slot, RunSlot):
            outcomes += slot.run.collect(lanes.failure(slot.futures))
        elif isinstance(slot, Future):
            err = slot.exception()
            outcomes.append((False, err) if err is not None else (True, slot.result()))
        else:
            outcomes += slot
    return _results(outcomes, return_exceptions)


def submit_lanes(plane: Plane, run: lanes.Run, jobs: list[lanes.Lane], priority: str | None,
                 client: str | None, timeout: float | None) -> list[Future[Any]]:
    """Queue ``run``'s lane jobs, under its session; a job refused (``Busy``...) is a
    failed future, whose share the other lanes take."""
    session = plane.sessions.of(run.requests[0])
    limit = session.limit_name if session else None
    futures: list[Future[Any]] = []
    for job in jobs:
        try:
            futures.append(plane.router.submit(
                job, session, priority=priority, client=client, timeout=timeout,
                block=True, lend=False, session_limit=limit))
        except CryptoplaneError as e:
            futures.append(_failed(e))
    return futures


def _results(outcomes: list[tuple[bool, Any]], return_exceptions: bool) -> list[Any]:
    """The batch's values in order; unless ``return_exceptions``, the first error is
    raised instead (every request has ended by then)."""
    if not return_exceptions:
        for ok, value in outcomes:
            if not ok:
                raise value
    return [value for _, value in outcomes]


def uniform(items: list[Submittable]) -> bool:
    """Requests all of one type, on one key, and (for GIL-holding work, whose inline
    allowance is per size class) of one size class: one decision can serve the whole batch (the
    common case; deciding and grouping request by request was most of map's own
    cost)."""
    first = items[0]
    if not isinstance(first, rq.Request) or first.key is None:
        return False
    kind, key, size = type(first), first.key, first.nbytes.bit_length()
    # a GIL-free run is one run, whatever the sizes
    sized = not releases_gil_op(key.algorithm, first.op)
    for r in items:  # a loop, not all(): cheaper for the small batches this is for
        if type(r) is not kind or r.key is not key or (
                sized and r.nbytes.bit_length() != size):  # type: ignore[union-attr]
            return False
    return True


def batch_allowed_inline(plane: Plane, items: list[Submittable]) -> Session | None:
    """The session of a uniform batch whose kind's inline allowance is enough for all
    of it: the whole batch then runs in the caller on one decision. Deciding per request
    was a visible share of big AEAD messages' time (the caches cold from the cipher
    work; figures: benchmarks/README.md, map_batch)."""
    first: rq.Request = items[0]  # type: ignore[assignment]  # uniform: a request
    key = first.key
    assert key is not None
    s = key.session_hint
    if s.fast_plane is not plane:  # unbound, elsewhere, or a key's first use here
        return None
    return s if plane.router.take_allowance(first, len(items)) else None  # type: ignore[no-any-return]


class RunSlot(NamedTuple):
    run: lanes.Run
    futures: list[Future[Any]]


def _failed(error: BaseException) -> Future[Any]:
    f: Future[Any] = Future()
    f.set_exception(error)
    return f


def caller_runs_a_lane(plane: Plane, run: lanes.Run) -> bool:
    """Whether the caller runs one of ``run``'s lanes itself, at once: when the
    lane-taking threads leave a core free and the run's session may run inline. Its
    native calls release the GIL, which lets the woken workers start theirs sooner than
    when the caller waits (it holds the GIL until it blocks). When the threads already
    cover every core, a third runner only delays a worker's start: batches ran faster
    with the caller waiting (benchmarks/README.md, map_batch)."""
    if lane_threads(plane) >= CORES:
        return False
    s = plane.sessions.of(run.requests[0])
    return s is None or s.engine is None


def session_allowed_inline(plane: Plane, r: Submittable) -> Session | None:
    """The session of ``r`` when ``r`` is GIL-holding work that its kind's inline
    allowance lets run in the caller (``Router.inline_on_allowance``): it then runs
    like the fast path, without ticket or future."""
    if not isinstance(r, rq.Request) or r.key is None or releases_gil(r):
        return None
    s = r.key.session_hint
    if s.fast_plane is not plane:
        s = plane.sessions.for_key(r.key)  # a key's first use here: its implicit session
    if s.fast_plane is not plane or not plane.router.inline_on_allowance(r):
        return None
    return s  # type: ignore[no-any-return]


def quicker_than_a_hand_off(plane: Plane, r: Submittable) -> bool:
    """GIL-free work measured to cost less inline than a hand-off (ECDSA signing, RSA
    verification): in a lane, its ticket and the GIL turns around each request cost
    more than the second core gives (benchmarks/README.md, map_batch), so it runs in
    the caller at once, as ``submit`` would run it alone."""
    if not isinstance(r, rq.Request) or not releases_gil(r) or not plane.router.small(r):
        return False
    s = plane.sessions.of(r)
    return s is None or s.engine is None


def run_measured_inline(plane: Plane, r: rq.Request, client: str | None) -> tuple[bool, Any]:
    """Run ``r`` in this thread through inline's meter (its estimate stays fresh)."""
    try:
        return True, plane.router.run_inline(r, client or _client_of(r))
    except CryptoplaneError as e:
        return False, e


def run_all_on_session(plane: Plane, s: Session,
                       batch: list[rq.Request]) -> list[tuple[bool, Any]]:
    """A uniform batch run in the caller like the fast path: per request, the call and
    its tally (``run_on_session``); encryptions and decryptions through the session's
    own AEAD call."""
    kind = type(batch[0])
    if kind is rq.Encrypt or kind is rq.Decrypt:
        return _run_aead_on_session(plane, s, batch,  # type: ignore[arg-type]
                                    "encrypt" if kind is rq.Encrypt else "decrypt")
    return [run_on_session(plane, s, r) for r in batch]


def _run_aead_on_session(plane: Plane, s: Session, batch: list[rq.Encrypt | rq.Decrypt],
                         op: str) -> list[tuple[bool, Any]]:
    """Encryptions or decryptions through the session's own AEAD call, as the fast
    path makes them: the kernel's Python layer (measurable even on 1 MiB AES-GCM, the
    caches cold) only where that call fails, to name the error; CBC padding through
    the kernel."""
    call = s.enc if op == "encrypt" else s.dec
    kernel, add, index = s.kernel, s.tally.add, OP_INDEX[op]
    out: list[tuple[bool, Any]] = []
    for r in batch:
        try:
            value = r.apply(kernel) if r.padding else call(r.nonce, r.data, r.aad)
        except Exception as e:  # typed and counted as the fast path does, or raised
            typed = plane.sessions.explain(s, op, e, r.data, r.nonce, r.aad)
            if not isinstance(typed, CryptoplaneError):
                raise typed from None
            out.append((False, typed))
        else:
            add(index, len(r.data))
            out.append((True, value))
    return out


def run_on_session(plane: Plane, s: Session, r: rq.Request) -> tuple[bool, Any]:
    """``r`` run on its session's kernel in the caller, counted as the fast path counts."""
    op = r.op.value
    try:
        value = r.apply(s.kernel)
    except CryptoplaneError as e:
        plane.sessions.counter(s, op).error(e)
        return False, e
    index = OP_INDEX.get(op)
    if index is not None:
        s.tally.add(index, r.nbytes)
    else:
        plane.sessions.counter(s, op).add(1, r.nbytes)
    return True, value


def lane_count(plane: Plane) -> int:
    """Lanes that share a run at once: each thread of the engines that take lane jobs
    (``traits.takes_lanes``; no more than the cores: they share them), and the caller's
    own thread when those threads leave a core free (``caller_runs_a_lane``)."""
    threads = lane_threads(plane)
    return min(threads, CORES) + (0 if threads >= CORES else 1)


def lane_threads(plane: Plane) -> int:
    """Threads of the engines that take lane jobs, the caller's own not counted."""
    return sum(e.parallelism for e in plane.router.engines.values()
               if e.traits.takes_lanes and not e.traits.caller_thread)


def has_limits(plane: Plane) -> bool:
    limits = plane.router.scheduler.limits
    return bool(limits) and any(not lim.unlimited for lim in limits.values())


def runs_in_lanes(plane: Plane, r: rq.Request) -> bool:
    """GIL-free work whose session may run on an engine that takes lane jobs."""
    if not releases_gil(r) or plane.router.small(r):
        return False
    s = plane.sessions.of(r)
    return s is None or s.engine is None or plane.router.engines[s.engine].traits.takes_lanes


def runs_in_lanes_by_kind(plane: Plane) -> Callable[[rq.Request], bool]:
    """``runs_in_lanes``, decided once per type, key and size of request within a batch:
    asked of each request, it was most of the time that grouping a batch cost, while
    the workers waited for their first job (benchmarks/README.md, map_batch)."""
    seen: dict[tuple[type, int, int], bool] = {}

    def test(r: rq.Request) -> bool:
        kind = (type(r), id(r.key), r.nbytes)
        answer = seen.get(kind)
        if answer is None:
            answer = seen[kind] = runs_in_lanes(plane, r)
        return answer
    return test


def _client_of(r: Any) -> str:
    s = r.key.session_hint if getattr(r, "key", None) is not None else None
    return getattr(s, "client", "-") or "-"
