"""A payload's chunk runs as requests on a plane (``SealChunks``/``OpenChunks``), so its
engines, balancer, QoS limits and statistics see stream work like any other.

Streams that are not given a plane share one, made at first use: the inline engine, for
ChaCha20-Poly1305 only (its self-test is all a stream waits for). A payload's session is
bound to the inline engine, so each run is served in the thread that read it (the
stream's workers, ``pipeline.py``), the kernel releasing the GIL meanwhile: handing a
batch to the threads engine cost more scheduling than the crypto could spare. On a
plane without an inline engine, its balancer chooses.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from cryptoplane.algorithms import lookup
from cryptoplane.engines import InlineEngine
from cryptoplane.exceptions import InvalidRequest
from cryptoplane.kernels.base import Buffer
from cryptoplane.kernels.chunks import releases_gil
from cryptoplane.keys import Key
from cryptoplane.plane import Plane
from cryptoplane.requests import OpenChunks, SealChunks

__all__ = ["Done", "Outcome", "Runs", "parallel", "shared_plane"]

ALGORITHM = "chacha20-poly1305"

_lock = threading.Lock()
_shared: Plane | None = None


def shared_plane() -> Plane:
    """The plane that streams use when none is given; closed when the interpreter exits."""
    global _shared
    with _lock:
        if _shared is None:
            alg = [lookup(ALGORITHM)]
            _shared = Plane([InlineEngine(algorithms=alg)])
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
    """One payload key on ``plane``: its chunk runs as requests, run in the calling
    thread (the inline engine) where the plane has one."""

    __slots__ = ("inline", "key", "plane")

    def __init__(self, payload_key: bytes, plane: Plane | None = None) -> None:
        self.plane = plane if plane is not None else shared_plane()
        if len(payload_key) != 32:
            raise InvalidRequest("a payload key is 32 bytes")
        self.key = Key(ALGORITHM, payload_key)
        inline = "inline" in self.plane.engines
        self.plane.session(self.key, engine="inline" if inline else None)
        self.inline = inline

    def seal(self, data: Buffer, out: Any, counter: int, final: bool) -> Outcome:
        """The run sealed: done at once on the plane's fast path (this thread, the
        inline engine), else submitted to the plane's engines."""
        if self.inline:
            return Done.of(self.seal_now, data, out, counter, final)
        return self.plane.submit(SealChunks(self.key, data, out, counter=counter,
                                            final=final))

    def open(self, data: Buffer, out: Any, counter: int, final: bool) -> Outcome:
        if self.inline:
            return Done.of(self.open_now, data, out, counter, final)
        return self.plane.submit(OpenChunks(self.key, data, out, counter=counter,
                                            final=final))

    def open_now(self, data: Buffer, out: Any, counter: int, final: bool) -> int:
        """``open`` and wait: raises ``ChunkAuthenticationFailed`` for a bad chunk."""
        return self.plane.open_chunks(self.key, data, out, counter=counter, final=final)

    def seal_now(self, data: Buffer, out: Any, counter: int, final: bool) -> int:
        return self.plane.seal_chunks(self.key, data, out, counter=counter, final=final)


class Done:
    """A run already done, with a future's ``result()``: on the fast path a stream's batch
    needs no ``Future`` (its lock and condition cost more than the call's bookkeeping)."""

    __slots__ = ("_error", "_value")

    def __init__(self, value: int, error: BaseException | None) -> None:
        self._value, self._error = value, error

    @classmethod
    def of(cls, fn: Callable[[Buffer, Any, int, bool], int], data: Buffer, out: Any,
           counter: int, final: bool) -> Done:
        try:
            return cls(fn(data, out, counter, final), None)
        except Exception as e:  # handed over with result(), as a future would
            return cls(0, e)

    def result(self) -> int:
        if self._error is not None:
            raise self._error
        return self._value


Outcome = Future[int] | Done
