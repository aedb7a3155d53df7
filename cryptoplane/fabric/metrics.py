"""The server's Prometheus metrics, all named ``cryptoplane_fabric_*``.

Labels are only ever a tenant, an op name, a status name, a transport or an auth-failure
reason: never a key name, a token or anything of a payload (key names are tenants'
data, and unbounded). Op and status values are checked against the wire protocol's
names the first time each is seen, so a key name passed by mistake fails loudly in
tests instead of leaking into a scrape.

The hot path is cheap: label children are looked up once and kept in a dict, so
``count`` is a dict lookup and two increments (about a microsecond), and a server
aggregates a whole event-loop turn into a ``Tally`` and hands it over once
(``observe_batch``). The request-duration histogram is kept here (a ``bisect`` and a
list increment per observation) and exposed by a collector, because prometheus_client's
``Histogram.observe`` walks its buckets in Python under a lock.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .codec import Op, Status

PREFIX: Final = "cryptoplane_fabric_"
# request seconds: a cached AES-GCM op takes microseconds, a cold RSA-4096 key creation
# seconds; le is inclusive, as Prometheus' buckets are
BUCKETS: Final[tuple[float, ...]] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
OPS: Final = frozenset(o.name.lower() for o in Op)
STATUSES: Final = frozenset(s.name.lower() for s in Status)
# transports and auth-failure reasons are the server's vocabulary: short identifiers
_WORD = re.compile(r"[a-z][a-z0-9_]{0,31}")


def _op(op: str) -> str:
    if op not in OPS:
        raise ValueError(f"not an op name: {op!r} (labels never carry key names)")
    return op


def _status(status: str) -> str:
    if status not in STATUSES:
        raise ValueError(f"not a status name: {status!r}")
    return status


def _word(value: str, what: str) -> str:
    if not _WORD.fullmatch(value):
        raise ValueError(f"{what} must be a short lowercase identifier, got {value!r}")
    return value


class _Durations(Collector):
    """``request_seconds{op}``: a histogram kept as plain lists, exposed on collect."""

    def __init__(self, name: str) -> None:
        self._name = name
        # op -> [count per bucket (the last one +Inf)], and op -> sum of seconds
        self._counts: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}

    def observe(self, op: str, seconds: float, n: int = 1) -> None:
        counts = self._counts.get(op)
        if counts is None:
            counts = self._counts[_op(op)] = [0] * (len(BUCKETS) + 1)
            self._sums[op] = 0.0
        counts[bisect_left(BUCKETS, seconds)] += n
        self._sums[op] += seconds * n

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            self._name, "Seconds from a request's arrival to its answer, by op",
            labels=["op"])
        for op, counts in list(self._counts.items()):
            snapshot = list(counts)  # one consistent copy: +Inf must equal the count
            running, buckets = 0, []
            for bound, c in zip((*map(str, BUCKETS), "+Inf"), snapshot, strict=True):
                running += c
                buckets.append((bound, float(running)))
            family.add_metric([op], buckets, self._sums.get(op, 0.0))
        yield family


class _Grants(Collector):
    """Grant enforcement and the manager's lease, read at scrape time from the grant
    table and the membership (plain counters there: nothing on the request path)."""

    def __init__(self) -> None:
        self.table: Any = None  # grants.GrantTable
        self.membership: Any = None  # membership.Membership

    def collect(self) -> Iterator[Metric]:
        table = self.table
        if table is not None:
            ops = CounterMetricFamily(f"{PREFIX}grant_admitted_ops",
                                      "Operations admitted under grants, by class",
                                      labels=["class"])
            nbytes = CounterMetricFamily(f"{PREFIX}grant_admitted_bytes",
                                         "Payload bytes admitted under grants, by class",
                                         labels=["class"])
            for cls, (n, b) in table.admitted().items():
                ops.add_metric([cls], n)
                nbytes.add_metric([cls], b)
            throttled = CounterMetricFamily(
                f"{PREFIX}grant_throttled", "Requests refused THROTTLED as over their "
                "grant's rate, by class", labels=["class"])
            for cls, n in sorted(table.throttled.items()):
                throttled.add_metric([cls], n)
            yield ops
            yield nbytes
            yield throttled
            yield GaugeMetricFamily(f"{PREFIX}grants_held", "Grants presented and held",
                                    value=len(table))
        m = self.membership
        if m is not None:
            yield GaugeMetricFamily(f"{PREFIX}manager_reachable",
                                    "1 when the manager answered the last call",
                                    value=1.0 if m.reachable else 0.0)
            yield GaugeMetricFamily(f"{PREFIX}manager_registered",
                                    "1 while this server holds a lease",
                                    value=1.0 if m.registered else 0.0)
            age = m.lease_age()
            yield GaugeMetricFamily(f"{PREFIX}manager_lease_age_seconds",
                                    "Seconds since the manager last renewed the lease "
                                    "(-1: never)", value=-1.0 if age is None else age)


class Tally:
    """One event-loop turn's requests, summed before they reach the metrics.

    The server ``add``s each answered request (a dict update), then hands the turn to
    ``FabricMetrics.observe_batch``, which applies it and empties the tally.
    """

    __slots__ = ("durations", "requests")

    def __init__(self) -> None:
        # (tenant, op, status) -> [requests, bytes, batch items]
        self.requests: dict[tuple[str, str, str], list[int]] = {}
        # op -> seconds of each request
        self.durations: dict[str, list[float]] = {}

    def add(self, tenant: str, op: str, status: str, *, nbytes: int = 0, items: int = 0,
            seconds: float | None = None) -> None:
        """One request: its payload bytes, its batch items (0: not a batch), and, if
        measured, its seconds."""
        row = self.requests.get((tenant, op, status))
        if row is None:
            self.requests[tenant, op, status] = [1, nbytes, items]
        else:
            row[0] += 1
            row[1] += nbytes
            row[2] += items
        if seconds is not None:
            d = self.durations.get(op)
            if d is None:
                self.durations[op] = [seconds]
            else:
                d.append(seconds)

    def __bool__(self) -> bool:
        return bool(self.requests or self.durations)

    def clear(self) -> None:
        self.requests.clear()
        self.durations.clear()


class FabricMetrics:
    """The fabric server's metrics, in their own registry (default: a new one, so two
    servers in one process, or tests, do not collide)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}requests", "Requests answered",
                                ["tenant", "op", "status"], registry=r)
        self.request_bytes = Counter(f"{PREFIX}request_bytes", "Request payload bytes",
                                     ["tenant", "op"], registry=r)
        self.batch_items = Counter(f"{PREFIX}batch_items", "Items carried by batches",
                                   ["tenant", "op"], registry=r)
        self.throttled = Counter(f"{PREFIX}throttled", "Requests refused as over a rate",
                                 ["tenant"], registry=r)
        # "_open", not plain "connections": that is the counter's family name below (its
        # sample is connections_total), and the two would clash in the registry and in
        # OpenMetrics
        self.connections = Gauge(f"{PREFIX}connections_open", "Connections open",
                                 registry=r)
        self.connections_opened = Counter(f"{PREFIX}connections", "Connections accepted",
                                          ["transport"], registry=r)
        self.in_flight = Gauge(f"{PREFIX}in_flight", "Requests received, not yet answered",
                               registry=r)
        self.auth_failures = Counter(f"{PREFIX}auth_failures", "Failed authentications",
                                     ["reason"], registry=r)
        self.durations = _Durations(f"{PREFIX}request_seconds")
        r.register(self.durations)
        # label children, looked up once (``labels()`` costs microseconds, a dict get
        # tens of nanoseconds): (tenant, op, status) -> (requests, bytes, items)
        self._children: dict[tuple[str, str, str], tuple[Counter, Counter, Counter]] = {}
        self._throttled: dict[str, Counter] = {}
        self._grants = _Grants()
        r.register(self._grants)

    # -- requests ------------------------------------------------------------------

    def _child(self, tenant: str, op: str, status: str) -> tuple[Counter, Counter, Counter]:
        key = (tenant, _op(op), _status(status))
        found = self._children[key] = (
            self.requests.labels(tenant, op, status),
            self.request_bytes.labels(tenant, op),
            self.batch_items.labels(tenant, op),
        )
        return found

    def count(self, tenant: str, op: str, status: str, n: int = 1, nbytes: int = 0,
              items: int = 0) -> None:
        """``n`` requests of ``op`` answered ``status`` for ``tenant``, with ``nbytes``
        of payload in all and ``items`` batch items in all."""
        c = self._children.get((tenant, op, status))
        if c is None:
            c = self._child(tenant, op, status)
        c[0].inc(n)
        if nbytes:
            c[1].inc(nbytes)
        if items:
            c[2].inc(items)
        if status == "throttled":
            self.throttle(tenant, n)

    def throttle(self, tenant: str, n: int = 1) -> None:
        """``n`` requests of ``tenant`` refused as over a rate (``count`` with status
        ``throttled`` calls this; call it directly only for refusals not counted so)."""
        c = self._throttled.get(tenant)
        if c is None:
            c = self._throttled[tenant] = self.throttled.labels(tenant)
        c.inc(n)

    def observe(self, op: str, seconds: float, n: int = 1) -> None:
        """``n`` requests of ``op`` that each took ``seconds``."""
        self.durations.observe(op, seconds, n)

    def observe_many(self, op: str, seconds: Iterable[float]) -> None:
        for s in seconds:
            self.durations.observe(op, s)

    def observe_batch(self, tally: Tally) -> None:
        """Apply one turn's ``Tally`` and empty it."""
        for (tenant, op, status), (n, nbytes, items) in tally.requests.items():
            self.count(tenant, op, status, n, nbytes, items)
        for op, secs in tally.durations.items():
            self.observe_many(op, secs)
        tally.clear()

    # -- connections and authentication --------------------------------------------

    def connection_opened(self, transport: str) -> None:
        """A connection accepted over ``transport`` (``tcp``, ``tls``, ``unix``...)."""
        self.connections_opened.labels(_word(transport, "transport")).inc()
        self.connections.inc()

    def connection_closed(self) -> None:
        self.connections.dec()

    def set_in_flight(self, n: int) -> None:
        self.in_flight.set(n)

    def auth_failure(self, reason: str) -> None:
        """A failed authentication, by a short reason (``bad_token``, ``expired``,
        ``no_certificate``...): never the token or the tenant it claimed."""
        self.auth_failures.labels(_word(reason, "reason")).inc()

    # -- grants and the manager ---------------------------------------------------

    def watch_grants(self, table: Any) -> None:
        """Expose a ``grants.GrantTable``'s admits and throttles per class."""
        self._grants.table = table

    def watch_membership(self, membership: Any) -> None:
        """Expose a ``membership.Membership``: manager reachability, lease age."""
        self._grants.membership = membership

    # -- exposition ----------------------------------------------------------------

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


__all__ = ["BUCKETS", "OPS", "PREFIX", "STATUSES", "FabricMetrics", "Tally"]
