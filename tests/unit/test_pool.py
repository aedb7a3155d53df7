"""The pool engine: same answers as inline, typed errors across the process boundary,
shared-memory transport, backpressure, failover, and a clean close."""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support import gone, shm_entries

import cryptoplane as cp
from cryptoplane import requests as rq
from cryptoplane.engines import REGISTRY, Health, Job
from cryptoplane.engines.pool import PoolEngine
from cryptoplane.keys import Key

NONCE = bytes(range(12))


def children(pids: list[int]) -> list[int]:
    """Which of ``pids`` multiprocessing still counts as our live children."""
    return [p.pid for p in multiprocessing.active_children() if p.pid in pids]


class Box:
    """Completions, counted per job: a second completion is an error in itself."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.results: dict[int, list[tuple[Any, BaseException | None]]] = {}
        self.event = threading.Event()
        self.expect = 0

    def job(self, i: int, request: rq.Request) -> Job:
        def done(result: Any, error: BaseException | None) -> None:
            with self.lock:
                self.results.setdefault(i, []).append((result, error))
                if len(self.results) >= self.expect:
                    self.event.set()
        return request, done

    def wait(self, n: int, timeout: float = 30.0) -> None:
        with self.lock:
            self.expect = n
            self.event.clear()
            if len(self.results) >= n:
                self.event.set()
        assert self.event.wait(timeout), f"only {len(self.results)} of {n} completed"


def submit_all(engine: PoolEngine, jobs: list[Job], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while jobs:
        n = engine.submit(jobs)
        jobs = jobs[n:]
        if jobs:
            assert time.monotonic() < deadline, "the pool stopped accepting work"
            engine.wait_for_space(0.5)


@pytest.fixture(scope="module")
def pool() -> Iterator[PoolEngine]:
    engine = PoolEngine(workers=2)
    engine.start()  # the known answers run in the workers
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def keys() -> dict[str, Key]:
    names = ["aes-256-gcm", "chacha20-poly1305", "aes-128-ctr", "aes-256-cbc", "aes-256-xts",
             "hmac-sha256", "hkdf-sha256", "rsa-pss-sha256", "rsa-pkcs1v15-sha256",
             "rsa-oaep-sha256", "ecdsa-p256-sha256", "ed25519", "x25519"]
    return {n: Key.generate(n) for n in names}


def test_registered_and_self_tested(pool: PoolEngine) -> None:
    assert REGISTRY["pool"] is PoolEngine
    assert pool.health is Health.OK
    failed = {n: r.detail for n, r in pool.self_tests.items() if not r.passed}
    assert not failed
    assert len(pool.workers) == 2 and all(not gone(pid) for pid in pool.workers)
    assert pool.capacity == 2 * pool.slots


def deterministic(k: dict[str, Key]) -> list[rq.Request]:
    xts_unit = bytes(range(256)) * 2
    sectors = os.urandom(8 * 4096)
    return [
        rq.Encrypt(k["aes-256-gcm"], b"a" * 1000, nonce=NONCE, aad=b"hdr"),
        rq.Encrypt(k["aes-256-gcm"], memoryview(bytearray(b"view" * 100)), nonce=NONCE),
        rq.Encrypt(k["aes-256-gcm"], b"", nonce=NONCE),
        rq.Encrypt(k["chacha20-poly1305"], os.urandom(70_000), nonce=NONCE),
        rq.Encrypt(k["aes-128-ctr"], os.urandom(100), nonce=bytes(16)),
        rq.Encrypt(k["aes-256-cbc"], b"seventeen bytes!!", nonce=bytes(16), padding=True),
        rq.Encrypt(k["aes-256-xts"], xts_unit, nonce=bytes(16)),
        rq.Digest("sha256", b"abc" * 1000),
        rq.Digest("blake2b", bytearray(b"xyz")),
        rq.Mac(k["hmac-sha256"], b"message"),
        rq.Mac(k["hmac-sha256"], b"message", tag_size=16),
        rq.Derive(k["hkdf-sha256"], length=42, salt=b"salt", info=b"info"),
        rq.Derive(k["x25519"], k["x25519"].public_key()),
        rq.Derive(k["x25519"], Key.generate("x25519").public_key().export_raw()),
        rq.Sign(k["rsa-pkcs1v15-sha256"], b"deterministic"),
        rq.Sign(k["ed25519"], b"deterministic"),
        rq.EncryptSectors(k["aes-256-xts"], sectors, sector=7),
        rq.DecryptSectors(k["aes-256-xts"], sectors, sector=2**40, sector_size=512,
                          tweak="plain64be"),
    ]


def test_deterministic_outputs_match_inline(pool: PoolEngine, keys: dict[str, Key]) -> None:
    for request in deterministic(keys):
        want = request.apply(request.kernel())
        got = pool.run_one(request)
        assert type(got) is bytes, request
        assert got == want, request


def test_inverse_operations_round_trip(pool: PoolEngine, keys: dict[str, Key]) -> None:
    gcm = keys["aes-256-gcm"]
    ct = gcm.kernel().encrypt(b"secret payload", NONCE, b"aad")
    assert pool.run_one(rq.Decrypt(gcm, ct, nonce=NONCE, aad=b"aad")) == b"secret payload"
    cbc = keys["aes-256-cbc"]
    ct = cbc.kernel().encrypt(b"pad me", bytes(16), None, True)
    assert pool.run_one(rq.Decrypt(cbc, ct, nonce=bytes(16), padding=True)) == b"pad me"
    mac = keys["hmac-sha256"]
    assert pool.run_one(rq.VerifyMac(mac, b"m", mac.kernel().mac(b"m"))) is None
    oaep = keys["rsa-oaep-sha256"]
    ct = pool.run_one(rq.Encrypt(oaep.public_key(), b"wrapped key", aad=b"label"))
    assert oaep.kernel().decrypt(ct, None, b"label") == b"wrapped key"
    ct = oaep.public_key().kernel().encrypt(b"the other way", None, None)
    assert pool.run_one(rq.Decrypt(oaep, ct)) == b"the other way"


@pytest.mark.parametrize("name", ["rsa-pss-sha256", "ecdsa-p256-sha256", "ed25519"])
def test_signatures_verify(pool: PoolEngine, keys: dict[str, Key], name: str) -> None:
    key = keys[name]
    sig = pool.run_one(rq.Sign(key, b"message"))
    key.public_key().kernel().verify(b"message", sig)  # inline check of the pool's work
    inline_sig = key.kernel().sign(b"message")
    assert pool.run_one(rq.Verify(key.public_key(), b"message", inline_sig)) is None


def test_random(pool: PoolEngine) -> None:
    a, b = pool.run_one(rq.Random(64)), pool.run_one(rq.Random(64))
    assert len(a) == 64 and a != b
    assert pool.run_one(rq.Random(0)) == b""


def same_error(pool: PoolEngine, request: rq.Request, kind: type[BaseException]) -> None:
    with pytest.raises(kind) as inline:
        request.apply(request.kernel())
    with pytest.raises(kind) as pooled:
        pool.run_one(request)
    assert type(pooled.value) is type(inline.value)
    assert str(pooled.value) == str(inline.value)


def test_typed_errors_cross_the_process_boundary(pool: PoolEngine,
                                                 keys: dict[str, Key]) -> None:
    gcm = keys["aes-256-gcm"]
    ct = bytearray(gcm.kernel().encrypt(b"x" * 64, NONCE, None))
    ct[3] ^= 1
    same_error(pool, rq.Decrypt(gcm, ct, nonce=NONCE), cp.AuthenticationFailed)
    mac = keys["hmac-sha256"]
    same_error(pool, rq.VerifyMac(mac, b"m", bytes(32)), cp.AuthenticationFailed)
    for name in ("rsa-pss-sha256", "ecdsa-p256-sha256", "ed25519"):
        pub = keys[name].public_key()
        bad = pool.run_one(rq.Sign(keys[name], b"other message"))
        same_error(pool, rq.Verify(pub, b"message", bad), cp.InvalidSignature)
    same_error(pool, rq.Encrypt(keys["aes-256-cbc"], b"x" * 15, nonce=bytes(16)),
               cp.InvalidRequest)
    same_error(pool, rq.Encrypt(keys["aes-128-ctr"], b"x", nonce=bytes(16), aad=b"no"),
               cp.InvalidRequest)
    same_error(pool, rq.Derive(keys["hkdf-sha256"], length=10**6), cp.InvalidRequest)
    same_error(pool, rq.Derive(keys["hkdf-sha256"], keys["x25519"], length=8),
               cp.InvalidRequest)
    same_error(pool, rq.Derive(keys["x25519"], keys["x25519"]), cp.KeyRejected)
    same_error(pool, rq.Derive(keys["x25519"], bytes(32)), cp.KeyRejected)


def test_errors_carry_no_key_material(pool: PoolEngine, keys: dict[str, Key]) -> None:
    gcm = keys["aes-256-gcm"]
    with pytest.raises(cp.AuthenticationFailed) as info:
        pool.run_one(rq.Decrypt(gcm, bytes(32), nonce=NONCE))
    text = repr(info.value) + str(info.value.args)
    assert gcm.export_raw().hex() not in text and repr(gcm.export_raw()) not in text


def test_out_buffers_are_written(pool: PoolEngine, keys: dict[str, Key]) -> None:
    xts = keys["aes-256-xts"]
    plain = os.urandom(16 * 4096)
    want = xts.kernel().encrypt_sectors(plain, 100, 4096)
    out = bytearray(len(plain))
    got = pool.run_one(rq.EncryptSectors(xts, plain, sector=100, out=out))
    assert got is out and bytes(out) == want
    # in place, the way a block device does it
    buf = bytearray(plain)
    assert pool.run_one(rq.EncryptSectors(xts, buf, sector=100, out=buf)) is buf
    assert bytes(buf) == want
    view = memoryview(buf)
    assert pool.run_one(rq.DecryptSectors(xts, view, sector=100, out=view)) is view
    assert bytes(buf) == plain
    # an out the kernel refuses: the inline engine's very error
    same_error(pool, rq.EncryptSectors(xts, plain, out=bytearray(10)), cp.InvalidRequest)
    same_error(pool, rq.EncryptSectors(xts, plain, out=bytes(len(plain))), cp.InvalidRequest)


def test_max_request_is_declared_and_refused() -> None:
    engine = PoolEngine(workers=1, slots=2, slot_size=64 * 1024)
    try:
        engine.start(self_test=False)
        key = Key.generate("aes-256-gcm")
        assert engine.capabilities["aes-256-gcm"].max_request == 64 * 1024
        assert engine.can_serve(rq.Encrypt(key, bytes(64 * 1024), nonce=NONCE))
        assert not engine.can_serve(rq.Encrypt(key, bytes(64 * 1024 + 1), nonce=NONCE))
        assert not engine.can_serve(rq.Random(64 * 1024 + 1))
    finally:
        engine.close()


def test_backpressure_and_close_with_jobs_in_flight() -> None:
    before = shm_entries()
    engine = PoolEngine(workers=1, slots=2)
    engine.start(self_test=False)
    key = Key.generate("aes-256-gcm")
    box = Box()
    jobs = [box.job(i, rq.Encrypt(key, b"x" * 100, nonce=NONCE)) for i in range(5)]
    (pid,) = engine.workers
    os.kill(pid, signal.SIGSTOP)  # a busy worker: nothing completes until SIGCONT
    try:
        assert engine.submit(jobs) == 2
        assert engine.inflight == 2
        assert engine.submit(jobs[2:]) == 0
        assert not engine.wait_for_space(0.05)
    finally:
        os.kill(pid, signal.SIGCONT)
    box.wait(2)
    assert engine.wait_for_space(5.0)
    assert engine.submit(jobs[2:4]) == 2
    box.wait(4)
    os.kill(pid, signal.SIGSTOP)
    try:
        assert engine.submit(jobs[4:]) == 1
        engine.close()  # the stopped worker is killed; its job fails, exactly once
    finally:
        if not gone(pid):
            os.kill(pid, signal.SIGCONT)
    assert all(len(v) == 1 for v in box.results.values()) and len(box.results) == 5
    result, error = box.results[4][0]
    assert isinstance(error, cp.EngineFailed) and result is None
    want = key.kernel().encrypt(b"x" * 100, NONCE, None)
    assert all(box.results[i][0] == (want, None) for i in range(4))
    assert engine.submit(jobs) == 0 and not engine.can_serve(jobs[0][0])
    assert children([pid]) == []
    assert gone(pid)
    assert shm_entries() <= before


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def stopped_worker_with_jobs(engine: PoolEngine, box: Box, n: int,
                             key: Key) -> tuple[int, list[Job]]:
    (pid,) = engine.workers
    os.kill(pid, signal.SIGSTOP)
    jobs = [box.job(i, rq.Encrypt(key, os.urandom(1000), nonce=NONCE)) for i in range(n)]
    assert engine.submit(jobs) == n
    return pid, jobs


def test_failover_reruns_jobs_on_a_new_worker() -> None:
    engine = PoolEngine(workers=1, slots=4)
    try:
        engine.start(self_test=False)
        key = Key.generate("aes-256-gcm")
        box = Box()
        pid, jobs = stopped_worker_with_jobs(engine, box, 4, key)
        os.kill(pid, signal.SIGKILL)
        box.wait(4)
        for i, (request, _) in enumerate(jobs):
            assert box.results[i] == [(request.apply(request.kernel()), None)]
        c = engine.counters()
        assert (c["deaths"], c["failovers"], c["respawns"], c["retries"]) == (1, 1, 1, 4)
        wait_until(lambda: len(engine.workers) == 1)
        assert engine.workers != [pid] and engine.health is Health.OK
        assert engine.run_one(rq.Random(8)) != bytes(8)  # the new worker serves
    finally:
        pids = engine.workers
        engine.close()
    assert children([pid, *pids]) == []


def test_attempts_are_capped() -> None:
    engine = PoolEngine(workers=1, slots=2, max_attempts=1)
    try:
        engine.start(self_test=False)
        box = Box()
        pid, _ = stopped_worker_with_jobs(engine, box, 2, Key.generate("aes-256-gcm"))
        os.kill(pid, signal.SIGKILL)
        box.wait(2)
        assert all(isinstance(v[0][1], cp.EngineFailed) for v in box.results.values())
        assert engine.counters()["failed"] == 2
    finally:
        engine.close()


def test_death_storm_breaks_the_engine_and_hands_off() -> None:
    engine = PoolEngine(workers=1, slots=2, storm=(2, 60.0))
    handed: list[Job] = []
    engine.on_broken = handed.extend
    try:
        engine.start(self_test=False)
        key = Key.generate("aes-256-gcm")
        box = Box()
        pid, _ = stopped_worker_with_jobs(engine, box, 2, key)
        os.kill(pid, signal.SIGKILL)
        box.wait(2)  # first death: re-run on the replacement
        wait_until(lambda: len(engine.workers) == 1)
        box2 = Box()
        pid, jobs = stopped_worker_with_jobs(engine, box2, 2, key)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: engine.health is Health.BROKEN and len(handed) == 2)
        assert [r for r, _ in handed] == [r for r, _ in jobs] and not box2.results
        assert engine.counters()["handed_off"] == 2
        assert engine.submit(jobs) == 0 and not engine.can_serve(jobs[0][0])
    finally:
        pids = engine.workers
        engine.close()
    assert children([pid, *pids]) == []


def test_dead_keys_are_dropped_from_workers(pool: PoolEngine) -> None:
    key = Key.generate("aes-256-gcm")
    pool.run_one(rq.Encrypt(key, b"x", nonce=NONCE))
    kid = pool._key_ids[id(key)]
    assert any(kid in w.keys for w in pool._workers)
    del key
    gc.collect()
    pool.run_one(rq.Random(1))  # the next submit tells the workers
    assert not any(kid in w.keys for w in pool._workers)


def test_close_leaves_no_process_and_no_segment() -> None:
    before = shm_entries()
    engine = PoolEngine(workers=2)
    engine.start(self_test=False)
    pids = engine.workers
    assert len(shm_entries() - before) == 2
    key = Key.generate("ecdsa-p256-sha256")
    box = Box()
    submit_all(engine, [box.job(i, rq.Sign(key, b"m")) for i in range(50)])
    box.wait(50)
    engine.close()
    engine.close()  # idempotent
    assert children(pids) == []
    wait_until(lambda: all(gone(p) for p in pids))
    assert shm_entries() <= before


def descriptors() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_open_close_leaves_no_descriptors() -> None:
    """Each worker's sentinel pipes are closed by close(), not left to the garbage
    collector (disabled here, so a leak shows up as descriptors that stay open)."""
    with cp.Plane(engines=["inline", "pool"]):
        pass  # the forkserver and its pipes start once per process: not counted
    gc.collect()
    gc.disable()
    try:
        before = descriptors()
        for _ in range(3):
            with cp.Plane(engines=["inline", "pool"]) as plane:
                plane.run(rq.Random(8))
        engine = PoolEngine(workers=1, slots=2)
        engine.start(self_test=False)
        pid = engine.workers[0]
        os.kill(pid, signal.SIGKILL)  # a respawn: the dead worker's pipes go too
        wait_until(lambda: len(engine.workers) == 1 and engine.workers != [pid])
        engine.close()
        after = descriptors()
    finally:
        gc.enable()
    assert after - before == set(), {fd: os.readlink(f"/proc/self/fd/{fd}")
                                     for fd in after - before
                                     if os.path.exists(f"/proc/self/fd/{fd}")}
