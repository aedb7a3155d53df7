"""One client connection to a fabric server: an ``asyncio.Protocol`` (not a StreamReader:
FABRIC.md measured StreamReader at a quarter of the speed) that pipelines requests.

Writes are coalesced: every frame queued in one turn of the event loop goes out in one
``writelines``. Reads are decoded a receive at a time: every frame that one
``data_received`` completes is dispatched in one pass. Answers are matched to their
``Call`` by request id, in any order.

A ``Call`` is one request on its way: what to send (kept, so it can be sent again on
another connection), whether repeating it is safe, its deadline, and ``done`` to call
exactly once with the answer frame or an exception. The connection only carries calls;
retrying, throttling and deadlines are the ``Pool``'s (``pool.py``).

Offload sessions (docs/wire-protocol.md, 4.4) are per connection: a call bound to a
``SessionSpec`` (a plane key's algorithm and material) waits, on this connection, for the
connection's SESSION_OPEN of that key, sent once on first use; its payload then gets the
session's SESSION field in front.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import ssl as ssl_module
import struct
from collections.abc import Callable
from typing import Any, Final, Protocol, cast
from urllib.parse import urlsplit

from ..exceptions import InvalidRequest
from . import codec
from .codec import Field, Frame, FrameType, Op, Status
from .errors import ConnectionLost, ProtocolError

_SESSION_TAG: Final = codec.encode_fields({Field.SESSION: b"\0\0\0\0"})[:5]

# kinds of call
NORMAL, STREAM, INTERNAL = 0, 1, 2

Done = Callable[[Frame | None, BaseException | None], None]


class Transport(Protocol):
    """What a connection uses of its transport. A protocol, not ``asyncio.Transport``:
    uvloop's transports do the same things without subclassing asyncio's classes."""

    def write(self, data: bytes) -> None: ...
    def writelines(self, list_of_data: list[bytes]) -> None: ...
    def get_extra_info(self, name: str, default: Any = None) -> Any: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...


class SessionSpec:
    """A key to offload: its plane algorithm and its material (raw, PKCS#8 or SPKI DER).
    Compared by identity: one spec per key (the engine caches them by key)."""

    __slots__ = ("__weakref__", "algorithm", "cls", "material")

    def __init__(self, algorithm: str, material: bytes, cls: str = "") -> None:
        self.algorithm = algorithm
        self.material = material
        self.cls = cls  # the algorithm class a grant charges its work to

    def __repr__(self) -> str:  # never the material
        return f"<SessionSpec {self.algorithm}>"


class Call:
    """One request on its way. ``done(frame, error)`` is called exactly once, by the pool."""

    __slots__ = ("attempts", "bucket", "cls", "conn", "deadline", "done", "finished", "ftype",
                 "id", "inflight_at_send", "key", "kind", "nbytes", "on_frame", "op",
                 "payload", "pin", "safe", "sent_at", "server", "session")

    def __init__(self, ftype: int, op: int, key: bytes, payload: bytes, safe: bool,
                 done: Done, deadline: float, session: SessionSpec | None = None) -> None:
        self.ftype = ftype
        self.op = op
        self.key = key
        self.payload = payload
        self.safe = safe
        self.done = done
        self.deadline = deadline
        self.session = session
        self.kind = NORMAL
        self.on_frame: Callable[[Frame], None] | None = None
        self.id = 0
        self.conn: ClientConnection | None = None
        self.bucket: set[Call] | None = None  # the pool's deadline bucket holding it
        self.finished = False
        self.attempts = 0
        # what placement and pacing read: the data's size (size-split; the payload's
        # by default), the algorithm class a grant charges it to ("": from op and key)
        self.nbytes = len(payload)
        self.cls = ""
        self.pin = ""  # the server URL a grant's share gave it ("": placement chooses)
        # the pool's accounting while it is on the wire: its server, when it was sent
        # and how many that server had in flight then (least-loaded's service time)
        self.server: Any = None
        self.sent_at = 0.0
        self.inflight_at_send = 0


class Endpoint:
    """Where to connect: ``tcp://host:port``, ``tls://host:port`` or ``unix:///path``."""

    __slots__ = ("host", "path", "port", "scheme", "url")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.url = url
        self.scheme = parts.scheme
        self.host = ""
        self.port = 0
        self.path = ""
        if self.scheme == "unix":
            self.path = (parts.netloc + parts.path) or ""
            if not self.path:
                raise InvalidRequest(f"{url!r}: a unix URL needs a path (unix:///path)")
        elif self.scheme in ("tcp", "tls"):
            try:
                port = parts.port
            except ValueError:
                port = None
            if not parts.hostname or port is None:
                raise InvalidRequest(f"{url!r}: expected {self.scheme}://host:port")
            self.host, self.port = parts.hostname, port
        else:
            raise InvalidRequest(f"{url!r}: the scheme must be tcp, tls or unix")

    def __repr__(self) -> str:
        return self.url


class ClientConnection(asyncio.Protocol):
    """The protocol of one connection. ``owner`` gets ``answered``, ``lost`` and
    ``goaway`` (the ``Pool``)."""

    def __init__(self, owner: Any, endpoint: Endpoint, hello: bytes,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.owner = owner
        self.endpoint = endpoint
        self.server: Any = None  # the pool's ServerState for it
        self.loop = loop
        self.transport: Transport | None = None
        self.decoder = codec.FrameDecoder()
        self.pending: dict[int, Call] = {}
        self._ids = itertools.count(1)
        self._out: list[bytes] = []
        self._flush_handle: asyncio.Handle | None = None
        self._hello = hello
        self.welcome: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.closed_future: asyncio.Future[None] = loop.create_future()
        # set when nothing new may go here: GOAWAY, SHUTTING_DOWN or the end
        self.retired: asyncio.Future[None] = loop.create_future()
        self.ready = False
        self.goaway = False
        self.closed = False
        self.limits: dict[str, Any] = {}
        self.max_in_flight = 4096
        self.max_frame = codec.MAX_FRAME
        self.heard = loop.time()  # when the server last sent anything
        self.probed = 0.0  # when a PING went out to a silent server (0: none)
        # per offload session: its id once open, or the calls waiting for it to open
        self.sessions: dict[SessionSpec, int | list[Call]] = {}

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # duck-typed: an asyncio or a uvloop stream transport (uvloop's subclass neither
        # asyncio.Transport nor WriteTransport)
        self.transport = t = cast(Transport, transport)
        sock = t.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t.write(self._hello)

    def data_received(self, data: bytes) -> None:
        self.heard = self.loop.time()
        self.probed = 0.0
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as e:
            self._abort(e)
            return
        if not self.ready:
            frames = self._handshake(frames)
        pending = self.pending
        owner = self.owner
        for f in frames:
            t = f.type
            if t == FrameType.RESPONSE or t == FrameType.BATCH_RESPONSE:
                call = pending.pop(f.id, None)
                if call is None:
                    continue  # timed out and forgotten: a late answer is dropped
                if call.on_frame is not None:
                    call.on_frame(f)
                else:
                    owner.answered(self, call, f)
            elif t == FrameType.DATA:
                call = pending.get(f.id)
                if call is not None and call.on_frame is not None:
                    if f.flags & codec.Flag.END:
                        del pending[f.id]
                    call.on_frame(f)
            elif t == FrameType.GOAWAY:
                if not self.goaway:
                    self.retire()
                    owner.goaway(self)
            elif t == FrameType.PING:
                self._queue([codec.encode_frame(FrameType.PONG, f.id, payload=f.payload)])
            elif t == FrameType.PONG:
                pass
            elif t == FrameType.EVENT:
                owner.event(self, f)
            else:
                self._abort(ProtocolError(f"unexpected frame type {t} from the server"))
                return

    def _handshake(self, frames: list[Frame]) -> list[Frame]:
        if not frames:
            return frames
        first, rest = frames[0], frames[1:]
        if first.type != FrameType.WELCOME:
            self._abort(ProtocolError(f"expected WELCOME, got frame type {first.type}"))
            return []
        if first.status != Status.OK:
            err = codec.error_from(first.status, first.payload)
            if not self.welcome.done():
                self.welcome.set_exception(err)
            self._abort(err)
            return []
        try:
            info = codec.decode_json_payload(first.payload)
        except ProtocolError as e:
            self._abort(e)
            return []
        self.limits = dict(info.get("limits") or {})
        self.max_in_flight = int(self.limits.get("max_in_flight") or 4096)
        self.max_frame = min(codec.MAX_FRAME, int(self.limits.get("max_frame")
                                                  or codec.MAX_FRAME))
        self.ready = True
        if not self.welcome.done():
            self.welcome.set_result(info)
        return rest

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.ready = False
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._out.clear()
        if not self.welcome.done():
            self.welcome.set_exception(ConnectionLost(
                f"{self.endpoint}: connection closed during the handshake"
                + (f" ({exc})" if exc else "")))
        calls: list[Call] = []
        streams: list[Call] = []
        for call in self.pending.values():
            if call.kind == NORMAL:
                calls.append(call)
            elif call.kind == STREAM:
                streams.append(call)
        self.pending.clear()
        for waiting in self.sessions.values():
            if isinstance(waiting, list):
                calls.extend(waiting)
        self.sessions.clear()
        if not self.closed_future.done():
            self.closed_future.set_result(None)
        if not self.retired.done():
            self.retired.set_result(None)
        self.owner.lost(self, calls, streams, exc)

    # -- sending -------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return self.ready and not self.goaway and not self.closed

    def send(self, call: Call) -> None:
        """Send ``call`` (through its offload session on this connection, if it has one)."""
        call.conn = self
        spec = call.session
        if spec is None:
            self._write(call, call.payload)
            return
        state = self.sessions.get(spec)
        if isinstance(state, int):
            self._write(call, _SESSION_TAG + codec.u32(state) + call.payload)
        elif state is not None:
            state.append(call)
        else:
            self.sessions[spec] = [call]
            self._open_session(spec)

    def _write(self, call: Call, payload: bytes) -> None:
        size = codec.HEADER_SIZE + len(call.key) + len(payload)
        if size > self.max_frame:  # the server would close the connection on it
            self.owner.answered(self, call, None, InvalidRequest(
                f"a request of {size} bytes exceeds the server's limit of "
                f"{self.max_frame} per frame"))
            return
        fid = next(self._ids)
        call.id = fid
        self.pending[fid] = call
        self._queue([codec.header_bytes(call.ftype, fid, call.op, 0, len(call.key),
                                        len(payload)), call.key, payload])

    def send_data(self, call: Call, piece: bytes, end: bool) -> None:
        """A DATA frame of stream ``call`` (already sent)."""
        self._queue([codec.header_bytes(FrameType.DATA, call.id, 0, 0, 0, len(piece),
                                        codec.Flag.END if end else 0), piece])

    def _queue(self, parts: list[bytes]) -> None:
        if self.closed:
            return
        self._out.extend(parts)
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        out, self._out = self._out, []
        if out and self.transport is not None and not self.closed:
            self.transport.writelines(out)

    def forget(self, call: Call) -> None:
        """Drop ``call`` (it timed out): a late answer to it is ignored."""
        if self.pending.get(call.id) is call:
            del self.pending[call.id]
            return
        if call.session is not None:
            state = self.sessions.get(call.session)
            if isinstance(state, list) and call in state:
                state.remove(call)

    def _open_session(self, spec: SessionSpec) -> None:
        payload = codec.encode_fields({Field.ALGORITHM: spec.algorithm.encode(),
                                       Field.KEY: spec.material})
        opener = Call(FrameType.REQUEST, Op.SESSION_OPEN, b"", payload, True, _ignore,
                      0.0)
        opener.kind = INTERNAL

        def opened(frame: Frame) -> None:
            waiting = self.sessions.get(spec)
            if not isinstance(waiting, list):
                return
            if frame.status != Status.OK:
                del self.sessions[spec]
                err = codec.error_from(frame.status, frame.payload)
                for call in waiting:
                    self.owner.answered(self, call, None, err)
                return
            try:
                sid = codec.get_u32(codec.decode_fields(frame.payload), Field.SESSION)
            except InvalidRequest as e:
                self._abort(ProtocolError(f"bad SESSION_OPEN answer: {e}"))
                return
            self.sessions[spec] = sid
            for call in waiting:
                self._write(call, _SESSION_TAG + codec.u32(sid) + call.payload)

        opener.on_frame = opened
        self._write(opener, payload)

    def close_session(self, spec: SessionSpec) -> None:
        sid = self.sessions.get(spec)
        if isinstance(sid, int):
            del self.sessions[spec]
            closer = Call(FrameType.REQUEST, Op.SESSION_CLOSE, b"",
                          codec.encode_fields({Field.SESSION: codec.u32(sid)}), True,
                          _ignore, 0.0)
            closer.kind = INTERNAL
            closer.on_frame = _ignore_frame
            self._write(closer, closer.payload)

    def retire(self) -> None:
        """Send nothing new here (GOAWAY); closed once nothing is owed."""
        self.goaway = True
        if not self.retired.done():
            self.retired.set_result(None)
        if not self.pending:
            self.close()

    def ping(self) -> None:
        self._queue([codec.encode_frame(FrameType.PING, 0)])

    def probe(self, now: float, silence: float) -> None:
        """Called now and then by the pool: a server silent for ``silence`` seconds while
        requests wait is sent a PING; silent for as long again, the connection is cut
        (a stopped process or a lost network sends no reset), so its requests fail over."""
        if not self.pending or now - self.heard < silence:
            return
        if not self.probed:
            self.probed = now
            self.ping()
        elif now - self.probed >= silence:
            self._abort(ConnectionLost(f"{self.endpoint}: no answer for "
                                       f"{now - self.heard:.1f} s, not even to a PING"))

    def _abort(self, error: BaseException) -> None:
        if not self.welcome.done():
            self.welcome.set_exception(error)
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self._flush()
            self.transport.close()


def _ignore(frame: Frame | None, error: BaseException | None) -> None:
    pass


def _ignore_frame(frame: Frame) -> None:
    pass


_unpack_field = struct.Struct("!BI").unpack_from


def read_field(payload: bytes, tag: int) -> bytes:
    """The value of field ``tag`` in an answer's payload (b"" when absent), reading only
    field headers: the hot operations' answers carry one or two fields, and a dict of
    them (``codec.decode_fields``) cost more than the rest of the answer's handling."""
    pos, end = 0, len(payload)
    while end - pos >= 5:
        t, n = _unpack_field(payload, pos)
        pos += 5
        if n > end - pos:
            raise ProtocolError("malformed answer: a field runs past the end")
        if t == tag:
            return payload[pos:pos + n]
        pos += n
    return b""


def hello_frame(token: str | None, name: str,
                extra: dict[str, Any] | None = None) -> bytes:
    """HELLO; ``extra`` adds fields (``grant``: a manager's capability token)."""
    obj: dict[str, Any] = {"versions": [codec.VERSION], "client": name or "cryptoplane"}
    if token:
        obj["token"] = token
    if extra:
        obj.update(extra)
    return codec.encode_json_frame(FrameType.HELLO, obj)


async def connect(owner: Any, endpoint: Endpoint, *, token: str | None, name: str,
                  ssl: ssl_module.SSLContext | None, timeout: float,
                  extra: dict[str, Any] | None = None
                  ) -> tuple[ClientConnection, dict[str, Any]]:
    """Open one connection and complete its handshake; (connection, WELCOME fields)."""
    loop = asyncio.get_running_loop()
    hello = hello_frame(token, name, extra)

    def factory() -> ClientConnection:
        return ClientConnection(owner, endpoint, hello, loop)

    async def go() -> tuple[ClientConnection, dict[str, Any]]:
        if endpoint.scheme == "unix":
            _, proto = await loop.create_unix_connection(factory, endpoint.path, ssl=ssl)
        elif endpoint.scheme == "tls":
            if ssl is None:
                raise InvalidRequest(f"{endpoint}: a tls:// URL needs an ssl context")
            _, proto = await loop.create_connection(factory, endpoint.host, endpoint.port,
                                                    ssl=ssl)
        else:
            _, proto = await loop.create_connection(factory, endpoint.host, endpoint.port,
                                                    ssl=ssl)
        info = await proto.welcome
        return proto, info

    try:
        return await asyncio.wait_for(go(), timeout)
    except TimeoutError:
        raise ConnectionLost(f"{endpoint}: no WELCOME within {timeout:g} s") from None


def describe_info(info: dict[str, Any]) -> str:
    return json.dumps(info, sort_keys=True)
