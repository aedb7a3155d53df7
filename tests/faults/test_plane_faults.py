"""Acceptance point 2 through the Plane: 20,000 mixed requests submitted to a plane whose
only engine is the pool, a worker SIGKILLed twice mid-run. Every future completes exactly
once with the right answer, nothing deadlocks, stats() counts the failovers, and close()
leaves no process or shared-memory segment behind."""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from support import gone, shm_entries

import cryptoplane as cp

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("pool_faults", HERE / "test_pool_faults.py")
assert _spec is not None and _spec.loader is not None
pool_faults = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pool_faults)

N = pool_faults.N
WINDOW = 256  # futures outstanding at once: bounded memory, the pool always busy
DEADLINE = 100.0


@pytest.mark.timeout(150)
def test_plane_survives_two_sigkills_with_every_request_once() -> None:
    shm_before = shm_entries()
    mix = pool_faults.Mix()
    plane = cp.Plane(engines=["pool"], self_test=False)
    pool = plane.engines["pool"]
    seen = set(pool.workers)  # type: ignore[attr-defined]
    lock = threading.Lock()
    counts = [0] * N
    outcome: list[Any] = [None] * N
    progress = {"done": 0}
    room = threading.Semaphore(WINDOW)

    def on_done(i: int) -> Any:
        signs = mix.kind(i) in ("rsa", "ecdsa")

        def cb(f: Future[Any]) -> None:
            err = f.exception()
            value = err if err is not None else (
                f.result() if signs else pool_faults.digest(f.result()))
            with lock:
                counts[i] += 1
                outcome[i] = value
                progress["done"] += 1
            room.release()
        return cb

    def feed() -> None:
        for i in range(N):
            while not room.acquire(timeout=1.0):
                pass
            plane.submit(mix.request(i)).add_done_callback(on_done(i))

    feeder = threading.Thread(target=feed, daemon=True)
    t0 = time.monotonic()
    feeder.start()
    deadline = t0 + DEADLINE
    try:
        for n, fraction in enumerate(pool_faults.KILL_AT):
            while progress["done"] < fraction * N:
                assert time.monotonic() < deadline, f"stuck at {progress['done']}"
                time.sleep(0.005)
            victim = pool.workers[n % 2]  # type: ignore[attr-defined]
            os.kill(victim, signal.SIGSTOP)  # surely holding work when it dies
            time.sleep(0.05)  # replies sent before it stopped reach its reader first
            while pool.inflight_by_worker().get(victim, 0) == 0:  # type: ignore[attr-defined]
                assert time.monotonic() < deadline, "the stopped worker got no work"
                time.sleep(0.002)
            os.kill(victim, signal.SIGKILL)
            seen.update(pool.workers)  # type: ignore[attr-defined]
        while progress["done"] < N:
            assert time.monotonic() < deadline, f"stuck at {progress['done']} of {N}"
            time.sleep(0.01)
        feeder.join(10)
        seen.update(pool.workers)  # type: ignore[attr-defined]
        stats = plane.stats()
    finally:
        plane.close()
    time.sleep(0.2)
    assert counts == [1] * N  # exactly once, every one
    errors = [(i, v) for i, v in enumerate(outcome) if isinstance(v, BaseException)]
    assert errors == [], errors[:5]
    for i in range(N):
        mix.check(i, outcome[i])
    pool_stats = stats["engines"]["pool"]
    assert pool_stats["failovers"] == 2 and pool_stats["respawns"] == 2, pool_stats
    assert pool_stats["requests"] == N and stats["scheduler"]["completed"] == N
    assert stats["scheduler"]["submitted"] == N
    ours = {p.pid for p in multiprocessing.active_children()} & seen
    assert ours == set(), ours
    end = time.monotonic() + 5
    while not all(gone(p) for p in seen):
        assert time.monotonic() < end, "a worker outlived close()"
        time.sleep(0.01)
    assert shm_entries() <= shm_before
    print(f"\n{N} requests through the plane in {time.monotonic() - t0:.1f} s; "
          f"pool {pool_stats}")
