"""Talking to the manager: what a server (register, heartbeat, leave), a client (request,
renew, release grants) and an operator (list, revoke, status) send it.

One ``ManagerClient`` keeps a connection to each manager URL given and sends each call to
a live one, so a dead manager costs nothing while another lives (the managers share
their state through the database; any one answers for all). Pushes (EVENT frames: a
grant moved or was revoked) go to ``on_event``. Safe calls (all but GRANT_REQUEST) are
repeated on another manager when a connection dies.
"""

from __future__ import annotations

import json
import ssl as ssl_module
from collections.abc import Callable, Sequence
from typing import Any, Final

from ..client import AsyncClient
from ..codec import Field, Op, get_json
from ..errors import QuotaRefused
from ..pool import Pool
from .protocol import (
    GrantAnswer,
    Heartbeat,
    HeartbeatAnswer,
    QuotaRequest,
    Registered,
    Registration,
)

# repeating these cannot change their outcome: elsewhere after a lost connection
SAFE: Final = frozenset({Op.SERVER_REGISTER, Op.SERVER_HEARTBEAT, Op.SERVER_LEAVE,
                         Op.GRANT_RENEW, Op.GRANT_RELEASE, Op.GRANT_LIST, Op.GRANT_REVOKE,
                         Op.FABRIC_STATUS, Op.WATCH})
EventCallback = Callable[[dict[str, Any]], None]


def manager_urls(url: str | Sequence[str]) -> list[str]:
    """``manager://host:port[,host:port...]`` (or tcp://, unix://, a list of them) as the
    fabric URLs to dial."""
    urls = [url] if isinstance(url, str) else list(url)
    out: list[str] = []
    for u in urls:
        if u.startswith("manager://"):
            out.extend(f"tcp://{hp}" for hp in u[len("manager://"):].split(",") if hp)
        else:
            out.append(u)
    if not out:
        raise ValueError("no manager address given")
    return out


class ManagerClient:
    """See the module docstring. ``await ManagerClient.connect(urls, token=...)``."""

    def __init__(self, client: AsyncClient, pool: Pool) -> None:
        self._client = client
        self._pool = pool

    @classmethod
    async def connect(cls, url: str | Sequence[str], *, token: str | None = None,
                      ssl: ssl_module.SSLContext | None = None, timeout: float = 10.0,
                      name: str = "", on_event: EventCallback | None = None,
                      keep_trying: bool = False) -> ManagerClient:
        """Connect to the managers (one connection each); ``keep_trying``: return even
        if none answers yet, reconnecting in the background."""
        pool = Pool(manager_urls(url), token=token, ssl=ssl, connections=1,
                    timeout=timeout, name=name or "cryptoplane-manager-client",
                    on_event=on_event)
        await pool.start(wait=not keep_trying, keep_trying=keep_trying)
        return cls(AsyncClient(pool), pool)

    @property
    def on_event(self) -> EventCallback | None:
        return self._pool.on_event

    @on_event.setter
    def on_event(self, callback: EventCallback | None) -> None:
        self._pool.on_event = callback

    @property
    def live(self) -> bool:
        return self._pool.live

    async def close(self) -> None:
        await self._client.close()

    async def call(self, op: Op, obj: dict[str, Any] | None = None, *,
                   timeout: float | None = None) -> dict[str, Any]:
        """One manager operation: JSON in, JSON out; error statuses raise."""
        raw = json.dumps(obj or {}, separators=(",", ":")).encode()
        fields = await self._client.request(op, fields={Field.JSON: raw}, timeout=timeout,
                                            safe=op in SAFE)
        return get_json(fields)

    # -- servers ---------------------------------------------------------------------

    async def register(self, registration: Registration) -> Registered:
        return Registered.from_json(await self.call(Op.SERVER_REGISTER,
                                                    registration.to_json()))

    async def heartbeat(self, beat: Heartbeat) -> HeartbeatAnswer:
        return HeartbeatAnswer.from_json(await self.call(Op.SERVER_HEARTBEAT,
                                                         beat.to_json()))

    async def leave(self, server_id: str) -> None:
        await self.call(Op.SERVER_LEAVE, {"server_id": server_id})

    # -- grants ----------------------------------------------------------------------

    async def request_grant(self, request: QuotaRequest) -> GrantAnswer:
        """The grant, or ``QuotaRefused`` (its ``left``: what the pool could still
        give)."""
        return _granted(await self.call(Op.GRANT_REQUEST, request.to_json()))

    async def renew(self, grant_id: str) -> GrantAnswer:
        """The grant renewed (its servers may have changed), or ``QuotaRefused`` when
        the pool cannot carry it any more (servers left)."""
        return _granted(await self.call(Op.GRANT_RENEW, {"grant_id": grant_id}))

    async def release(self, grant_id: str) -> None:
        await self.call(Op.GRANT_RELEASE, {"grant_id": grant_id})

    async def revoke(self, grant_id: str) -> None:
        await self.call(Op.GRANT_REVOKE, {"grant_id": grant_id})

    async def watch(self, grant_ids: Sequence[str]) -> None:
        """Ask for EVENT pushes about these grants on this client's connections."""
        await self.call(Op.WATCH, {"grant_ids": list(grant_ids)})

    async def list_grants(self) -> list[dict[str, Any]]:
        grants = (await self.call(Op.GRANT_LIST)).get("grants", [])
        return list(grants) if isinstance(grants, list) else []

    async def status(self) -> dict[str, Any]:
        return await self.call(Op.FABRIC_STATUS)


def _granted(obj: dict[str, Any]) -> GrantAnswer:
    answer = GrantAnswer.from_json(obj)
    if not answer.granted:
        raise QuotaRefused(answer.reason or "the pool cannot carry this quota",
                           left=answer.left)
    return answer


__all__ = ["SAFE", "EventCallback", "ManagerClient", "manager_urls"]
