"""The manager's side of the wire: one ``asyncio.Protocol`` per connection, the
manager's ops (``protocol.py``) answered over the fabric codec, and EVENT pushes.

Control traffic, not the hot path: clarity comes before speed. Every database call and
every signature runs on a small thread pool (the state is a database away, and an
event loop that waits on it would stop answering everyone), never on the loop.

Connections authenticate in HELLO as on the crypto server (a keystore token, or a TLS
client certificate) and each op needs a scope (the token's op globs):

    fabric-server   SERVER_REGISTER, SERVER_HEARTBEAT, SERVER_LEAVE
    quota           GRANT_REQUEST, GRANT_RENEW, GRANT_RELEASE, GRANT_LIST, WATCH,
                    FABRIC_STATUS (its own tenant's grants only)
    admin           GRANT_REVOKE, FABRIC_STATUS (everything); GRANT_REQUEST/RENEW/
                    RELEASE/LIST with a "tenant" field, acting for that tenant

A connection that requested, renewed or watched a grant is told when it moves (a server
left: a fresh token naming the new servers) or is revoked. Changes arrive from the
state's subscription, from any manager sharing the database, on a listener thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Final, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ...exceptions import Busy, CryptoplaneError, InvalidRequest, NotSupported
from .. import codec as C
from ..auth import Authenticator, Principal
from ..capability import GrantClaims, key_id, public_key_b64, sign_grant
from ..codec import FrameType, Op, Status
from ..dispatch import error_answer
from ..errors import (
    Forbidden,
    KeyNotFound,
    ProtocolError,
    QuotaRefused,
    ShuttingDown,
    Unauthorized,
)
from .metrics import ManagerMetrics
from .protocol import (
    Grant,
    GrantAnswer,
    Heartbeat,
    HeartbeatAnswer,
    QuotaRequest,
    Registered,
    Registration,
    grant_id_of,
    server_id_of,
)

if TYPE_CHECKING:
    from .state import FabricState

log = logging.getLogger("cryptoplane.fabric.manager")

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


def placement_of(grant: Grant) -> str:
    """What a client must learn again when it changes: servers and their rates."""
    return json.dumps([s.to_json() for s in grant.servers], sort_keys=True)


class ManagerService:
    """The manager's ops over one ``FabricState``. ``start()`` on the loop, hand
    ``protocol`` to ``create_server``, ``await close()`` at the end."""

    def __init__(self, state: FabricState, auth: Authenticator,
                 signing_key: Ed25519PrivateKey, *, metrics: ManagerMetrics | None = None,
                 threads: int = 4, handshake_timeout: float = 10.0,
                 max_connections: int = 10_000, clock: Callable[[], float] = time.time
                 ) -> None:
        self.state = state
        self.auth = auth
        self.signing_key = signing_key
        self.key_id = key_id(signing_key.public_key())
        self.public_b64 = public_key_b64(signing_key.public_key())
        self.metrics = metrics or ManagerMetrics()
        self.threads = threads
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.clock = clock
        self.connections: set[ManagerConnection] = set()
        self.watchers: dict[str, set[ManagerConnection]] = {}
        self.stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._unsubscribe: Callable[[], None] | None = None

    # -- life --------------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the manager service is not started")
        return self._loop

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(self.threads,
                                            thread_name_prefix="cryptoplane-manager")
        self._unsubscribe = self.state.subscribe(self._on_event)

    def protocol(self) -> ManagerConnection:
        return ManagerConnection(self)

    async def close(self) -> None:
        """Stop: no new events, every connection told GOAWAY and closed, threads done."""
        self.stopping = True
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for conn in list(self.connections):
            conn.goaway()
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: executor.shutdown(wait=True, cancel_futures=True))

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        if self._executor is None:
            raise RuntimeError("the manager service is stopped")
        return self.loop.run_in_executor(self._executor, fn, *args)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the service's threads (the reaper and the metrics use it)."""
        return await self.submit(fn, *args)

    def recheck(self) -> None:
        """Check every open connection's token again (the app calls this every few
        seconds): a revoked token stops working on connections already open too."""
        if self.stopping:
            return
        for conn in list(self.connections):
            conn.recheck()

    # -- ops (on the threads) ----------------------------------------------------------

    def execute(self, op: int, principal: Principal, obj: dict[str, Any],
                conn: ManagerConnection) -> tuple[dict[str, Any], dict[str, str]]:
        """The answer to one op, and the grants (id -> placement) the connection now
        watches. Raises the typed errors the wire carries as statuses."""
        state = self.state
        if op == Op.SERVER_REGISTER:
            reg = Registration.from_json(obj)
            state.register(reg)
            conn.beats[reg.server_id] = self.clock()
            return Registered(reg.server_id, state.lease_seconds,
                              state.signing_keys()).to_json(), {}
        if op == Op.SERVER_HEARTBEAT:
            beat = Heartbeat.from_json(obj)
            now = self.clock()
            # revocations since the last beat this connection saw, with a lease of margin
            # (a beat lost, another manager's revocation committed a little late)
            since = conn.beats.get(beat.server_id, now - state.lease_seconds)
            since -= state.lease_seconds
            registered = state.heartbeat(beat)
            conn.beats[beat.server_id] = now
            revoked = state.revoked_for(beat.server_id, since) if registered else []
            return HeartbeatAnswer(registered, state.lease_seconds, state.signing_keys(),
                                   revoked).to_json(), {}
        if op == Op.SERVER_LEAVE:
            server_id = server_id_of(obj)
            moved = state.leave(server_id)
            conn.beats.pop(server_id, None)
            return {"moved": len(moved)}, {}
        if op == Op.GRANT_REQUEST:
            request = QuotaRequest.from_json(obj)
            tenant = self._tenant(principal, obj)
            try:
                grant = state.admit(tenant, request)
            except QuotaRefused as e:
                self.metrics.refused(request.quota)
                return GrantAnswer(False, reason=str(e), left=e.left).to_json(), {}
            return self.answer(grant).to_json(), {grant.grant_id: placement_of(grant)}
        if op == Op.GRANT_RENEW:
            grant_id = grant_id_of(obj)
            try:
                grant = state.renew(self._tenant(principal, obj), grant_id)
            except QuotaRefused as e:
                return GrantAnswer(False, reason=str(e), left=e.left).to_json(), {}
            return self.answer(grant).to_json(), {grant.grant_id: placement_of(grant)}
        if op == Op.GRANT_RELEASE:
            state.release(self._tenant(principal, obj), grant_id_of(obj))
            return {}, {}
        if op == Op.GRANT_REVOKE:
            gone = state.revoke(grant_id_of(obj))
            return {"revoked": gone is not None}, {}
        if op == Op.GRANT_LIST:
            if obj.get("all") and principal.allows("admin", None):
                grants = state.list_grants(None)
            else:
                grants = state.list_grants(self._tenant(principal, obj))
            return {"grants": [g.to_json() for g in grants]}, {}
        if op == Op.WATCH:
            return {}, self._watch(principal, obj)
        if op == Op.FABRIC_STATUS:
            admin = principal.allows("admin", None)
            status = state.status(None if admin else principal.tenant)
            status["manager"] = state.manager_id
            if not admin:  # its own grants only; the pool's totals are for everyone
                status["tenant"] = principal.tenant
            return status, {}
        raise InvalidRequest(f"op {op} is not a manager op")

    def _tenant(self, principal: Principal, obj: dict[str, Any]) -> str:
        """The principal's tenant; an admin (a control plane) may act for another."""
        tenant = obj.get("tenant")
        if tenant is None or tenant == principal.tenant:
            return principal.tenant
        if not isinstance(tenant, str) or not tenant or len(tenant) > 128:
            raise InvalidRequest("tenant must be a string of 1-128 characters")
        if not principal.allows("admin", None):
            raise Forbidden("acting for another tenant needs the admin scope")
        return tenant

    def _watch(self, principal: Principal, obj: dict[str, Any]) -> dict[str, str]:
        ids = obj.get("grant_ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or len(
                ids) > MAX_WATCHED:
            raise InvalidRequest(f"grant_ids must be a list of at most {MAX_WATCHED} ids")
        admin = principal.allows("admin", None)
        out: dict[str, str] = {}
        for gid in ids:
            grant = self.state.get_grant(gid)
            # another tenant's grant is as unknown as a missing one
            if grant is None or (grant.tenant != principal.tenant and not admin):
                raise KeyNotFound("grant not found")
            out[gid] = placement_of(grant)
        return out

    def answer(self, grant: Grant) -> GrantAnswer:
        """The grant with a fresh token signed by this manager."""
        claims = GrantClaims(
            grant_id=grant.grant_id, tenant=grant.tenant, expires_at=grant.expires_at,
            issued_at=self.clock(), priority=grant.priority,
            servers={gs.server_id: {cls: (r.get("ops", 0.0), r.get("bytes", 0.0))
                                    for cls, r in gs.rates.items()}
                     for gs in grant.servers})
        token = sign_grant(self.signing_key, claims)
        return GrantAnswer(True, grant=grant, token=token, renew_after=grant.ttl / 2)

    # -- events ------------------------------------------------------------------------

    def _on_event(self, event: dict[str, Any]) -> None:
        """From the state's listener thread (or the thread that committed)."""
        loop = self._loop
        if loop is None or self.stopping:
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody to tell
            loop.call_soon_threadsafe(self._event, event)

    def _event(self, event: dict[str, Any]) -> None:
        if self.stopping:
            return
        kind = event.get("event")
        gid = event.get("grant_id")
        if kind == "moved" and isinstance(gid, str) and gid in self.watchers:
            self._refresh([gid])
        elif kind == "revoked" and isinstance(gid, str):
            for conn in self.watchers.pop(gid, set()):
                conn.watching.pop(gid, None)
                conn.push({"event": "revoked", "grant_id": gid})
        elif kind == "resync" and self.watchers:
            # notifications may have been lost while the listener reconnected
            self._refresh(list(self.watchers))

    def _refresh(self, grant_ids: list[str]) -> None:
        fut = self.submit(self._moved_answers, grant_ids)
        fut.add_done_callback(self._moved_done)

    def _moved_answers(self, grant_ids: list[str]) -> list[tuple[str, GrantAnswer | None]]:
        now = self.clock()
        out: list[tuple[str, GrantAnswer | None]] = []
        for gid in grant_ids:
            grant = self.state.get_grant(gid)
            out.append((gid, self.answer(grant) if grant is not None
                        and grant.expires_at > now else None))
        return out

    def _moved_done(self, fut: asyncio.Future[list[tuple[str, GrantAnswer | None]]]
                    ) -> None:
        if fut.cancelled():
            return
        if fut.exception() is not None:
            log.warning("grant moved, but reading it failed: %s", fut.exception())
            return
        for gid, answer in fut.result():
            if answer is None or answer.grant is None:
                continue  # gone: the client learns at its next renewal
            placement = placement_of(answer.grant)
            body = {"event": "moved", "grant": answer.to_json()}
            for conn in list(self.watchers.get(gid, ())):
                if conn.watching.get(gid) != placement:
                    conn.watching[gid] = placement
                    conn.push(body)

    def watch(self, conn: ManagerConnection, grants: dict[str, str]) -> None:
        for gid, placement in grants.items():
            if gid not in conn.watching and len(conn.watching) >= MAX_WATCHED:
                continue
            conn.watching[gid] = placement
            self.watchers.setdefault(gid, set()).add(conn)

    def unwatch(self, conn: ManagerConnection, grant_id: str | None = None) -> None:
        ids = list(conn.watching) if grant_id is None else [grant_id]
        for gid in ids:
            conn.watching.pop(gid, None)
            conns = self.watchers.get(gid)
            if conns is not None:
                conns.discard(conn)
                if not conns:
                    del self.watchers[gid]


class ManagerConnection(asyncio.Protocol):
    """One client, server or operator connected to the manager."""

    def __init__(self, service: ManagerService) -> None:
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
            "version": C.VERSION, "server": svc.state.manager_id, "role": "manager",
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
        fut = svc.submit(svc.execute, f.op, principal, obj, self)
        fut.add_done_callback(lambda done: self._done(f, op_name, done))

    def _done(self, f: C.Frame, op_name: str,
              fut: asyncio.Future[tuple[dict[str, Any], dict[str, str]]]) -> None:
        self.inflight -= 1
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


__all__ = ["SCOPE", "DatabaseUnavailable", "ManagerConnection", "ManagerService",
           "placement_of", "unavailable"]
