"""The threads engine: a pool of threads for work that releases the GIL.

RSA and ECDSA in ``cryptography`` and the native sector kernel release the GIL while they
run, so threads give real parallelism for them at the cost of one hand-off; AEAD calls
hold the GIL and gain nothing here (the pool engine of processes serves those, when the
copies it needs cost less than the work).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from .base import Engine, Job, releases_gil

# The caller's share of a hand-off to a thread (queue put, wake-up, completion), measured
# here at ~10-20 µs; what the balancer weighs against doing the work inline.
HANDOFF_SECONDS = 15e-6


class ThreadsEngine(Engine):
    name = "threads"
    priority = 50

    def __init__(self, workers: int | None = None, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.workers = workers or os.cpu_count() or 1
        self.parallelism = self.workers
        self.capacity = self.workers * 4  # enough to keep every thread fed
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="cryptoplane")
        self._count_lock = threading.Lock()
        self._inflight = 0

    @property
    def inflight(self) -> int:
        return self._inflight

    def _run(self, job: Job) -> None:
        request, done = job
        # this thread's CPU time: waits for the GIL or a core are the neighbours' doing,
        # and wall time would teach the balancer that threads are slow when merely busy
        t0 = time.thread_time()
        error: BaseException | None
        try:
            result = request.apply(request.kernel())
        except BaseException as e:  # every outcome reaches the completion
            result, error = None, e
        else:
            error = None
        work = time.thread_time() - t0
        caller = HANDOFF_SECONDS + (0.0 if releases_gil(request) else work)
        self.meter.record(request.algorithm.name, request.op.value, request.nbytes, work,
                          caller)
        with self._count_lock:
            self._inflight -= 1
        done(result, error)

    def submit(self, jobs: Sequence[Job]) -> int:
        with self._count_lock:
            self._inflight += len(jobs)
        for job in jobs:
            self._executor.submit(self._run, job)
        return len(jobs)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=False)
