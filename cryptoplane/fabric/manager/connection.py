"""One connection to the manager: the handshake (a keystore token or a TLS client
certificate, as on the crypto server), the scope each op needs, requests handed to the
service's threads and answered in RESPONSE frames, EVENT pushes, GOAWAY.

    fabric-server   SERVER_REGISTER, SERVER_HEARTBEAT, SERVER_LEAVE
    quota           GRANT_REQUEST, GRANT_RENEW, GRANT_RELEASE, GRANT_LIST, WATCH,
                    FABRIC_STATUS (its own tenant's grants only)
    admin           GRANT_REVOKE, FABRIC_STATUS (everything)

Limits: frames of at most 16 KiB until the handshake is done (within the service's
``handshake_timeout``), then one JSON field's worth; at most ``MAX_IN_FLIGHT`` requests
at the threads before the connection is no longer read. The token is checked again every
``--token-recheck`` seconds: a revoked one ends the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import sys
import time
from collections.abc import Callable
from typing import Any, Final, Protocol, cast

from ...exceptions import Busy, CryptoplaneError, InvalidRequest, NotSupported
from .. import codec as C
from ..auth import Authenticator, Principal
from ..codec import FrameType, Op, Status
from ..dispatch import error_answer
from ..errors import ProtocolError, ShuttingDown, Unauthorized
from .metrics import ManagerMetrics
from .protocol import grant_id_of

log = logging.getLogger("cryptoplane.fabric.manager")

# the scope each op needs (FABRIC_STATUS: quota, or admin to see every tenant)
SCOPE: Final[dict[int, str]] = {
    Op.SERVER_REGISTER: "fabric-server", Op.SERVER_HEARTBEAT: "fabric-server",
    Op.SERVER_LEAVE: "fabric-server",
    Op.GRANT_REQUEST: "quota", Op.GRANT_RENEW: "quota", Op.GRANT_RELEASE: "quota",
    Op.GRANT_LIST: "quota", Op.WATCH: "quota", Op.FABRIC_STATUS: "quota",
    Op.GRANT_REVOKE: "admin",
}
# scopes a WELCOME lists, so a client sees what its token may do here
SCOPES: Final = ("admin", "fabric-server", "quota")
MAX_IN_FLIGHT: Final = 64  # requests at the threads per connection before reading stops
MAX_HELD: Final = 64  # frames sent before the handshake finished
MAX_WATCHED: Final = 4096  # grants one connection may watch
MAX_FRAME: Final = C.HEADER_SIZE + C.MAX_KEY_REF + C.MAX_JSON + 64
HANDSHAKE, OPEN, CLOSED = 0, 1, 2


class DatabaseUnavailable(Busy):
    """The manager's database did not answer (restarting, unreachable): BUSY, which
    clients retry, here or at another manager."""

    retry_after = 0.5


def unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` is the database being gone rather than a fault of the request."""
    if isinstance(exc, sqlite3.OperationalError):  # locked past its busy timeout
        return True
    psycopg = sys.modules.get("psycopg")  # imported only when the store is PostgreSQL
    return psycopg is not None and isinstance(exc, psycopg.OperationalError)


class Host(Protocol):
    """What a connection needs of its manager (``service.ManagerService``)."""

    stopping: bool
    connections: set[ManagerConnection]
    max_connections: int
    handshake_timeout: float
    auth: Authenticator
    metrics: ManagerMetrics
    key_id: str
    public_b64: str

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def manager_id(self) -> str: ...

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]: ...

    def execute(self, op: int, principal: Principal, obj: dict[str, Any],
                conn: ManagerConnection) -> tuple[dict[str, Any], dict[str, str]]: ...

    def watch(self, conn: ManagerConnection, grants: dict[str, str]) -> None: ...

    def unwatch(self, conn: ManagerConnection, grant_id: str | None = None) -> None: ...


