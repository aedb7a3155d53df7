"""Worker threads for an asyncio server's slow jobs, with completions handed back in
batches: the NBD server's big requests and the fabric server's signatures, key
management and stream pieces.

Why not ``loop.run_in_executor``: per job it builds a concurrent and an asyncio future,
chains them, and wakes the event loop once per completion (an eventfd write, an epoll
return, a loop turn, then one write per reply). With nbdcopy's 256 KiB requests that cost
~130 µs of CPU per request on this 2-core machine, as much as decrypting it, and halved
the NBD server's throughput next to running the same requests on the loop. Here a worker
appends each outcome to a deque and rings the loop only when no ring is pending already,
so one loop turn takes every completion that arrived meanwhile, and each owner (a
connection) sends its replies together (``Owner.settle``).

The jobs release the GIL in their long part (``preadv``, the sector kernel, ``pwritev``,
OpenSSL's signatures), which is what lets the workers run beside the loop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger("cryptoplane")


class Owner(Protocol):
    """Who submitted a job: told of each outcome, then once per batch of outcomes."""

    def completed(self, token: Any, result: Any, error: BaseException | None) -> None: ...

    def settle(self) -> None: ...


# a job: the work, its arguments, who is told, and what is passed back to them
Job = tuple[Callable[..., Any], tuple[Any, ...], Owner, Any]


class Offloader:
    """``workers`` threads running jobs in submission order (per worker), outcomes
    delivered on ``loop``'s thread: ``completed`` per job, then ``settle`` per owner.

    ``coalesce``: with more jobs queued, up to this many completions may wait for a later
    ring (this thread's next completion or another worker's) instead of waking the loop
    each. Under pipelined signatures that made the fabric server's loop wake, and each
    connection write, once per several answers (~70 µs of wake-up and system calls a
    sign, measured). The wait is at most one job, so give it only to pools whose jobs
    are short (not key generation); 0 rings at every completion."""

    def __init__(self, loop: asyncio.AbstractEventLoop, workers: int,
                 name: str = "cryptoplane", *, coalesce: int = 0) -> None:
        if workers < 1:
            raise ValueError("an offloader needs at least one worker")
        self._loop = loop
        self._coalesce = coalesce
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._done: collections.deque[tuple[Owner, Any, Any, BaseException | None]] = (
            collections.deque())
        self._rung = False  # a call of _collect is scheduled and has not started yet
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], owner: Owner,
               token: Any) -> None:
        self._jobs.put((fn, args, owner, token))

    def _ring(self) -> bool:
        """Schedules ``_collect``; False when the loop is closed (nobody is left to tell)."""
        self._rung = True
        try:
            self._loop.call_soon_threadsafe(self._collect)
        except RuntimeError:
            return False
        return True

    def _work(self) -> None:
        take, done, jobs, coalesce = self._jobs.get, self._done, self._jobs, self._coalesce
        while True:
            job = take()
            if job is None:
                if done and not self._rung:  # a completion left for a later ring
                    self._ring()
                return
            fn, args, owner, token = job
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # delivered to the owner, who decides
                result, error = None, exc
            done.append((owner, token, result, error))
            # what the job read (a stream piece's buffer) is not kept while we wait
            job = fn = args = result = None  # type: ignore[assignment]
            # Appended before the flag is read, and _collect clears the flag before it
            # drains: either this ring or the pending one sees the outcome.
            if (not self._rung and (not coalesce or len(done) >= coalesce or jobs.empty())
                    and not self._ring()):
                return

    def _collect(self) -> None:
        self._rung = False
        owners: dict[int, Owner] = {}
        done = self._done
        while done:
            owner, token, result, error = done.popleft()
            owners[id(owner)] = owner
            try:
                owner.completed(token, result, error)
            except Exception:  # one owner's bug must not strand the others' outcomes
                log.exception("a worker's completion failed")
        for owner in owners.values():
            try:
                owner.settle()
            except Exception:
                log.exception("settling a worker's completions failed")

    def shutdown(self, timeout: float = 10.0) -> None:
        """Let queued jobs finish, then stop the threads (their outcomes are delivered
        only while the loop runs)."""
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join(timeout)


__all__ = ["Job", "Offloader", "Owner"]
