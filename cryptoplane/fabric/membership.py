"""A crypto server's membership of a manager's pool: register, heartbeat, leave.

At start the server registers its address and capacity (``selfbench``) and learns the
manager's public keys (which sign the grants its clients will present) and its lease.
Every third of the lease it sends a heartbeat with the load it served under grants
since the last one, per class and per tenant (``GrantTable.load``, ``tenant_load``),
and the requests it holds; the answer may name grants to stop honouring (``revoked``),
new manager keys, or say the lease had lapsed (``registered: false``: the server
registers again at once).

A manager that does not answer stops nothing: the server keeps serving, and keeps
checking grants with the keys it has, and keeps trying (every second at first, then
less often, at most every third of a lease), logging once per change of state, not once
per try. On shutdown the server leaves (best effort, bounded) before it drains, so the
manager moves its grants at once instead of when the lease lapses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl as ssl_module
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from ..exceptions import CryptoplaneError
from .capability import GrantRefused
from .codec import Op
from .grants import GrantTable
from .manager.client import ManagerClient
from .manager.protocol import Heartbeat, HeartbeatAnswer, Rates, Registered, Registration

log = logging.getLogger("cryptoplane.fabric")

RETRY_FIRST: Final = 1.0  # seconds before the first retry of an unanswered manager
RETRY_MAX: Final = 10.0
CALL_TIMEOUT: Final = 5.0
LEAVE_TIMEOUT: Final = 2.0
DEFAULT_LEASE: Final = 15.0  # until the manager says


class Membership:
    """See the module docstring. ``inflight``: how many requests the server holds now
    (for heartbeats)."""

    def __init__(self, urls: str | Sequence[str], *, server_id: str, address: str,
                 capacity: Rates, grants: GrantTable, token: str | None = None,
                 ssl: ssl_module.SSLContext | None = None,
                 inflight: Callable[[], int] = lambda: 0,
                 call_timeout: float = CALL_TIMEOUT) -> None:
        self.urls = urls
        self.server_id = server_id
        self.address = address
        self.capacity = capacity
        self.grants = grants
        self.token = token
        self.ssl = ssl
        self.inflight = inflight
        self.call_timeout = call_timeout
        self.registered = False
        self.reachable: bool | None = None  # None: not tried yet
        self.lease_seconds = DEFAULT_LEASE
        self.last_ok: float | None = None  # monotonic time of the last answer
        self.registrations = 0
        self.heartbeats = 0
        self._client: ManagerClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._left = False

    # -- lifetime --------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (in the background when no manager answers yet) and begin: register,
        then heartbeat."""
        self._client = await ManagerClient.connect(
            self.urls, token=self.token, ssl=self.ssl, timeout=self.call_timeout,
            name=f"cryptoplane-server {self.server_id}", keep_trying=True)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def leave(self, timeout: float = LEAVE_TIMEOUT) -> None:
        """Stop heartbeats and tell the manager this server leaves (best effort, at most
        ``timeout`` seconds); then close the connection. Safe to call twice."""
        if self._left:
            return
        self._left = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        client = self._client
        if client is None:
            return
        if self.registered:
            try:
                await client.call(Op.SERVER_LEAVE, {"server_id": self.server_id},
                                  timeout=timeout)
                log.info("left the manager's pool")
            except (CryptoplaneError, OSError, TimeoutError) as e:
                log.warning("could not tell the manager this server leaves (%s); its "
                            "lease will lapse", e)
            self.registered = False
        with contextlib.suppress(Exception):
            await client.close()

    def lease_age(self) -> float | None:
        """Seconds since the manager last answered (None: never)."""
        return None if self.last_ok is None else time.monotonic() - self.last_ok

    def status(self) -> dict[str, Any]:
        return {"registered": self.registered, "reachable": bool(self.reachable),
                "lease_seconds": self.lease_seconds, "lease_age": self.lease_age(),
                "manager_keys": self.grants.key_ids, "grants": len(self.grants)}

    # -- the loop --------------------------------------------------------------------

    async def _run(self) -> None:
        retry = RETRY_FIRST
        while True:
            try:
                if not self.registered:
                    await self._register()
                else:
                    await self._heartbeat()
            except asyncio.CancelledError:
                raise
            except (CryptoplaneError, OSError, TimeoutError) as e:
                self._reached(False, e)
                await asyncio.sleep(min(retry, self.lease_seconds / 3))
                retry = min(retry * 2, RETRY_MAX)
                continue
            retry = RETRY_FIRST
            if self.registered:  # a lapsed lease registers again at once
                await asyncio.sleep(self.lease_seconds / 3)

    async def _register(self) -> None:
        assert self._client is not None
        registration = Registration(self.server_id, self.address, self.capacity)
        answer = Registered.from_json(await self._client.call(
            Op.SERVER_REGISTER, registration.to_json(), timeout=self.call_timeout))
        self._keys(answer.manager_keys)
        self.lease_seconds = answer.lease_seconds or DEFAULT_LEASE
        self.registered = True
        self.registrations += 1
        self._reached(True)
        log.info("registered with the manager as %s at %s (lease %g s, %d manager keys)",
                 self.server_id, self.address, self.lease_seconds, len(self.grants.key_ids))

    async def _heartbeat(self) -> None:
        assert self._client is not None
        beat = Heartbeat(self.server_id, self.grants.load(), max(0, self.inflight()),
                         tenants=self.grants.tenant_load())
        answer = HeartbeatAnswer.from_json(await self._client.call(
            Op.SERVER_HEARTBEAT, beat.to_json(), timeout=self.call_timeout))
        self.heartbeats += 1
        self._reached(True)
        self._keys(answer.manager_keys)
        if answer.lease_seconds:
            self.lease_seconds = answer.lease_seconds
        if answer.revoked:
            n = self.grants.revoke(answer.revoked)
            log.info("the manager revoked %d grants (%d held here)", len(answer.revoked), n)
        if not answer.registered:
            log.warning("the manager had let this server's lease lapse; registering again")
            self.registered = False

    def _keys(self, keys: dict[str, str]) -> None:
        if not keys:
            return
        try:
            self.grants.update_keys(keys)
        except GrantRefused as e:
            log.error("manager keys not taken: %s", e)

    def _reached(self, ok: bool, error: BaseException | None = None) -> None:
        if ok:
            self.last_ok = time.monotonic()
        if ok == self.reachable:
            return
        self.reachable = ok
        if ok:
            log.info("the manager answers")
        else:
            log.warning("the manager does not answer (%s); serving on with the keys "
                        "held, retrying", error)


__all__ = ["Membership"]
