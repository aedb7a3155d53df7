from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

import cryptoplane as cp
from cryptoplane.requests import Encrypt
from cryptoplane.telemetry.metrics import PlaneCollector, prometheus_text

# recognisable key material: its hex (or the bytes) must never reach an export
MATERIAL = bytes(range(0xA0, 0xC0))
NONCE = bytes(12)
BIG = 128 * 1024  # above the fast-path limit: queued, so timed in the histogram


def load(plane: cp.Plane, key: cp.Key) -> None:
    """5 fast-path encrypts, 2 failing decrypts, 3 queued encrypts, 1 ECDSA signature,
    2 requests of a limited client."""
    for i in range(5):
        ct = plane.encrypt(key, b"x" * 100, nonce=i.to_bytes(12, "big"))
    for _ in range(2):
        with pytest.raises(cp.AuthenticationFailed):
            plane.decrypt(key, ct[:-1] + bytes([ct[-1] ^ 1]), nonce=NONCE)
    plane.map([Encrypt(key, bytes(BIG), nonce=(100 + i).to_bytes(12, "big"))
               for i in range(3)])
    plane.sign(cp.Key.generate("ecdsa-p256-sha256"), b"message")
    plane.limit(client="tenant-a", ops=50)
    for i in range(2):
        plane.run(Encrypt(key, b"y" * 10, nonce=(200 + i).to_bytes(12, "big")),
                  client="tenant-a")


@pytest.fixture(scope="module")
def loaded() -> Iterator[tuple[cp.Plane, cp.Key]]:
    with cp.Plane() as plane:
        key = cp.Key("aes-256-gcm", MATERIAL)
        load(plane, key)
        yield plane, key


def families(text: bytes) -> dict[str, Metric]:
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def samples(family: Metric, suffix: str = "", **labels: str) -> list[Any]:
    return [s for s in family.samples if s.name == family.name + suffix
            and all(s.labels.get(k) == v for k, v in labels.items())]


def test_export_parses_and_counts_match_stats(loaded: tuple[cp.Plane, cp.Key]) -> None:
    plane, _ = loaded
    text = prometheus_text(plane)
    stats = plane.stats()
    fams = families(text)
    assert all(name.startswith("cryptoplane_") for name in fams)
    requests = fams["cryptoplane_requests"]
    assert requests.type == "counter"
    enc = samples(requests, "_total", algorithm="aes-256-gcm", op="encrypt")
    assert sum(s.value for s in enc) == stats["algorithms"]["aes-256-gcm"]["encrypt"][
        "requests"] == 5 + 3 + 2
    assert {s.labels["client"] for s in enc} == {"-", "tenant-a"}
    assert {s.labels["engine"] for s in enc} <= set(plane.engines)
    nbytes = samples(fams["cryptoplane_bytes"], "_total", algorithm="aes-256-gcm",
                     op="encrypt")
    assert sum(s.value for s in nbytes) == 5 * 100 + 3 * BIG + 2 * 10
    errors = samples(fams["cryptoplane_errors"], "_total", error="AuthenticationFailed")
    assert sum(s.value for s in errors) == 2
    assert {s.labels["op"] for s in errors} == {"decrypt"}
    sign = samples(requests, "_total", algorithm="ecdsa-p256-sha256", op="sign")
    assert sum(s.value for s in sign) == 1
    for name, per_client in stats["clients"].items():
        assert sum(s.value for s in samples(requests, "_total", client=name)) == \
            per_client["requests"]


def test_latency_histogram_is_cumulative(loaded: tuple[cp.Plane, cp.Key]) -> None:
    plane, _ = loaded
    hist = families(prometheus_text(plane))["cryptoplane_request_duration_seconds"]
    assert hist.type == "histogram"
    series = {(s.labels["engine"], s.labels["algorithm"], s.labels["op"])
              for s in hist.samples}
    assert series, "queued work must have been timed"
    total = 0.0
    for engine, alg, op in series:
        labels = {"engine": engine, "algorithm": alg, "op": op}
        buckets = samples(hist, "_bucket", **labels)
        les = [float(s.labels["le"]) for s in buckets]
        counts = [s.value for s in buckets]
        assert les == sorted(les) and les[-1] == float("inf") and les[0] == pytest.approx(1e-6)
        assert counts == sorted(counts), "buckets must be cumulative"
        (count,) = samples(hist, "_count", **labels)
        (total_seconds,) = samples(hist, "_sum", **labels)
        assert counts[-1] == count.value > 0 and total_seconds.value > 0
        total += count.value
        summary = plane.stats()["latency"][f"{engine}/{alg}/{op}"]
        assert count.value == summary["count"]
    assert total == sum(h["count"] for h in plane.stats()["latency"].values())


def test_gauges_and_info(loaded: tuple[cp.Plane, cp.Key]) -> None:
    plane, _ = loaded
    fams = families(prometheus_text(plane))
    stats = plane.stats()
    depth = {s.labels["priority"]: s.value for s in fams["cryptoplane_queue_depth"].samples}
    assert {"high", "normal", "bulk"} <= set(depth)
    health = fams["cryptoplane_engine_health"]
    for name, e in stats["engines"].items():
        states = {s.labels["state"]: s.value for s in samples(health, engine=name)}
        assert states[e["health"]] == 1 and sum(states.values()) == 1
        (cap,) = samples(fams["cryptoplane_engine_capacity"], engine=name)
        assert cap.value == e["capacity"]
    (ops,) = samples(fams["cryptoplane_limit_ops_per_second"], client="tenant-a")
    assert ops.value == 50
    (submitted,) = fams["cryptoplane_scheduler_submitted"].samples
    assert submitted.value == stats["scheduler"]["submitted"] > 0
    assert "cryptoplane_scheduler_failovers" in fams
    # the text format has no info type: an info metric reads back as a gauge of 1
    backends = {s.labels["component"]: s.labels["backend"]
                for s in fams["cryptoplane_backend_info"].samples}
    assert backends == {"sector_kernel": stats["sector_kernel"]["backend"],
                        "fast_path": stats["fast_path"]["backend"]}


def test_no_key_material(loaded: tuple[cp.Plane, cp.Key]) -> None:
    plane, key = loaded
    text = prometheus_text(plane)
    assert key.export_raw() == MATERIAL
    for needle in (MATERIAL.hex(), MATERIAL.hex().upper(), MATERIAL.hex()[:16]):
        assert needle.encode() not in text
    assert MATERIAL not in text and MATERIAL[:8] not in text


def test_collector_reads_the_plane_at_each_scrape() -> None:
    with cp.Plane() as plane:
        registry = CollectorRegistry()
        registry.register(PlaneCollector(plane))
        key = cp.Key.generate("aes-256-gcm")

        def encrypts() -> float:
            fam = families(generate_latest(registry))["cryptoplane_requests"]
            return float(sum(s.value for s in samples(fam, "_total", op="encrypt")))

        assert encrypts() == 0
        plane.encrypt(key, b"a", nonce=NONCE)
        assert encrypts() == 1
        plane.encrypt(key, b"b", nonce=bytes(11) + b"\1")
        assert encrypts() == 2
