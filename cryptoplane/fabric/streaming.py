"""Streams on a fabric connection (wire protocol section 6): ENCRYPT_STREAM and
DECRYPT_STREAM driven through ``bulk``'s jobs.

A REQUEST opens the stream (an encrypt's header needs a data key: a worker makes it);
DATA frames feed the job, small pieces on the loop, pieces of 256 KiB and more (and the
last) on a worker, one step at a time per stream, in order. Memory stays bounded: while a
stream has ``STREAM_QUEUE`` pieces waiting for its worker the connection is not read.
Output pieces go out as DATA frames of the stream's id, the last with END; a failure is
one RESPONSE with its status, and the stream's later DATA frames are dropped.

Under a grant each piece is charged to the grant's ``aead`` bytes/s. A piece over the
rate is not refused (a stream cannot resend one piece): it waits, the stream held busy,
until the bucket allows it, and the connection stops being read as for a slow worker.
An expired or revoked grant fails the stream.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Final

from . import codec as C
from .bufpool import SEALED
from .bulk import StreamDecryptJob, StreamEncryptJob
from .capacity import AEAD
from .codec import Field, FrameType, Op
from .dispatch import BIG, error_answer
from .handling import Handling

_DATA: Final = int(FrameType.DATA)
# a stream stops the connection's reading while this many pieces wait for its worker
STREAM_QUEUE: Final = 2


class Stream:
    """An ENCRYPT_STREAM or DECRYPT_STREAM in progress: its job, pieces waiting for it,
    whether a worker has it now."""

    __slots__ = ("busy", "id", "job", "op", "queue")

    def __init__(self, fid: int, op: int, job: StreamEncryptJob | StreamDecryptJob) -> None:
        self.id = fid
        self.op = op
        self.job = job
        self.queue: deque[tuple[bytes, bool]] = deque()
        self.busy = False


def stream_step(job: StreamEncryptJob | StreamDecryptJob, data: bytes,
                 end: bool) -> list[bytearray]:
    out = job.feed(data) if data else []
    if end:
        out.extend(job.finish())
    return out



class Streaming(Handling):
    """The stream half of a connection."""

    streams: dict[int, Stream]

    def _open_stream(self, f: C.Frame, name: str, fields: dict[int, bytes],
                     out: list[Any]) -> None:
        cls = StreamEncryptJob if f.op == Op.ENCRYPT_STREAM else StreamDecryptJob
        job = cls(self.transit, self.tenant, name, context=fields.get(Field.CONTEXT),
                  plane=self.svc.plane, piece=self.svc.stream_piece, principal=self.label,
                  alloc=SEALED.take)
        stream = Stream(f.id, f.op, job)
        self.streams[f.id] = stream
        self.ids.add(f.id)
        self.inflight += 1
        if isinstance(job, StreamEncryptJob):
            # the header needs a data key: transit, maybe the keystore: a worker
            stream.busy = True
            self.server.workers.submit(job.start, (), self, ("stream", f.id, f.op, 0, 0))

    def _data(self, f: C.Frame) -> None:
        stream = self.streams.get(f.id)
        if stream is None:
            return  # a stream that failed (its error was sent): the rest is dropped
        end = bool(f.flags & C.Flag.END)
        if stream.busy or stream.queue:
            stream.queue.append((f.payload, end))
            if len(stream.queue) >= STREAM_QUEUE:
                self._pause()
            return
        self._stream_run(stream, f.payload, end)

    def _stream_run(self, stream: Stream, data: bytes, end: bool) -> None:
        g = self.grant
        if g is not None and data:
            try:
                wait = g.admit(AEAD, 0, len(data))
            except Exception as e:
                self._stream_failed(stream, e)
                return
            if wait:
                stream.queue.appendleft((data, end))
                stream.busy = True
                self.server.loop.call_later(wait, self._stream_wake, stream)
                return
        if len(data) >= BIG or end:
            stream.busy = True
            self.server.workers.submit(stream_step, (stream.job, data, end), self,
                                       ("stream", stream.id, stream.op, len(data), end))
            return
        try:
            pieces = stream.job.feed(data)
        except Exception as e:
            self._stream_failed(stream, e)
            return
        self._stream_out(stream, pieces, False)

    def _stream_out(self, stream: Stream, pieces: list[Any], end: bool) -> None:
        out = self.out
        for i, piece in enumerate(pieces):
            flags = C.Flag.END if end and i == len(pieces) - 1 else 0
            out.append(C.header_bytes(_DATA, stream.id, stream.op, 0, 0, len(piece), flags))
            if piece:
                out.append(piece)
                self.out_bytes += len(piece)
        if end:
            if not pieces:
                out.append(C.header_bytes(_DATA, stream.id, stream.op, 0, 0, 0, C.Flag.END))
            self._stream_done(stream, 0)

    def _stream_failed(self, stream: Stream, exc: BaseException) -> None:
        status, payload = error_answer(exc)
        self._answer(self.out, stream.id, stream.op, status, payload)
        self._stream_done(stream, status)

    def _stream_done(self, stream: Stream, status: int) -> None:
        if self.streams.pop(stream.id, None) is not None:
            self.ids.discard(stream.id)
            self.inflight -= 1
            self._count(stream.op, status, 0)

    def _stream_wake(self, stream: Stream) -> None:
        """The grant's bucket has the bytes for the piece that waited."""
        if stream.id not in self.streams or self.streams[stream.id] is not stream:
            return
        stream.busy = False
        self._stream_next(stream)
        self.settle()

    def _stream_next(self, stream: Stream) -> None:
        while stream.queue and not stream.busy and stream.id in self.streams:
            data, end = stream.queue.popleft()
            self._stream_run(stream, data, end)

