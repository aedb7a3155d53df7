"""The inline engine: runs each request at once, in the caller's thread.

It is the fast path's engine: no queue, no thread hop, no future. It serves everything
the catalogue knows, on ``cryptography``'s prepared objects and the native sector kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..requests import Request
from .base import Engine, Job, Traits, complete, run_request


class InlineEngine(Engine):
    name = "inline"
    priority = 100
    traits = Traits(caller_thread=True, in_process=True, takes_lanes=True)

    def run_one(self, request: Request) -> Any:
        return run_request(request)

    def submit(self, jobs: Sequence[Job]) -> int:
        for job in jobs:
            complete(job)
        return len(jobs)
