"""Ordered, bounded, parallel batch processing of one byte stream: read, transform, write.

The STREAM rules live in ``payload.py``; this module only moves bytes. The caller's
thread reads batch after batch into a few buffers allocated once (``depth`` pairs of
input and output buffers, reused for every batch), starts each batch's job at once (a
request on the plane: the threads engine's workers run them while this thread reads
the next and writes the last), and writes the results in batch order as they complete.
Memory is ``depth`` x (in + out) whatever the stream's length: a pipe is processed in
constant memory.

Whether a batch is the last one is known only at EOF, so a read takes one byte more
than a batch and carries it over to the next batch: a batch is final exactly when that
byte is missing. (A full batch at EOF is final; only an empty stream has an empty batch.)
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from cryptoplane.exceptions import InvalidRequest


class Pending(Protocol):
    """A batch's job once started: ``outcome()`` waits for it and gives (bytes written
    to dst, the error to raise after writing them)."""

    def outcome(self) -> tuple[int, BaseException | None]: ...


# job(src, dst, batch_number, final): the batch's work, started (it may still run)
Job = Callable[[memoryview, memoryview, int, bool], Pending]


class Writer(Protocol):
    def write(self, data: Any, /) -> Any: ...


def fill(src: Any, buf: memoryview) -> int:
    """Read from ``src`` into ``buf`` until it is full or ``src`` is at EOF; bytes read."""
    readinto = getattr(src, "readinto", None)
    pos = 0
    size = len(buf)
    while pos < size:
        if readinto is not None:
            got = readinto(buf[pos:])
        else:
            data = src.read(size - pos)
            got = None if data is None else len(data)
            if got:
                buf[pos:pos + got] = data
        if got is None:
            # a non-blocking source with nothing ready: taking it for EOF would seal a
            # silently truncated stream
            raise InvalidRequest("src returned no data without reaching EOF "
                                 "(a non-blocking file?); give a blocking one")
        if got == 0:
            break
        pos += got
    return pos


def write_all(dst: Writer, data: memoryview) -> None:
    """``dst.write`` until all of ``data`` is taken (raw files may take part of it).
    A writer that returns None is taken to have written everything, as duck-typed
    writers do (a non-blocking raw file, which returns None for "nothing", is not
    supported)."""
    while len(data):
        took = dst.write(data)
        if took is None or took >= len(data):
            return
        if took <= 0:  # would loop for ever: a writer must take something or block
            raise OSError(f"dst.write took {took} of {len(data)} bytes")
        data = data[took:]


class Pipeline:
    """One run over ``src``: batches of ``in_size`` bytes in, up to ``out_size`` out.
    ``progress(consumed, produced)`` is called after each batch is written."""

    def __init__(self, src: Any, dst: Writer, job: Job, *, in_size: int, out_size: int,
                 progress: Callable[[int, int], None] | None = None) -> None:
        self._src = src
        self._dst = dst
        self._job = job
        self._in_size = in_size
        self._out_size = out_size
        self._progress = progress
        self._carry: int | None = None  # the byte read past the last batch
        self.consumed = 0         # bytes read from src, in batches written
        self.produced = 0         # bytes written to dst

    def run(self, depth: int) -> None:
        """Process the whole stream with up to ``depth`` batches started at once;
        raises the first error, after writing every batch before it."""
        free = [(memoryview(bytearray(self._in_size + 1)),
                 memoryview(bytearray(self._out_size))) for _ in range(max(1, depth))]
        started: deque[tuple[memoryview, memoryview, int, Pending]] = deque()
        number = 0
        eof = False
        read_error: BaseException | None = None
        try:
            while True:
                while free and not eof:
                    inbuf, outbuf = free.pop()
                    try:
                        size, eof = self._read(inbuf)
                    except Exception as exc:  # raised once the batches before it are out
                        read_error, eof = exc, True
                        break
                    started.append((inbuf, outbuf, size,
                                    self._job(inbuf[:size], outbuf, number, eof)))
                    number += 1
                if not started:
                    break
                inbuf, outbuf, size, pending = started.popleft()
                written, error = pending.outcome()
                write_all(self._dst, outbuf[:written])
                self.produced += written
                self.consumed += size
                if self._progress is not None:
                    self._progress(self.consumed, self.produced)
                if error is not None:
                    raise error
                free.append((inbuf, outbuf))
        except Exception:
            for *_, pending in started:  # nothing may still write into our buffers
                with contextlib.suppress(Exception):
                    pending.outcome()
            raise
        if read_error is not None:
            raise read_error

    def _read(self, buf: memoryview) -> tuple[int, bool]:
        """The next batch into ``buf``: (its size, whether it is the final one)."""
        start = 0
        if self._carry is not None:
            buf[0] = self._carry
            start = 1
        size = start + fill(self._src, buf[start:])
        if size > self._in_size:
            self._carry = buf[self._in_size]
            return self._in_size, False
        return size, True
