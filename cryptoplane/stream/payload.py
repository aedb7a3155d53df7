"""age's payload: the STREAM of ChaCha20-Poly1305 chunks, sealed and opened on every core.

The payload key (from the header's file key and nonce) seals the plaintext in chunks of
64 KiB, each with the nonce ``counter (11 bytes, big-endian) || final flag``; the last
chunk carries the flag, may be short, and is empty only when the whole payload is.

A reader cannot tell that a full-size chunk is the last one until it sees EOF after it,
so the openers hold the last full chunk back until they know. Whole batches of chunks go
to the plane as ``SealChunks``/``OpenChunks`` requests (``chunks.py``: one kernel call per
batch, the GIL released, in the thread that read the batch); ``pipeline.Pipeline``
spreads the batches over threads and writes the results in order.
Openers release only authenticated plaintext: on the first bad chunk they write the
plaintext of the chunks before it and raise a ``PayloadError``. A chunk
that authenticates, but not in its place (a full chunk at EOF that opens as non-final, a
final chunk with bytes after it), is released too, as age does and as the age test kit's
payload hashes require:

* ``ChunkTampered``: a chunk fails authentication (changed, dropped, duplicated,
  reordered, a wrong key). A stream cut inside a chunk reads as this too: the tag cannot
  tell a cut from a change.
* ``Truncated``: no chunk at all, a final chunk shorter than a tag, or a stream that stops
  after a whole chunk that is not marked final.
* ``TrailingData``: a full-size final chunk followed by more bytes. (After a short final
  chunk, extra bytes make the last chunk fail: ``ChunkTampered``.)
* ``EmptyFinalChunk``: an empty final chunk after other chunks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from cryptoplane.exceptions import ChunkAuthenticationFailed, InvalidRequest
from cryptoplane.plane import Plane
from cryptoplane.stream.chunks import Outcome, Runs, parallel
from cryptoplane.stream.errors import (
    ChunkTampered,
    EmptyFinalChunk,
    PayloadError,
    TrailingData,
    Truncated,
)
from cryptoplane.stream.pipeline import Pending, Pipeline, Writer

__all__ = [
    "BATCH_CHUNKS",
    "CHUNK_SIZE",
    "TAG_SIZE",
    "PayloadOpener",
    "PayloadSealer",
    "chunk_opener",
    "open_chunk",
    "open_payload",
    "seal_payload",
]

CHUNK_SIZE = 65536
TAG_SIZE = 16
SEALED_SIZE = CHUNK_SIZE + TAG_SIZE
# Chunks per batch (one request on the plane, one read, one write): big enough that the
# plane's work per request and the per-batch Python costs vanish beside the batch's
# crypto, small enough that a batch stays in the caches between its read, its crypto and
# its write.
BATCH_CHUNKS = 16


def _key(payload_key: bytes) -> bytes:
    key = bytes(payload_key)
    if len(key) != 32:
        raise InvalidRequest("a payload key is 32 bytes")
    return key


def _workers(workers: int | None) -> int:
    if workers is not None and workers < 1:
        raise InvalidRequest(f"workers must be at least 1, got {workers}")
    if not parallel():
        return 1  # the Python kernel holds the GIL: threads would only add switching
    if workers is None:
        affinity = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere every core
        return max(1, len(affinity(0)) if affinity else os.cpu_count() or 1)
    return workers


def _tampered(index: int) -> ChunkTampered:
    return ChunkTampered(f"payload chunk {index} failed authentication "
                         "(changed, dropped, reordered or duplicated; or a wrong key)")


def _opens(runs: Runs, chunk: memoryview, dst: memoryview, index: int, final: bool) -> int:
    """Open one chunk into ``dst``: its plaintext's length, or -1 if it does not open."""
    try:
        return runs.open_now(chunk, dst, index, final)
    except ChunkAuthenticationFailed:
        return -1


def _diagnose(runs: Runs, src: memoryview, dst: memoryview, counter: int, final: bool,
              bad: int) -> tuple[int, PayloadError]:
    """Chunk ``bad`` of this batch failed: the plaintext to release (the chunks before
    it, opened again as the kernel's ``dst`` is undefined after a failure) and the error.

    A chunk that opens the other way is authentic and released, as age does (the test
    kit's payload hashes include it): a full chunk at EOF that opens as non-final (the
    stream was cut after it), or a chunk followed by more bytes that opens as final.
    """
    start = bad * SEALED_SIZE
    written = 0
    if bad:
        written = runs.open_now(src[:start], dst, counter, False)
    chunk = src[start:start + SEALED_SIZE]
    index = counter + bad
    if final and start + len(chunk) == len(src):
        # the stream's last chunk did not open as final
        if len(chunk) == SEALED_SIZE:
            got = _opens(runs, chunk, dst[written:], index, final=False)
            if got >= 0:
                return written + got, Truncated(f"the payload stops after chunk {index}, "
                                                "which is not its final chunk")
        return written, _tampered(index)
    got = _opens(runs, chunk, dst[written:], index, final=True)
    if got >= 0:
        return written + got, TrailingData(f"bytes follow the payload's final chunk {index}")
    return written, _tampered(index)


