"""Prometheus export of a plane's statistics, built on ``prometheus-client``.

``PlaneCollector`` is a custom collector: each scrape reads the plane afresh (counters,
histograms, queue depths, limits) and yields metric families; nothing is copied into
prometheus-client's own metric objects, so there is no second set of counters to keep in
step with the plane's. ``prometheus_text(plane)`` renders one plane in the text format.

Everything exported is a count, a duration, a rate, a name or a label: the statistics
never see key material, and this module adds none.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from cryptoplane._version import __version__
from cryptoplane.engines.base import Health
from cryptoplane.stats import Histogram

if TYPE_CHECKING:
    from cryptoplane.plane import Plane

PREFIX = "cryptoplane"
OP_LABELS = ("engine", "algorithm", "op", "client")

Row = tuple[tuple[str, str, str, str], int, int, dict[str, int]]


def _rows(plane: Plane) -> list[Row]:
    """Counts per (engine, algorithm, op, client), the breakdown ``stats()`` folds away
    (read through the plane's own ``stat_rows``, so the two never drift apart)."""
    rows: list[Row] = [(k, n, b, errs) for k, n, b, errs, _ in plane.stat_rows()]
    # a live session and the registry can hold the same key (a session's earlier
    # errors, say): sum them, since a family may not repeat a label set
    merged: dict[tuple[str, str, str, str], list[Any]] = {}
    for key, n, b, errors in rows:
        m = merged.setdefault(key, [0, 0, {}])
        m[0] += n
        m[1] += b
        for err, count in errors.items():
            m[2][err] = m[2].get(err, 0) + count
    return [(k, m[0], m[1], m[2]) for k, m in sorted(merged.items())]


def _histograms(plane: Plane) -> dict[tuple[str, str, str], Histogram]:
    """Latency per (engine, algorithm, op), summed over clients.

    Merged into fresh histograms so one scrape works on a copy that the engines' threads
    do not move under it. Per client would multiply 82 series by the client count.
    """
    out: dict[tuple[str, str, str], Histogram] = {}
    for (engine, alg, op, _client), _, _, _, latency in plane.stat_rows():
        if latency is not None and latency.count:
            out.setdefault((engine, alg, op), Histogram()).merge(latency)
    return dict(sorted(out.items()))


def _le(bound: float) -> str:
    # Six significant digits: the decade bounds read "0.001", not "0.0010000000000000002".
    # The label differs from the bound used for counting by < 1e-5 relative, well under
    # the resolution of the clock that measured the latency.
    return repr(float(f"{bound:.6g}"))


def _name(*parts: str) -> str:
    """A metric name from free-form parts (scheduler counter names, say)."""
    return "_".join(re.sub(r"[^a-zA-Z0-9_]", "_", p) for p in (PREFIX, *parts))


class PlaneCollector:
    """A ``prometheus_client`` collector over one ``Plane``.

    Register it where the application already exports metrics
    (``prometheus_client.REGISTRY.register(PlaneCollector(plane))``), or use
    ``prometheus_text``. Each ``collect()`` calls ``plane.stats()`` once.
    """

    def __init__(self, plane: Plane) -> None:
        self._plane = plane

    def collect(self) -> Iterator[Metric]:
        stats = self._plane.stats()
        yield from self._requests()
        yield self._latency()
        yield from self._engines(stats["engines"])
        yield from self._queues_and_scheduler(stats)
        yield from self._limits(stats["limits"])
        yield self._backends(stats)

    def _requests(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            _name("requests"), "Requests completed, per engine, algorithm, operation and "
            "client (fast path included).", labels=OP_LABELS)
        nbytes = CounterMetricFamily(
            _name("bytes"), "Payload bytes of completed requests.", labels=OP_LABELS)
        errors = CounterMetricFamily(
            _name("errors"), "Requests that failed, by error type.",
            labels=(*OP_LABELS, "error"))
        for key, n, b, errs in _rows(self._plane):
            requests.add_metric(key, n)
            nbytes.add_metric(key, b)
            for err, count in sorted(errs.items()):
                errors.add_metric((*key, err), count)
        yield requests
        yield nbytes
        yield errors

    def _latency(self) -> Metric:
        family = HistogramMetricFamily(
            _name("request_duration_seconds"),
            "Latency of queued work from submission to completion (the fast path is not "
            "timed: timing it would cost more than the call). Log buckets, 10 per decade.",
            labels=("engine", "algorithm", "op"))
        for key, h in _histograms(self._plane).items():
            # the +Inf bucket and _count come from the same snapshot of the bucket array
            # as the finite buckets, so the series is cumulative even while it grows
            buckets = [(_le(bound), float(n)) for bound, n in h.buckets()]
            buckets.append(("+Inf", float(sum(h.counts))))
            family.add_metric(key, buckets, sum_value=h.sum)
        return family

    def _engines(self, engines: dict[str, Any]) -> Iterator[Metric]:
        gauges = {
            "inflight": GaugeMetricFamily(_name("engine_inflight"),
                                          "Requests an engine holds now.", labels=["engine"]),
            "capacity": GaugeMetricFamily(_name("engine_capacity"),
                                          "Requests an engine accepts at once.",
                                          labels=["engine"]),
            "parallelism": GaugeMetricFamily(_name("engine_parallelism"),
                                             "Requests an engine runs at the same time.",
                                             labels=["engine"]),
            "algorithms": GaugeMetricFamily(_name("engine_algorithms"),
                                            "Algorithms an engine offers (after self-tests).",
                                            labels=["engine"]),
        }
        health = GaugeMetricFamily(
            _name("engine_health"), "1 for the engine's current health state, 0 for others.",
            labels=["engine", "state"])
        busy = CounterMetricFamily(_name("engine_busy_seconds"),
                                   "Seconds an engine spent running requests.",
                                   labels=["engine"])
        rate_ops = GaugeMetricFamily(
            _name("engine_rate_ops_per_second"), "Measured rate (moving average) that the "
            "balancer uses, per algorithm and operation.", labels=["engine", "algorithm", "op"])
        rate_bytes = GaugeMetricFamily(
            _name("engine_rate_bytes_per_second"), "Measured byte rate (moving average) that "
            "the balancer uses.", labels=["engine", "algorithm", "op"])
        extra = CounterMetricFamily(
            _name("engine_events"), "Engine-specific counters (the pool's worker deaths, "
            "respawns, retries...).", labels=["engine", "event"])
        for name, e in engines.items():
            for field, family in gauges.items():
                family.add_metric([name], float(e[field]))
            for state in Health:
                health.add_metric([name, state.value], 1.0 if e["health"] == state.value else 0.0)
            busy.add_metric([name], float(e["busy_seconds"]))
            for alg_op, rate in sorted(e.get("rates", {}).items()):
                alg, _, op = alg_op.rpartition("/")
                rate_ops.add_metric([name, alg, op], float(rate["ops_per_s"]))
                rate_bytes.add_metric([name, alg, op], float(rate["bytes_per_s"]))
            # an engine's counters() land in its stats entry beside the standard fields
            for field, value in sorted(e.items()):
                if field not in _ENGINE_FIELDS and isinstance(value, int) \
                        and not isinstance(value, bool):
                    extra.add_metric([name, field], float(value))
        yield from gauges.values()
        yield health
        yield busy
        yield rate_ops
        yield rate_bytes
        yield extra

    def _queues_and_scheduler(self, stats: dict[str, Any]) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            _name("queue_depth"), "Requests waiting, per priority queue ('delayed': held "
            "by a QoS limit).", labels=["priority"])
        for priority, n in stats["queues"].items():
            depth.add_metric([priority], float(n))
        yield depth
        sched = stats["scheduler"]
        for field, value in sorted(sched.items()):
            if isinstance(value, int) and not isinstance(value, bool):
                yield CounterMetricFamily(_name("scheduler", field),
                                          _SCHEDULER_HELP.get(field, f"Scheduler: {field}."),
                                          value=float(value))
        yield InfoMetricFamily(_name("scheduler"), "The scheduler's balancing policy.",
                               value={"policy": str(sched.get("policy", ""))})

    def _limits(self, limits: dict[str, Any]) -> Iterator[Metric]:
        ops = GaugeMetricFamily(_name("limit_ops_per_second"),
                                "QoS limit on requests/s per client or session (0: none).",
                                labels=["client"])
        nbytes = GaugeMetricFamily(_name("limit_bytes_per_second"),
                                   "QoS limit on bytes/s per client or session (0: none).",
                                   labels=["client"])
        for client, lim in sorted(limits.items()):
            ops.add_metric([client], float(lim["ops_per_s"]))
            nbytes.add_metric([client], float(lim["bytes_per_s"]))
        yield ops
        yield nbytes

    def _backends(self, stats: dict[str, Any]) -> Metric:
        info = InfoMetricFamily(
            _name("backend"), "Which implementation serves each native component "
            "('native' C, or the slower 'python' fallback and why).",
            labels=["component"])
        for component in ("sector_kernel", "fast_path"):
            b = stats.get(component, {})
            info.add_metric([component], {"backend": str(b.get("backend", "")),
                                          "reason": str(b.get("reason", "")),
                                          "version": __version__})
        return info


# the fields every engine's stats carry; anything else that is an int is an extra counter
_ENGINE_FIELDS = frozenset(("requests", "bytes", "errors", "health", "algorithms",
                            "inflight", "capacity", "parallelism", "busy_seconds", "rates"))

_SCHEDULER_HELP = {
    "submitted": "Requests queued to the scheduler (the fast path does not count here).",
    "completed": "Queued requests that completed.",
    "failed": "Queued requests that completed with an error.",
    "timeouts": "Requests that ran past their timeout.",
    "cancelled": "Requests cancelled before an engine took them.",
    "busy": "Submissions refused with Busy (queues full, block=False).",
    "failovers": "Requests moved to another engine after theirs failed.",
    "requeued": "Requests an engine did not accept and that went back to the queue.",
}


def prometheus_text(plane: Plane) -> bytes:
    """The plane's metrics in the Prometheus text format (``CONTENT_TYPE_LATEST``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PlaneCollector(plane))
    return generate_latest(registry)
