"""The threads engine: threads for the work that releases the GIL.

RSA and ECDSA in ``cryptography`` and the native sector kernel release the GIL while they
run, so threads give real parallelism for them. AEAD, hashes, Ed25519 and X25519 hold the
GIL: a thread only adds a hand-off. The engine can still run them (a session may be bound
here), but its meter charges their whole run to the caller, so the balancer keeps them
where they are cheapest.

Its workers take work from the scheduler's queues themselves (``attach``): no dispatcher
hop and no executor queue in between, each of which costs a thread hand-off's CPU time,
much of what a second core gives RSA signing (benchmarks/README.md, scaling).
Before it is attached (self-tests) or when used alone, ``submit`` feeds the same workers.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Sequence

from .base import Engine, Job, Traits, record, releases_gil, run_measured

# The caller's share of a hand-off to a thread (enqueue, wake-up, completion), as
# measured (benchmarks/README.md, scaling); what the balancer weighs against doing the
# work inline.
HANDOFF_SECONDS = 25e-6
POLL_SECONDS = 0.1  # a worker re-checks for closing at least this often


class ThreadsEngine(Engine):
    name = "threads"
    priority = 50
    traits = Traits(in_process=True, pulls=True, takes_lanes=True)

    def __init__(self, workers: int | None = None, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.workers = workers or os.cpu_count() or 1
        self.parallelism = self.workers
        self.capacity = self.workers * 4  # for submit(): enough to keep every thread fed
        self._cv = threading.Condition()
        self._jobs: deque[Job] = deque()
        self._take: Callable[[str, float], Job | None] | None = None
        self._inflight = 0
        self._closed = False
        self._threads = [threading.Thread(target=self._loop, name=f"cryptoplane-{i}",
                                          daemon=True) for i in range(self.workers)]
        for t in self._threads:
            t.start()

    @property
    def inflight(self) -> int:
        return self._inflight

    def attach(self, take: Callable[[str, float], Job | None]) -> None:
        with self._cv:
            self._take = take
            self._cv.notify_all()

    def submit(self, jobs: Sequence[Job]) -> int:
        with self._cv:
            self._jobs.extend(jobs)
            self._inflight += len(jobs)
            self._cv.notify(len(jobs))
        return len(jobs)

    def _next(self) -> Job | None:
        with self._cv:
            if self._jobs:
                return self._jobs.popleft()
            if self._closed:
                raise StopIteration
            take = self._take
            if take is None:
                self._cv.wait(POLL_SECONDS)
                return None
        job = take(self.name, POLL_SECONDS)  # waits on the scheduler's condition
        if job is not None:
            with self._cv:
                self._inflight += 1
        return job

    def _loop(self) -> None:
        while True:
            try:
                job = self._next()
            except StopIteration:
                return
            if job is not None:
                self._run(job)

    def _run(self, job: Job) -> None:
        request, done = job
        result, error, work = run_measured(request)
        caller = HANDOFF_SECONDS + (0.0 if releases_gil(request) else work)
        record(self.meter, request, work, caller)
        with self._cv:
            self._inflight -= 1
        done(result, error)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(5)
