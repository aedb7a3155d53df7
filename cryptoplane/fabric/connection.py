"""One client's connection to the fabric server: the transport, the handshake, flow
control and closing. What requests become is ``handling.Handling``; streams are
``streaming.Streaming``.

Per receive the codec splits every complete frame at once, each is handled, and the
answers go out together in one write. Big DATA frames (stream pieces) are read straight
into a buffer of their own (``framebuf``), the rest into one scratch buffer. Answers of
jobs at the worker threads come back in batches (``cryptoplane.offload``) and are written
together too.

Limits: frames of at most 16 KiB until the handshake is done (and it must be done within
``handshake_timeout``); a frame begun must be complete within ``frame_timeout``
(slowloris; the server's watchdog); at most ``max_in_flight`` requests at the workers or
streams open per connection, and ``max_in_flight_bytes`` of their payloads (reading
stops until answers drain); reading stops while the transport holds more than the write
high-water mark (a client that does not read its answers), and the frames of a receive
not yet handled wait until it drains; a broken frame is answered PROTOCOL_ERROR where
it has an id and the connection closes.

A HELLO may carry ``"grant"``, a manager's capability token (``grants``): it is checked
once the principal is known (its tenant must be the grant's), inline (an Ed25519
verify, some tens of microseconds); a bad, expired, revoked or foreign grant is a
WELCOME with UNAUTHORIZED.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from typing import Any, Final, cast

from ..exceptions import CryptoplaneError
from . import codec as C
from .auth import Principal
from .capability import GrantRefused
from .codec import Field, FrameType, Status
from .dispatch import SCOPES
from .errors import ProtocolError, Unauthorized
from .framebuf import DirectDecoder
from .grants import NO_GRANT, GrantEntry
from .handling import (
    BATCH_RESPONSE,
    DECRYPT,
    ENCRYPT,
    NONCE_POOL,
    RESPONSE,
    TENANT_LIMITS,
    Host,
)
from .sessions import Sessions
from .streaming import STREAM_QUEUE, Stream, Streaming

log = logging.getLogger("cryptoplane.fabric")

_VERSION: Final = C.VERSION
_REQUEST: Final = int(FrameType.REQUEST)
_BATCH: Final = int(FrameType.BATCH)
_DATA: Final = int(FrameType.DATA)
# answers are joined into one buffer before writing unless big ones (counted in
# out_bytes: everything but the hot path's ~100-byte answers) pass this
_JOIN_LIMIT: Final = 256 * 1024
MAX_PING: Final = 64
# what one receive reads at most, outside big DATA frames (those are read in place)
_SCRATCH: Final = 256 * 1024
# after GOAWAY, how long a connection owed nothing waits for its client to close it
LINGER: Final = 1.0

HANDSHAKE, OPEN, CLOSED = 0, 1, 2


class Connection(Streaming, asyncio.BufferedProtocol):
    """See the module docstring. Made by ``Server`` per accepted socket."""

    def __init__(self, server: Host) -> None:
        self.server = server
        self.svc = server.service
        self.transit = server.service.transit
        self.admit = server.service.rate_limits.admit
        self.decoder = DirectDecoder(C.MAX_UNAUTHENTICATED_FRAME,
                                     big_max=server.service.stream_piece + 4096)
        self.scratch = memoryview(bytearray(_SCRATCH))
        self.direct = False  # the last get_buffer gave the decoder's big frame
        self.after_big = False  # a big frame just completed: read only a header next
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
        self.buffered = 0  # bytes of a frame not yet whole, as charged to the server
        self.starved = False  # not read: the server's memory budget is spent
        self.held: list[C.Frame] = []  # frames that came before the handshake finished
        self.read_paused = False
        self.write_paused = False
        self.draining = False
        self.closing = False
        self.linger: asyncio.TimerHandle | None = None
        self.sessions: Sessions | None = None
        self.streams: dict[int, Stream] = {}
        self.counts: dict[tuple[int, int], list[int]] = {}
        # the hot path: keys looked up this receive, nonces drawn in bulk
        self.hot: dict[bytes, tuple[Any, bytes, int, str, bytes]] = {}
        self.hot_dec: dict[tuple[bytes, int], tuple[Any, str]] = {}
        self.nonces = b""
        self.npos = NONCE_POOL
        self.encrypt = server.service.plane.encrypt
        self.decrypt = server.service.plane.decrypt
        self.record_use = server.service.transit.source.record_use
        self.label = ""
        grants = server.service.grants
        # None: served without one; NO_GRANT: data requests FORBIDDEN until one comes
        self.grant: GrantEntry | None = (NO_GRANT if grants is not None and grants.required
                                         else None)
        self.hello_grant: str | None = None  # checked once the principal is known
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
        self._hold(-self.buffered)
        self.server.release(self.inflight_bytes)
        self.inflight_bytes = 0
        self.streams.clear()
        self.held.clear()
        if self.sessions is not None:
            self.sessions.clear()
        self._flush_counts()
        if self in self.server.connections:
            self.server.connections.discard(self)
            self.svc.metrics.connection_closed()
            self.server.connection_gone()

    def _hold(self, delta: int) -> None:
        """Charge (or give back) bytes of a half-received frame to the server's budget;
        over it, this connection is not read until others give memory back."""
        self.buffered += delta
        if self.server.charge(delta) and delta > 0:
            self.starve()

    def starve(self) -> None:
        self.starved = True
        self.server.starving(self)
        self._pause()

    def fed(self) -> None:
        """The server's budget has room again (called by the server)."""
        self.starved = False
        self._update_reading()

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
            if self.counts:
                self._flush_counts()
            self.hot.clear()
            self.hot_dec.clear()
        self._update_reading()

    def eof_received(self) -> bool | None:
        # the client is done sending; answers still owed go out, then we close
        self.closing = True
        if not self.inflight or self.kind == "tls":  # TLS cannot stay half-open
            return None
        return True

    # ---- receiving ----------------------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        # a big DATA frame under way is read straight into its own buffer (no copies);
        # anything else into the scratch buffer, which buffer_updated empties. Right
        # after a big frame, only a header: the next is likely big too, and its payload
        # then goes straight to its buffer instead of through the scratch
        view = self.decoder.want()
        self.direct = view is not None
        if view is not None:
            return view
        if self.after_big:
            self.after_big = False
            return self.scratch[:C.HEADER_SIZE]
        return self.scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self.state == CLOSED:
            return
        decoder = self.decoder
        try:
            if self.direct:
                self.direct = False
                frames = decoder.filled(nbytes)
                self.after_big = bool(frames)
            else:
                frames = decoder.feed_view(self.scratch[:nbytes])
        except ProtocolError as e:
            self._fatal(0, str(e))
            return
        self._received(frames)

    def data_received(self, data: bytes) -> None:
        if self.state == CLOSED:
            return
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as e:
            self._fatal(0, str(e))
            return
        self._received(frames)

    def _received(self, frames: list[C.Frame]) -> None:
        self.activity += 1
        held = self.decoder.buffered
        if held != self.buffered:
            self._hold(held - self.buffered)
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
        self.hot_dec.clear()

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
                op = f.op
                if op == ENCRYPT and self._encrypt_fast(f, out):
                    continue
                if op == DECRYPT and self._decrypt_fast(f, out):
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
        if (self.state == HANDSHAKE and self.principal is None and self.token is None
                and not self.held):
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
        grant = hello.get("grant")
        if grant is not None and not isinstance(grant, str):
            self._refuse("bad_grant", "malformed grant token")
            return
        self.hello_grant = grant
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
            self._fatal(0, "credential changed tenant", RESPONSE, Status.UNAUTHORIZED)
            return
        self.principal = principal
        self.expires_at = (principal.expires_at if principal.expires_at is not None
                           else float("inf"))
        self.allowed.clear()

    def _welcome(self, principal: Principal) -> None:
        if self.state == CLOSED:
            return
        grant, self.hello_grant = self.hello_grant, None
        table = self.svc.grants
        if grant is not None and table is not None:
            try:
                self.grant = table.present(grant, principal.tenant)
            except GrantRefused as e:
                self._refuse("bad_grant", str(e))
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
                   "ops": [op for op in SCOPES if principal.allows(op, None)],
                   "key_types": self.svc.key_types,
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
                self._fatal(0, "credential revoked or expired", RESPONSE,
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
        self.server.release(nbytes)
        out = self.out
        if error is not None:
            self._error(out, fid, op, error)
        elif kind == "batch":
            self._answer(out, fid, op, 0, result, BATCH_RESPONSE)
            self._count(op, 0, nbytes, extra)
        else:
            self._answer(out, fid, op, 0, result)
            self._count(op, 0, nbytes)
            if op == TENANT_LIMITS:
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
        if not self.inflight and self.state != CLOSED:
            if self.closing:
                self._close()
            elif self.draining:
                self._linger()

    def _pause(self) -> None:
        if not self.read_paused and self.transport is not None and self.state != CLOSED:
            self.read_paused = True
            self.transport.pause_reading()

    def _update_reading(self) -> None:
        t = self.transport
        if t is None or self.state == CLOSED or t.is_closing():
            return
        if self.closing:
            if not self.inflight and not self.out:
                self._close()
            return
        if self.draining and not self.inflight and not self.out:
            self._linger()  # and go on reading: see _linger
        blocked = (self.write_paused or self.starved
                   or self.inflight >= self.server.max_in_flight
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

    def _fatal(self, fid: int, message: str, ftype: int = RESPONSE,
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
        if self.linger is not None:
            self.linger.cancel()
        t = self.transport
        if t is not None and not t.is_closing():
            t.close()

    def _linger(self) -> None:
        """Owed nothing after GOAWAY: wait for the client to close (it does once its own
        requests here are answered), still reading and answering SHUTTING_DOWN, for at
        most LINGER seconds. Closing at once would drop requests already on the wire
        and, with them unread, make the kernel reset the connection: the client could
        lose answers it had not read yet (the lingering close of HTTP servers)."""
        if self.linger is None and self.state != CLOSED:
            loop = asyncio.get_running_loop()
            self.linger = loop.call_later(LINGER, self._close)

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