class _Done:
    """A batch whose outcome was known without a kernel call (or after a waited one)."""

    __slots__ = ("value",)

    def __init__(self, written: int, error: BaseException | None) -> None:
        self.value = (written, error)

    def outcome(self) -> tuple[int, BaseException | None]:
        return self.value


class _Sealing:
    __slots__ = ("future",)

    def __init__(self, future: Outcome) -> None:
        self.future = future

    def outcome(self) -> tuple[int, BaseException | None]:
        return self.future.result(), None


class _Opening:
    """An open under way: a chunk that fails is diagnosed (``_diagnose``) when its
    outcome is asked for; ``after`` is the error of a batch that opens (its empty final
    chunk)."""

    __slots__ = ("after", "counter", "dst", "final", "future", "runs", "src")

    def __init__(self, runs: Runs, src: memoryview, dst: memoryview, counter: int,
                 final: bool, after: PayloadError | None) -> None:
        self.runs, self.src, self.dst, self.counter, self.final = runs, src, dst, counter, final
        self.after = after
        self.future = runs.open(src, dst, counter, final)

    def outcome(self) -> tuple[int, BaseException | None]:
        try:
            return self.future.result(), self.after
        except ChunkAuthenticationFailed as exc:
            return _diagnose(self.runs, self.src, self.dst, self.counter, self.final,
                             exc.index)


