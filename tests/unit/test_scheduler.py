"""The slow path through a real plane: chains, priorities, QoS, timeouts, cancellation,
backpressure, binding and statistics (threads engine; the pool has its own tests)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import cryptoplane as cp
from cryptoplane.engines.base import Engine, Job
from cryptoplane.requests import Request
from cryptoplane.scheduler import core
from cryptoplane.scheduler import router as router_module

NONCE = bytes(12)


@pytest.fixture()
def plane() -> Iterator[cp.Plane]:
    with cp.Plane() as p:
        yield p


def test_chain_encrypt_then_hmac_equals_by_hand(plane: cp.Plane) -> None:
    key, mkey = cp.Key.generate("aes-256-gcm"), cp.Key.generate("hmac-sha256")
    data = os.urandom(100_000)  # big enough to leave the caller's thread
    chain = cp.Chain(cp.Encrypt(key, data, nonce=NONCE), lambda ct: cp.Mac(mkey, ct))
    ct, tag = plane.run(chain)
    assert ct == AESGCM(key.export_raw()).encrypt(NONCE, data, None)
    h = hmac.HMAC(mkey.export_raw(), hashes.SHA256())
    h.update(ct)
    assert tag == h.finalize()
    assert plane.submit(chain).result(timeout=10) == (ct, tag)


def test_chain_hash_then_sign(plane: cp.Plane) -> None:
    signer = cp.Key.generate("ecdsa-p256-sha256")
    msg = os.urandom(5000)
    digest, sig = plane.run(cp.Chain(cp.Digest("sha256", msg), lambda d: cp.Sign(signer, d)))
    h = hashes.Hash(hashes.SHA256())
    h.update(msg)
    assert digest == h.finalize()
    plane.verify(signer.public_key(), digest, sig)


def test_chain_failure_is_the_steps_own_error(plane: cp.Plane) -> None:
    key = cp.Key.generate("aes-256-gcm")
    bad = cp.Chain(cp.Decrypt(key, b"\0" * 40, nonce=NONCE), lambda pt: cp.Digest("sha256", pt))
    with pytest.raises(cp.AuthenticationFailed) as exc:
        plane.run(bad)
    assert "step 1 of 2" in " ".join(exc.value.__notes__)
    verifier = cp.Key.generate("ed25519").public_key()
    second = cp.Chain(cp.Digest("sha256", b"m"), lambda d: cp.Verify(verifier, d, bytes(64)))
    with pytest.raises(cp.InvalidSignature) as exc2:
        plane.submit(second).result(timeout=10)
    assert "step 2 of 2" in " ".join(exc2.value.__notes__)
    third = cp.Chain(cp.Digest("sha256", b"m"), lambda d: cp.Sign(verifier, d))
    with pytest.raises(cp.KeyRejected):  # the step could not even be made
        plane.run(third)
    with pytest.raises(cp.InvalidRequest):
        cp.Chain(b"not a request")  # type: ignore[arg-type]


class GateEngine(Engine):
    """A one-lane engine that holds every job until released: makes queueing exact."""

    name = "gate"
    priority = 10
    parallelism = 1
    capacity = 1

    def __init__(self) -> None:
        super().__init__(algorithms=[cp.lookup("hmac-sha256")])
        self.release = threading.Semaphore(0)
        self.order: list[bytes] = []
        self._inflight = 0
        self._threads: list[threading.Thread] = []

    @property
    def inflight(self) -> int:
        return self._inflight

    def submit(self, jobs: Any) -> int:
        accepted = jobs[: self.capacity - self._inflight]
        for request, done in accepted:
            self._inflight += 1
            t = threading.Thread(target=self._work, args=(request, done), daemon=True)
            self._threads.append(t)
            t.start()
        return len(accepted)

    def _work(self, request: Request, done: Any) -> None:
        if self.started:
            self.release.acquire()
        self.order.append(bytes(request.data[:1]))  # type: ignore[attr-defined]
        result = request.apply(request.kernel())
        self._inflight -= 1
        done(result, None)
        if self.started:
            self.answered += 1  # after done() returned: the scheduler has taken it

    answered = 0

    started = False

    def start(self, *, self_test: bool = True) -> None:
        super().start(self_test=self_test)
        self.order.clear()  # the known-answer runs are not part of any test's order
        self.started = True


def test_priority_order_and_bulk_progress() -> None:
    gate = GateEngine()
    with cp.Plane(engines=[gate]) as plane:
        key = cp.Key.generate("hmac-sha256")
        futures = [plane.submit(cp.Mac(key, b"B%d" % i), priority="bulk") for i in range(20)]
        wait_for(lambda: gate.inflight == 1, "gave the first bulk job to the gate")
        futures += [plane.submit(cp.Mac(key, b"H%d" % i), priority="high") for i in range(20)]
        for _ in range(40):
            gate.release.release()
        for f in futures:
            f.result(timeout=10)
        order = b"".join(gate.order).decode()
        assert order[0] == "B"  # already in the engine when high work arrived
        first_high = order.index("H")
        assert first_high == 1
        # high work overtakes the queued bulk, but bulk still gets one turn in 9
        assert order[1:10].count("B") <= 1 and "B" in order[1:20]


class FakeTime:
    """A clock that moves only when told to (or when the plane sleeps on it): QoS
    schedules are checked exactly, whatever the load on the machine."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:  # the router's QoS wait for a sync call
        self.slept.append(seconds)
        self.now += seconds

    perf_counter = staticmethod(time.perf_counter)
    thread_time = staticmethod(time.thread_time)


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.005)


