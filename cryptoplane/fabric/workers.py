"""Worker threads for the server's slow requests, with completions handed back in batches.

What runs here: signatures (RSA, ECDSA, Ed25519: tens of µs to ms, the GIL released in
OpenSSL), key management (a database round trip, an RSA key generation), token checks,
big payloads. What does not: AES-GCM, ChaCha20-Poly1305, HMAC and digests of small
payloads, which cost less than the hop and run on the event loop.

Why not ``loop.run_in_executor``: it makes a concurrent and an asyncio future per job and
wakes the loop once per completion. Here a worker appends its outcome to a deque and
rings the loop only when no ring is pending already, so one loop turn takes every
outcome that arrived meanwhile, and each connection writes all its answers at once
(``Owner.settle``), as the NBD server's offloader does.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger("cryptoplane.fabric")

# completions a worker may leave for a later ring while jobs are queued
_COALESCE = 32


class Owner(Protocol):
    """Who submitted a job: told of each outcome, then once per batch of outcomes."""

    def completed(self, token: Any, result: Any, error: BaseException | None) -> None: ...

    def settle(self) -> None: ...


Job = tuple[Callable[..., Any], tuple[Any, ...], Owner, Any]


class Workers:
    """``count`` threads taking jobs in submission order; outcomes delivered on ``loop``'s
    thread to the job's owner (``completed`` per job, then ``settle`` per owner)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int,
                 name: str = "cryptoplane-fabric") -> None:
        if count < 1:
            raise ValueError("a worker pool needs at least one thread")
        self._loop = loop
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._done: collections.deque[tuple[Owner, Any, Any, BaseException | None]] = (
            collections.deque())
        self._rung = False
        self.pending = 0  # submitted and not yet delivered (read on the loop's thread)
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(count)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], owner: Owner,
               token: Any) -> None:
        self.pending += 1
        self._jobs.put((fn, args, owner, token))

    def _work(self) -> None:
        take, done, loop, jobs = self._jobs.get, self._done, self._loop, self._jobs
        while True:
            job = take()
            if job is None:
                if done and not self._rung:  # a completion deferred below
                    self._rung = True
                    with contextlib.suppress(RuntimeError):
                        loop.call_soon_threadsafe(self._collect)
                return
            fn, args, owner, token = job
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # the owner turns it into an answer
                result, error = None, exc
            done.append((owner, token, result, error))
            # what the job read (a stream piece's buffer) is not kept while we wait
            job = fn = args = result = None  # type: ignore[assignment]
            # appended before the flag is read; _collect clears the flag before draining.
            # With more jobs queued, this thread's next completion (or another worker's)
            # rings instead: under a pipelined load of signatures the loop then wakes,
            # and each connection writes, once per several answers instead of once per
            # answer (~70 µs of loop wake-up and system calls a sign, measured). The
            # delay is at most one job; an answer awaited alone is rung at once.
            if not self._rung and (jobs.empty() or len(done) >= _COALESCE):
                self._rung = True
                try:
                    loop.call_soon_threadsafe(self._collect)
                except RuntimeError:  # the loop is closed: nobody is left to tell
                    return

    def _collect(self) -> None:
        self._rung = False
        owners: dict[int, Owner] = {}
        done = self._done
        while done:
            owner, token, result, error = done.popleft()
            self.pending -= 1
            owners[id(owner)] = owner
            try:
                owner.completed(token, result, error)
            except Exception:  # one owner's bug must not strand the others' answers
                log.exception("a worker's completion failed")
        for owner in owners.values():
            try:
                owner.settle()
            except Exception:
                log.exception("settling a worker's completions failed")

    def shutdown(self, timeout: float = 10.0) -> None:
        """Let queued jobs finish, then stop the threads."""
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join(timeout)
