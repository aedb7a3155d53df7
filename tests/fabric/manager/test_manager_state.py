"""The manager's state in the database, on SQLite and on PostgreSQL: admission against
capacity x overcommit, release, revoke, renew, leases lapsing (with a clock the tests
move), grants moved off dead servers, events to the other manager, tenant isolation,
and an older store upgrading."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from statekit import Clock, ask, check_books, live_quota_sum, reg, sql, total

from cryptoplane.exceptions import InvalidRequest
from cryptoplane.fabric.errors import KeyNotFound, QuotaRefused
from cryptoplane.fabric.keystore import SCHEMA_VERSION, Keystore, backend
from cryptoplane.fabric.manager.protocol import Heartbeat
from cryptoplane.fabric.manager.state import FabricState

Opener = Callable[..., FabricState]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def open_state(keystore_url: str, clock: Clock) -> Iterator[Opener]:
    """Opens managers on the test's database: each its own store (connections) and
    FabricState, all on the one clock; closed at the end."""
    opened: list[tuple[FabricState, Keystore]] = []

    def opener(**kwargs: Any) -> FabricState:
        store = backend(keystore_url)
        kwargs.setdefault("clock", clock)
        state = FabricState(store, **kwargs)
        opened.append((state, store))
        return state
    yield opener
    for state, store in opened:
        state.close()
        store.close()


@pytest.fixture
def state(open_state: Opener) -> FabricState:
    return open_state(lease_seconds=10.0)


def _wait_for(events: list[dict[str, Any]], pred: Callable[[dict[str, Any]], bool],
              timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in list(events):
            if pred(e):
                return e
        time.sleep(0.01)
    raise AssertionError(f"no such event in {events}")


def test_admission_up_to_capacity_times_overcommit(open_state: Opener, keystore_url: str,
                                                   clock: Clock) -> None:
    state = open_state(overcommit=1.5)
    state.register(reg("a", rsa2048=600))
    state.register(reg("b", rsa2048=400))  # C = 1,000 signs/s; with 1.5: 1,500
    grants = [state.admit("t1", ask(rsa2048=400)) for _ in range(3)]
    assert all(sum(s.rates["rsa2048"]["ops"] for s in g.servers) == pytest.approx(400)
               for g in grants)
    with pytest.raises(QuotaRefused) as refused:
        state.admit("t1", ask(rsa2048=500))
    assert refused.value.left == {"rsa2048": {"ops": 300.0, "bytes": 0.0}}
    assert "rsa2048: asked 500 ops/s, 300 left" in str(refused.value)
    g = state.admit("t2", ask(rsa2048=300))  # exactly what is left fits
    with pytest.raises(QuotaRefused) as refused:
        state.admit("t2", ask(rsa2048=1))
    assert refused.value.left == {"rsa2048": {"ops": 0.0, "bytes": 0.0}}
    # a class no server offers: refused, nothing left
    with pytest.raises(QuotaRefused) as refused:
        state.admit("t2", ask(ed25519=1))
    assert refused.value.left == {"ed25519": {"ops": 0.0, "bytes": 0.0}}
    assert state.refusals == 3
    assert total([live_quota_sum(keystore_url, clock())], "rsa2048") == 1500
    # releasing frees its share
    state.release("t2", g.grant_id)
    state.release("t2", g.grant_id)  # again: nothing more
    state.admit("t2", ask(rsa2048=300))
    check_books(keystore_url)
    st = state.status()
    assert st["capacity"]["rsa2048"]["ops"] == 1000
    assert st["granted"]["rsa2048"]["ops"] == pytest.approx(1500)
    assert st["left"]["rsa2048"]["ops"] == pytest.approx(0)
    assert {s["server_id"] for s in st["servers"]} == {"a", "b"}
    assert len(st["grants"]) == 4 and st["refusals"] == 3


def test_bytes_are_admitted_and_placed_like_ops(state: FabricState, keystore_url: str) -> None:
    state.register(reg("a", aead=(1e5, 1e9), rsa2048=100))
    state.register(reg("b", aead=(1e5, 3e9)))
    g = state.admit("t", ask(aead=(1000, 2e9)))
    assert {s.server_id for s in g.servers} == {"a", "b"}
    assert total([s.rates for s in g.servers], "aead", "bytes") == pytest.approx(2e9)
    # shares follow free room: b has three times a's bytes/s
    by = {s.server_id: s.rates["aead"]["bytes"] for s in g.servers}
    assert by["b"] == pytest.approx(3 * by["a"])
    with pytest.raises(QuotaRefused) as refused:
        state.admit("t", ask(aead=(10, 2.5e9)))
    assert refused.value.left == {"aead": {"ops": 199_000.0, "bytes": 2e9}}
    # both classes at once: only a offers both
    g2 = state.admit("t", ask(aead=(10, 1e6), rsa2048=50))
    assert [s.server_id for s in g2.servers] == ["a"]
    check_books(keystore_url)


def test_fail_over_puts_the_whole_rate_on_two_servers(state: FabricState) -> None:
    for sid in "abc":
        state.register(reg(sid, ecdsa_p256=1000))
    g = state.admit("t", ask(ecdsa_p256=300, mode="fail-over", spread=1))
    assert len(g.servers) == 2
    assert all(s.rates["ecdsa-p256"]["ops"] == 300 for s in g.servers)
    # counted once against the pool: 2,700 of 3,000 is still grantable
    state.admit("t", ask(ecdsa_p256=2700))


def test_tenants_do_not_see_each_others_grants(state: FabricState) -> None:
    state.register(reg("a", rsa2048=100))
    g = state.admit("acme", ask(rsa2048=10))
    for call in (lambda: state.renew("evil", g.grant_id),
                 lambda: state.release("evil", g.grant_id),
                 lambda: state.renew("evil", "g-nosuch"),
                 lambda: state.release("acme", "g-nosuch")):
        with pytest.raises(KeyNotFound) as e:
            call()
        assert str(e.value) == "grant not found"
    assert [x.grant_id for x in state.list_grants("acme")] == [g.grant_id]
    assert state.list_grants("evil") == []
    assert state.get_grant(g.grant_id) is not None  # still live: evil changed nothing
    assert [x["grant_id"] for x in state.status(tenant="evil")["grants"]] == []


def test_revoke_frees_the_share_and_tells_the_servers(state: FabricState, clock: Clock,
                                                      keystore_url: str) -> None:
    events: list[dict[str, Any]] = []
    state.subscribe(events.append)
    state.register(reg("a", rsa2048=100))
    state.register(reg("b", rsa2048=100))
    g = state.admit("t", ask(rsa2048=200))
    before = clock()
    clock.advance(1)
    revoked = state.revoke(g.grant_id)
    assert revoked is not None and revoked.grant_id == g.grant_id
    assert state.revoke("g-nosuch") is None
    assert state.revoked_for("a", before) == [g.grant_id]
    assert state.revoked_for("b", before) == [g.grant_id]
    assert state.revoked_for("c", before) == []
    assert state.revoked_for("a", clock()) == []  # already known at that time
    with pytest.raises(KeyNotFound):
        state.renew("t", g.grant_id)
    assert state.get_grant(g.grant_id) is None and state.list_grants() == []
    state.admit("t", ask(rsa2048=200))  # its room is free again
    _wait_for(events, lambda e: e == {"event": "revoked", "grant_id": g.grant_id})
    check_books(keystore_url)


def test_renew_extends_and_expiry_ends(open_state: Opener, clock: Clock,
                                       keystore_url: str) -> None:
    state = open_state(lease_seconds=100.0)
    state.register(reg("a", rsa2048=100))
    g = state.admit("t", ask(rsa2048=100, ttl=30))
    assert g.expires_at == clock() + 30
    clock.advance(20)
    state.heartbeat(Heartbeat("a", {}))
    renewed = state.renew("t", g.grant_id)
    assert renewed.expires_at == clock() + 30 and renewed.grant_id == g.grant_id
    assert renewed.servers == g.servers
    clock.advance(29)
    state.heartbeat(Heartbeat("a", {}))
    with pytest.raises(QuotaRefused):  # still live: the pool is full
        state.admit("t", ask(rsa2048=1))
    clock.advance(2)  # expired now: not renewable, and its room is free
    state.heartbeat(Heartbeat("a", {}))
    with pytest.raises(KeyNotFound):
        state.renew("t", g.grant_id)
    assert state.get_grant(g.grant_id) is None
    state.admit("t", ask(rsa2048=100, ttl=300))
    check_books(keystore_url)
    clock.advance(31)  # one ttl after its expiry the row goes
    state.heartbeat(Heartbeat("a", {}))
    report = state.expire()
    assert report.expired_grants == [g.grant_id]
    assert sql(keystore_url, "SELECT COUNT(*) FROM fabric_grants WHERE grant_id = ?",
               g.grant_id) == [(0,)]


def test_heartbeats_keep_the_lease(state: FabricState, clock: Clock) -> None:
    state.register(reg("a", rsa2048=100))
    assert not state.heartbeat(Heartbeat("nosuch", {}))
    for _ in range(5):
        clock.advance(6)
        assert state.heartbeat(Heartbeat("a", {"rsa2048": {"ops": 42.0, "bytes": 0.0}}, 3))
        assert state.expire().removed_servers == []
    [row] = state.servers()
    assert row.load["rsa2048"]["ops"] == 42 and row.inflight == 3
    assert row.lease_age == 0 and row.lease_expires == clock() + 10
    clock.advance(11)
    assert not state.heartbeat(Heartbeat("a", {}))  # lapsed: register again
    state.register(reg("a", rsa2048=100))
    assert state.heartbeat(Heartbeat("a", {}))


def test_lapsed_servers_grants_move_and_the_other_manager_hears(
        open_state: Opener, clock: Clock, keystore_url: str) -> None:
    a = open_state(manager_id="m1")
    b = open_state(manager_id="m2")
    pg = keystore_url.startswith("postgres")
    heard: list[dict[str, Any]] = []
    # PostgreSQL: the other manager hears through NOTIFY; SQLite is one process's
    (b if pg else a).subscribe(heard.append)
    for sid in ("s1", "s2", "s3", "s4"):
        a.register(reg(sid, rsa2048=1000))
    grants = [a.admit(f"t{i % 2}", ask(rsa2048=300, spread=2)) for i in range(8)]
    on_s1 = [g for g in grants if "s1" in {s.server_id for s in g.servers}]
    assert on_s1
    clock.advance(6)
    for sid in ("s2", "s3", "s4"):
        b.heartbeat(Heartbeat(sid, {}))
    clock.advance(5)  # s1's lease lapsed
    assert {s["server_id"] for s in a.status()["servers"]} == {"s1", "s2", "s3", "s4"}
    report = a.expire()
    assert report.leader and report.removed_servers == ["s1"]
    assert {g.grant_id for g in report.moved} == {g.grant_id for g in on_s1}
    for g in report.moved:
        assert "s1" not in {s.server_id for s in g.servers}
        assert total([s.rates for s in g.servers], "rsa2048") == pytest.approx(300)
        again = b.get_grant(g.grant_id)
        assert again is not None and again.servers == g.servers
    for g in on_s1:
        _wait_for(heard, lambda e, g=g: e == {"event": "moved", "grant_id": g.grant_id})
    assert all(s.server_id != "s1" for g in b.list_grants() for s in g.servers)
    assert len(b.list_grants()) == 8
    check_books(keystore_url)
    # the pool shrank to 3,000 with 2,400 granted
    with pytest.raises(QuotaRefused) as refused:
        b.admit("t0", ask(rsa2048=700))
    assert refused.value.left["rsa2048"]["ops"] == pytest.approx(600)


def test_a_grant_with_no_server_left_waits_for_one(state: FabricState, clock: Clock,
                                                  keystore_url: str) -> None:
    state.register(reg("a", rsa2048=100))
    g = state.admit("t", ask(rsa2048=50, ttl=120))
    clock.advance(11)
    report = state.expire()
    assert report.removed_servers == ["a"] and report.moved[0].servers == []
    with pytest.raises(QuotaRefused):
        state.renew("t", g.grant_id)
    state.register(reg("b", rsa2048=100))
    renewed = state.renew("t", g.grant_id)
    assert [s.server_id for s in renewed.servers] == ["b"]
    assert renewed.servers[0].rates["rsa2048"]["ops"] == 50
    check_books(keystore_url)


def test_leave_moves_at_once(state: FabricState, keystore_url: str) -> None:
    state.register(reg("a", hmac=(1000, 1e8)))
    state.register(reg("b", hmac=(1000, 1e8)))
    g = state.admit("t", ask(hmac=(500, 1e6)))
    assert len(g.servers) == 2
    moved = state.leave("a")
    assert [m.grant_id for m in moved] == [g.grant_id]
    assert [s.server_id for s in moved[0].servers] == ["b"]
    assert moved[0].servers[0].rates["hmac"] == {"ops": 500, "bytes": 1e6}
    assert state.leave("a") == []
    check_books(keystore_url)


def test_grants_move_in_priority_order(state: FabricState, keystore_url: str) -> None:
    """When a server leaves, the highest-priority grant is placed first, on the freest
    server left."""
    state.register(reg("a", rsa2048=1000))
    low = state.admit("t", replace(ask(rsa2048=400, spread=1), priority=0))
    high = state.admit("t", replace(ask(rsa2048=400, spread=1), priority=7))
    state.register(reg("b", rsa2048=500))
    state.register(reg("c", rsa2048=400))
    moved = {g.grant_id: g for g in state.leave("a")}
    assert [s.server_id for s in moved[high.grant_id].servers] == ["b"]
    assert [s.server_id for s in moved[low.grant_id].servers] == ["c"]
    check_books(keystore_url)


def test_signing_keys_are_shared(open_state: Opener) -> None:
    a, b = open_state(), open_state()
    a.publish_signing_key("k1", "AAAA")
    a.publish_signing_key("k1", "AAAA")
    b.publish_signing_key("k2", "BBBB")
    assert a.signing_keys() == b.signing_keys() == {"k1": "AAAA", "k2": "BBBB"}


def test_concurrent_admissions_never_over_admit(open_state: Opener, clock: Clock,
                                                keystore_url: str) -> None:
    managers = [open_state(manager_id=f"m{i}", overcommit=1.2) for i in range(2)]
    for i in range(4):
        managers[0].register(reg(f"s{i}", rsa2048=250, aead=(1000, 1e9)))
    # 1,200 rsa2048 grantable: 8 threads x 40 asks of 7 ops/s (280 each) want 2,240
    admitted = []
    refused = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(state: FabricState, k: int) -> None:
        try:
            for j in range(40):
                q = ask(rsa2048=7) if j % 4 else ask(rsa2048=7, aead=(5, 1e6))
                try:
                    g = state.admit(f"t{k}", q)
                    with lock:
                        admitted.append(g)
                except QuotaRefused:
                    with lock:
                        refused.append(1)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(managers[k % 2], k)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(admitted) + len(refused) == 320
    in_db = live_quota_sum(keystore_url, clock())
    assert in_db["rsa2048"]["ops"] <= 1200 + 1e-6
    assert in_db["rsa2048"]["ops"] == pytest.approx(7 * len(admitted))
    assert len(admitted) == 1200 // 7  # filled to what fits, not less
    check_books(keystore_url)


def test_an_older_store_upgrades(keystore_url: str, clock: Clock) -> None:
    with backend(keystore_url) as old:
        assert old.migrate(target=3) == 3
    assert sql(keystore_url, "SELECT version FROM schema_version") == [(3,)]
    with backend(keystore_url) as store:
        state = FabricState(store, clock=clock)
        try:
            assert store.schema_version() == SCHEMA_VERSION >= 4
            state.register(reg("a", rsa2048=10))
            assert state.admit("t", ask(rsa2048=10)).servers[0].server_id == "a"
        finally:
            state.close()


def test_heartbeats_carry_the_load_per_tenant(state: FabricState, clock: Clock) -> None:
    state.register(reg("a", aead=(1000, 1e6)))
    state.register(reg("b", aead=(1000, 1e6)))
    aead = lambda ops, nbytes=0.0: {"aead": {"ops": ops, "bytes": nbytes}}  # noqa: E731
    assert state.heartbeat(Heartbeat("a", aead(30.0, 3000.0), tenants={
        "t1": aead(10.0, 1000.0), "t2": aead(20.0, 2000.0)}))
    assert state.heartbeat(Heartbeat("b", aead(5.0), tenants={"t1": aead(5.0)}))
    rows = {s.server_id: s for s in state.servers()}
    assert rows["a"].tenant_load == {"t1": aead(10.0, 1000.0), "t2": aead(20.0, 2000.0)}
    assert rows["b"].tenant_load == {"t1": aead(5.0)}
    status = state.status()
    assert status["used_by_tenant"] == {"t1": aead(15.0, 1000.0), "t2": aead(20.0, 2000.0)}
    assert {s["server_id"]: s["tenant_load"] for s in status["servers"]}["b"] == {
        "t1": aead(5.0)}
    # a tenant sees its own use only
    mine = state.status("t2")
    assert mine["used_by_tenant"] == {"t2": aead(20.0, 2000.0)}
    assert [s["tenant_load"] for s in mine["servers"]] == [{"t2": aead(20.0, 2000.0)}, {}]
    # the next beat replaces the last; a lapsed server counts no more
    assert state.heartbeat(Heartbeat("a", {}))
    assert state.status()["used_by_tenant"] == {"t1": aead(5.0)}
    clock.advance(6)
    assert state.heartbeat(Heartbeat("a", aead(1.0), tenants={"t2": aead(1.0)}))
    clock.advance(5)  # b's lease (10 s) lapsed, not yet removed
    assert state.status()["used_by_tenant"] == {"t2": aead(1.0)}
    # registering again starts from nothing
    state.register(reg("a", aead=(1000, 1e6)))
    assert {s.server_id: s.tenant_load for s in state.servers()}["a"] == {}


def test_a_version_4_store_upgrades(keystore_url: str, clock: Clock) -> None:
    with backend(keystore_url) as old:
        assert old.migrate(target=4) == 4
    sql(keystore_url, "INSERT INTO fabric_servers (server_id, address, capacity, load, "
        "inflight, registered_at, heartbeat_at, lease_expires, manager) VALUES "
        "('a', 'tcp://a.test:7000', '{}', '{}', 0, ?, ?, ?, 'm')", clock(), clock(),
        clock() + 10)
    with backend(keystore_url) as store:
        state = FabricState(store, clock=clock)
        try:
            assert store.schema_version() == SCHEMA_VERSION >= 5
            [row] = state.servers()
            assert row.server_id == "a" and row.tenant_load == {}
            assert state.heartbeat(Heartbeat("a", {}, tenants={"t": {"rsa2048": {
                "ops": 1.0, "bytes": 0.0}}}))
            assert state.status()["used_by_tenant"] == {"t": {"rsa2048": {
                "ops": 1.0, "bytes": 0.0}}}
        finally:
            state.close()


_RATE = {"aead": {"ops": 1.0, "bytes": 2.0}}


@pytest.mark.parametrize("tenants", [
    [], "t", {"": _RATE}, {"x" * 129: _RATE}, {"t": []}, {"t": {"nosuch": {"ops": 1}}},
    {"t": {"aead": {"ops": -1}}}, {"t": {"aead": {"ops": float("nan")}}},
    {"t": {"aead": {"ops": True}}}, {"t": {"aead": {"cpu": 1}}},
    {f"t{i}": _RATE for i in range(1025)},
])
def test_heartbeat_tenants_are_checked(tenants: Any) -> None:
    with pytest.raises(InvalidRequest):
        Heartbeat.from_json({"server_id": "a", "load": {}, "tenants": tenants})


def test_heartbeat_tenants_round_trip() -> None:
    many = {f"t{i}": _RATE for i in range(1023)}
    beat = Heartbeat.from_json({"server_id": "a", "tenants": many | {"x" * 128: {}}})
    assert beat.tenants["t7"] == _RATE and beat.tenants["x" * 128] == {}
    assert Heartbeat.from_json(beat.to_json()) == beat
    assert Heartbeat.from_json({"server_id": "a"}).tenants == {}  # optional
