"""The manager as a real ``cryptoplane manager`` process on loopback, over SQLite and the
tests' own PostgreSQL: registration, heartbeats, grants and their tokens, refusals,
scopes, revocation, lapsed leases pushing EVENTs, restarts, metrics."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from managerkit import start_manager, tokens

from cryptoplane.exceptions import InvalidRequest
from cryptoplane.fabric import codec as C
from cryptoplane.fabric.capability import public_key_from_b64, verify_grant
from cryptoplane.fabric.codec import Op
from cryptoplane.fabric.errors import (
    ConnectionLost,
    Forbidden,
    KeyNotFound,
    QuotaRefused,
    Unauthorized,
)
from cryptoplane.fabric.manager.app import open_state_store
from cryptoplane.fabric.manager.client import ManagerClient
from cryptoplane.fabric.manager.protocol import Heartbeat, QuotaRequest, Registration

RSA = "rsa2048"


def reg(server_id: str, ops: float = 1000.0, port: int = 9) -> Registration:
    return Registration(server_id, f"tcp://127.0.0.1:{port}",
                        {RSA: {"ops": ops, "bytes": 0.0}, "aead": {"ops": 1e5, "bytes": 1e9}})


def ask(ops: float, **kw: Any) -> QuotaRequest:
    return QuotaRequest({RSA: {"ops": ops, "bytes": 0.0}}, **kw)


def pipelined(sock: socket.socket, token: str | None) -> list[C.Frame]:
    """HELLO and a FABRIC_STATUS request in one write, before any WELCOME: the
    answers to both."""
    hello: dict[str, Any] = {"versions": [1]}
    if token:
        hello["token"] = token
    sock.sendall(C.encode_json_frame(C.FrameType.HELLO, hello)
                 + C.encode_frame(C.FrameType.REQUEST, 5, op=Op.FABRIC_STATUS,
                                  payload=C.json_field({})))
    decoder = C.FrameDecoder()
    frames: list[C.Frame] = []
    while len(frames) < 2:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {frames}"
        frames += decoder.feed(chunk)
    return frames


async def wait_for(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_register_grant_refuse_release_revoke(keystore_url: str, tmp_path: Path) -> None:
    tok = tokens(keystore_url)
    m = start_manager(keystore_url, tmp_path, lease=5.0)
    try:
        asyncio.run(_grants(m.url, tok, m.key_id))
        # the pool as the database holds it (s2 left: 1000), at the reaper's next beat
        want = f'cryptoplane_manager_capacity{{class="{RSA}",measure="ops"}} 1000.0'
        deadline = time.monotonic() + 5
        while want not in (text := m.get("/metrics")[1]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert want in text
        assert 'cryptoplane_manager_granted{class="rsa2048",measure="ops",tenant="b"} 800.0' \
            in text
        assert 'cryptoplane_manager_refusals_total{class="rsa2048"} 2.0' in text
        assert 'cryptoplane_manager_requests_total{op="grant_revoke",status="forbidden"}' in text
        assert 'cryptoplane_manager_request_seconds_count{op="grant_request"} 6.0' in text
        assert m.get("/healthz")[0] == 200 and m.get("/readyz")[0] == 200
    finally:
        assert m.stop() == 0, m.log_text()


async def _grants(url: str, tok: dict[str, str], key_id: str) -> None:
    events: list[dict[str, Any]] = []
    server = await ManagerClient.connect(url, token=tok["server"])
    a = await ManagerClient.connect(url, token=tok["a"], on_event=events.append)
    b = await ManagerClient.connect(url, token=tok["b"])
    admin = await ManagerClient.connect(url, token=tok["admin"])
    try:
        registered = await server.register(reg("s1"))
        await server.register(reg("s2", port=10))
        assert key_id in registered.manager_keys and registered.lease_seconds == 5.0
        beat = await server.heartbeat(Heartbeat("s1", {RSA: {"ops": 42.0, "bytes": 0.0}}, 3))
        assert beat.registered and beat.revoked == [] and key_id in beat.manager_keys
        assert not (await server.heartbeat(Heartbeat("nobody", {}))).registered

        status = await admin.status()
        by_id = {s["server_id"]: s for s in status["servers"]}
        assert set(by_id) == {"s1", "s2"}
        assert by_id["s1"]["capacity"][RSA]["ops"] == 1000.0
        assert by_id["s1"]["load"][RSA]["ops"] == 42.0 and by_id["s1"]["inflight"] == 3
        assert status["capacity"][RSA]["ops"] == 2000.0

        # a grant, its token verifies against the key servers learnt at registration
        answer = await a.request_grant(ask(1200, ttl=30, label="web"))
        grant = answer.grant
        assert grant is not None and grant.tenant == "a" and answer.renew_after == 15
        assert sum(s.rates[RSA]["ops"] for s in grant.servers) == pytest.approx(1200)
        keys = {k: public_key_from_b64(v) for k, v in registered.manager_keys.items()}
        for s in grant.servers:
            claims = verify_grant(answer.token, keys, server_id=s.server_id, tenant="a")
            assert claims.grant_id == grant.grant_id
            assert claims.servers[s.server_id][RSA][0] == s.rates[RSA]["ops"]
        assert abs(claims.expires_at - grant.expires_at) < 1e-3

        # over capacity: refused, saying what is left (the raw answer's shape too)
        with pytest.raises(QuotaRefused) as refused:
            await b.request_grant(ask(900))
        assert refused.value.left[RSA]["ops"] == pytest.approx(800)
        raw = await b.call(Op.GRANT_REQUEST, ask(900).to_json())
        assert raw["granted"] is False and raw["left"][RSA]["ops"] == pytest.approx(800)
        assert "800" in raw["reason"]
        second = await b.request_grant(ask(800))
        assert second.grant is not None

        # tenants: b's grant is unknown to a; a sees only its own
        with pytest.raises(KeyNotFound):
            await a.renew(second.grant.grant_id)
        with pytest.raises(KeyNotFound):
            await a.watch([second.grant.grant_id])
        assert [g["grant_id"] for g in await a.list_grants()] == [grant.grant_id]
        mine = await a.status()
        assert [g["grant_id"] for g in mine["grants"]] == [grant.grant_id]
        assert len((await admin.status())["grants"]) == 2

        # renew: a later expiry, a new token
        renewed = await a.renew(grant.grant_id)
        assert renewed.grant is not None and renewed.grant.grant_id == grant.grant_id
        assert renewed.grant.expires_at >= grant.expires_at

        # release frees its share
        await b.release(second.grant.grant_id)
        await b.release(second.grant.grant_id)  # again: nothing to do, no error
        third = await b.request_grant(ask(800))
        assert third.grant is not None

        # an admin acts for a tenant
        acting = await admin.call(Op.GRANT_LIST, {"tenant": "b"})
        assert [g["grant_id"] for g in acting["grants"]] == [third.grant.grant_id]
        with pytest.raises(Forbidden):
            await a.call(Op.GRANT_LIST, {"tenant": "b"})

        # scopes: each role its own ops
        with pytest.raises(Forbidden):
            await a.revoke(grant.grant_id)
        with pytest.raises(Forbidden):
            await a.register(reg("rogue"))
        with pytest.raises(Forbidden):
            await server.request_grant(ask(1))
        with pytest.raises(InvalidRequest):
            await a.call(Op.GRANT_REQUEST, {"quota": {"nope": {"ops": 1}}})

        # revoke: the watcher is told, the servers learn it at their next heartbeat
        await admin.revoke(grant.grant_id)
        await wait_for(lambda: any(e.get("event") == "revoked" for e in events), 5,
                       "the revoked EVENT")
        assert events[-1] == {"event": "revoked", "grant_id": grant.grant_id}
        named = {s.server_id for s in grant.servers}
        for sid in named:
            beat = await server.heartbeat(Heartbeat(sid, {}))
            assert grant.grant_id in beat.revoked
        with pytest.raises(KeyNotFound):
            await a.renew(grant.grant_id)
        assert (await admin.call(Op.GRANT_REVOKE, {"grant_id": "g-none"}))["revoked"] is False

        await server.leave("s2")
        assert {s["server_id"] for s in (await admin.status())["servers"]} == {"s1"}
    finally:
        for c in (server, a, b, admin):
            await c.close()


def test_tokens_refused_and_rechecked(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'ks.db'}"
    tok = tokens(url)
    sock = tmp_path / "manager.sock"
    m = start_manager(url, tmp_path, lease=1.0,
                      extra=["--listen", f"unix://{sock}", "--token-recheck", "0.2",
                             "--cache-ttl", "0.1"])
    assert f"unix://{sock}" in m.ready["listen"]
    try:
        async def go() -> None:
            with pytest.raises(Unauthorized):
                await ManagerClient.connect(m.url, token="cpt_0123456789abcdef_nope",
                                            timeout=5)
            none = await ManagerClient.connect(f"unix://{sock}", token=tok["none"])
            try:
                for op in (Op.FABRIC_STATUS, Op.GRANT_LIST, Op.SERVER_REGISTER):
                    with pytest.raises(Forbidden):
                        await none.call(op, {})
                with pytest.raises(Exception, match="not served by a manager"):
                    await none.call(Op.ENCRYPT, {})
            finally:
                await none.close()
            # a token revoked while its connection is open: the connection ends
            a = await ManagerClient.connect(m.url, token=tok["a"], timeout=2)
            try:
                assert await a.list_grants() == []
                store = open_state_store(url)
                try:
                    assert store.revoke_token(tok["a"].split("_")[1])
                finally:
                    store.close()
                deadline = time.monotonic() + 5
                while True:
                    try:
                        await a.list_grants()
                    except (Unauthorized, ConnectionLost):
                        break
                    assert time.monotonic() < deadline, "a revoked token still works"
                    await asyncio.sleep(0.1)
            finally:
                await a.close()
        asyncio.run(go())
        # the wire: a first frame that is not HELLO, or too big before the handshake,
        # is answered PROTOCOL_ERROR and the connection closed
        port = int(m.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            welcome, answer = pipelined(raw, tok["admin"])
            assert welcome.type == C.FrameType.WELCOME and welcome.status == 0
            assert (answer.type, answer.id, answer.status) == (C.FrameType.RESPONSE, 5, 0)
        for data in (C.encode_frame(C.FrameType.REQUEST, 7, op=Op.GRANT_LIST),
                     C.HEADER.pack(1 << 20, 1, C.FrameType.HELLO, 0, 0, 0, 0, 0, 0)):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                raw.sendall(data)
                got = b""
                while chunk := raw.recv(65536):
                    got += chunk
            frames = C.FrameDecoder().feed(got)
            assert len(frames) == 1 and frames[0].status == C.Status.PROTOCOL_ERROR
    finally:
        assert m.stop() == 0
    assert not sock.exists()


def test_lapsed_lease_moves_grants_and_pushes(keystore_url: str, tmp_path: Path) -> None:
    tok = tokens(keystore_url)
    m = start_manager(keystore_url, tmp_path, lease=1.0)
    try:
        asyncio.run(_lapse(m.url, tok))
        assert "removed s2" in m.log_text()
    finally:
        m.stop()


async def _lapse(url: str, tok: dict[str, str]) -> None:
    events: list[dict[str, Any]] = []
    server = await ManagerClient.connect(url, token=tok["server"])
    a = await ManagerClient.connect(url, token=tok["a"])
    watcher = await ManagerClient.connect(url, token=tok["a"], on_event=events.append)
    try:
        keys = (await server.register(reg("s1"))).manager_keys
        await server.register(reg("s2", port=10))
        answer = await a.request_grant(ask(1000, spread=2))
        assert answer.grant is not None
        assert {s.server_id for s in answer.grant.servers} == {"s1", "s2"}
        await watcher.watch([answer.grant.grant_id])
        # s1 keeps beating; s2 goes silent
        started = time.monotonic()
        while not events and time.monotonic() - started < 6:
            assert (await server.heartbeat(Heartbeat("s1", {}))).registered
            await asyncio.sleep(0.2)
        assert events, "no EVENT within 6 s of a 1 s lease lapsing"
        event = events[0]
        assert event["event"] == "moved"
        moved = event["grant"]
        assert moved["grant"]["grant_id"] == answer.grant.grant_id
        assert [s["server_id"] for s in moved["grant"]["servers"]] == ["s1"]
        assert moved["grant"]["servers"][0]["rates"][RSA]["ops"] == pytest.approx(1000)
        pub = {k: public_key_from_b64(v) for k, v in keys.items()}
        claims = verify_grant(moved["token"], pub, server_id="s1", tenant="a")
        assert set(claims.servers) == {"s1"}
        status = await a.status()
        assert [s["server_id"] for s in status["servers"]] == ["s1"]
        # the lapsed server is told to register again
        assert not (await server.heartbeat(Heartbeat("s2", {}))).registered
        # the one that never watched learns at its next renewal
        renewed = await a.renew(answer.grant.grant_id)
        assert renewed.grant is not None
        assert [s.server_id for s in renewed.grant.servers] == ["s1"]
    finally:
        for c in (server, a, watcher):
            await c.close()


def test_kill_and_restart_loses_nothing(keystore_url: str, tmp_path: Path) -> None:
    tok = tokens(keystore_url)
    m = start_manager(keystore_url, tmp_path, lease=30.0)

    async def before() -> str:
        server = await ManagerClient.connect(m.url, token=tok["server"])
        a = await ManagerClient.connect(m.url, token=tok["a"])
        try:
            await server.register(reg("s1"))
            answer = await a.request_grant(ask(400))
            assert answer.grant is not None
            return answer.grant.grant_id
        finally:
            await server.close()
            await a.close()

    gid = asyncio.run(before())
    m.kill()
    m2 = start_manager(keystore_url, tmp_path, lease=30.0, listen=m.url, name="again",
                       signing_key=m.signing_key)
    try:
        assert m2.url == m.url and m2.key_id == m.key_id

        async def after() -> None:
            server = await ManagerClient.connect(m2.url, token=tok["server"])
            a = await ManagerClient.connect(m2.url, token=tok["a"])
            try:
                assert (await server.heartbeat(Heartbeat("s1", {}))).registered
                assert [g["grant_id"] for g in await a.list_grants()] == [gid]
                renewed = await a.renew(gid)
                assert renewed.grant is not None
                assert renewed.grant.servers[0].server_id == "s1"
                with pytest.raises(QuotaRefused) as e:
                    await a.request_grant(ask(700))
                assert e.value.left[RSA]["ops"] == pytest.approx(600)
            finally:
                await server.close()
                await a.close()
        asyncio.run(after())
    finally:
        assert m2.stop() == 0


def test_two_managers_on_one_postgresql(pg_dsn: str, tmp_path: Path) -> None:
    tok = tokens(pg_dsn)
    ma = start_manager(pg_dsn, tmp_path, lease=1.0, name="ma")
    mb = start_manager(pg_dsn, tmp_path, lease=1.0, name="mb", signing_key=ma.signing_key)
    try:
        asyncio.run(_two(ma.url, mb.url, tok))
    finally:
        ma.stop()
        mb.stop()


async def _two(url_a: str, url_b: str, tok: dict[str, str]) -> None:
    events: list[dict[str, Any]] = []
    server = await ManagerClient.connect(url_a, token=tok["server"])
    on_a = await ManagerClient.connect(url_a, token=tok["a"])
    on_b = await ManagerClient.connect(url_b, token=tok["a"], on_event=events.append)
    try:
        await server.register(reg("s1"))
        await server.register(reg("s2", port=10))
        answer = await on_a.request_grant(ask(600, spread=2))
        assert answer.grant is not None
        gid = answer.grant.grant_id
        # renewed on the other manager: it is the same pool
        renewed = await on_b.renew(gid)
        assert renewed.grant is not None and renewed.grant.grant_id == gid
        # s2 lapses; whichever manager reaps it, the client on B is told
        started = time.monotonic()
        while not events and time.monotonic() - started < 6:
            await server.heartbeat(Heartbeat("s1", {}))
            await asyncio.sleep(0.2)
        assert events and events[0]["event"] == "moved"
        assert [s["server_id"] for s in events[0]["grant"]["grant"]["servers"]] == ["s1"]
        # both managers see one pool
        sa, sb = await on_a.status(), await on_b.status()
        assert [s["server_id"] for s in sa["servers"]] == ["s1"]
        assert [s["server_id"] for s in sb["servers"]] == ["s1"]
        assert sa["granted"] == sb["granted"]
    finally:
        for c in (server, on_a, on_b):
            await c.close()


def test_tls_certificates_and_tokens(tmp_path: Path) -> None:
    from certs import make_pki

    from cryptoplane.fabric.auth import client_ssl_context

    pki = make_pki(tmp_path)
    url = f"sqlite://{tmp_path / 'ks.db'}"
    tok = tokens(url)
    m = start_manager(url, tmp_path, extra=["--tls-cert", str(pki.server_cert), "--tls-key",
                                            str(pki.server_key), "--tls-client-ca",
                                            str(pki.ca_cert)])
    assert m.url.startswith("tls://")
    try:
        async def go() -> None:
            # a client certificate: its CN is the tenant, every scope
            cert = await ManagerClient.connect(m.url, ssl=client_ssl_context(
                pki.ca_cert, certfile=pki.client_a_cert, keyfile=pki.client_a_key))
            # a token over TLS, no certificate
            b = await ManagerClient.connect(m.url, token=tok["b"],
                                            ssl=client_ssl_context(pki.ca_cert))
            try:
                await cert.register(reg("s1"))
                answer = await cert.request_grant(ask(100))
                assert answer.grant is not None and answer.grant.tenant == "tenant-a"
                assert (await b.list_grants()) == []
                status = await b.status()
                assert status["tenant"] == "b" and status["grants"] == []
            finally:
                await cert.close()
                await b.close()
        asyncio.run(go())
        # a certificate is welcomed at once: what came with HELLO is answered too
        ctx = client_ssl_context(pki.ca_cert, certfile=pki.client_a_cert,
                                 keyfile=pki.client_a_key)
        port = int(m.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as plain, \
                ctx.wrap_socket(plain, server_hostname="127.0.0.1") as raw:
            welcome, answer = pipelined(raw, None)
            assert welcome.type == C.FrameType.WELCOME and welcome.status == 0
            assert (answer.id, answer.status) == (5, 0)
            assert C.decode_json_payload(answer.payload)["servers"][0]["server_id"] == "s1"
    finally:
        assert m.stop() == 0


def test_database_away_answers_busy_then_recovers(pg_cluster: Any, tmp_path: Path) -> None:
    import psycopg

    from cryptoplane.exceptions import Busy, Timeout

    name = "manager_db_away"
    dsn = pg_cluster.create_database(name)
    tok = tokens(dsn)
    m = start_manager(dsn, tmp_path, lease=1.0)

    def admin(sql: str) -> None:
        with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
            conn.execute(sql)

    async def go() -> None:
        a = await ManagerClient.connect(m.url, token=tok["a"])
        try:
            assert await a.list_grants() == []
            admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                  f"datname = '{name}'")
            # BUSY, which the client retries until its timeout
            with pytest.raises((Busy, Timeout)):
                await a.call(Op.GRANT_LIST, {}, timeout=1)
            deadline = time.monotonic() + 5
            while m.get("/readyz")[0] != 503:
                assert time.monotonic() < deadline, "/readyz still ready without a database"
                await asyncio.sleep(0.1)
            admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            deadline = time.monotonic() + 10
            while True:  # back: the same connection is answered again
                try:
                    assert await a.list_grants() == []
                    break
                except (Busy, Timeout):
                    assert time.monotonic() < deadline, "no answers after the database"
                    await asyncio.sleep(0.2)
            while m.get("/readyz")[0] != 200:
                assert time.monotonic() < deadline, "/readyz not ready again"
                await asyncio.sleep(0.1)
        finally:
            await a.close()

    try:
        asyncio.run(go())
        assert "the database is unavailable" in m.log_text()
    finally:
        m.stop()
        pg_cluster.drop_database(name)
