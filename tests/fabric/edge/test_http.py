"""OpsHttp over real sockets: urllib (in a thread) and raw asyncio streams."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cryptoplane.fabric import http as ops_http
from cryptoplane.fabric.http import MAX_HEAD, OpsHttp
from cryptoplane.fabric.metrics import FabricMetrics


def get(port: int, path: str) -> tuple[int, str, bytes]:
    """(status, content type, body) of GET ``path``; blocking, for a thread."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


async def raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    writer.write_eof()  # all it will send: a cut-off head is then a 400, not a 408
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return answer


def serve(test: Callable[[OpsHttp, int], Awaitable[None]], **kw: Any) -> None:
    async def main() -> None:
        kw.setdefault("ready", lambda: True)
        ops = OpsHttp(kw.pop("metrics", FabricMetrics()), **kw)
        port = await ops.start("127.0.0.1", 0)
        assert port > 0
        try:
            await test(ops, port)
        finally:
            await ops.close()
    asyncio.run(main())


def test_metrics_endpoint() -> None:
    m = FabricMetrics()
    m.count("acme", "encrypt", "ok", n=3)

    async def t(_: OpsHttp, port: int) -> None:
        status, ctype, body = await asyncio.to_thread(get, port, "/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        families = {f.name for f in text_string_to_metric_families(body.decode())}
        assert "cryptoplane_fabric_requests" in families
        assert b'tenant="acme"' in body
    serve(t, metrics=m)


def test_healthz_and_readyz_follow_the_callbacks() -> None:
    state = {"ready": False, "healthy": True}

    async def t(_: OpsHttp, port: int) -> None:
        assert await asyncio.to_thread(get, port, "/healthz") == (
            200, "text/plain; charset=utf-8", b"ok\n")
        assert (await asyncio.to_thread(get, port, "/readyz"))[0] == 503
        state["ready"] = True
        assert (await asyncio.to_thread(get, port, "/readyz"))[::2] == (200, b"ready\n")
        state["ready"] = False  # draining: alive, not ready
        assert (await asyncio.to_thread(get, port, "/readyz"))[0] == 503
        assert (await asyncio.to_thread(get, port, "/healthz"))[0] == 200
        state["healthy"] = False
        assert (await asyncio.to_thread(get, port, "/healthz"))[0] == 503
    serve(t, ready=lambda: state["ready"], healthy=lambda: state["healthy"])


def test_status_json_query_strings_and_404() -> None:
    async def t(_: OpsHttp, port: int) -> None:
        status, ctype, body = await asyncio.to_thread(get, port, "/status")
        assert status == 200 and ctype == "application/json"
        assert json.loads(body) == {"connections": 3, "draining": False}
        assert (await asyncio.to_thread(get, port, "/healthz?verbose=1"))[0] == 200
        assert (await asyncio.to_thread(get, port, "/"))[0] == 404
        assert (await asyncio.to_thread(get, port, "/metricsx"))[0] == 404
    serve(t, extra=lambda: {"connections": 3, "draining": False})
    serve(lambda _, port: _expect_404(port, "/status"))  # no extra: no /status


async def _expect_404(port: int, path: str) -> None:
    assert (await asyncio.to_thread(get, port, path))[0] == 404


def test_get_only_and_malformed_requests() -> None:
    async def t(_: OpsHttp, port: int) -> None:
        answer = await raw(port, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 405 ") and b"Allow: GET" in answer
        assert (await raw(port, b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        assert (await raw(port, b"GET /healthz HTTP/1.1\r\n")).startswith(b"HTTP/1.1 400 ")
        ok = await raw(port, b"GET /healthz HTTP/1.0\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in ok
        assert ok.endswith(b"\r\n\r\nok\n")
    serve(t)


def test_request_head_capped_at_8_kib() -> None:
    async def t(_: OpsHttp, port: int) -> None:
        huge = b"GET /healthz HTTP/1.1\r\nX-Pad: " + b"a" * MAX_HEAD + b"\r\n\r\n"
        assert (await raw(port, huge)).startswith(b"HTTP/1.1 431 ")
        fits = b"GET /healthz HTTP/1.1\r\nX-Pad: " + b"a" * (MAX_HEAD - 100) + b"\r\n\r\n"
        assert (await raw(port, fits)).startswith(b"HTTP/1.1 200 ")
    serve(t)


def test_slow_client_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops_http, "READ_TIMEOUT", 0.2)

    async def t(_: OpsHttp, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\n")  # and never the blank line
        answer = await asyncio.wait_for(reader.read(), 3)
        assert answer.startswith(b"HTTP/1.1 408 ")
        writer.close()
    serve(t)


def test_a_failing_callback_is_a_500_and_the_server_stays_up() -> None:
    def broken() -> bool:
        raise RuntimeError("bug")

    async def t(_: OpsHttp, port: int) -> None:
        assert (await asyncio.to_thread(get, port, "/readyz"))[0] == 500
        assert (await asyncio.to_thread(get, port, "/healthz"))[0] == 200
    serve(t, ready=broken)


def test_close_does_not_wait_for_idle_clients() -> None:
    async def main() -> None:
        ops = OpsHttp(FabricMetrics(), ready=lambda: True)
        port = await ops.start("127.0.0.1", 0)
        _, writer = await asyncio.open_connection("127.0.0.1", port)  # says nothing
        await asyncio.sleep(0.05)
        await asyncio.wait_for(ops.close(), 1.0)  # well within READ_TIMEOUT
        writer.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        await ops.close()  # twice is fine
    asyncio.run(main())


def test_connections_beyond_the_cap_are_closed_unanswered(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops_http, "MAX_CONNECTIONS", 2)

    async def t(_: OpsHttp, port: int) -> None:
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        await asyncio.sleep(0.05)
        with contextlib.suppress(ConnectionResetError):  # closed unread: EOF or reset
            assert await raw(port, b"GET /healthz HTTP/1.1\r\n\r\n") == b""
        for _reader, writer in idle:
            writer.close()
        await asyncio.sleep(0.05)
        assert (await raw(port, b"GET /healthz HTTP/1.1\r\n\r\n")).startswith(
            b"HTTP/1.1 200 ")
    serve(t)
