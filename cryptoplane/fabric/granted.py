"""A client that holds a manager's grant: ``ManagedPool``, a ``Pool`` whose servers are
those of its grant.

    client = await connect_managed("manager://10.0.0.2:7400", token=token,
                                   quota={"rsa2048": {"ops": 500}})
    client.grant          # servers, rates, expiry
    await client.close()  # the grant is released

What it does for the grant's life:
- ``start``: asks a manager for the quota (``QuotaRefused``, with what is left, when the
  pool cannot carry it); connects to the grant's servers, presenting the grant's token
  in HELLO (``hello_extra["grant"]``). Placement ``fail-over`` asks for a fail-over
  grant (every server enforces the whole rate; one is used at a time); any other mode
  a spread grant.
- pacing (``Pacer``): a call of a granted class waits, in order, for a free slot of
  the grant's rate before its first send, so what the client sends over all its
  servers together stays at the grant instead of being sent and THROTTLED. A spread
  grant's calls are pinned to the live server whose own share is free soonest. A
  THROTTLED answer is still sent again after its RETRY_AFTER.
- renewal at ``renew_after``: the new token is presented on every live connection
  (GRANT_PRESENT) and to new ones; a changed server list is applied (``set_servers``:
  new servers connected, removed ones retired, their calls finishing or moving).
- pushes from the manager (EVENT): ``moved`` applies the grant sent with it at once;
  ``revoked`` asks for a new grant.
- ``close``: releases the grant, then closes.

A call's class: ``Call.cls`` when its sender knows it (the remote engine: from its
session's algorithm, ``capacity.class_of_session``); else, for a keyed data op, the
class of its key as given in ``key_classes`` (key name -> class); else, when the grant
names one class only, that one. Anything else (key management, digests, random) is not
charged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl as ssl_module
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Final

from ..exceptions import Timeout
from . import capacity
from .client import AsyncClient
from .connection_client import Call
from .errors import ConnectionLost, QuotaRefused
from .manager.client import ManagerClient, manager_urls
from .manager.protocol import (
    DEFAULT_TTL,
    Grant,
    GrantAnswer,
    QuotaRequest,
    Rates,
    parse_rates,
)
from .placement import DEFAULT_THRESHOLD, Placement
from .pool import Pool
from .qos import BURST_SECONDS

log = logging.getLogger("cryptoplane.fabric")

BURST: Final = 0.05  # seconds of the whole granted rate that may go at once
# a share is paced a little under what its server allows: lateness on the way (the
# loop busy, the network) then seldom arrives as more than the server's burst
MARGIN: Final = 0.98
RETRY: Final = 1.0  # seconds between tries to renew or re-request after a failure
_CHARGED: Final = capacity.KEYED_DATA_OPS | capacity.RAW_OPS


class _Gcra:
    """One rate as a virtual schedule: each unit is given the next free slot, at most
    ``tolerance`` seconds ahead of its spacing (the generic cell rate algorithm,
    reserving: a call that must wait is given its turn, not refused)."""

    __slots__ = ("interval", "tat", "tolerance")

    def __init__(self, rate: float, burst: float) -> None:
        self.interval = 1.0 / rate
        self.tolerance = max(0.0, burst - 1.0) * self.interval
        self.tat = 0.0

    def next_slot(self, now: float) -> float:
        return max(now, self.tat - self.tolerance)

    def reserve(self, now: float, cost: float) -> float:
        start = self.next_slot(now)
        self.tat = max(self.tat, start) + cost * self.interval
        return start - now


class Pacer:
    """Holds calls back to a grant's rates: each class's calls wait in order, and each
    goes when its rate has a free slot (a timer at the next one), not before.

    A spread grant's servers each enforce their own share, with a burst of
    ``qos.BURST_SECONDS`` of it (one op at low rates): a call goes when some live
    server's share has a free slot, pinned to that server (``Call.pin``), each share
    paced at ``MARGIN`` of it. A THROTTLED answer (lateness on the way bunched two
    calls) moves that server's schedule past the retry the server asked for, so the
    calls after it keep their spacing. Otherwise (a fail-over grant: each server
    enforces the whole rate) the whole rate is paced and placement picks the server.
    Bytes/s are paced on the whole rate either way. Runs on the pool's loop."""

    def __init__(self, pool: Pool, rates: Rates, *,
                 key_classes: Mapping[str, str] | None = None) -> None:
        self.pool = pool
        self.key_classes = {k.encode(): capacity.check_class(v)
                            for k, v in (key_classes or {}).items()}
        self.rates: Rates = {}
        self._ops: dict[str, _Gcra] = {}
        self._bytes: dict[str, _Gcra] = {}
        self._shares: dict[str, dict[str, _Gcra]] = {}  # class -> server URL -> share
        self._queues: dict[str, deque[Call]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._only = ""
        self.set_rates(rates)

    def set_rates(self, rates: Rates, shares: Mapping[str, Rates] | None = None) -> None:
        """The grant's rates, and for a spread grant each server's share (URL ->
        rates). Schedules of unchanged rates are kept (a renewal does not reset them)."""
        old_ops, old_bytes, old_shares = self._ops, self._bytes, self._shares
        self.rates = {c: dict(r) for c, r in rates.items()}
        self._ops = {c: _keep(old_ops.get(c), r.get("ops", 0.0), BURST)
                     for c, r in self.rates.items() if r.get("ops", 0.0) > 0}
        self._bytes = {c: _keep(old_bytes.get(c), r.get("bytes", 0.0), BURST)
                       for c, r in self.rates.items() if r.get("bytes", 0.0) > 0}
        self._shares = {}
        for url, srates in (shares or {}).items():
            for cls, r in srates.items():
                ops = r.get("ops", 0.0) * MARGIN
                if ops > 0:
                    self._shares.setdefault(cls, {})[url] = _keep(
                        old_shares.get(cls, {}).get(url), ops, BURST_SECONDS)
        asked = [c for c, r in self.rates.items() if r.get("ops") or r.get("bytes")]
        self._only = asked[0] if len(asked) == 1 else ""
        for cls in list(self._queues):
            self._pump(cls)

    def class_of(self, call: Call) -> str:
        if call.cls:
            return call.cls
        if call.op not in _CHARGED:
            return capacity.FREE
        cls = self.key_classes.get(call.key) if call.key else None
        return cls or self._only or capacity.FREE

    def admit(self, call: Call) -> bool:
        cls = self.class_of(call)
        if cls == capacity.FREE or (cls not in self._ops and cls not in self._bytes
                                    and cls not in self._shares):
            return True  # not charged, or not in the grant (the server decides)
        queue = self._queues.get(cls)
        if queue is None:
            queue = self._queues[cls] = deque()
        queue.append(call)
        if cls not in self._timers:
            self._pump(cls)
        return False

    def _live(self, url: str) -> bool:
        return any(s.url == url and s.live for s in self.pool.servers)

    def _pump(self, cls: str) -> None:
        """Send what may go now; a timer for the next slot."""
        self._timers.pop(cls, None)
        queue = self._queues.get(cls)
        loop = self.pool.loop
        if not queue or loop is None:
            return
        now = loop.time()
        table = self._shares.get(cls)
        whole = None if table else self._ops.get(cls)
        nbytes = self._bytes.get(cls)
        while queue:
            call = queue[0]
            if call.finished:  # its deadline passed while it waited
                queue.popleft()
                continue
            share: tuple[str, _Gcra] | None = None
            when = now
            if table:
                # the live server whose share is free soonest (any, while none is live)
                share = min(table.items(), key=lambda kv: (not self._live(kv[0]),
                                                           kv[1].next_slot(now)))
                when = share[1].next_slot(now)
            elif whole is not None:
                when = whole.next_slot(now)
            if nbytes is not None:
                when = max(when, nbytes.next_slot(now))
            if when > now:
                self._timers[cls] = loop.call_at(when, self._pump, cls)
                return
            queue.popleft()
            if share is not None:
                call.pin = share[0]
                share[1].reserve(now, 1.0)
            elif whole is not None:
                whole.reserve(now, 1.0)
            if nbytes is not None:
                nbytes.reserve(now, float(call.nbytes))
            self.pool.dispatch(call)

    def throttled(self, call: Call, delay: float, now: float) -> None:
        if not call.pin:
            return
        g = self._shares.get(self.class_of(call), {}).get(call.pin)
        if g is not None:  # the retry goes at now + delay: the next one after it
            g.tat = max(g.tat, now + delay + g.interval)

    def close(self) -> None:
        for t in self._timers.values():
            t.cancel()
        self._timers.clear()
        self._queues.clear()


def _keep(old: _Gcra | None, rate: float, burst_seconds: float) -> _Gcra:
    """``old`` if it paces ``rate`` already, else a new schedule."""
    if old is not None and abs(old.interval * rate - 1.0) < 1e-9:
        return old
    return _Gcra(rate, max(1.0, rate * burst_seconds))


class ManagedPool(Pool):
    """See the module docstring. ``manager``: ``manager://host:port[,host:port]`` or
    URLs; ``token``: the tenant's token, shown to the grant's servers and, unless
    ``manager_token`` is given, to the managers (it needs the ``quota`` scope there);
    ``quota``: ``{"rsa2048": {"ops": 500}}`` or a ``QuotaRequest``; ``priority``,
    ``ttl``, ``label``, ``spread`` go into the request. The rest as ``Pool``."""

    needs_urls = False

    def __init__(self, manager: str | Sequence[str], *, token: str | None = None,
                 quota: Mapping[str, Mapping[str, float]] | QuotaRequest,
                 placement: str | Placement = "least-loaded",
                 threshold: int = DEFAULT_THRESHOLD, big: Sequence[str] | None = None,
                 priority: int = 0, ttl: float = DEFAULT_TTL, label: str = "",
                 spread: int = 2, key_classes: Mapping[str, str] | None = None,
                 manager_token: str | None = None,
                 manager_ssl: ssl_module.SSLContext | None = None,
                 **pool_kw: Any) -> None:
        super().__init__([], token=token, placement=placement, threshold=threshold,
                         big=big, **pool_kw)
        self.manager_urls = manager_urls(manager)
        if isinstance(quota, QuotaRequest):
            self.quota_request = quota
        else:
            mode = "fail-over" if self.placement.name == "fail-over" else "spread"
            self.quota_request = QuotaRequest(
                quota=parse_rates(dict(quota), "quota", need_one=True), priority=priority,
                ttl=ttl, label=label, spread=spread, mode=mode)
        self.manager_token = manager_token if manager_token is not None else token
        self.manager_ssl = manager_ssl
        self.pacer = self._pace = Pacer(self, self.quota_request.quota,
                                        key_classes=key_classes)
        self.grant: Grant | None = None
        self.renew_after = 0.0
        self.grant_counters = dict.fromkeys(("requested", "renewed", "moved", "revoked",
                                             "released", "failures"), 0)
        self._manager: ManagerClient | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._started = False

    # -- lifetime --------------------------------------------------------------------

    async def start(self, wait: bool = True, keep_trying: bool = False) -> None:
        """Get the grant (``QuotaRefused`` when the pool cannot carry it), then connect
        to its servers as ``Pool.start`` does. With ``keep_trying`` (the remote engine)
        an unreachable manager is not the end: the grant is asked for every ``RETRY``
        seconds in the background, and the servers connected once it comes."""
        try:
            try:
                self._manager = await self._connect_manager(False)
                self._apply(await self._manager.request_grant(self.quota_request))
                self.grant_counters["requested"] += 1
            except (ConnectionLost, TimeoutError, Timeout):
                if not keep_trying:
                    raise
                self.grant_counters["failures"] += 1
                if self._manager is None:
                    self._manager = await self._connect_manager(True)
            self._wake = asyncio.Event()
            self._renewer = asyncio.get_running_loop().create_task(self._keep_grant())
            self._started = True
        except BaseException:
            await self.close()
            raise
        if not self.servers:  # no grant yet (keep_trying): its servers come with it
            await super().start(wait=False)
            raise ConnectionLost("no grant yet: no manager answered; asking again "
                                 "in the background")
        # as Pool.start: with keep_trying, only a refused token closes it
        await super().start(wait=wait, keep_trying=keep_trying)

    async def _connect_manager(self, keep_trying: bool) -> ManagerClient:
        return await ManagerClient.connect(
            self.manager_urls, token=self.manager_token, ssl=self.manager_ssl,
            timeout=min(self.timeout, 10.0), name=self.name or "cryptoplane-granted",
            on_event=self._on_event, keep_trying=keep_trying)

    async def close(self) -> None:
        """Release the grant (the manager frees its rate at once), then close."""
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            renewer.cancel()
            with contextlib.suppress(BaseException):
                await renewer
        manager, self._manager = self._manager, None
        if manager is not None:
            if self.grant is not None:
                try:
                    await asyncio.wait_for(manager.release(self.grant.grant_id), 5.0)
                    self.grant_counters["released"] += 1
                except Exception as e:  # the grant lapses at its expiry anyway
                    log.warning("releasing grant %s failed: %s", self.grant.grant_id, e)
            with contextlib.suppress(Exception):
                await manager.close()
        # what the pacer still holds ends as what waits does: ConnectionLost
        for queue in self._pace._queues.values():
            self.waiting.extend(c for c in queue if not c.finished)
        self._pace.close()
        await super().close()

    # -- the grant -------------------------------------------------------------------

    def _apply(self, answer: GrantAnswer) -> None:
        """A grant (new, renewed, moved): its token, servers and rates in force."""
        grant = answer.grant
        if grant is None:
            return
        self.grant = grant
        self.renew_after = answer.renew_after or grant.ttl / 2
        if answer.token != self.hello_extra.get("grant"):
            if self._started:
                self.present_grant(answer.token)  # and hello_extra, for new connections
            else:
                self.hello_extra["grant"] = answer.token
        urls = [s.address for s in grant.servers]
        if urls and urls != [s.url for s in self.servers]:
            self.set_servers(urls)
        self._pace.set_rates(grant.quota, None if grant.mode == "fail-over" else {
            s.address: s.rates for s in grant.servers})

    async def _keep_grant(self) -> None:
        """Renew at ``renew_after``; after a failure, again every ``RETRY`` seconds
        (the grant holds until its expiry); a grant the manager no longer knows (revoked,
        expired) is asked for anew."""
        assert self._wake is not None and self._manager is not None
        delay = self.renew_after if self.grant is not None else RETRY
        while not self._closing:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.05, delay))
            grant, manager = self.grant, self._manager
            if manager is None:
                return
            try:
                if grant is None:
                    self._apply(await manager.request_grant(self.quota_request))
                    self.grant_counters["requested"] += 1
                else:
                    self._apply(await manager.renew(grant.grant_id))
                    self.grant_counters["renewed"] += 1
                delay = self.renew_after
            except asyncio.CancelledError:
                raise
            except (ConnectionLost, TimeoutError, Timeout, QuotaRefused) as e:
                # a manager away, or the pool cannot carry it now: keep what we have
                self.grant_counters["failures"] += 1
                log.warning("grant renewal failed: %s", e)
                delay = RETRY
            except Exception as e:  # unknown to the manager now: ask afresh
                self.grant_counters["failures"] += 1
                log.warning("grant renewal refused (%s); requesting a new grant", e)
                self.grant = None
                delay = 0.0

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        grant = self.grant
        if kind == "moved" and isinstance(event.get("grant"), dict):
            try:
                answer = GrantAnswer.from_json(event["grant"])
            except Exception as e:  # a malformed push: the next renewal re-syncs
                log.warning("ignoring a malformed 'moved' event: %s", e)
                return
            if answer.grant is not None and grant is not None and (
                    answer.grant.grant_id == grant.grant_id):
                self.grant_counters["moved"] += 1
                self._apply(answer)
        elif kind == "revoked" and grant is not None and (
                event.get("grant_id") == grant.grant_id):
            self.grant_counters["revoked"] += 1
            self.grant = None
            if self._wake is not None:
                self._wake.set()  # ask for a new one now

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        g = self.grant
        info["grant"] = None if g is None else {
            "grant_id": g.grant_id, "mode": g.mode, "quota": g.quota,
            "servers": [s.address for s in g.servers], "expires_at": g.expires_at}
        info["grant_counters"] = dict(self.grant_counters)
        return info


async def connect_managed(manager: str | Sequence[str], *, token: str | None = None,
                          quota: Mapping[str, Mapping[str, float]] | QuotaRequest,
                          placement: str | Placement = "least-loaded",
                          **kw: Any) -> AsyncClient:
    """An ``AsyncClient`` on the servers a manager grants ``quota`` to: requests paced to
    the grant, the grant renewed, moved and, on ``close()``, released; its ``grant``
    shows it. ``kw`` as ``ManagedPool``'s."""
    pool = ManagedPool(manager, token=token, quota=quota, placement=placement, **kw)
    await pool.start()
    return AsyncClient(pool)


__all__ = ["ManagedPool", "Pacer", "connect_managed"]
