"""Streamed operations (docs/wire-protocol.md, section 6) for the client.

A REQUEST opens the stream on one connection; the payload follows as DATA frames of at
most the server's ``stream_piece`` bytes, the last with END; the answer comes back as
DATA frames, the last with END, or as one RESPONSE with an error status. Memory is
bounded on both sides: the sender stays at most a window of pieces ahead of what the
caller has taken from the answer (the server holds a few pieces per stream and stops
reading a connection whose answers are not read). A stream is never repeated elsewhere:
a lost connection raises ``ConnectionLost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import IO, Any, Final

from . import codec
from .codec import Field, Frame, FrameType, Status
from .connection_client import STREAM, Call, ClientConnection
from .errors import ConnectionLost

# what a stream's payload may be: bytes, an iterable or async iterable of bytes, a file
StreamSource = AsyncIterable[bytes] | Iterable[bytes] | IO[bytes] | bytes
WINDOW_PIECES: Final = 4
DEFAULT_PIECE: Final = 1 << 20
_END: Final = object()


async def _pieces(source: StreamSource, piece: int) -> AsyncIterator[bytes]:
    """``source`` cut into pieces of at most ``piece`` bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source)
        for i in range(0, len(view), piece):
            yield bytes(view[i:i + piece])
    elif hasattr(source, "read"):
        loop = asyncio.get_running_loop()
        reader: Any = source
        while True:
            chunk = await loop.run_in_executor(None, reader.read, piece)
            if not chunk:
                return
            yield bytes(chunk)
    elif isinstance(source, AsyncIterable):
        async for chunk in source:
            for i in range(0, len(chunk), piece):
                yield bytes(chunk[i:i + piece])
    else:
        for chunk in source:
            for i in range(0, len(chunk), piece):
                yield bytes(chunk[i:i + piece])


async def _connection(pool: Any, deadline: float) -> ClientConnection:
    loop = asyncio.get_running_loop()
    while True:
        conn: ClientConnection | None = pool.pick()
        if conn is not None:
            return conn
        if loop.time() >= deadline:
            raise ConnectionLost("no fabric server is reachable for the stream")
        await asyncio.sleep(0.01)


async def run_stream(pool: Any, op: int, key: bytes,
                     source: StreamSource,
                     context: bytes | None) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    limits = pool.info.get("limits") or {}
    piece = int(limits.get("stream_piece") or DEFAULT_PIECE)
    window = WINDOW_PIECES * piece
    answers: asyncio.Queue[Any] = asyncio.Queue()
    room = asyncio.Event()
    room.set()
    state = {"sent": 0, "taken": 0}

    def on_frame(frame: Frame) -> None:
        if frame.type == FrameType.DATA:
            if frame.payload:
                answers.put_nowait(frame.payload)
            if frame.flags & codec.Flag.END:
                call.finished = True
                answers.put_nowait(_END)
        else:  # a RESPONSE ends the stream: an error, or OK with nothing more
            call.finished = True
            answers.put_nowait(codec.error_from(frame.status, frame.payload)
                               if frame.status != Status.OK else _END)

    fields: dict[int, bytes] = {}
    if context is not None:
        fields[Field.CONTEXT] = context
    call = Call(FrameType.REQUEST, op, key, codec.encode_fields(fields), False,
                lambda f, e: None, math.inf)
    call.kind = STREAM
    call.on_frame = on_frame
    conn = await _connection(pool, loop.time() + pool.timeout)
    conn.send(call)

    def ahead() -> int:
        # decryption's answer is a little smaller than its input: allow for the tags
        return state["sent"] - state["taken"] - (state["sent"] >> 8) - 8192

    async def send() -> None:
        async for chunk in _pieces(source, piece):
            while ahead() > window:
                room.clear()
                await room.wait()
            if conn.closed:
                return
            conn.send_data(call, chunk, False)
            state["sent"] += len(chunk)
        conn.send_data(call, b"", True)

    sender = loop.create_task(send())
    try:
        while True:
            get = loop.create_task(answers.get())
            await asyncio.wait([get, sender], return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                if sender.done() and sender.exception() is not None:
                    get.cancel()
                    raise sender.exception()  # type: ignore[misc]
                item = await get
            else:
                item = get.result()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            state["taken"] += len(item)
            if ahead() <= window:
                room.set()
            yield item
    finally:
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender
        if not call.finished:
            conn.forget(call)


def sync_iterate(loop: asyncio.AbstractEventLoop,
                 make: Callable[[], AsyncIterator[bytes]]) -> Iterator[bytes]:
    """An async iterator that lives on ``loop`` (another thread's), pulled from here."""
    agen = make()
    try:
        while True:
            try:
                yield asyncio.run_coroutine_threadsafe(
                    agen.__anext__(), loop).result()  # type: ignore[arg-type]
            except StopAsyncIteration:
                return
    finally:
        closer = getattr(agen, "aclose", None)
        if closer is not None:
            with contextlib.suppress(BaseException):
                asyncio.run_coroutine_threadsafe(closer(), loop).result(5)
