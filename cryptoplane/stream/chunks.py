"""A payload's chunk runs as requests on a plane (``SealChunks``/``OpenChunks``), so its
engines, balancer, QoS limits and statistics see stream work like any other.

Streams that are not given a plane share one, made at first use: the inline and threads
engines, for ChaCha20-Poly1305 only (its self-test is all a stream waits for). Work
meant for "this thread only" runs on a session bound to the inline engine; parallel work
on one bound to the threads engine, whose workers pull each run from the plane's queues
while the caller reads and writes.
"""

from __future__ import annotations

import atexit
import os
import threading
from concurrent.futures import Future
from typing import Any

from cryptoplane.algorithms import lookup
from cryptoplane.engines import InlineEngine, ThreadsEngine
from cryptoplane.exceptions import InvalidRequest
from cryptoplane.kernels.base import Buffer
from cryptoplane.kernels.chunks import releases_gil
from cryptoplane.keys import Key
from cryptoplane.plane import Plane
from cryptoplane.requests import OpenChunks, SealChunks

__all__ = ["Runs", "parallel", "shared_plane"]

ALGORITHM = "chacha20-poly1305"

_lock = threading.Lock()
_shared: Plane | None = None


def shared_plane() -> Plane:
    """The plane that streams use when none is given; closed when the interpreter exits."""
    global _shared
    with _lock:
        if _shared is None:
            alg = [lookup(ALGORITHM)]
            _shared = Plane([InlineEngine(algorithms=alg), ThreadsEngine(algorithms=alg)])
            atexit.register(_shared.close)
        return _shared


def _forget_in_child() -> None:
    # a forked child has none of the plane's threads: it makes its own plane when needed
    global _shared
    _shared = None


os.register_at_fork(after_in_child=_forget_in_child)


def parallel() -> bool:
    """Whether several runs at once use several cores: only when the chunk kernel
    releases the GIL (the Python one holds it: threads would only add switching)."""
    return releases_gil()


class Runs:
    """One payload key on ``plane``: its chunk runs as requests. ``here``: run them in the
    calling thread (the inline engine); otherwise on the threads engine's workers."""

    __slots__ = ("key", "plane")

    def __init__(self, payload_key: bytes, plane: Plane | None, *, here: bool) -> None:
        self.plane = plane if plane is not None else shared_plane()
        if len(payload_key) != 32:
            raise InvalidRequest("a payload key is 32 bytes")
        self.key = Key(ALGORITHM, payload_key)
        engines = self.plane.engines
        engine = "inline" if here else "threads"
        # a plane without that engine: its balancer chooses among those it has
        self.plane.session(self.key, engine=engine if engine in engines else None)

    def seal(self, data: Buffer, out: Any, counter: int, final: bool) -> Future[int]:
        return self.plane.submit(SealChunks(self.key, data, out, counter=counter,
                                            final=final))

    def open(self, data: Buffer, out: Any, counter: int, final: bool) -> Future[int]:
        return self.plane.submit(OpenChunks(self.key, data, out, counter=counter,
                                            final=final))

    def open_now(self, data: Buffer, out: Any, counter: int, final: bool) -> int:
        """``open`` and wait: raises ``ChunkAuthenticationFailed`` for a bad chunk."""
        written: int = self.plane.run(OpenChunks(self.key, data, out, counter=counter,
                                                 final=final))
        return written

    def seal_now(self, data: Buffer, out: Any, counter: int, final: bool) -> int:
        written: int = self.plane.run(SealChunks(self.key, data, out, counter=counter,
                                                 final=final))
        return written