class ManagerConnection(asyncio.Protocol):
    """One client, server or operator connected to the manager."""

    def __init__(self, service: Host) -> None:
        self.service = service
        self.decoder = C.FrameDecoder(C.MAX_UNAUTHENTICATED_FRAME)
        self.transport: asyncio.Transport | None = None
        self.state = HANDSHAKE
        self.principal: Principal | None = None
        self.held: list[C.Frame] = []
        self.inflight = 0
        self.paused = False
        self.closing = False
        self.watching: dict[str, str] = {}  # grant id -> placement last told
        self.beats: dict[str, float] = {}  # server id -> time of its last beat here
        self.token: str | None = None  # kept to recheck: a revocation ends the connection
        self.rechecking = False
        self._timer: asyncio.TimerHandle | None = None

    # -- transport ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        svc = self.service
        if svc.stopping or len(svc.connections) >= svc.max_connections:
            self.state = CLOSED
            self.transport.abort()
            return
        svc.connections.add(self)
        self._timer = svc.loop.call_later(svc.handshake_timeout, self._handshake_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = CLOSED
        if self._timer is not None:
            self._timer.cancel()
        self.service.unwatch(self)
        self.service.connections.discard(self)

    def _handshake_late(self) -> None:
        if self.state == HANDSHAKE:
            self._fatal(0, "no HELLO in time", FrameType.WELCOME, Status.UNAUTHORIZED)

    def data_received(self, data: bytes) -> None:
        if self.state == CLOSED:
            return
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as e:
            self._fatal(0, str(e))
            return
        if self.state == HANDSHAKE:
            self._before_open(frames)
            return
        self._frames(frames)

    def _frames(self, frames: list[C.Frame]) -> None:
        for f in frames:
            if self.state != OPEN:
                return
            if f.type == FrameType.REQUEST:
                self._request(f)
            elif f.type == FrameType.PING:
                if len(f.payload) > 64:
                    self._fatal(f.id, "PING carries at most 64 bytes")
                    return
                self._write(C.encode_frame(FrameType.PONG, f.id, payload=f.payload))
            elif f.type != FrameType.PONG:
                self._fatal(f.id, f"a manager takes no frame type {f.type}")
                return

    # -- handshake ---------------------------------------------------------------------

    def _before_open(self, frames: list[C.Frame]) -> None:
        if not frames:
            return
        if self.principal is None and not self.held and self.inflight == 0:
            first, frames = frames[0], frames[1:]
            if first.type != FrameType.HELLO:
                self._fatal(first.id, "the first frame must be HELLO")
                return
            self._hello(first)
            if self.state == OPEN:  # a certificate: welcomed at once
                self._frames(frames)
                return
            if self.state == CLOSED:
                return
        self.held.extend(frames)
        if len(self.held) > MAX_HELD:
            self._fatal(0, "too many frames before the handshake finished")

    def _hello(self, f: C.Frame) -> None:
        try:
            hello = C.decode_json_payload(f.payload)
        except ProtocolError as e:
            self._fatal(0, str(e), FrameType.WELCOME)
            return
        versions = hello.get("versions", [1])
        if not isinstance(versions, list) or C.VERSION not in versions:
            self._fatal(0, f"no common protocol version (this manager speaks {C.VERSION})",
                        FrameType.WELCOME)
            return
        token = hello.get("token")
        auth = self.service.auth
        if token is None:
            assert self.transport is not None
            peercert = self.transport.get_extra_info("peercert")
            try:
                principal = auth.from_certificate(peercert)
            except Unauthorized:
                self._refuse("no token and no client certificate")
                return
            self._welcome(principal)
            return
        if not isinstance(token, str) or len(token) > 512:
            self._refuse("invalid, revoked or expired token")
            return
        self.inflight += 1  # the keystore is a database away
        self.token = token
        fut = self.service.submit(auth.from_token, token)
        fut.add_done_callback(self._checked)

    def _checked(self, fut: asyncio.Future[Principal]) -> None:
        self.inflight -= 1
        if self.state == CLOSED or fut.cancelled():
            return
        error = fut.exception()
        if error is not None and unavailable(error):
            self._fatal(0, "the manager's database is unavailable; retry",
                        FrameType.WELCOME, Status.BUSY)
            return
        if error is not None:
            self.service.metrics.auth_failure()
            self._refuse(str(error) if isinstance(error, Unauthorized)
                         else "invalid, revoked or expired token")
            return
        self._welcome(fut.result())

    def _refuse(self, message: str) -> None:
        self._fatal(0, message, FrameType.WELCOME, Status.UNAUTHORIZED)

    def _welcome(self, principal: Principal) -> None:
        if self.state == CLOSED:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.principal = principal
        self.state = OPEN
        self.decoder.max_frame = MAX_FRAME
        svc = self.service
        self._write(C.encode_json_frame(FrameType.WELCOME, {
            "version": C.VERSION, "server": svc.manager_id, "role": "manager",
            "tenant": principal.tenant,
            "ops": [s for s in SCOPES if principal.allows(s, None)],
            "manager_key": {svc.key_id: svc.public_b64},
            "limits": {"max_frame": MAX_FRAME, "max_in_flight": MAX_IN_FLIGHT}}))
        if svc.stopping:
            self._write(C.encode_frame(FrameType.GOAWAY, 0))
        held, self.held = self.held, []
        self._frames(held)

    # -- requests ----------------------------------------------------------------------

    def _request(self, f: C.Frame) -> None:
        svc = self.service
        op_name = _op_name(f.op)
        if svc.stopping:
            self._error(f, op_name, _stopping())
            return
        scope = SCOPE.get(f.op)
        principal = self.principal
        assert principal is not None
        try:
            if scope is None:
                raise NotSupported(f"op {f.op} is not served by a manager")
            if f.op == Op.FABRIC_STATUS and principal.allows("admin", None):
                principal.check("admin", None)
            else:
                principal.check(scope, None)
            obj = C.get_json(C.decode_fields(f.payload))
        except (CryptoplaneError, ValueError) as e:
            self._error(f, op_name, e)
            return
        self.inflight += 1
        self._update_reading()
        started = time.perf_counter()
        fut = svc.submit(svc.execute, f.op, principal, obj, self)
        fut.add_done_callback(lambda done: self._done(f, op_name, started, done))

    def _done(self, f: C.Frame, op_name: str, started: float,
              fut: asyncio.Future[tuple[dict[str, Any], dict[str, str]]]) -> None:
        self.inflight -= 1
        self.service.metrics.took(op_name, time.perf_counter() - started)
        if self.state == CLOSED:
            return
        if fut.cancelled():
            self._error(f, op_name, _stopping())
        elif (error := fut.exception()) is not None:
            self._error(f, op_name, error)
        else:
            answer, watch = fut.result()
            if f.op == Op.GRANT_RELEASE:
                with contextlib.suppress(InvalidRequest):
                    self.service.unwatch(self, _gid(f))
            if watch:
                self.service.watch(self, watch)
            self.service.metrics.request(op_name, "ok")
            self._write(C.encode_frame(FrameType.RESPONSE, f.id, op=f.op,
                                       payload=C.json_field(answer)))
        self._update_reading()

    def _error(self, f: C.Frame, op_name: str, error: BaseException) -> None:
        if unavailable(error):
            log.warning("%s: the database is unavailable: %s", op_name, error)
            error = DatabaseUnavailable("the manager's database is unavailable; retry")
        status, payload = error_answer(error)
        self.service.metrics.request(op_name, Status(status).name.lower())
        self._write(C.encode_frame(FrameType.RESPONSE, f.id, op=f.op, status=status,
                                   payload=payload))

    def recheck(self) -> None:
        """Whether the token still stands (revoked, expired, scopes changed)."""
        if self.token is None or self.state != OPEN or self.rechecking:
            return
        self.rechecking = True
        fut = self.service.submit(self.service.auth.from_token, self.token)
        fut.add_done_callback(self._rechecked)

    def _rechecked(self, fut: asyncio.Future[Principal]) -> None:
        self.rechecking = False
        if self.state != OPEN or fut.cancelled():
            return
        error = fut.exception()
        if isinstance(error, Unauthorized):
            self.service.metrics.auth_failure()
            self._fatal(0, "credential revoked or expired", FrameType.RESPONSE,
                        Status.UNAUTHORIZED)
        elif error is None:
            principal = fut.result()
            if self.principal is not None and principal.tenant != self.principal.tenant:
                self._fatal(0, "credential changed tenant", FrameType.RESPONSE,
                            Status.UNAUTHORIZED)
            else:
                self.principal = principal

    def push(self, event: dict[str, Any]) -> None:
        if self.state != OPEN:
            return
        self.service.metrics.pushed(str(event.get("event", "")))
        self._write(C.encode_json_frame(FrameType.EVENT, event))

    # -- writing, pausing, closing -----------------------------------------------------

    def _write(self, data: bytes) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)
        if self.closing and not self.inflight:
            self._close()

    def _update_reading(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        if self.inflight >= MAX_IN_FLIGHT and not self.paused:
            self.paused = True
            t.pause_reading()
        elif self.inflight < MAX_IN_FLIGHT and self.paused:
            self.paused = False
            t.resume_reading()

    def goaway(self) -> None:
        """Shutting down: say so, answer what is owed, then close."""
        if self.state == OPEN:
            self._write(C.encode_frame(FrameType.GOAWAY, 0))
        self.closing = True
        if not self.inflight or self.state != OPEN:
            self._close()

    def _fatal(self, fid: int, message: str, ftype: int = FrameType.RESPONSE,
               status: int = Status.PROTOCOL_ERROR) -> None:
        if self.state == CLOSED:
            return
        self.state = CLOSED
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(C.encode_frame(ftype, fid, status=status,
                                   payload=C.error_fields(message)))
            t.close()

    def _close(self) -> None:
        self.state = CLOSED
        t = self.transport
        if t is not None and not t.is_closing():
            t.close()


def _stopping() -> ShuttingDown:
    return ShuttingDown("the manager is shutting down; use another")


def _op_name(op: int) -> str:
    try:
        return Op(op).name.lower()
    except ValueError:
        return "unknown"


def _gid(f: C.Frame) -> str:
    return grant_id_of(C.get_json(C.decode_fields(f.payload)))


__all__ = ["MAX_FRAME", "MAX_IN_FLIGHT", "MAX_WATCHED", "SCOPE", "SCOPES",
           "DatabaseUnavailable", "Host", "ManagerConnection", "unavailable"]
