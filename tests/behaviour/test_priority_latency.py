"""Issue 4, acceptance 3, in the suite: with the pool saturated by bulk work, high
requests' p99 latency is at most a fifth of bulk's, and bulk still progresses."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_benchmark() -> object:
    spec = importlib.util.spec_from_file_location("priority", ROOT / "benchmarks/priority.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_high_priority_p99_under_saturated_pool() -> None:
    bench = load_benchmark()
    r = bench.measure(3.0, "pool", 200)  # type: ignore[attr-defined]
    assert r["bulk_n"] > 100 and r["high_n"] > 50
    assert r["high_p99_ms"] <= r["bulk_p99_ms"] / 5, r