def _open_batch(runs: Runs, src: memoryview, dst: memoryview, counter: int,
                final: bool) -> Pending:
    """Start opening whole chunks (and, when ``final``, the stream's last chunk at the
    end); its outcome is the plaintext bytes written to ``dst`` and the error to raise
    after them."""
    size = len(src)
    after: PayloadError | None = None
    if final:
        if size == 0:
            return _Done(0, Truncated("the payload has no chunk" if counter == 0 else
                                      f"the payload stops after chunk {counter - 1}, "
                                      "which is not its final chunk"))
        count = -(-size // SEALED_SIZE)
        tail = size - (count - 1) * SEALED_SIZE
        if tail < TAG_SIZE:
            written, error = 0, None
            if count > 1:
                written, error = _open_batch(runs, src[:size - tail], dst, counter,
                                             False).outcome()
            return _Done(written, error or Truncated(
                f"the payload's last chunk is {tail} bytes, shorter than its tag"))
        if tail == TAG_SIZE and counter + count > 1:
            after = EmptyFinalChunk(
                f"the payload's final chunk {counter + count - 1} is empty; only an empty "
                "payload ends with an empty chunk")
    return _Opening(runs, src, dst, counter, final, after)


def _progress_of(progress: Callable[[int], None] | None,
                 plain_is_input: bool) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    if plain_is_input:
        return lambda consumed, produced: progress(consumed)
    return lambda consumed, produced: progress(produced)


def seal_payload(payload_key: bytes, src: Any, dst: Writer, *, workers: int | None = None,
                 progress: Callable[[int], None] | None = None,
                 plane: Plane | None = None) -> int:
    """Encrypt everything ``src`` yields until EOF as the STREAM, written to ``dst`` in
    order; returns the plaintext bytes. ``src`` needs ``readinto`` (or ``read``).
    ``workers``: threads (None: every core this process may use; 1: this thread only).
    ``progress(plaintext_bytes_so_far)`` is called after each batch, from the thread
    that wrote it.
    ``plane``: where the chunks are sealed (None: the streams' shared plane). Memory
    stays a few MiB per worker whatever the length."""
    key = _key(payload_key)
    batch = BATCH_CHUNKS
    n = _workers(workers)
    runs = Runs(key, plane)

    def job(s: memoryview, d: memoryview, number: int, final: bool) -> Pending:
        return _Sealing(runs.seal(s, d, number * batch, final))

    run = Pipeline(src, dst, job, in_size=batch * CHUNK_SIZE,
                   out_size=batch * SEALED_SIZE, progress=_progress_of(progress, True))
    run.run(n)
    return run.consumed


def open_payload(payload_key: bytes, src: Any, dst: Writer, *, workers: int | None = None,
                 progress: Callable[[int], None] | None = None,
                 plane: Plane | None = None) -> int:
    """Decrypt the STREAM that ``src`` holds from its first chunk to EOF into ``dst``;
    returns the plaintext bytes. Only authenticated plaintext is written, in order; on a
    bad chunk the plaintext of every chunk before it is written, then the
    ``PayloadError`` raised. ``workers``, ``progress`` and ``plane`` as for
    ``seal_payload``."""
    key = _key(payload_key)
    batch = BATCH_CHUNKS
    n = _workers(workers)
    runs = Runs(key, plane)

    def job(s: memoryview, d: memoryview, number: int, final: bool) -> Pending:
        return _open_batch(runs, s, d, number * batch, final)

    run = Pipeline(src, dst, job, in_size=batch * SEALED_SIZE,
                   out_size=batch * CHUNK_SIZE, progress=_progress_of(progress, False))
    run.run(n)
    return run.produced


def chunk_opener(payload_key: bytes, plane: Plane | None = None) -> Runs:
    """What ``open_chunk`` takes to open many chunks of one payload without preparing
    the key for each (``SeekableReader``)."""
    return Runs(_key(payload_key), plane)


def open_chunk(payload_key: bytes | Runs, chunk: bytes, index: int, *, final: bool) -> bytes:
    """The plaintext of one sealed chunk, number ``index`` (for readers that seek);
    ``final`` says whether it is the stream's last chunk. Raises ``ChunkTampered``."""
    runs = payload_key if isinstance(payload_key, Runs) else chunk_opener(payload_key)
    view = memoryview(chunk).cast("B")
    if final and len(view) < TAG_SIZE:
        raise Truncated(f"chunk {index} is {len(view)} bytes, shorter than its tag")
    if not final and len(view) != SEALED_SIZE:
        raise InvalidRequest(f"a chunk before the final one is {SEALED_SIZE} bytes, "
                             f"got {len(view)}")
    if final and len(view) > SEALED_SIZE:
        raise InvalidRequest(f"a chunk is at most {SEALED_SIZE} bytes, got {len(view)}")
    out = bytearray(len(view) - TAG_SIZE)
    try:
        runs.open_now(view, out, index, final)
    except ChunkAuthenticationFailed:
        raise _tampered(index) from None
    if final and index > 0 and not out:
        raise EmptyFinalChunk(f"the payload's final chunk {index} is empty")
    return bytes(out)


class PayloadSealer:
    """Incremental ``seal_payload``: ``update(plaintext)`` returns the sealed chunks
    completed so far, ``finish()`` the rest, ending with the final chunk. The bytes are
    those of ``seal_payload`` on the concatenated input."""

    def __init__(self, payload_key: bytes, plane: Plane | None = None) -> None:
        self._runs = Runs(_key(payload_key), plane)
        self._pending = bytearray()
        self._counter = 0
        self._done = False

    def __repr__(self) -> str:
        return f"<PayloadSealer chunk {self._counter}{' finished' if self._done else ''}>"

    def _seal(self, size: int, final: bool) -> bytes:
        count = max(1, -(-size // CHUNK_SIZE))
        out = bytearray(size + TAG_SIZE * count)
        with memoryview(self._pending) as view, view[:size] as part:
            self._runs.seal_now(part, out, self._counter, final)
        # a new buffer, not a resize: a request that failed may still hold a view of it
        self._pending = self._pending[size:]
        self._counter += count
        return bytes(out)

    def update(self, data: Any) -> bytes:
        if self._done:
            raise InvalidRequest("this PayloadSealer is finished")
        self._pending += data
        # a chunk is sealed only once a byte follows it: until then it may be the last
        whole = (len(self._pending) - 1) // CHUNK_SIZE if self._pending else 0
        return self._seal(whole * CHUNK_SIZE, False) if whole else b""

    def finish(self) -> bytes:
        if self._done:
            raise InvalidRequest("this PayloadSealer is finished")
        self._done = True
        return self._seal(len(self._pending), True)


class PayloadOpener:
    """Incremental ``open_payload``: ``update(ciphertext)`` returns the plaintext
    authenticated so far (a full chunk is held back until a byte follows it: it may be
    the final one), ``finish()`` the rest. Errors as ``open_payload``'s: an ``update``
    that finds one returns the plaintext authenticated before it, if any, and the next
    call raises it; ``finish`` raises at once (so it may release less than
    ``open_payload``: never a chunk together with its error). After an error every call
    raises it again."""

    def __init__(self, payload_key: bytes, plane: Plane | None = None) -> None:
        self._runs = Runs(_key(payload_key), plane)
        self._pending = bytearray()
        self._counter = 0
        self._done = False
        self._error: BaseException | None = None  # a PayloadError

    def __repr__(self) -> str:
        return f"<PayloadOpener chunk {self._counter}{' finished' if self._done else ''}>"

    def _open(self, size: int, final: bool) -> bytes:
        out = bytearray(size)
        with memoryview(self._pending) as view, view[:size] as part:
            written, error = _open_batch(self._runs, part, memoryview(out), self._counter,
                                         final).outcome()
        # a new buffer, not a resize: the failed request's traceback may hold a view of it
        self._pending = self._pending[size:]
        self._counter += size // SEALED_SIZE
        if error is not None:
            self._error = error
            self._pending.clear()
            if final or not written:
                raise error  # finish() has no next call to carry the error
            # release the authenticated plaintext now; the error comes with the next call
        return bytes(out[:written])

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._done:
            raise InvalidRequest("this PayloadOpener is finished")

    def update(self, data: Any) -> bytes:
        self._check()
        self._pending += data
        whole = (len(self._pending) - 1) // SEALED_SIZE if self._pending else 0
        return self._open(whole * SEALED_SIZE, False) if whole else b""

    def finish(self) -> bytes:
        self._check()
        self._done = True
        return self._open(len(self._pending), True)
