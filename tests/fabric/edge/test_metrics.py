"""FabricMetrics: the counts come out, and no label carries anything but its vocabulary."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from cryptoplane.fabric.metrics import BUCKETS, FabricMetrics, Tally

ALLOWED_LABELS = {"tenant", "op", "status", "transport", "reason", "le"}


def samples(m: FabricMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(m.exposition().decode()):
        for s in family.samples:
            out[s.name, frozenset(s.labels.items())] = s.value
    return out


def value(m: FabricMetrics, name: str, **labels: str) -> float:
    return samples(m)[f"cryptoplane_fabric_{name}", frozenset(labels.items())]


def test_counts_show_in_the_exposition() -> None:
    m = FabricMetrics()
    m.count("acme", "encrypt", "ok", n=5, nbytes=500, items=3)
    m.count("acme", "encrypt", "ok")
    m.count("acme", "decrypt", "authentication_failed")
    m.count("beta", "encrypt", "throttled", n=2)
    m.connection_opened("tls")
    m.connection_opened("tcp")
    m.connection_closed()
    m.set_in_flight(7)
    m.auth_failure("bad_token")
    m.observe("encrypt", 0.0003, n=4)
    m.observe_many("decrypt", [0.00005, 20.0])
    assert value(m, "requests_total", tenant="acme", op="encrypt", status="ok") == 6
    assert value(m, "requests_total", tenant="acme", op="decrypt",
                 status="authentication_failed") == 1
    assert value(m, "request_bytes_total", tenant="acme", op="encrypt") == 500
    assert value(m, "batch_items_total", tenant="acme", op="encrypt") == 3
    assert value(m, "throttled_total", tenant="beta") == 2
    assert value(m, "connections_total", transport="tls") == 1
    assert value(m, "connections_open") == 1
    assert value(m, "in_flight") == 7
    assert value(m, "auth_failures_total", reason="bad_token") == 1
    assert value(m, "request_seconds_count", op="encrypt") == 4
    assert value(m, "request_seconds_sum", op="encrypt") == pytest.approx(0.0012)
    assert value(m, "request_seconds_bucket", op="encrypt", le="0.00025") == 0
    assert value(m, "request_seconds_bucket", op="encrypt", le="0.0005") == 4
    assert value(m, "request_seconds_bucket", op="decrypt", le="0.0001") == 1
    assert value(m, "request_seconds_bucket", op="decrypt", le="10.0") == 1
    assert value(m, "request_seconds_bucket", op="decrypt", le="+Inf") == 2


def test_bucket_bounds_are_inclusive() -> None:
    m = FabricMetrics()
    for b in BUCKETS:
        m.observe("digest", b)
    for i, b in enumerate(BUCKETS):
        assert value(m, "request_seconds_bucket", op="digest", le=str(b)) == i + 1


def test_only_the_vocabulary_becomes_labels() -> None:
    m = FabricMetrics()
    m.count("acme", "encrypt", "ok", nbytes=10)
    m.connection_opened("unix")
    m.auth_failure("expired")
    m.observe("encrypt", 0.001)
    for family in text_string_to_metric_families(m.exposition().decode()):
        assert family.name.startswith("cryptoplane_fabric_")
        for s in family.samples:
            assert set(s.labels) <= ALLOWED_LABELS, s


@pytest.mark.parametrize("op", ["billing-key", "cpt_0011223344556677_secret", "ENCRYPT"])
def test_a_key_name_or_token_as_op_is_refused(op: str) -> None:
    m = FabricMetrics()
    with pytest.raises(ValueError):
        m.count("acme", op, "ok")
    with pytest.raises(ValueError):
        m.observe(op, 0.1)
    with pytest.raises(ValueError):
        m.count("acme", "encrypt", op)
    assert op.encode() not in m.exposition()


def test_reasons_and_transports_are_short_identifiers() -> None:
    m = FabricMetrics()
    for bad in ("cpt_0011223344556677_" + "s" * 43, "Bad Token", ""):
        with pytest.raises(ValueError):
            m.auth_failure(bad)
        with pytest.raises(ValueError):
            m.connection_opened(bad)


def test_tally_aggregates_a_turn() -> None:
    m = FabricMetrics()
    t = Tally()
    assert not t
    for _ in range(100):
        t.add("acme", "encrypt", "ok", nbytes=10, seconds=0.0002)
    t.add("acme", "encrypt", "ok", nbytes=0, items=50)
    t.add("acme", "sign", "forbidden")
    assert t
    m.observe_batch(t)
    assert not t  # emptied
    assert value(m, "requests_total", tenant="acme", op="encrypt", status="ok") == 101
    assert value(m, "request_bytes_total", tenant="acme", op="encrypt") == 1000
    assert value(m, "batch_items_total", tenant="acme", op="encrypt") == 50
    assert value(m, "requests_total", tenant="acme", op="sign", status="forbidden") == 1
    assert value(m, "request_seconds_count", op="encrypt") == 100


def test_registries_are_separate() -> None:
    a, b = FabricMetrics(), FabricMetrics()
    a.count("acme", "encrypt", "ok")
    assert b"acme" not in b.exposition()
    reg = CollectorRegistry()
    c = FabricMetrics(reg)
    assert c.registry is reg


def test_count_is_cheap_once_its_labels_are_known() -> None:
    m = FabricMetrics()
    m.count("acme", "encrypt", "ok", 1, 100)
    n = 20_000
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            m.count("acme", "encrypt", "ok", 1, 100)
        best = min(best, (time.perf_counter() - start) / n)
    # about a microsecond on a laptop; generous, for a loaded CI machine
    assert best < 10e-6, best
