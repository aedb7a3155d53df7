"""A client that holds a manager's grant: ``ManagedPool``, a ``Pool`` whose servers are
those of its grant.

    client = await AsyncClient.connect_managed("manager://10.0.0.2:7400", token=token,
                                               quota={"rsa2048": {"ops": 500}})
    client.grant          # servers, rates, expiry
    await client.close()  # the grant is released

What it does for the grant's life:
- ``start``: asks a manager for the quota (``QuotaRefused``, with what is left, when the
  pool cannot carry it); connects to the grant's servers, presenting the grant's token
  in HELLO (``hello_extra["grant"]``). Placement ``fail-over`` asks for a fail-over
  grant (every server enforces the whole rate; one is used at a time); any other mode
  a spread grant.
- pacing: each call waits for its turn at the granted rate of its class (a GCRA per
  class, ops/s and, for AEAD and HMAC, bytes/s) before its first send, so what the
  client sends over all its servers together stays at the grant instead of being sent
  and THROTTLED. A THROTTLED answer is still sent again after its RETRY_AFTER.
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
from collections.abc import Mapping, Sequence
from typing import Any, Final

from . import capacity
from .connection_client import Call, ClientConnection
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
from .placement import DEFAULT_THRESHOLD, Placement, ServerState
from .pool import Pool

log = logging.getLogger("cryptoplane.fabric")

BURST: Final = 0.05  # seconds of the granted rate that may go at once
RETRY: Final = 1.0  # seconds between tries to renew or re-request after a failure
_CHARGED: Final = capacity.KEYED_DATA_OPS | capacity.RAW_OPS


class _Gcra:
    """One rate as a virtual schedule: each unit is given the next free slot, at most
    ``burst`` seconds' worth ahead of now (the generic cell rate algorithm, reserving:
    a call that must wait is given its turn, not refused)."""

    __slots__ = ("interval", "tat", "tolerance")

    def __init__(self, rate: float, burst: float) -> None:
        self.interval = 1.0 / rate
        self.tolerance = max(0.0, rate * burst - 1.0) * self.interval
        self.tat = 0.0

    def due(self, now: float) -> bool:
        return now >= self.tat - self.tolerance

    def reserve(self, now: float, cost: float) -> float:
        start = max(now, self.tat - self.tolerance)
        self.tat = max(self.tat, start) + cost * self.interval
        return start - now


class Pacer:
    """Seconds each call must wait to keep within ``rates`` (class -> ops, bytes)."""

    def __init__(self, rates: Rates, *, key_classes: Mapping[str, str] | None = None,
                 burst: float = BURST) -> None:
        self.burst = burst
        self.key_classes = {k.encode(): capacity.check_class(v)
                            for k, v in (key_classes or {}).items()}
        self.rates: Rates = {}
        self._ops: dict[str, _Gcra] = {}
        self._bytes: dict[str, _Gcra] = {}
        self._only = ""
        self.set_rates(rates)

    def set_rates(self, rates: Rates) -> None:
        """New rates (a renewal); a class whose rate is unchanged keeps its schedule."""
        old = self.rates
        self.rates = {c: dict(r) for c, r in rates.items()}
        for cls, r in self.rates.items():
            if old.get(cls, {}).get("ops") != r.get("ops"):
                self._set(self._ops, cls, r.get("ops", 0.0))
            if old.get(cls, {}).get("bytes") != r.get("bytes"):
                self._set(self._bytes, cls, r.get("bytes", 0.0))
        for gone in set(old) - set(self.rates):
            self._ops.pop(gone, None)
            self._bytes.pop(gone, None)
        asked = [c for c, r in self.rates.items() if r.get("ops") or r.get("bytes")]
        self._only = asked[0] if len(asked) == 1 else ""

    def _set(self, table: dict[str, _Gcra], cls: str, rate: float) -> None:
        if rate > 0:
            table[cls] = _Gcra(rate, self.burst)
        else:
            table.pop(cls, None)

    def class_of(self, call: Call) -> str:
        if call.cls:
            return call.cls
        if call.op not in _CHARGED:
            return capacity.FREE
        cls = self.key_classes.get(call.key) if call.key else None
        return cls or self._only or capacity.FREE

    def __call__(self, call: Call, now: float) -> float:
        cls = self.class_of(call)
        wait = 0.0
        g = self._ops.get(cls)
        if g is not None:
            wait = g.reserve(now, 1.0)
        g = self._bytes.get(cls)
        if g is not None:
            wait = max(wait, g.reserve(now, float(call.nbytes)))
        return wait


class GrantShares(Placement):
    """A spread grant's servers each enforce their own share of the rate: calls go,
    by the pool's placement mode, among the servers whose share has room now (a GCRA
    per server and class), so that no server is sent more than it was told to
    allow. With none due (the total pacer keeps this rare) every server is a choice."""

    def __init__(self, inner: Placement, pacer: Pacer) -> None:
        self.inner = inner
        self.name = inner.name
        self.pacer = pacer
        self.shares: dict[str, dict[str, _Gcra]] = {}  # class -> url -> its share

    def set_grant(self, grant: Grant) -> None:
        shares: dict[str, dict[str, _Gcra]] = {}
        if grant.mode != "fail-over":  # fail-over: each server allows the whole rate
            for server in grant.servers:
                for cls, r in server.rates.items():
                    if r.get("ops", 0.0) > 0:
                        old = self.shares.get(cls, {}).get(server.address)
                        keep = old is not None and abs(old.interval * r["ops"] - 1) < 1e-9
                        shares.setdefault(cls, {})[server.address] = (
                            old if keep and old is not None
                            else _Gcra(r["ops"], self.pacer.burst))
        self.shares = shares

    def choose(self, servers: Sequence[ServerState], call: Call | None,
               now: float) -> ClientConnection | None:
        table = self.shares.get(self.pacer.class_of(call)) if call is not None else None
        if not table:
            return self.inner.choose(servers, call, now)
        due = [s for s in servers if (g := table.get(s.url)) is None or g.due(now)]
        conn = self.inner.choose(due or servers, call, now)
        if conn is not None and conn.server is not None:
            g = table.get(conn.server.url)
            if g is not None:
                g.reserve(now, 1.0)
        return conn

    def describe(self) -> dict[str, object]:
        return {**self.inner.describe(), "shares": {
            cls: {u: round(1 / g.interval, 3) for u, g in t.items()}
            for cls, t in self.shares.items()}}


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
        self.pacer = self._pace = Pacer(self.quota_request.quota, key_classes=key_classes)
        self.placement = self._shares = GrantShares(self.placement, self._pace)
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
        to its servers as ``Pool.start`` does."""
        self._manager = await ManagerClient.connect(
            self.manager_urls, token=self.manager_token, ssl=self.manager_ssl,
            timeout=min(self.timeout, 10.0), name=self.name or "cryptoplane-granted",
            on_event=self._on_event)
        try:
            self._apply(await self._manager.request_grant(self.quota_request))
            self.grant_counters["requested"] += 1
            self._wake = asyncio.Event()
            self._renewer = asyncio.get_running_loop().create_task(self._keep_grant())
            self._started = True
            await super().start(wait=wait, keep_trying=keep_trying)
        except BaseException:
            await self.close()
            raise

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
        self._pace.set_rates(grant.quota)
        self._shares.set_grant(grant)

    async def _keep_grant(self) -> None:
        """Renew at ``renew_after``; after a failure, again every ``RETRY`` seconds
        (the grant holds until its expiry); a grant the manager no longer knows (revoked,
        expired) is asked for anew."""
        assert self._wake is not None and self._manager is not None
        delay = self.renew_after
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
            except (ConnectionLost, TimeoutError, QuotaRefused) as e:
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


__all__ = ["ManagedPool", "Pacer"]
