"""The manager's Prometheus metrics, all named ``cryptoplane_manager_*``.

Two kinds. Counters of what this process did (requests per op and status, refusals per
algorithm class, events pushed, failed handshakes). And the pool as the database holds
it (capacity, granted, used rate per server and per tenant, lease ages, grants): every
manager of a pool reports the same pool, from a snapshot of ``FabricState.status()``
that the manager refreshes on its reaper's beat (a scrape never waits on the database,
and never runs on a database that is down: the last snapshot stays, and ``/readyz``
says the database is gone). The used rate per tenant is what the servers' heartbeats
report, each its busiest tenants.

Labels are tenants, server ids, algorithm classes, measures (ops, bytes), op and status
names: never a token or a grant's token.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX: Final = "cryptoplane_manager_"
MEASURES: Final = ("ops", "bytes")
# seconds an op spends at the manager's threads: a cached heartbeat takes well under a
# millisecond, an admission over a busy PostgreSQL tens
BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                  2.5, 5.0)


class _PoolCollector(Collector):
    def __init__(self, owner: ManagerMetrics) -> None:
        self.owner = owner

    def collect(self) -> Iterator[Metric]:
        snap = self.owner.snapshot()
        capacity = GaugeMetricFamily(
            PREFIX + "capacity", "Pool capacity (live servers, before overcommit): ops/s "
            "or bytes/s per algorithm class", labels=["class", "measure"])
        left = GaugeMetricFamily(
            PREFIX + "left", "What the pool can still grant (capacity x overcommit - "
            "granted) per class", labels=["class", "measure"])
        for fam, key in ((capacity, "capacity"), (left, "left")):
            for cls, rate in sorted((snap.get(key) or {}).items()):
                for m in MEASURES:
                    fam.add_metric([cls, m], float(rate.get(m, 0.0)))
        granted = GaugeMetricFamily(
            PREFIX + "granted", "Rates granted by live grants, per tenant and class",
            labels=["tenant", "class", "measure"])
        per_tenant: dict[tuple[str, str, str], float] = {}
        grants = snap.get("grants") or []
        for g in grants:
            for cls, rate in (g.get("quota") or {}).items():
                for m in MEASURES:
                    k = (str(g.get("tenant", "")), cls, m)
                    per_tenant[k] = per_tenant.get(k, 0.0) + float(rate.get(m, 0.0))
        for k, v in sorted(per_tenant.items()):
            granted.add_metric(list(k), v)
        used_by_tenant = GaugeMetricFamily(
            PREFIX + "used_by_tenant", "Rate each tenant's grants were served at over the "
            "servers' last heartbeat intervals (summed over live servers)",
            labels=["tenant", "class", "measure"])
        for tenant, rates in sorted((snap.get("used_by_tenant") or {}).items()):
            for cls, rate in sorted(rates.items()):
                for m in MEASURES:
                    used_by_tenant.add_metric([str(tenant), cls, m], float(rate.get(m, 0.0)))
        used = GaugeMetricFamily(
            PREFIX + "used", "Rate each server served over its last heartbeat interval",
            labels=["server", "class", "measure"])
        server_cap = GaugeMetricFamily(
            PREFIX + "server_capacity", "Each live server's capacity",
            labels=["server", "class", "measure"])
        lease_age = GaugeMetricFamily(
            PREFIX + "lease_age_seconds", "Seconds since each server's last heartbeat",
            labels=["server"])
        inflight = GaugeMetricFamily(
            PREFIX + "server_inflight", "Requests each server held at its last heartbeat",
            labels=["server"])
        servers = snap.get("servers") or []
        for s in servers:
            sid = str(s.get("server_id", ""))
            for fam, key in ((used, "load"), (server_cap, "capacity")):
                for cls, rate in sorted((s.get(key) or {}).items()):
                    for m in MEASURES:
                        fam.add_metric([sid, cls, m], float(rate.get(m, 0.0)))
            lease_age.add_metric([sid], float(s.get("lease_age", 0.0)))
            inflight.add_metric([sid], float(s.get("inflight", 0)))
        yield from (capacity, left, granted, used_by_tenant, used, server_cap, lease_age,
                    inflight)
        yield GaugeMetricFamily(PREFIX + "servers", "Live servers in the pool",
                                value=len(servers))
        yield GaugeMetricFamily(PREFIX + "grants_active", "Live grants",
                                value=len(grants))
        yield GaugeMetricFamily(PREFIX + "database_up",
                                "1 when the last read of the pool's state succeeded",
                                value=1.0 if self.owner.database_up else 0.0)


class ManagerMetrics:
    """One registry per manager (tests run several in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._requests = Counter(PREFIX + "requests", "Requests answered, per op and status",
                                 ["op", "status"], registry=self.registry)
        self._refusals = Counter(PREFIX + "refusals", "Quota requests refused, per class "
                                 "asked for", ["class"], registry=self.registry)
        self._events = Counter(PREFIX + "events_pushed", "EVENT frames pushed to clients",
                               ["event"], registry=self.registry)
        self._seconds = Histogram(PREFIX + "request_seconds", "Seconds from a request's "
                                  "arrival to its answer, per op", ["op"],
                                  buckets=BUCKETS, registry=self.registry)
        self._auth = Counter(PREFIX + "auth_failures", "Handshakes refused",
                             registry=self.registry)
        self._expired = Counter(PREFIX + "servers_expired", "Servers removed by this "
                                "manager because their lease lapsed",
                                registry=self.registry)
        self._moved = Counter(PREFIX + "grants_moved", "Grants re-placed by this manager "
                              "after their servers' leases lapsed", registry=self.registry)
        self._lock = threading.Lock()
        self._snapshot: dict[str, Any] = {}
        self.database_up = False
        self.registry.register(_PoolCollector(self))

    def request(self, op: str, status: str) -> None:
        self._requests.labels(op, status).inc()

    def took(self, op: str, seconds: float) -> None:
        self._seconds.labels(op).observe(seconds)

    def refused(self, quota: dict[str, dict[str, float]]) -> None:
        for cls in quota:
            self._refusals.labels(cls).inc()

    def pushed(self, event: str) -> None:
        self._events.labels(event if event in ("moved", "revoked") else "other").inc()

    def auth_failure(self) -> None:
        self._auth.inc()

    def expired(self, servers: int, moved: int) -> None:
        self._expired.inc(servers)
        self._moved.inc(moved)

    def update(self, status: dict[str, Any] | None) -> None:
        """A fresh ``FabricState.status()``; None: reading it failed."""
        with self._lock:
            if status is None:
                self.database_up = False
            else:
                self._snapshot = status
                self.database_up = True

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self._snapshot

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["PREFIX", "ManagerMetrics"]
