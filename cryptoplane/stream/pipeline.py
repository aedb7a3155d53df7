"""Ordered, bounded, parallel batch processing of one byte stream: read, transform, write.

The STREAM rules live in ``payload.py``; this module only moves bytes. The caller's
thread reads batch after batch into a few buffers allocated once (``depth`` pairs of
input and output buffers, reused for every batch) and starts each batch's job at once (a
request on the plane, which the threads engine's workers run); a writer thread takes
the batches in order as they complete and writes them out. Reads, the crypto and writes
all release the GIL, so they overlap: this is no crypto thread pool, only the I/O.
With a depth of 1 everything happens in the caller's thread. Memory is ``depth`` x (in +
out) whatever the stream's length: a pipe is processed in constant memory.

Whether a batch is the last one is known only at EOF, so a read takes one byte more
than a batch and carries it over to the next batch: a batch is final exactly when that
byte is missing. (A full batch at EOF is final; only an empty stream has an empty batch.)
"""

from __future__ import annotations

import contextlib
import queue
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
# a started batch: its input and output buffers, its input size, its job
_Started = tuple[memoryview, memoryview, int, Pending]


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
        self._carry: int | None = None  # the byte read past the last batch
        self.consumed = 0         # bytes read from src, in batches written
        self.produced = 0         # bytes written to dst

    def run(self, depth: int) -> None:
        """Process the whole stream with up to ``depth`` batches started at once (1: all
        in this thread); raises the first error, after writing every batch before it."""
        if depth <= 1:
            self._run_here()
        else:
            self._run_split(depth)

    def _pair(self) -> tuple[memoryview, memoryview]:
        return memoryview(bytearray(self._in_size + 1)), memoryview(bytearray(self._out_size))

    def _run_here(self) -> None:
        inbuf, outbuf = self._pair()
        number = 0
        while True:
            size, final = self._read(inbuf)
            written, error = self._job(inbuf[:size], outbuf, number, final).outcome()
            self._put(outbuf[:written], size, error)
            if final:
                return
            number += 1

    def _put(self, data: memoryview, consumed: int, error: BaseException | None) -> None:
        write_all(self._dst, data)
        self.produced += len(data)
        self.consumed += consumed
        if self._progress is not None:
            self._progress(self.consumed, self.produced)
        if error is not None:
            raise error

    def _run_split(self, depth: int) -> None:
        """This thread reads and starts batches; a writer thread waits for each in turn
        and writes it, so that reads, the crypto and writes overlap (the crypto runs
        wherever the job sends it: the plane's engines)."""
        slots: queue.SimpleQueue[tuple[memoryview, memoryview] | None] = queue.SimpleQueue()
        for _ in range(depth):
            slots.put(self._pair())
        order: queue.SimpleQueue[_Started | None] = queue.SimpleQueue()
        failed: list[BaseException] = []
        abandon = threading.Event()
        writer = threading.Thread(target=self._write_in_order,
                                  args=(order, slots, failed, abandon),
                                  name="cryptoplane-stream-writer", daemon=True)
        writer.start()
        read_error: Exception | None = None
        try:
            number, final = 0, False
            while not final:
                pair = slots.get()
                if pair is None:  # the writer stopped on an error
                    break
                inbuf, outbuf = pair
                try:
                    size, final = self._read(inbuf)
                except Exception as exc:  # raised once the batches before it are out
                    read_error = exc
                    break
                order.put((inbuf, outbuf, size, self._job(inbuf[:size], outbuf, number,
                                                           final)))
                number += 1
        except Exception:
            order.put(None)
            writer.join()
            raise
        except BaseException:  # e.g. KeyboardInterrupt: write nothing more, wait for nobody
            abandon.set()
            order.put(None)
            raise
        order.put(None)
        writer.join()
        if failed:
            raise failed[0]
        if read_error is not None:
            raise read_error

    def _write_in_order(self, order: queue.SimpleQueue[_Started | None],
                        slots: queue.SimpleQueue[tuple[memoryview, memoryview] | None],
                        failed: list[BaseException], abandon: threading.Event) -> None:
        while True:
            item = order.get()
            if item is None:
                return
            inbuf, outbuf, size, pending = item
            if failed or abandon.is_set():
                with contextlib.suppress(Exception):
                    pending.outcome()  # nothing may still write into our buffers
                continue
            try:
                written, error = pending.outcome()
                self._put(outbuf[:written], size, error)
            except BaseException as exc:  # every failure ends the run, raised by run()
                failed.append(exc)
                slots.put(None)
                continue
            slots.put((inbuf, outbuf))

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
