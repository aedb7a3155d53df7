"""The manager's ops: what each answers, the grants it signs, and the EVENT pushes
about grants that moved or were revoked, over one ``FabricState``.

Control traffic, not the hot path: clarity comes before speed. Every database call and
every signature runs on a small thread pool (the state is a database away, and an
event loop that waits on it would stop answering everyone), never on the loop.

Connections (``connection.py``) authenticate in HELLO and each op needs a scope; an
admin may pass a "tenant" field to GRANT_REQUEST/RENEW/RELEASE/LIST, acting for that
tenant (a control plane).

A connection that requested, renewed or watched a grant is told when it moves (a server
left: a fresh token naming the new servers) or is revoked. Changes arrive from the
state's subscription, from any manager sharing the database, on a listener thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ...exceptions import InvalidRequest
from ..auth import Authenticator, Principal
from ..capability import GrantClaims, key_id, public_key_b64, sign_grant
from ..codec import Op
from ..errors import (
    Forbidden,
    KeyNotFound,
    QuotaRefused,
)
from .connection import MAX_WATCHED, ManagerConnection
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

KEYS_TTL: Final = 2.0  # seconds the pool's public keys are cached


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
        self._keys: tuple[float, dict[str, str] | None] = (0.0, None)

    # -- life --------------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the manager service is not started")
        return self._loop

    @property
    def manager_id(self) -> str:
        return self.state.manager_id

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
                              self.manager_keys()).to_json(), {}
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
            return HeartbeatAnswer(registered, state.lease_seconds, self.manager_keys(),
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

    def manager_keys(self) -> dict[str, str]:
        """The pool's public keys, read at most every ``KEYS_TTL`` seconds: they change
        when a manager with a new key starts, and every heartbeat carries them."""
        at, keys = self._keys
        now = time.monotonic()
        if keys is None or now - at > KEYS_TTL:
            keys = self.state.signing_keys()
            self._keys = (now, keys)
        return keys

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
                # ended (released, expired, revoked elsewhere): nothing more to tell;
                # a client still renewing it learns at its next renewal
                for conn in list(self.watchers.get(gid, ())):
                    self.unwatch(conn, gid)
                continue
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


__all__ = ["ManagerService", "placement_of"]
