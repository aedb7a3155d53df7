"""A real ``cryptoplane server --manager`` under a real ``cryptoplane manager``: it
registers its capacity, heartbeats carry its load, the grants the manager signs are
enforced, a revocation reaches open connections, and SIGTERM takes it out of the pool at
once."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grantkit import ServerProcess, hello_with
from serverwire import message

from cryptoplane.exceptions import Busy
from cryptoplane.fabric.capacity import CLASSES
from cryptoplane.fabric.codec import Field, Op, Status
from cryptoplane.fabric.manager.client import ManagerClient
from cryptoplane.fabric.manager.protocol import QuotaRequest

_MANAGER_TESTS = str(Path(__file__).resolve().parent.parent / "manager")
if _MANAGER_TESTS not in sys.path:
    sys.path.insert(0, _MANAGER_TESTS)

from managerkit import start_manager, tokens  # noqa: E402


def _call(url: str, token: str, fn: Callable[[ManagerClient], Any]) -> Any:
    """``fn(client)`` on a fresh manager client; BUSY (a manager on SQLite finding its
    database locked by the servers' heartbeats: the call did not run) is retried, for
    at most 5 s."""
    async def run() -> Any:
        client = await ManagerClient.connect(url, token=token, timeout=5.0)
        try:
            deadline = time.monotonic() + 5.0
            while True:
                try:
                    return await fn(client)
                except Busy:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)
        finally:
            await client.close()
    return asyncio.run(run())


def _server(status: dict[str, Any], server_id: str) -> dict[str, Any] | None:
    return next((s for s in status["servers"] if s["server_id"] == server_id), None)


def _until(what: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got:
            return got
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_server_joins_serves_grants_and_leaves(tmp_path: Path) -> None:
    store = f"sqlite://{tmp_path / 'manager.db'}"
    toks = tokens(store)
    m = start_manager(store, tmp_path, lease=2.0)
    try:
        status = lambda: _call(m.url, toks["admin"], lambda c: c.status())  # noqa: E731
        # one server measures its capacity, the other declares it
        s1 = ServerProcess(tmp_path, "--manager", m.manager_url, "--manager-token",
                           toks["server"], tenants=("a",), server_id="s1")
        s2 = ServerProcess(tmp_path, "--manager", m.url, "--capacity",
                           "rsa2048=400,aead=10000:1e6", tenants=("a",), server_id="s2",
                           env={"CRYPTOPLANE_MANAGER_TOKEN": toks["server"]})
        try:
            st = _until(lambda: (lambda x: x if _server(x, "s1") and _server(x, "s2")
                                 else None)(status()))
            one, two = _server(st, "s1"), _server(st, "s2")
            assert one is not None and two is not None
            assert one["address"] == s1.address
            assert set(one["capacity"]) == set(CLASSES)
            assert all(v["ops"] > 0 for v in one["capacity"].values())
            assert two["capacity"] == {"rsa2048": {"ops": 400.0, "bytes": 0.0},
                                       "aead": {"ops": 10000.0, "bytes": 1e6}}
            # a grant from the manager, enforced by the server it names
            answer = _call(m.url, toks["a"], lambda c: c.request_grant(QuotaRequest(
                quota={"rsa2048": {"ops": 50.0, "bytes": 0.0}}, spread=1,
                mode="fail-over")))
            assert answer.grant is not None
            target = next(s for s in (s1, s2)
                          if s.address == answer.grant.servers[0].address)
            sid = "s1" if target is s1 else "s2"
            w, welcome = hello_with(target.port, target.tokens["a"], grant=answer.token)
            with w:
                assert welcome.status == 0, message_of(welcome)
                st_key, d = w.json(Op.KEY_CREATE, b"rsa", {"type": "rsa-2048"})
                assert st_key == 0, d
                ok = throttled = 0
                end = time.monotonic() + 1.0
                while time.monotonic() < end:
                    code, _ = w.call(Op.SIGN, b"rsa", {Field.DATA: b"m"})
                    ok += code == 0
                    throttled += code == Status.THROTTLED
                assert ok <= 50 * 1.05 + 2 and throttled > 0, (ok, throttled)
                # the heartbeats carry the load served under grants, per class and per
                # tenant (a beat reports its interval: the traffic goes on meanwhile)
                def used() -> bool:
                    w.call(Op.SIGN, b"rsa", {Field.DATA: b"m"})
                    st = status()
                    return bool(((_server(st, sid) or {}).get("load", {})
                                 .get("rsa2048", {}).get("ops", 0)) > 0 and st[
                        "used_by_tenant"].get("a", {}).get("rsa2048", {}).get("ops", 0) > 0)
                _until(used)

                def exported() -> bool:
                    w.call(Op.SIGN, b"rsa", {Field.DATA: b"m"})
                    code, text = m.get("/metrics")
                    assert code == 200
                    return _used_by_tenant(text, "a", "rsa2048") > 0
                _until(exported)
                # a revocation reaches the open connection at the next heartbeat
                _call(m.url, toks["admin"], lambda c: c.revoke(answer.grant.grant_id))

                def refused() -> bool:
                    code, f = w.call(Op.SIGN, b"rsa", {Field.DATA: b"m"})
                    if code == Status.THROTTLED:
                        return False
                    assert code in (0, Status.UNAUTHORIZED), code
                    return code == Status.UNAUTHORIZED and "revoked" in message(f)
                _until(refused, timeout=5.0)
            metrics = s1.metrics()
            assert "cryptoplane_fabric_manager_reachable 1.0" in metrics
            assert "cryptoplane_fabric_manager_registered 1.0" in metrics
            # SIGTERM: the server leaves before draining; gone from the pool at once
            # (well before its 2 s lease could lapse)
            assert s2.stop() == 0
            assert "left the manager's pool" in s2.log()
            left = status()
            assert _server(left, "s2") is None and _server(left, "s1") is not None
        finally:
            s1.stop()
            s2.stop()
    finally:
        m.stop()


def _used_by_tenant(metrics: str, tenant: str, cls: str) -> float:
    """The manager's ``used_by_tenant`` ops/s for ``tenant`` and ``cls`` (0: none)."""
    want = (f'cryptoplane_manager_used_by_tenant{{class="{cls}",measure="ops",'
            f'tenant="{tenant}"}} ')
    for line in metrics.splitlines():
        if line.startswith(want):
            return float(line[len(want):])
    return 0.0


def message_of(frame: Any) -> str:
    from cryptoplane.fabric import codec as C

    return message(C.decode_fields(frame.payload))


def test_manager_later_and_a_lapsed_lease(tmp_path: Path) -> None:
    """A server whose manager is not up yet serves anyway and registers once it is; a
    server whose lease lapsed (stopped past it) registers again when it comes back."""
    import signal
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = f"sqlite://{tmp_path / 'manager.db'}"
    toks = tokens(store)
    srv = ServerProcess(tmp_path, "--manager", f"manager://127.0.0.1:{port}",
                        "--manager-token", toks["server"], "--capacity", "aead=1000:1e6",
                        "--grants", "optional", tenants=("a",))
    try:
        with srv:
            w, welcome = hello_with(srv.port, srv.tokens["a"])
            with w:
                assert welcome.status == 0
                assert w.json(Op.KEY_LIST)[0] == 0
            # a call to no manager fails after its timeout: said once, then retried
            _until(lambda: "the manager does not answer" in srv.log(), timeout=15.0)
            assert "cryptoplane_fabric_manager_reachable 0.0" in srv.metrics()
            m = start_manager(store, tmp_path, lease=2.0, listen=f"tcp://127.0.0.1:{port}")
            try:
                def registered() -> dict[str, Any] | None:
                    st = _call(m.url, toks["admin"], lambda c: c.status())
                    return _server(st, "s1")
                _until(registered, timeout=15.0)
                assert srv.log().count("the manager does not answer") == 1
                # stopped past its lease: removed; back, it registers again
                srv.proc.send_signal(signal.SIGSTOP)
                try:
                    _until(lambda: registered() is None, timeout=10.0)
                finally:
                    srv.proc.send_signal(signal.SIGCONT)
                _until(registered, timeout=10.0)
                assert "registering again" in srv.log()
            finally:
                m.stop()
    finally:
        srv.stop()
