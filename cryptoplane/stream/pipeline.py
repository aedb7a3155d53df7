"""Ordered, bounded, parallel batch processing of one byte stream: read, transform, write.

The STREAM rules live in ``payload.py``; this module only moves bytes. Each of ``workers``
threads owns one input and one output buffer (allocated once, reused for every batch) and
loops: take the next batch from ``src`` (reads are serialised and numbered), run its job
(a request on the plane, served in that thread: the chunk kernel releases the GIL, so
jobs run on several cores), then wait for its turn and write the result to ``dst``
(writes are serialised in batch order). Reads and writes release the GIL too, so one
thread's I/O overlaps another's crypto, and no batch hops between threads: a hand-off to
the plane's threads engine cost more scheduling per batch than the crypto could spare.
Memory is ``workers`` x (in + out) whatever the stream's length: a pipe is processed in
constant memory.

Whether a batch is the last one is known only at EOF, so a reader takes one byte more
than a batch and carries it over to the next batch: a batch is final exactly when that
byte is missing. (A full batch at EOF is final; only an empty stream has an empty batch.)
"""

from __future__ import annotations

import threading
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
    ``progress(consumed, produced)`` is called after each batch is written, from the
    thread that wrote it."""

    def __init__(self, src: Any, dst: Writer, job: Job, *, in_size: int, out_size: int,
                 progress: Callable[[int, int], None] | None = None) -> None:
        self._src = src
        self._dst = dst
        self._job = job
        self._in_size = in_size
        self._out_size = out_size
        self._progress = progress
        self._read_lock = threading.Lock()
        self._turn = threading.Condition()
        self._next_batch = 0      # the number the next read gets (read lock)
        self._carry: int | None = None  # the byte read past the last batch (read lock)
        self._eof = False
        self._writing = 0         # the batch whose turn it is to write (turn condition)
        self._stop = False
        self._error: BaseException | None = None
        self.consumed = 0         # bytes read from src, in batches written
        self.produced = 0         # bytes written to dst

    def run(self, workers: int) -> None:
        """Process the whole stream with ``workers`` threads (1: this thread only);
        raises the first error, after writing every batch before it."""
        if workers <= 1:
            self._work()
        else:
            threads = [threading.Thread(target=self._work, name=f"cryptoplane-stream-{i}",
                                        daemon=True) for i in range(workers)]
            for t in threads:
                t.start()
            try:
                for t in threads:
                    t.join()
            except BaseException:
                self._fail(None)  # e.g. KeyboardInterrupt: let the workers wind down
                raise
        if self._error is not None:
            raise self._error

    def _fail(self, error: BaseException | None) -> None:
        with self._turn:
            if self._error is None and error is not None:
                self._error = error
            self._stop = True
            self._turn.notify_all()

    def _work(self) -> None:
        try:
            inbuf = memoryview(bytearray(self._in_size + 1))
            outbuf = memoryview(bytearray(self._out_size))
            while True:
                got = self._read(inbuf)
                if got is None:
                    return
                number, size, final = got
                written, error = self._job(inbuf[:size], outbuf, number, final).outcome()
                if not self._write(number, size, outbuf[:written], error) or final:
                    return
        except BaseException as exc:  # every failure ends the run, reported by run()
            self._fail(exc)

    def _read(self, buf: memoryview) -> tuple[int, int, bool] | None:
        with self._read_lock:
            if self._eof or self._stop:
                return None
            start = 0
            if self._carry is not None:
                buf[0] = self._carry
                start = 1
            size = start + fill(self._src, buf[start:])
            number = self._next_batch
            self._next_batch += 1
            if size > self._in_size:
                self._carry = buf[self._in_size]
                return number, self._in_size, False
            self._eof = True
            return number, size, True

    def _write(self, number: int, consumed: int, data: memoryview,
               error: BaseException | None) -> bool:
        """Write batch ``number`` in its turn; False when the run has stopped."""
        with self._turn:
            while self._writing != number and not self._stop:
                self._turn.wait()
            if self._stop:
                return False
        # Our turn: nobody else writes until we pass it on, so no lock is held here.
        write_all(self._dst, data)
        self.produced += len(data)
        self.consumed += consumed
        if self._progress is not None:
            self._progress(self.consumed, self.produced)
        with self._turn:
            self._writing += 1
            if error is not None:
                if self._error is None:
                    self._error = error
                self._stop = True
            self._turn.notify_all()
        return error is None
