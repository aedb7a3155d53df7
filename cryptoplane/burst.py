"""Bursts: many requests on one key handed to an engine as one job (DPDK's burst enqueue).

Every request that goes through the scheduler costs ~20-40 µs of Python under the GIL
(ticket, queue, wake-up, future, completion, statistics). For a 200 µs RSA signature that
is the difference between 1.9x and 1.3x on two cores: the GIL-held part is what the
threads serialise on. ``plane.map`` therefore cuts a batch of GIL-free work on one key
into bursts of shrinking size over the lanes (each thread of the engines that take
bursts, and the caller's own thread when those leave a core free: ``batch.lanes``): each
burst is one ticket, its requests run back to back on one kernel, and a lane that
finishes early takes the next burst.

Only work that releases the GIL is grouped (GIL-holding work runs inline at submit time
anyway), only for engines that declare ``takes_bursts`` (in-process ones: a pool worker
would need the burst's payloads in shared memory), and never for a client or session
under a QoS limit (a burst would count as one op).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from .algorithms import Algorithm, Op
from .kernels.base import Kernel
from .requests import Request

# each burst takes 1/(SHARE * lanes) of the requests left: a larger share gives smaller
# bursts (each costs one ticket, ~30-50 µs) and lanes that finish closer together
SHARE = 1


class Burst(Request):
    """Requests of one type on one key, run back to back; ``apply`` returns one
    ``(ok, value)`` per request, ``value`` being the result or the request's own error,
    so one failing request does not fail its neighbours."""

    __slots__ = ("_op", "requests")
    burst = True

    def __init__(self, requests: Sequence[Request]) -> None:
        if not requests:
            raise ValueError("an empty burst")
        first = requests[0]
        self.key = first.key
        self._op = first.op
        self.requests = tuple(requests)

    @property  # type: ignore[misc]  # per instance here: a burst is of its requests' op
    def op(self) -> Op:  # type: ignore[override]
        return self._op

    @property
    def algorithm(self) -> Algorithm:
        return self.requests[0].algorithm

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.requests)

    @property
    def count(self) -> int:
        return len(self.requests)

    @property
    def largest(self) -> int:
        return max(r.nbytes for r in self.requests)

    @property
    def retry_safe(self) -> bool:
        return all(r.retry_safe for r in self.requests)

    def kernel(self) -> Kernel:
        return self.requests[0].kernel()

    def apply(self, kernel: Kernel) -> list[tuple[bool, Any]]:
        out: list[tuple[bool, Any]] = []
        append = out.append
        for r in self.requests:
            try:
                append((True, r.apply(kernel)))
            except Exception as e:  # the request's own outcome, delivered in its place
                append((False, e))
        return out

    def __repr__(self) -> str:
        return f"<Burst of {len(self.requests)} {self.algorithm.name} {self.op.value}>"


def group(requests: Sequence[Any], lanes: int, groupable: Any) -> list[tuple[int, Any]]:
    """Cut ``requests`` into ``(count, submittable)``: runs of consecutive requests for
    which ``groupable(r)`` holds and that share type and key become bursts of shrinking
    size (``sizes``); the rest stay as they are (count 1)."""
    out: list[tuple[int, Any]] = []
    run: list[Request] = []

    def flush() -> None:
        i = 0
        for size in sizes(len(run), lanes):
            part = run[i:i + size]
            i += size
            out.append((1, part[0]) if len(part) == 1 else (len(part), Burst(part)))
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


def sizes(n: int, lanes: int) -> list[int]:
    """Burst sizes for a run of ``n`` requests over ``lanes`` lanes, largest first
    (OpenMP's guided schedule): each takes 1/(SHARE * lanes) of what is left, so the
    first bursts amortise their tickets over many requests and the last are single
    requests, which is what lets every lane finish within one request of the others
    (equal bursts left a lane idle for up to a whole burst at the end of each batch)."""
    out: list[int] = []
    share = SHARE * max(1, lanes)
    while n > 0:
        k = max(1, -(-n // share))
        out.append(k)
        n -= k
    return out


def outcomes(fut: Future[Any], count: int) -> list[tuple[bool, Any]]:
    """``(ok, value)`` per request of a submitted request (``count`` 1) or burst."""
    err = fut.exception()
    if count == 1:
        return [(False, err)] if err is not None else [(True, fut.result())]
    if err is not None:  # the whole burst failed (e.g. no engine left)
        return [(False, err)] * count
    return fut.result()  # type: ignore[no-any-return]
