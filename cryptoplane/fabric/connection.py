"""One client's connection to the fabric server: frames in, answers out.

The hot path, per receive: the codec splits every complete frame at once; each request
is checked (scope, expiry, rate) and, when it costs less than a hop to a thread
(AES-GCM, ChaCha20-Poly1305, HMAC, digests of small payloads), run at once; its answer
is appended to a list, and the whole list goes out in one ``writelines`` when the
receive is done. Requests that would hold the loop (signatures, key management, big
payloads) go to worker threads (``workers.Workers``), whose answers come back in
batches and are written together too. No per-request future, log line or lookup
beyond the op table's.

Limits: frames of at most 16 KiB until the handshake is done (and it must be done within
``handshake_timeout``); a frame begun must be complete within ``frame_timeout``
(slowloris); at most ``max_in_flight`` requests at the workers or streams open per
connection (reading stops until answers drain); reading stops while the transport holds
more than the write high-water mark (a client that does not read its answers); a broken
frame is answered PROTOCOL_ERROR where it has an id and the connection closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Final, cast

from ..exceptions import CryptoplaneError, InvalidRequest
from . import codec as C
from .auth import Principal
from .bulk import StreamDecryptJob, StreamEncryptJob
from .codec import Field, FrameType, Op, Status
from .dispatch import (
    ADMIN,
    BIG,
    INLINE,
    OPS,
    SCOPES,
    SESSION_OPS,
    STREAM_OPS,
    OpSpec,
    error_answer,
    run_batch,
)
from .errors import ProtocolError, ShuttingDown, Unauthorized
from .sessions import Sessions, run_raw

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("cryptoplane.fabric")

_pack = C.HEADER.pack
_VERSION: Final = C.VERSION
_RESPONSE: Final = int(FrameType.RESPONSE)
_BATCH_RESPONSE: Final = int(FrameType.BATCH_RESPONSE)
_DATA: Final = int(FrameType.DATA)
_REQUEST: Final = int(FrameType.REQUEST)
_BATCH: Final = int(FrameType.BATCH)
_ENCRYPT: Final = int(Op.ENCRYPT)
_DECRYPT: Final = int(Op.DECRYPT)
_TENANT_LIMITS: Final = int(Op.TENANT_LIMITS)
_AFTER_LENGTH: Final = C.HEADER_SIZE - 4
# a RESPONSE header and its first field's head, packed at once (the hot path's answer)
_pack_field_answer = struct.Struct("!IBBHQHHHHBI").pack
_VERSION_FIELD: Final = bytes((Field.VERSION,)) + (4).to_bytes(4, "big")
_NONCE_POOL: Final = 12 * 512
# answers are joined into one buffer before writing unless big ones (counted in
# out_bytes: everything but the hot path's ~100-byte answers) pass this
_JOIN_LIMIT: Final = 256 * 1024
_COPY_LIMIT: Final = 16 * 1024  # answers up to this size are joined to their header
STATUS_NAMES: Final = {int(s): s.name.lower() for s in Status}
MAX_PING: Final = 64
SHUTDOWN_RETRY: Final = 0.001  # RETRY_AFTER of SHUTTING_DOWN: at once, elsewhere
# a stream stops the connection's reading while this many pieces wait for its worker
STREAM_QUEUE: Final = 2

HANDSHAKE, OPEN, CLOSED = 0, 1, 2


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


def _stream_step(job: StreamEncryptJob | StreamDecryptJob, data: bytes,
                 end: bool) -> list[bytearray]:
    out = job.feed(data) if data else []
    if end:
        out.extend(job.finish())
    return out


class Connection(asyncio.Protocol):
    """See the module docstring. Made by ``Server`` per accepted socket."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.svc = server.service
        self.transit = server.service.transit
        self.admit = server.service.rate_limits.admit
        self.decoder = C.FrameDecoder(C.MAX_UNAUTHENTICATED_FRAME)
        self.transport: asyncio.Transport | None = None
        self.state = HANDSHAKE
        self.principal: Principal | None = None
        self.tenant = ""
        self.expires_at = float("inf")
        self.kind = "tcp"
        self.peercert: dict[str, Any] | None = None
        self.token: str | None = None  # kept to recheck it while the connection lives
        self.rechecking = False
        self.allowed: dict[tuple[str, str | None], bool] = {}
        self.out: list[Any] = []
        self.out_bytes = 0  # payload bytes in ``out`` (big answers; the hot path's aside)
        self.ids: set[int] = set()  # requests at the workers and streams open
        self.inflight = 0
        self.inflight_bytes = 0  # request payload bytes at the workers
        self.held: list[C.Frame] = []  # frames that came before the handshake finished
        self.read_paused = False
        self.write_paused = False
        self.draining = False
        self.closing = False
        self.sessions: Sessions | None = None
        self.streams: dict[int, Stream] = {}
        self.counts: dict[tuple[int, int], list[int]] = {}
        # the hot path: keys looked up this receive, nonces drawn in bulk
        self.hot: dict[bytes, tuple[Any, bytes, int, str, bytes]] = {}
        self.nonces = b""
        self.npos = _NONCE_POOL
        self.encrypt = server.service.plane.encrypt
        self.record_use = server.service.transit.source.record_use
        self.label = ""
        # for the watchdog
        loop_time = server.loop.time()
        self.born = loop_time
        self.activity = 0    # receives so far
        self.frames = 0      # frames completed so far
        self.mark = (0, 0)   # (activity, frames) at the last sweep
        self.partial = False  # a frame was half received at the last sweep
        self.frame_at = loop_time
        self.act_at = loop_time

    # ---- transport callbacks ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but they are one
        self.transport = t = cast(asyncio.Transport, transport)
        server = self.server
        if len(server.connections) >= server.max_connections or server.stopping:
            self.closing = True
            self.state = CLOSED
            t.abort()
            return
        server.connections.add(self)
        t.set_write_buffer_limits(server.write_high_water, server.write_high_water // 4)
        self.kind = server.kind_of(t)
        self.peercert = t.get_extra_info("peercert") if self.kind == "tls" else None
        self.svc.metrics.connection_opened(self.kind)
        sock = t.get_extra_info("socket")
        if sock is not None and self.kind != "unix":
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = CLOSED
        self.closing = True
        self.streams.clear()
        self.held.clear()
        if self.sessions is not None:
            self.sessions.clear()
        self._flush_counts()
        if self in self.server.connections:
            self.server.connections.discard(self)
            self.svc.metrics.connection_closed()
            self.server.connection_gone()

    def pause_writing(self) -> None:
        self.write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.held and self.state == OPEN:
            held, self.held = self.held, []
            self._frames(held)
            if self.out:
                self._write()
        self._update_reading()

    def eof_received(self) -> bool | None:
        # the client is done sending; answers still owed go out, then we close
        self.closing = True
        if not self.inflight or self.kind == "tls":  # TLS cannot stay half-open
            return None
        return True

    # ---- receiving ----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.state == CLOSED:
            return
        self.activity += 1
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as e:
            self._fatal(0, str(e))
            return
        if not frames:
            return
        self.frames += len(frames)
        if self.state != OPEN:
            self._before_open(frames)
        else:
            self._frames(frames)
        if self.out:
            self._write()
        if self.counts:
            self._flush_counts()
        self.hot.clear()

    def _frames(self, frames: list[C.Frame]) -> None:
        if self.expires_at <= time.time():
            self._expired()
        out = self.out
        high = self.server.write_high_water
        for i, f in enumerate(frames):
            if self.state == CLOSED:
                return
            if self.out_bytes > high:
                # answers pile up faster than the client takes them: write what there is
                # and, if the transport is full, keep the rest of the frames for later
                self._write()
                out = self.out
                if self.write_paused:
                    self.held[:0] = frames[i:]
                    self._pause()
                    return
            ftype = f.type
            if ftype == _REQUEST:
                if f.op == _ENCRYPT and self._encrypt_fast(f, out):
                    continue
                self._request(f, out)
            elif ftype == _BATCH:
                self._batch(f, out)
            elif ftype == _DATA:
                self._data(f)
            elif ftype == FrameType.PING:
                self._pong(f, out)
            elif ftype == FrameType.PONG:
                pass
            else:
                self._fatal(f.id, f"a client may not send frame type {ftype} now")
                return

    def _pong(self, f: C.Frame, out: list[Any]) -> None:
        if len(f.payload) > MAX_PING or f.key:
            self._fatal(f.id, "PING carries at most 64 bytes and no key")
            return
        out.append(C.encode_frame(FrameType.PONG, f.id, payload=f.payload))

    # ---- the handshake ---------------------------------------------------------------

    def _before_open(self, frames: list[C.Frame]) -> None:
        if self.state == HANDSHAKE and self.principal is None and not self.held:
            first, rest = frames[0], frames[1:]
            if first.type != FrameType.HELLO:
                self._fatal(first.id, "the first frame must be HELLO")
                return
            self.held.extend(rest)
            self._hello(first)
        else:
            self.held.extend(frames)
        if len(self.held) > 64 or self.principal is None:
            self._pause()  # the handshake is out at a worker: nothing more until then

    def _hello(self, f: C.Frame) -> None:
        try:
            hello = C.decode_json_payload(f.payload)
        except ProtocolError as e:
            self._fatal(0, str(e), FrameType.WELCOME)
            return
        versions = hello.get("versions", [1])
        if not isinstance(versions, list) or _VERSION not in versions:
            self._fatal(0, f"no common protocol version (this server speaks {_VERSION})",
                        FrameType.WELCOME)
            return
        token = hello.get("token")
        self.principal = None
        if token is None:
            try:
                principal = self.svc.auth.from_certificate(self.peercert)
            except Unauthorized as e:
                self._refuse("no_credential" if self.peercert is None else "bad_certificate",
                             str(e) if self.peercert else "no token and no client certificate")
                return
            self._welcome(principal)
            return
        if not isinstance(token, str) or len(token) > 512:
            self._refuse("bad_token", "invalid, revoked or expired token")
            return
        # the keystore may be a database away: a worker asks it
        self.inflight += 1
        self.token = token
        self.server.auth.submit(self.svc.auth.from_token, (token,), self, ("hello",))

    def recheck(self) -> None:
        """Ask the keystore (through the authenticator's cache) whether the token still
        stands: a revoked token stops working on open connections too, within the
        server's recheck period plus the cache's TTL (the watchdog calls this)."""
        if self.token is not None and self.state == OPEN and not self.rechecking:
            self.rechecking = True
            self.server.auth.submit(self.svc.auth.from_token, (self.token,), self,
                                    ("recheck",))

    def _refuse(self, reason: str, message: str) -> None:
        self.svc.metrics.auth_failure(reason)
        self._fatal(0, message, FrameType.WELCOME, Status.UNAUTHORIZED)

    def _welcome_again(self, principal: Principal) -> None:
        """The token's grant changed (scopes, expiry): use the new one from now on."""
        if principal.tenant != self.tenant:
            self._fatal(0, "credential changed tenant", _RESPONSE, Status.UNAUTHORIZED)
            return
        self.principal = principal
        self.expires_at = (principal.expires_at if principal.expires_at is not None
                           else float("inf"))
        self.allowed.clear()

    def _welcome(self, principal: Principal) -> None:
        if self.state == CLOSED:
            return
        self.principal = principal
        self.tenant = principal.tenant
        self.label = principal.label
        self.expires_at = principal.expires_at if principal.expires_at is not None else float(
            "inf")
        self.decoder.max_frame = self.server.max_frame
        self.state = OPEN
        s = self.server
        welcome = {"version": _VERSION, "server": self.svc.server_id, "tenant": self.tenant,
                   "ops": SCOPES, "key_types": self.svc.key_types,
                   "limits": {"max_frame": s.max_frame, "max_batch": C.MAX_BATCH,
                              "max_in_flight": s.max_in_flight,
                              "stream_piece": self.svc.stream_piece}}
        self.out.append(C.encode_json_frame(FrameType.WELCOME, welcome))
        if self.draining:
            self.out.append(C.encode_frame(FrameType.GOAWAY, 0))
        held, self.held = self.held, []
        if held:
            self._frames(held)
        self._update_reading()

    # ---- requests ---------------------------------------------------------------------

    def _answer(self, out: list[Any], fid: int, op: int, status: int, payload: bytes,
                ftype: int = _RESPONSE) -> None:
        n = len(payload)
        self.out_bytes += n
        head = _pack(_AFTER_LENGTH + n, _VERSION, ftype, 0, fid, op, status, 0, 0)
        if n <= _COPY_LIMIT:
            out.append(head + payload)
        else:
            out.append(head)
            out.append(payload)

    def _count(self, op: int, status: int, nbytes: int, items: int = 0) -> None:
        row = self.counts.get((op, status))
        if row is None:
            self.counts[op, status] = [1, nbytes, items]
        else:
            row[0] += 1
            row[1] += nbytes
            row[2] += items

    def _flush_counts(self) -> None:
        count = self.svc.metrics.count
        tenant = self.tenant or "-"
        for (op, status), (n, nbytes, items) in self.counts.items():
            spec = OPS.get(op)
            if spec is not None:
                count(tenant, spec.name, STATUS_NAMES.get(status, "internal"), n, nbytes,
                      items)
        self.counts.clear()

    def _error(self, out: list[Any], fid: int, op: int, exc: BaseException) -> None:
        status, payload = error_answer(exc)
        self._answer(out, fid, op, status, payload)
        self._count(op, status, 0)

    def _encrypt_fast(self, f: C.Frame, out: list[Any]) -> bool:
        """ENCRYPT of one DATA field with a plain AEAD key, in scope, not draining: the
        hot path. False: take the general one (``Transit.encrypt``, same result).

        What it saves over the general path: the key's usable version is looked up once
        per receive (``hot``), nonces come from one ``os.urandom`` per 512 requests, and
        the answer is packed with one struct and joined once."""
        p = f.payload
        n = len(p) - 5
        if (n < 0 or n >= BIG or p[0] != 1 or int.from_bytes(p[1:5], "big") != n
                or self.draining or f.id in self.ids):
            return False
        hot = self.hot.get(f.key)
        if hot is None:
            hot = self._heat(f.key)
            if hot is None:
                return False
        aead, header, version, name, tail = hot
        principal = self.principal
        assert principal is not None
        if self.admit(principal, 1, n):
            return False  # the general path answers THROTTLED
        pos = self.npos
        if pos >= _NONCE_POOL:
            self.nonces = os.urandom(_NONCE_POOL)
            pos = 0
        nonce = self.nonces[pos:pos + 12]
        self.npos = pos + 12
        try:
            ct = self.encrypt(aead, p[5:], nonce, b"")
        except Exception:
            return False  # the general path says why
        self.record_use(self.tenant, name, version, "encrypt", n, self.label)
        out.append(b"".join((_pack_field_answer(_AFTER_LENGTH + len(ct) + 31, _VERSION,
                                                _RESPONSE, 0, f.id, _ENCRYPT, 0, 0, 0, 2,
                                                len(ct) + 17),
                             header, nonce, ct, tail)))
        row = self.counts.get((_ENCRYPT, 0))
        if row is None:
            self.counts[_ENCRYPT, 0] = [1, n, 0]
        else:
            row[0] += 1
            row[1] += n
        return True

    def _heat(self, key: bytes) -> tuple[Any, bytes, int, str, bytes] | None:
        """The hot path's view of a key, for this receive: None when it does not apply
        (a derived or non-AEAD key, out of scope, not found: the general path answers)."""
        name = self.server.names.get(key)
        if name is None or ("encrypt", name) not in self.allowed:
            return None
        try:
            ver = self.transit.ring(self.tenant, name).fast
        except Exception:
            return None
        if ver is None or ver.aead is None:
            return None
        hot = (ver.aead, ver.ct_header, ver.number, name,
               _VERSION_FIELD + ver.number.to_bytes(4, "big"))
        self.hot[key] = hot
        return hot

    def _check(self, spec: OpSpec, f: C.Frame) -> str:
        """The key name, once scope and shutdown are checked (raises the error)."""
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another server")
        if spec.keyed:
            key = f.key
            if not key:
                raise InvalidRequest(f"{spec.name} needs a key name")
            name = self.server.names.get(key)
            if name is None:
                try:
                    name = key.decode("utf-8")
                except UnicodeDecodeError:
                    raise InvalidRequest("the key reference is not UTF-8") from None
                self.server.remember_name(key, name)
        else:
            name = ""
        scope = (spec.scope, name or None)
        if scope not in self.allowed:
            assert self.principal is not None
            self.principal.check(spec.scope, name or None)
            if len(self.allowed) < 4096:
                self.allowed[scope] = True
        return name

    def _request(self, f: C.Frame, out: list[Any]) -> None:
        fid, op = f.id, f.op
        spec = OPS.get(op)
        if spec is None:
            self._answer(out, fid, op, Status.NOT_SUPPORTED,
                         C.error_fields(f"unknown operation {op}"))
            return
        if fid in self.ids:
            self._fatal(fid, f"request id {fid} is already in flight")
            return
        try:
            name = self._check(spec, f)
            assert self.principal is not None
            # an operator lifting a limit must not be refused by it
            wait = self.admit(self.principal, 1, len(f.payload)) if op != _TENANT_LIMITS else 0
            if wait:
                raise C.error_for(Status.THROTTLED, "rate limit exceeded", wait)
            fields = C.decode_fields(f.payload)
            if op in SESSION_OPS:
                self._session(f, fields, out)
                return
            if op in STREAM_OPS:
                self._open_stream(f, name, fields, out)
                return
            where = spec.where
            if where == INLINE and len(f.payload) >= BIG:
                where = 1
            if where == INLINE:
                assert spec.run is not None
                answer = spec.run(self.svc, self.tenant, name, fields, self.label)
                self._answer(out, fid, op, 0, answer)
                self._count(op, 0, len(f.payload))
                return
        except Exception as e:
            if isinstance(e, ShuttingDown):
                self._answer(out, fid, op, Status.SHUTTING_DOWN,
                             C.error_fields(str(e), SHUTDOWN_RETRY))
                self._count(op, Status.SHUTTING_DOWN, 0)
                return
            self._error(out, fid, op, e)
            return
        assert spec.run is not None
        self._submit(where, spec.run, (self.svc, self.tenant, name, fields, self.label),
                     ("req", fid, op, len(f.payload), 0))

    def _submit(self, where: int, fn: Any, args: tuple[Any, ...], token: tuple[Any, ...]
                ) -> None:
        self.ids.add(token[1])
        self.inflight += 1
        self.inflight_bytes += token[3]
        pool = self.server.admin if where == ADMIN else self.server.workers
        pool.submit(fn, args, self, token)
        if (self.inflight >= self.server.max_in_flight
                or self.inflight_bytes >= self.server.max_in_flight_bytes):
            self._pause()

    def _batch(self, f: C.Frame, out: list[Any]) -> None:
        fid, op = f.id, f.op
        spec = OPS.get(op)
        if spec is None or (spec.batch is None and (spec.run is None or spec.where == ADMIN)):
            self._answer(out, fid, op, Status.NOT_SUPPORTED,
                         C.error_fields(f"operation {op} cannot be batched"))
            return
        if fid in self.ids:
            self._fatal(fid, f"request id {fid} is already in flight")
            return
        try:
            name = self._check(spec, f)
            try:
                items = C.decode_batch(f.payload)
            except ProtocolError as e:  # the frame was sound: refuse the batch only
                raise InvalidRequest(str(e)) from None
            assert self.principal is not None
            wait = self.admit(self.principal, len(items), len(f.payload))
            if wait:
                raise C.error_for(Status.THROTTLED, "rate limit exceeded", wait)
            if spec.where == INLINE and len(f.payload) < BIG:
                answer = run_batch(self.svc, self.tenant, spec, name, items, self.label)
                self._answer(out, fid, op, 0, answer, _BATCH_RESPONSE)
                self._count(op, 0, len(f.payload), len(items))
                return
        except Exception as e:
            if isinstance(e, ShuttingDown):
                self._answer(out, fid, op, Status.SHUTTING_DOWN,
                             C.error_fields(str(e), SHUTDOWN_RETRY))
                return
            self._error(out, fid, op, e)
            return
        self._submit(1, run_batch, (self.svc, self.tenant, spec, name, items, self.label),
                     ("batch", fid, op, len(f.payload), len(items)))

    # ---- offload sessions ------------------------------------------------------------

    def _session(self, f: C.Frame, fields: dict[int, bytes], out: list[Any]) -> None:
        s = self.sessions
        if s is None:
            s = self.sessions = Sessions(self.svc.plane)
        op = f.op
        if op == Op.SESSION_OPEN:
            answer = s.open(fields)
        elif op == Op.SESSION_CLOSE:
            answer = s.close(fields)
        else:
            key = s.key(fields)
            if s.where(op, fields) != INLINE:
                self._submit(1, run_raw, (self.svc.plane, key, op, fields),
                             ("req", f.id, op, len(f.payload), 0))
                return
            answer = run_raw(self.svc.plane, key, op, fields)
        self._answer(out, f.id, op, 0, answer)
        self._count(op, 0, len(f.payload))

    # ---- streams ---------------------------------------------------------------------

    def _open_stream(self, f: C.Frame, name: str, fields: dict[int, bytes],
                     out: list[Any]) -> None:
        cls = StreamEncryptJob if f.op == Op.ENCRYPT_STREAM else StreamDecryptJob
        job = cls(self.transit, self.tenant, name, context=fields.get(Field.CONTEXT),
                  plane=self.svc.plane, piece=self.svc.stream_piece)
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
        if len(data) >= BIG or end:
            stream.busy = True
            self.server.workers.submit(_stream_step, (stream.job, data, end), self,
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

    def _stream_next(self, stream: Stream) -> None:
        while stream.queue and not stream.busy and stream.id in self.streams:
            data, end = stream.queue.popleft()
            self._stream_run(stream, data, end)

    # ---- completions from the workers ------------------------------------------------------

    def completed(self, token: tuple[Any, ...], result: Any,
                  error: BaseException | None) -> None:
        kind, fid, op, nbytes, extra = token if len(token) == 5 else (*token, 0, 0, 0, 0)
        if kind == "hello":
            self.inflight -= 1
            if error is not None:
                self._refuse("bad_token", str(error) if isinstance(error, CryptoplaneError)
                             else "invalid, revoked or expired token")
            else:
                self._welcome(result)
            return
        if kind == "recheck":
            self.rechecking = False
            if isinstance(error, Unauthorized):
                self.svc.metrics.auth_failure("revoked")
                self._fatal(0, "credential revoked or expired", _RESPONSE,
                            Status.UNAUTHORIZED)
            elif error is None and result != self.principal:
                self._welcome_again(result)
            return
        if self.state == CLOSED:
            return
        if kind == "stream":
            stream = self.streams.get(fid)
            if stream is None:
                return
            stream.busy = False
            if error is not None:
                self._stream_failed(stream, error)
            elif isinstance(result, bytes):  # the encrypt header from start()
                self._stream_out(stream, [result], False)
            else:
                self._stream_out(stream, result, bool(extra))
            self._stream_next(stream)
            return
        self.ids.discard(fid)
        self.inflight -= 1
        self.inflight_bytes -= nbytes
        out = self.out
        if error is not None:
            self._error(out, fid, op, error)
        elif kind == "batch":
            self._answer(out, fid, op, 0, result, _BATCH_RESPONSE)
            self._count(op, 0, nbytes, extra)
        else:
            self._answer(out, fid, op, 0, result)
            self._count(op, 0, nbytes)
            if op == _TENANT_LIMITS:
                self.svc.apply_limits(json.loads(C.decode_fields(result)[Field.JSON]))

    def settle(self) -> None:
        if self.state == CLOSED:
            return
        if self.out:
            self._write()
        if self.counts:
            self._flush_counts()
        self._update_reading()

    # ---- writing, pausing, closing ------------------------------------------------------

    def _write(self) -> None:
        out, self.out = self.out, []
        big = self.out_bytes
        self.out_bytes = 0
        t = self.transport
        if t is not None and not t.is_closing():
            if big < _JOIN_LIMIT and len(out) > 1:
                # one buffer: half the cost of writelines per answer on uvloop, and one
                # TLS record per 16 KiB instead of one per answer
                t.write(b"".join(out))
            else:
                t.writelines(out)
        if (self.draining or self.closing) and not self.inflight and self.state != CLOSED:
            self._close()

    def _pause(self) -> None:
        if not self.read_paused and self.transport is not None and self.state != CLOSED:
            self.read_paused = True
            self.transport.pause_reading()

    def _update_reading(self) -> None:
        t = self.transport
        if t is None or self.state == CLOSED or t.is_closing():
            return
        if self.draining or self.closing:
            if not self.inflight and not self.out:
                self._close()
            return
        blocked = (self.write_paused or self.inflight >= self.server.max_in_flight
                   or self.principal is None or bool(self.held)
                   or self.inflight_bytes >= self.server.max_in_flight_bytes
                   or any(len(s.queue) >= STREAM_QUEUE for s in self.streams.values()))
        if blocked and not self.read_paused:
            self.read_paused = True
            t.pause_reading()
        elif not blocked and self.read_paused:
            self.read_paused = False
            t.resume_reading()

    def _expired(self) -> None:
        """The credential expired mid-connection: say so and close."""
        self._fatal(0, "credential expired", FrameType.RESPONSE, Status.UNAUTHORIZED)

    def _fatal(self, fid: int, message: str, ftype: int = _RESPONSE,
               status: int = Status.PROTOCOL_ERROR) -> None:
        """Answer an error that ends the connection, then close it."""
        if self.state == CLOSED:
            return
        self.out.append(C.encode_frame(ftype, fid, status=status,
                                       payload=C.error_fields(message)))
        out, self.out = self.out, []
        self.state = CLOSED
        t = self.transport
        if t is not None and not t.is_closing():
            t.writelines(out)
            t.close()

    def _close(self) -> None:
        self.state = CLOSED
        t = self.transport
        if t is not None and not t.is_closing():
            t.close()

    def goaway(self) -> None:
        """Graceful shutdown: GOAWAY now; requests already received are answered, new
        ones refused SHUTTING_DOWN; closed once nothing is owed."""
        if self.draining or self.state == CLOSED:
            return
        self.draining = True
        if self.state == OPEN:
            self.out.append(C.encode_frame(FrameType.GOAWAY, 0))
        self._write()
        if self.principal is None and not self.inflight:
            self._close()

    def abort(self) -> None:
        self.state = CLOSED
        if self.transport is not None:
            self.transport.abort()

    def owes(self) -> bool:
        return bool(self.inflight or self.streams)
