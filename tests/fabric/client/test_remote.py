"""The remote engine against the real server: its results equal the inline engine's byte
for byte for deterministic operations (AES-GCM and ChaCha20-Poly1305 with a given nonce,
HMAC, Ed25519, RSA PKCS#1 v1.5), randomised signatures verify locally, failures raise
the local exception classes, and a dead server's work goes back to the scheduler."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from realserver import RealServer

import cryptoplane as cp
from cryptoplane.engines.base import Health
from cryptoplane.fabric import Client
from cryptoplane.fabric.errors import Unauthorized


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealServer]:
    with RealServer(tmp_path_factory.mktemp("srv")) as s:
        yield s


@pytest.fixture(scope="module")
def planes(server: RealServer) -> Iterator[tuple[cp.Plane, cp.Plane, cp.Remote]]:
    remote = cp.Remote(server.url, token=server.token())
    with cp.Plane(engines=["inline", remote]) as plane, cp.Plane(engines=["inline"]) as local:
        yield plane, local, remote


def test_self_tests_pass_through_the_server(planes: tuple[cp.Plane, cp.Plane, cp.Remote]
                                            ) -> None:
    _, _, remote = planes
    assert remote.health is Health.OK
    assert remote.self_tests and all(r.passed for r in remote.self_tests.values())
    assert "aes-256-gcm" in remote.capabilities and "rsa-pss-sha256" in remote.capabilities
    info = remote.describe()
    assert info["traits"]["local"] is False and info["tenant"] == "acme"


def test_deterministic_results_equal_inline_byte_for_byte(
        planes: tuple[cp.Plane, cp.Plane, cp.Remote]) -> None:
    plane, local, remote = planes
    nonce = os.urandom(12)
    cases: list[tuple[cp.Key, list[cp.Request]]] = []
    for alg in ("aes-128-gcm", "aes-256-gcm", "chacha20-poly1305"):
        k = cp.Key.generate(alg)
        cases.append((k, [cp.Encrypt(k, b"x" * n, nonce=nonce, aad=b"hdr")
                          for n in (0, 1, 64, 5000)]))
    h = cp.Key.generate("hmac-sha256")
    cases.append((h, [cp.Mac(h, b"data"), cp.Mac(h, b"data", tag_size=16)]))
    ed = cp.Key.generate("ed25519")
    cases.append((ed, [cp.Sign(ed, b"m%d" % i) for i in range(5)]))
    rsa = cp.Key.generate("rsa-pkcs1v15-sha256")
    cases.append((rsa, [cp.Sign(rsa, b"m")]))
    for key, reqs in cases:
        plane.session(key, engine=remote.name)
        for r in reqs:
            assert plane.run(r) == local.run(r), r
    before = remote.counters()["sent"]
    key = cases[0][0]
    many = [cp.Encrypt(key, b"%d" % i, nonce=nonce) for i in range(2000)]
    assert plane.map(many) == local.map(many)
    assert remote.counters()["sent"] - before >= 2000


def test_randomised_signatures_verify_locally_and_failures_are_typed(
        planes: tuple[cp.Plane, cp.Plane, cp.Remote]) -> None:
    plane, local, remote = planes
    for alg in ("rsa-pss-sha256", "ecdsa-p256-sha256", "ecdsa-p384-sha384"):
        k = cp.Key.generate(alg)
        pub = k.public_key()
        plane.session(k, engine=remote.name)
        plane.session(pub, engine=remote.name)
        sig = plane.run(cp.Sign(k, b"msg"))
        local.verify(pub, b"msg", sig)
        plane.run(cp.Verify(pub, b"msg", sig))  # verified remotely too
        with pytest.raises(cp.InvalidSignature):
            plane.run(cp.Verify(pub, b"other", sig))
    g = cp.Key.generate("aes-256-gcm")
    plane.session(g, engine=remote.name)
    nonce = bytes(12)
    ct = bytearray(plane.run(cp.Encrypt(g, b"secret", nonce=nonce)))
    assert plane.run(cp.Decrypt(g, bytes(ct), nonce=nonce)) == b"secret"
    ct[0] ^= 1
    with pytest.raises(cp.AuthenticationFailed):
        plane.run(cp.Decrypt(g, bytes(ct), nonce=nonce))
    h = cp.Key.generate("hmac-sha512")
    plane.session(h, engine=remote.name)
    tag = plane.run(cp.Mac(h, b"d"))
    plane.run(cp.VerifyMac(h, b"d", tag))
    with pytest.raises(cp.AuthenticationFailed):
        plane.run(cp.VerifyMac(h, b"e", tag))


def test_the_meter_learns_the_remote_rate(planes: tuple[cp.Plane, cp.Plane, cp.Remote]
                                          ) -> None:
    _, _, remote = planes
    rates = remote.meter.rates()
    assert any(k.startswith("aes-") for k in rates)


def test_unreachable_server_leaves_the_engine_broken_and_the_plane_working() -> None:
    remote = cp.Remote("tcp://127.0.0.1:1", connect_timeout=1.0)
    with cp.Plane(engines=["inline", remote]) as plane:
        assert remote.health is Health.BROKEN
        k = cp.Key.generate("aes-256-gcm")
        assert plane.encrypt(k, b"x", nonce=bytes(12))


def test_a_refused_token_raises(server: RealServer) -> None:
    with pytest.raises(Unauthorized):
        cp.Plane(engines=["inline", cp.Remote(server.url, token="cpt_0000000000000000_x")])


def test_a_dead_server_hands_safe_work_back_and_the_engine_heals(tmp_path: Path) -> None:
    srv = RealServer(tmp_path).start()
    remote = cp.Remote(srv.url, token=srv.token(), connect_timeout=5)
    try:
        with cp.Plane(engines=["threads", remote]) as plane:
            k = cp.Key.generate("rsa-pkcs1v15-sha256")
            want = plane.run(cp.Sign(k, b"m"))
            futs = [plane.submit(cp.Sign(k, b"m")) for _ in range(300)]
            port = srv.port
            srv.stop(0.0)
            assert all(f.result(30) == want for f in futs)  # every one ends, correctly
            deadline = time.monotonic() + 5
            while remote.health is not Health.BROKEN and time.monotonic() < deadline:
                time.sleep(0.01)
            assert remote.health is Health.BROKEN
            assert plane.run(cp.Sign(k, b"m")) == want  # the threads engine serves it
            srv.port = port
            srv.start()
            deadline = time.monotonic() + 10
            while remote.health is not Health.OK and time.monotonic() < deadline:
                time.sleep(0.02)
            assert remote.health is Health.OK
            assert remote.counters()["reconnects"] >= 1
    finally:
        srv.close()


def test_throttled_jobs_go_back_to_the_scheduler_at_once(server: RealServer) -> None:
    token = server.token("tiny")
    with Client(server.url, token=server.token()) as admin:
        admin.set_tenant_limits("tiny", ops=2)
    remote = cp.Remote(server.url, token=token)
    try:
        remote.start(self_test=False)
        key = cp.Key.generate("hmac-sha256")
        outcomes: list[tuple[object, BaseException | None]] = []
        done = threading.Event()

        def complete(result: object, error: BaseException | None) -> None:
            outcomes.append((result, error))
            if len(outcomes) == 50:
                done.set()

        t0 = time.monotonic()
        remote.submit([(cp.Mac(key, b"%d" % i), complete) for i in range(50)])
        assert done.wait(10)
        assert time.monotonic() - t0 < 5  # not held until a 30 s deadline
        refused = [e for _, e in outcomes if e is not None]
        assert refused and all(type(e) is cp.EngineFailed for e in refused)
        assert remote.inflight == 0
    finally:
        remote.close()
        with Client(server.url, token=server.token()) as admin:
            admin.set_tenant_limits("tiny", ops=0)


def test_jobs_handed_over_one_at_a_time_while_many_are_in_flight_all_end(
        planes: tuple[cp.Plane, cp.Plane, cp.Remote]) -> None:
    """With WAKE_BELOW or more on the wire a submit does not wake the engine's loop: the
    next answer's turn sends what queued meanwhile. Every job must still be sent and end
    once, and the engine's count of jobs in flight must come back to zero."""
    from cryptoplane.fabric.remote import WAKE_BELOW

    _, _, remote = planes
    key = cp.Key.generate("hmac-sha256")
    n = WAKE_BELOW * 20
    ended: list[tuple[int, object, BaseException | None]] = []
    all_done = threading.Event()
    lock = threading.Lock()

    def done_for(i: int) -> Callable[[object, BaseException | None], None]:
        def done(result: object, error: BaseException | None) -> None:
            with lock:
                ended.append((i, result, error))
                if len(ended) == n:
                    all_done.set()
        return done

    for i in range(n):  # one job per submit, as a dispatcher hands over a trickle
        assert remote.submit([(cp.Mac(key, b"%d" % i), done_for(i))]) == 1
    assert all_done.wait(30), f"{n - len(ended)} of {n} jobs never ended"
    assert sorted(i for i, _, _ in ended) == list(range(n))
    assert all(e is None for _, _, e in ended)
    local = cp.Plane(engines=["inline"])
    try:
        assert all(r == local.run(cp.Mac(key, b"%d" % i)) for i, r, _ in ended)
    finally:
        local.close()
    deadline = time.monotonic() + 5
    while remote.inflight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert remote.inflight == 0
