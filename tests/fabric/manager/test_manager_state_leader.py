"""Several managers on one PostgreSQL: one expires leases at a time (advisory lock),
listeners come back after losing their connection; placement's arithmetic; and the
manager's message parsers given arbitrary JSON."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from statekit import Clock, ask, reg

from cryptoplane.exceptions import InvalidRequest
from cryptoplane.fabric.keystore import backend
from cryptoplane.fabric.manager import placement as pl
from cryptoplane.fabric.manager.protocol import Heartbeat, QuotaRequest, Registration
from cryptoplane.fabric.manager.state import ExpiryReport, FabricState


class _BlockingClock(Clock):
    """Blocks the first thread that reads it until ``release`` (so that a leader holds
    its lock while the other manager tries)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.blocking = False

    def __call__(self) -> float:
        if self.blocking and not self.entered.is_set():
            self.entered.set()
            self.release.wait(10)
        return super().__call__()


def test_one_manager_expires_at_a_time(pg_dsn: str) -> None:
    clock = _BlockingClock()
    stores = [backend(pg_dsn) for _ in range(2)]
    managers = [FabricState(s, clock=clock, manager_id=f"m{i}")
                for i, s in enumerate(stores)]
    try:
        managers[0].register(reg("dead", rsa2048=10))
        managers[0].admit("t", ask(rsa2048=5))
        managers[0].register(reg("live", rsa2048=10))
        clock.advance(6)
        assert managers[0].heartbeat(Heartbeat("live", {}))
        clock.advance(5)
        reports: dict[int, ExpiryReport] = {}
        clock.blocking = True
        # the first reads the clock only once it holds the lock, and waits there
        first = threading.Thread(target=lambda: reports.__setitem__(0, managers[0].expire()))
        first.start()
        assert clock.entered.wait(10)
        second = threading.Thread(target=lambda: reports.__setitem__(1, managers[1].expire()))
        second.start()
        second.join(10)
        clock.release.set()
        first.join(10)
        assert reports[1] == ExpiryReport(leader=False)
        assert reports[0].leader and reports[0].removed_servers == ["dead"]
        assert [s.server_id for g in reports[0].moved for s in g.servers] == ["live"]
        # once the leader committed, anyone may lead the next round (nothing to do)
        again = managers[1].expire()
        assert again.leader and again.removed_servers == []
    finally:
        for m in managers:
            m.close()
        for s in stores:
            s.close()


def test_a_listener_reconnects_and_says_resync(pg_dsn: str) -> None:
    stores = [backend(pg_dsn) for _ in range(2)]
    a, b = (FabricState(s) for s in stores)
    heard: list[dict[str, Any]] = []
    try:
        b.subscribe(heard.append)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            n = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                             "query LIKE 'LISTEN %'").fetchall()
        assert n == [(True,)]
        deadline = time.monotonic() + 10
        while {"event": "resync"} not in heard and time.monotonic() < deadline:
            time.sleep(0.02)
        assert {"event": "resync"} in heard
        # and it listens again
        while True:
            a.register(reg("s", rsa2048=1))
            if {"event": "servers"} in heard or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert {"event": "servers"} in heard
    finally:
        a.close()
        b.close()
        for s in stores:
            s.close()


# -- placement ------------------------------------------------------------------------


def _cands(**free: float) -> list[pl.Candidate]:
    return [pl.Candidate(sid, f"tcp://{sid}:1", cap={"rsa2048": [1000.0, 0.0]},
                         placed={"rsa2048": [1000.0 - f, 0.0]}) for sid, f in free.items()]


def test_spread_prefers_room_and_splits_by_it() -> None:
    shares = pl.place(ask(rsa2048=300).quota, "spread", 2, _cands(a=100, b=600, c=300), 1.0)
    got = {c.server_id: r["rsa2048"]["ops"] for c, r in shares}
    assert got == {"b": pytest.approx(200), "c": pytest.approx(100)}


def test_a_full_server_gets_no_zero_share() -> None:
    shares = pl.place(ask(rsa2048=300).quota, "spread", 3, _cands(a=0, b=600, c=300), 1.0)
    assert {c.server_id for c, _ in shares} == {"b", "c"}
    # nothing has room: an even split, never a share of 0
    shares = pl.place(ask(rsa2048=300).quota, "spread", 2, _cands(a=0, b=0), 1.0)
    assert [r["rsa2048"]["ops"] for _, r in shares] == [150, 150]


def test_fail_over_takes_two_even_when_asked_for_one() -> None:
    shares = pl.place(ask(rsa2048=300).quota, "fail-over", 1, _cands(a=10, b=20, c=30), 1.0)
    assert [(c.server_id, r["rsa2048"]["ops"]) for c, r in shares] == [("c", 300), ("b", 300)]
    only = pl.place(ask(rsa2048=300).quota, "fail-over", 3, _cands(a=10), 1.0)
    assert len(only) == 1


def test_a_moved_grant_keeps_its_surviving_server() -> None:
    shares = pl.place(ask(rsa2048=100).quota, "spread", 2, _cands(a=10, b=900, c=800), 1.0,
                      prefer={"a"})
    assert [c.server_id for c, _ in shares] == ["a", "b"]


# -- the parsers ------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
_keys = st.sampled_from(["quota", "priority", "ttl", "label", "spread", "mode", "server_id",
                         "address", "capacity", "rsa2048", "aead", "ops", "bytes"])
_near = st.recursive(
    _json | st.sampled_from(["rsa2048", "aead", "spread", "fail-over", "tcp://h:1"]),
    lambda inner: st.dictionaries(_keys | st.text(max_size=4), inner, max_size=5),
    max_leaves=16)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_keys | st.text(max_size=6), _near, max_size=6))
def test_parsers_raise_only_invalid_request(obj: dict[str, Any]) -> None:
    for parse in (QuotaRequest.from_json, Registration.from_json):
        with contextlib.suppress(InvalidRequest):
            parse(obj)
