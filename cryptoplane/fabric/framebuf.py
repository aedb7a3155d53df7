"""Receiving big DATA frames in place, sans-I/O: a ``FrameDecoder`` that assembles each
DATA frame of ``big_min`` to ``big_max`` bytes in a bytearray of its own, which the
transport can read into directly (``asyncio.BufferedProtocol``: ``want`` gives the view
to fill, ``filled`` says how much was), and whose payload it hands out as a
``memoryview`` of that bytearray, not copied.

Why: a stream's 1 MiB pieces otherwise cost three copies of user memory before the
kernel sees them (the event loop's bytes per read, ``FrameDecoder``'s join of the reads,
the payload's slice); the profile of 100 concurrent ``encrypt_stream`` clients showed
them as ~10% of the server's CPU beside the seal itself. Small frames (the hot path of
64-byte requests) go through ``FrameDecoder.feed`` as before: for them a view would cost
more than the copy.

Memory: a big frame's bytearray is allocated whole when its header is in, and counted
whole in ``buffered`` from then on (a peer announcing frames it does not send is charged
for them, as the server's budget and frame timeout expect); ``big_max`` bounds it (the
stream piece and a little). Payload views keep their bytearray alive until dropped; a
bytearray is not written again while its frame's payload is referenced (``bufpool``
recycles it after).
"""

from __future__ import annotations

from typing import Final, cast

from .bufpool import RECEIVED
from .codec import (
    HEADER,
    HEADER_SIZE,
    MAX_FRAME,
    Frame,
    FrameDecoder,
    FrameType,
)

_DATA: Final = int(FrameType.DATA)
_unpack_header = HEADER.unpack_from


class DirectDecoder(FrameDecoder):
    """See the module docstring. ``feed`` takes bytes as ``FrameDecoder``'s does;
    ``feed_view`` takes a view of a buffer the caller reuses (it is copied or consumed
    before return); while ``want`` is not None the next bytes belong in it."""

    __slots__ = ("_big", "_got", "_view", "big_max", "big_min")

    def __init__(self, max_frame: int = MAX_FRAME, *, big_min: int = 64 * 1024,
                 big_max: int = (1 << 20) + 4096) -> None:
        super().__init__(max_frame)
        self.big_min = big_min
        self.big_max = big_max
        self._big: bytearray | None = None
        self._view: memoryview | None = None
        self._got = 0

    @property
    def buffered(self) -> int:
        return self._size + (len(self._big) if self._big is not None else 0)

    def want(self) -> memoryview | None:
        """Where the bytes of the big frame being received go, or None."""
        if self._view is None:
            return None
        return self._view[self._got:]

    def filled(self, n: int) -> list[Frame]:
        """``n`` bytes were written at the start of ``want()``."""
        assert self._big is not None
        self._got += n
        return [self._finish()] if self._got == len(self._big) else []

    def feed(self, data: bytes) -> list[Frame]:
        frames: list[Frame] = []
        if self._big is not None:  # bytes for a big frame that came the ordinary way
            take = min(len(self._big) - self._got, len(data))
            self._big[self._got:self._got + take] = data[:take]
            frames.extend(self.filled(take))
            if take == len(data):
                return frames
            data = data[take:]
        frames.extend(super().feed(data))
        if self._chunks:
            self._adopt()
        return frames

    def feed_view(self, view: memoryview) -> list[Frame]:
        """Like ``feed``; a big DATA frame at the start of ``view`` is copied once, into
        its own bytearray, not first into bytes."""
        if self._big is None and not self._chunks and len(view) >= HEADER_SIZE:
            total = self._big_total(view)
            if total:
                self._open(total)
                assert self._big is not None
                take = min(total, len(view))
                self._big[:take] = view[:take]
                frames = self.filled(take)
                if take < len(view):
                    frames.extend(self.feed(view[take:].tobytes()))
                return frames
        return self.feed(view.tobytes())

    def _big_total(self, head: bytes | bytearray | memoryview) -> int:
        """The size of the frame whose header starts ``head`` if it is a big DATA frame
        (its header checked), else 0."""
        length, version, ftype, _fl, _id, _op, _st, klen, _r = _unpack_header(head, 0)
        total: int = length + 4
        if ftype != _DATA or not self.big_min <= total <= self.big_max:
            return 0
        self._check_length(length, self.max_frame)
        self._check_header(version, ftype, klen, length)
        return total

    def _adopt(self) -> None:
        """A partial frame is held: if it is a big DATA frame with its header in, move
        it into its own bytearray so the rest can be read there directly."""
        if self._size < HEADER_SIZE or self._need < self.big_min:
            return
        first = self._chunks[0]
        head = first if len(first) >= HEADER_SIZE else b"".join(self._chunks)
        total = self._big_total(head)
        if not total:
            return
        chunks = self._chunks
        self._chunks, self._size, self._need = [], 0, 0
        self._open(total)
        assert self._big is not None
        pos = 0
        for c in chunks:
            self._big[pos:pos + len(c)] = c
            pos += len(c)
        self._got = pos

    def _open(self, total: int) -> None:
        self._big = RECEIVED.take(total)  # recycled: every byte is written before use
        self._view = memoryview(self._big)
        self._got = 0

    def _finish(self) -> Frame:
        big, view = self._big, self._view
        assert big is not None and view is not None
        self._big = self._view = None
        self._got = 0
        _len, _v, ftype, flags, fid, op, status, klen, _r = _unpack_header(big, 0)
        start = HEADER_SIZE + klen
        # the stream path reads DATA payloads as buffers only (len, the chunk kernel)
        return Frame(ftype, flags, fid, op, status, bytes(big[HEADER_SIZE:start]),
                     cast(bytes, view[start:]))
