"""Acceptance point 2, at the engine level: 20,000 mixed requests in flight through the
pool, a worker SIGKILLed mid-run twice. Every request completes exactly once with the
inline engine's answer, nothing deadlocks, and close() leaves no process or segment."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import signal
import threading
import time
from typing import Any

import pytest
from support import gone, shm_entries

from cryptoplane import requests as rq
from cryptoplane.engines import Job
from cryptoplane.engines.pool import PoolEngine
from cryptoplane.keys import Key

N = 20_000
BURST = 64
DEADLINE = 100.0  # seconds for the whole run: past this it is a deadlock, not slowness
KILL_AT = (0.30, 0.60)  # fractions of completions at which a worker is SIGKILLed
# Share of each kind, by index: RSA's is kept small because a 2-core machine signs
# ~4,900/s and the test has to stay well under a minute.
RSA_EVERY, ECDSA_EVERY, SECTORS_EVERY = 50, 8, 4


def digest(data: Any) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


class Mix:
    """Request ``i`` is a pure function of ``i``: the verifier rebuilds it, so no
    payload or result is kept (20,000 results of up to 64 KiB would be over 600 MB)."""

    def __init__(self) -> None:
        rng = random.Random(20_000)
        self.pool = rng.randbytes(1 << 20)  # payloads are views of this
        self.sizes = [rng.randrange(1, 64 * 1024 + 1) for _ in range(N)]
        self.offsets = [rng.randrange(0, (1 << 20) - 64 * 1024) for _ in range(N)]
        self.gcm = [Key.generate("aes-256-gcm") for _ in range(3)]
        self.xts = Key.generate("aes-256-xts")
        self.rsa = Key.generate("rsa-pss-sha256")
        self.ec = Key.generate("ecdsa-p256-sha256")

    def kind(self, i: int) -> str:
        if i % RSA_EVERY == 0:
            return "rsa"
        if i % ECDSA_EVERY == 1:
            return "ecdsa"
        if i % SECTORS_EVERY == 2:
            return "sectors"
        return "gcm"

    def request(self, i: int) -> rq.Request:
        view = memoryview(self.pool)
        kind = self.kind(i)
        if kind == "rsa":
            return rq.Sign(self.rsa, view[i % 1000:i % 1000 + 100])
        if kind == "ecdsa":
            return rq.Sign(self.ec, view[i % 1000:i % 1000 + 100])
        if kind == "sectors":
            start = (self.offsets[i] // 4096) * 4096
            out = bytearray(64 * 1024) if i % 40 == 2 else None  # some into caller buffers
            return rq.EncryptSectors(self.xts, view[start:start + 64 * 1024],
                                     sector=i, out=out)
        off = self.offsets[i]
        return rq.Encrypt(self.gcm[i % 3], view[off:off + self.sizes[i]],
                          nonce=i.to_bytes(12, "big"))

    def check(self, i: int, got: bytes) -> None:
        request = self.request(i)
        if isinstance(request, rq.Sign):  # randomised: verify with the inline engine
            assert request.key is not None
            request.key.public_key().kernel().verify(request.data, got)
        else:
            assert got == digest(request.apply(request.kernel())), f"request {i} differs"


@pytest.mark.timeout(150)
def test_sigkill_twice_under_load_every_request_completes_once() -> None:
    shm_before = shm_entries()
    mix = Mix()
    engine = PoolEngine(workers=2)
    t_start = time.monotonic()
    engine.start(self_test=False)
    seen_pids = set(engine.workers)

    lock = threading.Lock()
    counts = [0] * N
    outcome: list[Any] = [None] * N
    duplicates: list[int] = []
    progress = {"done": 0}
    all_done = threading.Event()

    def completion(i: int) -> Any:
        def done(result: Any, error: BaseException | None) -> None:
            signs = mix.kind(i) in ("rsa", "ecdsa")  # signatures are kept to verify
            value: Any = error if error is not None else (
                result if signs else digest(result))
            with lock:
                counts[i] += 1
                if counts[i] > 1:
                    duplicates.append(i)
                    return
                outcome[i] = value
                progress["done"] += 1
                if progress["done"] == N:
                    all_done.set()
        return done

    feeder_error: list[BaseException] = []

    def feed() -> None:
        try:
            deadline = time.monotonic() + DEADLINE
            i = 0
            pending: list[Job] = []
            while i < N or pending:
                assert time.monotonic() < deadline, "feeder: the pool stopped accepting"
                while len(pending) < BURST and i < N:
                    pending.append((mix.request(i), completion(i)))
                    i += 1
                accepted = engine.submit(pending)
                del pending[:accepted]
                if pending and not accepted:
                    engine.wait_for_space(0.2)
        except BaseException as e:  # reported by the main thread
            feeder_error.append(e)

    feeder = threading.Thread(target=feed, name="feeder", daemon=True)
    feeder.start()
    deadline = time.monotonic() + DEADLINE
    kills: list[int] = []
    try:
        for fraction in KILL_AT:
            while progress["done"] < fraction * N:
                assert time.monotonic() < deadline, f"stuck at {progress['done']} of {N}"
                assert not feeder_error, feeder_error
                time.sleep(0.005)
            victim = engine.workers[len(kills) % 2]
            assert victim not in kills
            # Stopped first, so that it surely dies holding jobs (an idle worker's death
            # tests nothing): the feeder keeps filling its free slots meanwhile.
            os.kill(victim, signal.SIGSTOP)
            time.sleep(0.05)  # replies it sent before stopping reach its reader first
            while engine.inflight_by_worker().get(victim, 0) == 0:
                assert time.monotonic() < deadline, "the stopped worker got no work"
                time.sleep(0.002)
            os.kill(victim, signal.SIGKILL)
            kills.append(victim)
            seen_pids.update(engine.workers)
        while not all_done.wait(0.1):
            assert time.monotonic() < deadline, f"stuck at {progress['done']} of {N}"
            assert not feeder_error, feeder_error
            seen_pids.update(engine.workers)
        feeder.join(DEADLINE)
        assert not feeder.is_alive() and not feeder_error, feeder_error
        elapsed = time.monotonic() - t_start
        counters = engine.counters()
    finally:
        seen_pids.update(engine.workers)
        engine.close()

    time.sleep(0.2)  # a late second completion would land here
    assert duplicates == [], f"completed twice: {duplicates[:10]}"
    assert counts == [1] * N
    errors = [(i, v) for i, v in enumerate(outcome) if isinstance(v, BaseException)]
    assert errors == [], errors[:5]
    for i in range(N):
        mix.check(i, outcome[i])

    assert counters["failovers"] == 2 and counters["respawns"] == 2, counters
    assert counters["deaths"] == 2 and counters["failed"] == 0, counters
    assert counters["retries"] >= 1, counters
    ours = {p.pid for p in multiprocessing.active_children()} & seen_pids
    assert ours == set(), ours
    deadline = time.monotonic() + 5
    while not all(gone(p) for p in seen_pids):
        assert time.monotonic() < deadline, "a worker outlived close()"
        time.sleep(0.01)
    assert shm_entries() <= shm_before
    print(f"\n{N} requests in {elapsed:.1f} s, counters {counters}")