def test_qos_ops_limit_admits_on_schedule() -> None:
    """200 ops/s with a burst of 20 (a tenth of a second): at clock time t exactly
    min(600, 20 + 200 t) requests have run, never one more, and all of them in the end."""
    clock = FakeTime()
    with cp.Plane(clock=clock.monotonic) as plane:
        key = cp.Key.generate("ecdsa-p256-sha256")
        plane.limit(client="tenant-a", ops=200)
        futures = [plane.submit(cp.Sign(key, b"m"), client="tenant-a") for _ in range(600)]
        start = clock.now

        def done() -> int:
            return sum(f.done() for f in futures)

        for step in range(13):  # 0, 0.25, ... 3.0 s
            clock.now = start + step * 0.25
            allowed = min(600, 20 + 50 * step)
            wait_for(lambda allowed=allowed: done() >= allowed,
                     f"ran {allowed} requests by t={step * 0.25}")
            time.sleep(0.02)  # room for a wrong early start to show
            assert done() == allowed, (step, done())
        for f in futures:
            f.result(timeout=30)
        st = plane.stats()
        assert st["limits"]["tenant-a"]["ops_per_s"] == 200
        assert st["clients"]["tenant-a"]["requests"] == 600


def test_qos_limit_changes_live_and_applies_to_sync_calls(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A limited sync call leaves the fast path and sleeps off its debt: 30 calls at 50/s
    with a burst of 5 wait exactly 25/50 s in all, no more, no less."""
    clock = FakeTime()
    monkeypatch.setattr(router_module, "time", clock)
    with cp.Plane(engines=["inline"], clock=clock.monotonic) as plane:
        key = cp.Key.generate("aes-128-gcm")
        s = plane.session(key, client="tenant-b")
        assert s.fast_plane is plane
        plane.limit(client="tenant-b", ops=50)
        assert s.fast_plane is None  # the fast path neither waits nor queues
        for _ in range(30):  # 5 from the burst, 25 at 50/s
            plane.encrypt(key, b"x", nonce=NONCE)
        assert len(clock.slept) == 25 and sum(clock.slept) == pytest.approx(0.5)
        assert all(w == pytest.approx(0.02) for w in clock.slept), clock.slept
        plane.limit(client="tenant-b", ops=0)
        assert s.fast_plane is plane
        plane.encrypt(key, b"x", nonce=NONCE)
        assert len(clock.slept) == 25  # lifted: no more waiting
        with pytest.raises(cp.InvalidRequest):
            plane.limit(client="x", session=s, ops=1)
        with pytest.raises(cp.InvalidRequest):
            plane.limit(client="x", ops=-1)


def test_session_limit_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """1.5 MB at 1 MB/s with a 0.1 MB burst: 1.4 s of waiting in all, exactly."""
    clock = FakeTime()
    monkeypatch.setattr(router_module, "time", clock)
    with cp.Plane(engines=["inline"], clock=clock.monotonic) as plane:
        key = cp.Key.generate("aes-128-gcm")
        s = plane.session(key)
        plane.limit(session=s, bytes=1_000_000)
        for _ in range(30):
            plane.encrypt(key, bytes(50_000), nonce=NONCE)
        assert sum(clock.slept) == pytest.approx(1.4)
        assert len(clock.slept) == 28  # the first two fit the burst


def test_timeout_and_cancel_and_busy() -> None:
    gate = GateEngine()
    with cp.Plane(engines=[gate], max_queued=3) as plane:
        key = cp.Key.generate("hmac-sha256")
        first = plane.submit(cp.Mac(key, b"1"))  # held in the engine
        wait_for(lambda: gate.inflight == 1, "gave the first job to the gate")
        queued = [plane.submit(cp.Mac(key, b"%d" % i)) for i in range(2)]
        timed = plane.submit(cp.Mac(key, b"t"), timeout=0.1)
        with pytest.raises(cp.Busy):
            plane.submit(cp.Mac(key, b"x"), block=False)
        with pytest.raises(cp.Timeout):
            timed.result(timeout=5)
        assert queued[1].cancel()
        for _ in range(10):
            gate.release.release()
        assert first.result(timeout=5) and queued[0].result(timeout=5)
        deadline = time.monotonic() + 5  # the cancelled one is dropped when its turn comes
        while plane.stats()["scheduler"]["cancelled"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        st = plane.stats()["scheduler"]
        assert st["timeouts"] == 1 and st["busy"] == 1 and st["cancelled"] == 1
        assert st["submitted"] == 4


def test_inflight_timeout_finishes_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine answers after the request timed out: the answer is dropped, not
    delivered again (every delivery is seen, even one the future itself would ignore)."""
    settled: list[tuple[Future[Any], Any, BaseException | None]] = []
    real = core._settle

    def settle(future: Future[Any], result: Any, error: BaseException | None) -> None:
        settled.append((future, result, error))
        real(future, result, error)

    monkeypatch.setattr(core, "_settle", settle)
    gate = GateEngine()
    with cp.Plane(engines=[gate]) as plane:
        key = cp.Key.generate("hmac-sha256")
        fut = plane.submit(cp.Mac(key, b"slow"), timeout=0.1)
        with pytest.raises(cp.Timeout):
            fut.result(timeout=5)
        gate.release.release()  # the late answer must be dropped, not delivered twice
        wait_for(lambda: gate.answered == 1, "answered")  # the scheduler has had it
        mine = [(r, e) for f, r, e in settled if f is fut]
        assert len(mine) == 1 and isinstance(mine[0][1], cp.Timeout), mine
        assert isinstance(fut.exception(), cp.Timeout)
        st = plane.stats()
        assert st["scheduler"]["timeouts"] == 1 and st["scheduler"]["completed"] == 0
        assert st["engines"]["gate"]["requests"] == 0


def test_binding_and_capabilities(plane: cp.Plane) -> None:
    key = cp.Key.generate("ecdsa-p256-sha256")
    plane.session(key, engine="threads", priority="high")
    sig = plane.run(cp.Sign(key, b"m"))
    plane.verify(key, b"m", sig)
    assert plane.stats()["engines"]["threads"]["requests"] >= 2


def test_close_fails_queued_work_once() -> None:
    gate = GateEngine()
    plane = cp.Plane(engines=[gate])
    key = cp.Key.generate("hmac-sha256")
    held = plane.submit(cp.Mac(key, b"held"))
    wait_for(lambda: gate.inflight == 1, "gave the held job to the gate")
    queued = [plane.submit(cp.Mac(key, b"q")) for _ in range(3)]
    closer = threading.Thread(target=plane.close)
    closer.start()
    for f in queued:
        with pytest.raises(cp.EngineFailed):
            f.result(timeout=5)
    gate.release.release()
    closer.join(5)
    assert held.result(timeout=5)
    with pytest.raises(cp.InvalidRequest, match="closed"):
        plane.submit(cp.Mac(key, b"late"))


def test_map_uses_the_callers_thread_and_keeps_order(plane: cp.Plane) -> None:
    signer = cp.Key.generate("rsa-pss-sha256")
    reqs = [cp.Sign(signer, b"%d" % i) for i in range(40)]
    sigs = plane.map(reqs)
    for i, sig in enumerate(sigs):
        plane.verify(signer, b"%d" % i, sig)
    st = plane.stats()["engines"]
    assert st["threads"]["requests"] + st["inline"]["requests"] >= 40


def test_latency_and_queue_stats(plane: cp.Plane) -> None:
    signer = cp.Key.generate("ed25519")
    plane.session(signer, engine="threads")  # queued work on a known engine
    futures: list[Future[Any]] = [plane.submit(cp.Sign(signer, b"m")) for _ in range(50)]
    for f in futures:
        f.result(timeout=10)
    st = plane.stats()
    lat = st["latency"]["threads/ed25519/sign"]
    assert lat["count"] == 50 and 0 < lat["p50"] <= lat["p99"] <= lat["max"] * 1.3
    assert set(st["queues"]) == {"high", "normal", "bulk", "delayed"}
    assert st["scheduler"]["policy"] == "least-completion"


def test_unknown_policy() -> None:
    with pytest.raises(cp.NotSupported, match="unknown policy"):
        cp.Plane(policy="fastest")
    with cp.Plane(policy="round-robin") as p:
        assert p.stats()["scheduler"]["policy"] == "round-robin"


def test_engine_failure_rehashes_to_another_engine() -> None:
    class Broken(Engine):
        name = "broken"
        priority = 200  # tried first while nothing is measured yet
        capacity = 100

        def submit(self, jobs: Any) -> int:
            # a device that dies with the work in hand: hands it back for rehash
            assert self.on_broken is not None
            self.on_broken(list(jobs))
            return len(jobs)

    with cp.Plane(engines=["inline", Broken(), "threads"], self_test=False) as plane:
        # RSA: slow enough to be queued once measured (quick work stays inline)
        signer = cp.Key.generate("rsa-pss-sha256")
        plane.session(signer, engine=None)
        futures = [plane.submit(cp.Sign(signer, b"%d" % i)) for i in range(30)]
        for i, f in enumerate(futures):
            plane.verify(signer, b"%d" % i, f.result(timeout=10))
        assert plane.stats()["scheduler"]["failovers"] >= 1


def test_failed_job_list_type() -> None:
    job: Job = (cp.Random(1), lambda r, e: None)
    assert isinstance(job[0], cp.Request)
