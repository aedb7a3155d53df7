"""The manager simulation (benchmarks/fabric_manager_sim.py) at a small size: it runs,
stays in its time bound, reaps the servers it kills, and its checks of the database
pass (no over-admission, every grant on live servers, the books balanced)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "fabric_manager_sim.py"


def test_a_small_simulation_passes_its_checks(pg_dsn: str) -> None:
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--servers", "20", "--clients", "500", "--duration",
         "8", "--dead", "3", "--lease", "2", "--threads", "4", "--hb-threads", "2",
         "--dsn", pg_dsn, "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    r = json.loads(out.stdout)
    assert time.monotonic() - t0 < 20
    assert r["clients_done"] == 500 and r["admitted"] + r["refused"] == 500
    assert r["admitted"] > 0 and r["renewed"] > 0 and r["released"] > 0
    assert r["checks"] == {**r["checks"], "ok": True, "over_admitted": [],
                           "grants_off_live_servers": []}
    assert sum(e["removed"] for e in r["expiries"]) == 3
    assert r["leases_lost_alive"] == [] and not r["errors"]
    # reaped within a lease (2 s) and a reaper's period or two of their last heartbeat
    assert all(e["at"] < 4.0 for e in r["expiries"])
