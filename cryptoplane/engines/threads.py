"""The threads engine: a pool of threads for work that releases the GIL.

RSA and ECDSA in ``cryptography`` and the native sector kernel release the GIL while they
run, so threads give real parallelism for them at the cost of one hand-off; AEAD calls
hold the GIL and gain nothing here (the pool engine of processes serves those).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from .base import Engine, Job, complete


class ThreadsEngine(Engine):
    name = "threads"
    priority = 50

    def __init__(self, workers: int | None = None, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.workers = workers or os.cpu_count() or 1
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="cryptoplane")

    def submit(self, jobs: Sequence[Job]) -> int:
        for job in jobs:
            self._executor.submit(complete, job)
        return len(jobs)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=False)
