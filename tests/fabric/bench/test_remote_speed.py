"""``cryptoplane remote-speed --quick --skip-kmip --json``: a smoke run with tiny
durations (servers started and stopped, every section measured); every figure and ratio
is present and sane. The figures of so short a run are rough: only their presence and
sign are checked here, never a target."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time

import pytest
import support

EXPECTED_FIGURES = {
    ("tcp", "encrypt 64 B, pipelined"),
    ("tcp", "encrypt 64 B, batches of 1,000"),
    ("tcp", "RSA-2048 sign (PSS), pipelined"),
    ("tcp", "RSA-2048 sign (PSS), local"),
    ("tcp", "encrypt 64 B, 1 in flight: p50"),
    ("tcp", "encrypt 64 B, 1 in flight: p99"),
    ("tcp", "RSA-2048 sign, 1 in flight: p50"),
    ("tcp", "RSA-2048 sign, 1 in flight: p99"),
    ("tls", "encrypt 64 B, pipelined"),
    ("stream", "encrypt_stream, 3 clients x 2 MiB"),
    ("remote engine", "RSA-2048 sign: plane alone"),
    ("remote engine", "RSA-2048 sign: plane + remote"),
    ("remote engine", "AES-256-GCM encrypt 64 B: plane alone"),
    ("remote engine", "AES-256-GCM encrypt 64 B: plane + remote"),
}
EXPECTED_RATIOS = {
    "RSA sign: through the server (tcp) / local",
    "remote engine: RSA sign, plane+remote / plane alone",
    "remote engine: 64 B AEAD cost of adding it (1 - ratio)",
}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(120)
def test_quick_run_gives_every_figure() -> None:
    if shutil.which("taskset") is None:  # the remote-engine figure pins with it
        support.unavailable("taskset (Debian: util-linux)")
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "cryptoplane", "remote-speed", "--quick", "--skip-kmip",
         "--json", "--duration", "0.15", "--stream-clients", "3", "--stream-size", "2M"],
        capture_output=True, text=True, timeout=110, check=False)
    elapsed = time.monotonic() - t0
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    figures = {(f["section"], f["name"]): f for f in report["figures"]}
    assert set(figures) >= EXPECTED_FIGURES, EXPECTED_FIGURES - set(figures)
    for key, f in figures.items():
        assert math.isfinite(f["value"]) and f["value"] > 0, (key, f)
        assert f["errors"] == 0, (key, f)
    for section in ("tcp",):
        p50 = figures[(section, "encrypt 64 B, 1 in flight: p50")]["value"]
        p99 = figures[(section, "encrypt 64 B, 1 in flight: p99")]["value"]
        assert p50 <= p99
    ratios = {r["name"]: r for r in report["ratios"]}
    assert set(ratios) >= EXPECTED_RATIOS, EXPECTED_RATIOS - set(ratios)
    for name, r in ratios.items():
        assert math.isfinite(r["value"]), (name, r)
        if not r["below"]:
            assert r["value"] > 0, (name, r)
    assert report["meta"]["elapsed_s"] > 0
    assert elapsed < 60, f"the quick run took {elapsed:.1f} s"
    pids = report["meta"]["server_pids"]
    assert len(pids) == 3
    assert not [p for p in pids if _alive(p)], "a server outlived the command"


@pytest.mark.timeout(120)
def test_only_stream_measures_just_the_streams() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cryptoplane", "remote-speed", "--only", "stream", "--json",
         "--stream-clients", "3", "--stream-size", "2M"],
        capture_output=True, text=True, timeout=110, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert [(f["section"], f["name"]) for f in report["figures"]] == [
        ("stream", "encrypt_stream, 3 clients x 2 MiB")]
    assert report["figures"][0]["value"] > 0


@pytest.mark.timeout(150)
def test_only_remote_engine_measures_just_the_plane_with_a_remote_engine() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cryptoplane", "remote-speed", "--only", "remote-engine",
         "--quick", "--json"],
        capture_output=True, text=True, timeout=140, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert {f["section"] for f in report["figures"]} == {"remote engine"}
    assert all(f["value"] > 0 for f in report["figures"])
    assert [r["name"] for r in report["ratios"]] == [
        "remote engine: RSA sign, plane+remote / plane alone",
        "remote engine: 64 B AEAD cost of adding it (1 - ratio)"]
    pids = report["meta"]["server_pids"]
    assert len(pids) == 1 and not _alive(pids[0]), "the server outlived the command"
