"""The client's connection logic against a tiny fake server (fake_server.py): pipelining
with answers out of order, throttling, deadlines, GOAWAY, lost connections, sessions."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from fake_server import FakeServer

from cryptoplane.exceptions import AuthenticationFailed, InvalidRequest, Timeout
from cryptoplane.fabric import AsyncClient, Client, codec
from cryptoplane.fabric.errors import ConnectionLost, Throttled, Unauthorized


def run(test: Callable[..., Awaitable[Any]], **kw: Any) -> Any:
    async def main() -> Any:
        server = FakeServer(**kw)
        url = await server.start()
        try:
            return await test(server, url)
        finally:
            await server.stop()
    return asyncio.run(main())


def test_pipelined_answers_in_any_order_match_their_requests() -> None:
    async def t(server: FakeServer, url: str) -> None:
        async with await AsyncClient.connect(url, token="t") as c:
            assert c.capabilities["server"] == "fake"
            msgs = [b"m%d" % i for i in range(2000)]
            cts = await asyncio.gather(*(c.encrypt("k", m) for m in msgs))
            assert cts == [b"ct:" + m for m in msgs]
            assert await c.decrypt("k", cts[5]) == msgs[5]
            assert await c.digest(b"abc") == hashlib.sha256(b"abc").digest()
            assert await c.list_keys() == ["a", "b"]
            with pytest.raises(AuthenticationFailed):
                await c.decrypt("k", b"nope")
    run(t)


def test_a_bad_token_is_unauthorized() -> None:
    async def t(server: FakeServer, url: str) -> None:
        with pytest.raises(Unauthorized):
            await AsyncClient.connect(url, token="wrong", timeout=5)
    run(t)


def test_bad_urls_are_refused() -> None:
    for url in ("http://x:1", "tcp://nohost", "unix://"):
        with pytest.raises(InvalidRequest):
            asyncio.run(AsyncClient.connect(url, token="t"))


def test_throttled_requests_are_sent_again_after_retry_after() -> None:
    async def t(server: FakeServer, url: str) -> None:
        async with await AsyncClient.connect(url, token="t") as c:
            assert await c.encrypt("throttle", b"x") == b"ct:x"
            assert server.throttled == 3
            assert c.counters["throttled"] == 3
    run(t, throttle_first=3)


def test_throttled_past_the_deadline_raises_throttled() -> None:
    async def t(server: FakeServer, url: str) -> None:
        async with await AsyncClient.connect(url, token="t") as c:
            with pytest.raises(Throttled):
                await c.encrypt("throttle", b"x", timeout=0.1)
    run(t, throttle_first=10_000)


def test_an_unanswered_request_times_out_and_others_carry_on() -> None:
    async def t(server: FakeServer, url: str) -> None:
        async with await AsyncClient.connect(url, token="t") as c:
            slow = asyncio.ensure_future(c.encrypt("silent", b"x", timeout=0.2))
            assert await c.encrypt("k", b"y") == b"ct:y"
            with pytest.raises(Timeout):
                await slow
    run(t)


def test_lost_connection_retries_safe_requests_and_fails_unsafe_ones() -> None:
    async def t(server: FakeServer, url: str) -> None:
        async with await AsyncClient.connect(url, token="t", connections=2) as c:
            # queue work on both connections, then one request that kills its connection
            unsafe = [asyncio.ensure_future(c.encrypt("silent", b"u")) for _ in range(4)]
            safe = [asyncio.ensure_future(c.sign("silent", b"s", timeout=1.5))
                    for _ in range(4)]
            await asyncio.sleep(0.05)
            for tr in list(server.transports):
                tr.abort()
            for f in unsafe:
                with pytest.raises(ConnectionLost):
                    await f
            # safe ones are sent again once a connection is back; still silent: time out
            for f in safe:
                with pytest.raises((Timeout, ConnectionLost)):
                    await f
            assert c.counters["retried"] >= 4
            # the pool reconnected and works again
            assert await c.encrypt("k", b"again", timeout=5) == b"ct:again"
            assert c.counters["reconnects"] >= 1
    run(t)


def test_goaway_moves_new_requests_to_a_new_connection() -> None:
    async def t(server: FakeServer, url: str) -> None:
        async with await AsyncClient.connect(url, token="t", connections=1) as c:
            assert await c.encrypt("k", b"1") == b"ct:1"
            server.goaway()
            await asyncio.sleep(0.05)
            assert await c.encrypt("k", b"2", timeout=5) == b"ct:2"
            assert c.counters["goaways"] == 1
            assert len(server.transports) >= 2
    run(t)


def test_batch_items_fail_alone() -> None:
    async def t(server: FakeServer, url: str) -> None:
        async with await AsyncClient.connect(url, token="t") as c:
            out = await c.batch("encrypt", "k", [{"data": b"a"}, {"data": b"bad"},
                                                 {"data": b"c"}])
            assert out[0] == b"ct:a" and out[2] == b"ct:c"
            assert isinstance(out[1], InvalidRequest)
    run(t)


def test_sessions_open_once_per_connection() -> None:
    async def t(server: FakeServer, url: str) -> None:
        async with await AsyncClient.connect(url, token="t", connections=1) as c:
            s = await c.open_session("aes-256-gcm", b"k" * 32)
            outs = await asyncio.gather(*(c.raw("encrypt", s, {codec.Field.DATA: b"%d" % i})
                                          for i in range(50)))
            assert [o[codec.Field.DATA] for o in outs] == [b"raw1:%d" % i for i in range(50)]
            opens = [op for op, _ in server.received if op == codec.Op.SESSION_OPEN]
            assert len(opens) == 1
    run(t)


def test_sync_client() -> None:
    async def t(server: FakeServer, url: str) -> None:
        def work() -> None:
            with Client(url, token="t") as c:
                assert c.encrypt("k", b"z") == b"ct:z"
                assert c.list_keys() == ["a", "b"]
        await asyncio.get_running_loop().run_in_executor(None, work)
    run(t)


def test_the_remote_engine_is_live_again_after_a_goaway() -> None:
    import cryptoplane as cp
    from cryptoplane.engines.base import Health

    async def t(server: FakeServer, url: str) -> None:
        loop = asyncio.get_running_loop()
        remote = cp.Remote(url, token="t", connections=1)
        try:
            await loop.run_in_executor(None, lambda: remote.start(self_test=False))
            assert remote.health is Health.OK
            server.goaway()
            for _ in range(100):
                await asyncio.sleep(0.02)
                if remote.counters()["goaways"] and remote.health is Health.OK:
                    break
            assert remote.counters()["goaways"] == 1 and remote.health is Health.OK
        finally:
            await loop.run_in_executor(None, remote.close)
    run(t)


def test_every_call_ends_exactly_once_under_drops_timeouts_and_throttling() -> None:
    """Low-level: prepared Calls straight into the pool, each counting its endings,
    while connections are killed, requests go unanswered and the server throttles."""
    import random as rnd

    from cryptoplane.fabric.codec import FrameType, Op
    from cryptoplane.fabric.connection_client import Call

    async def t(server: FakeServer, url: str) -> None:
        loop = asyncio.get_running_loop()
        async with await AsyncClient.connect(url, token="t", connections=3) as c:
            endings: dict[int, list[object]] = {}
            all_done = asyncio.Event()
            total = 3000

            def make(i: int, key: bytes, safe: bool) -> Call:
                def done(frame: object, error: BaseException | None) -> None:
                    endings.setdefault(i, []).append(error if error is not None else frame)
                    if len(endings) == total:
                        all_done.set()
                payload = codec.encode_fields({codec.Field.DATA: b"%d" % i})
                return Call(FrameType.REQUEST, Op.ENCRYPT if not safe else Op.SIGN, key,
                            payload, safe, done, loop.time() + 0.5)

            r = rnd.Random(7)
            for i in range(total):
                key = r.choices([b"k", b"silent", b"drop", b"throttle"], [90, 4, 1, 5])[0]
                c.submit_call(make(i, key, r.random() < 0.5))
                if i % 100 == 0:
                    await asyncio.sleep(0)
            await asyncio.wait_for(all_done.wait(), 30)
            await asyncio.sleep(0.7)  # late answers, sweeps: nothing may end twice
            assert all(len(v) == 1 for v in endings.values())
            assert len(endings) == total
            kinds = {type(v[0]).__name__ for v in endings.values()}
            assert kinds <= {"Frame", "Timeout", "ConnectionLost", "Throttled"}, kinds
    run(t, throttle_first=50)


def test_requests_over_the_servers_frame_limit_are_refused_here() -> None:
    async def t(server: FakeServer, url: str) -> None:
        async with await AsyncClient.connect(url, token="t") as c:
            with pytest.raises(InvalidRequest, match="limit"):
                await c.encrypt("k", b"x" * 2000)
            assert await c.encrypt("k", b"small") == b"ct:small"  # still connected
            assert c.counters["reconnects"] == 0
    run(t, max_frame=1024)


def test_a_token_refused_on_reconnect_fails_waiting_requests() -> None:
    async def t(server: FakeServer, url: str) -> None:
        async with await AsyncClient.connect(url, token="t", connections=1) as c:
            server.token = "revoked"
            for tr in list(server.transports):
                tr.abort()
            await asyncio.sleep(0.01)
            t0 = asyncio.get_running_loop().time()
            with pytest.raises(Unauthorized):
                await c.encrypt("k", b"x", timeout=20)
            assert asyncio.get_running_loop().time() - t0 < 5
    run(t)


def test_a_silent_server_is_probed_and_cut_and_safe_requests_fail_over() -> None:
    async def main() -> None:
        a, b = FakeServer(), FakeServer()
        urls = [await a.start(), await b.start()]
        try:
            async with await AsyncClient.connect(urls, token="t", connections=1,
                                                 silence=0.2) as c:
                while c.live_connections < 2:
                    await asyncio.sleep(0.01)
                a.frozen = True  # as if SIGSTOPped: the socket stays open
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                safe = [asyncio.ensure_future(c.sign("k", b"%d" % i, timeout=10))
                        for i in range(40)]
                unsafe = [asyncio.ensure_future(c.encrypt("k", b"%d" % i, timeout=10))
                          for i in range(40)]
                assert await asyncio.gather(*safe) == [b"sig:%d" % i for i in range(40)]
                results = await asyncio.gather(*unsafe, return_exceptions=True)
                lost = [r for r in results if isinstance(r, ConnectionLost)]
                assert lost and all(isinstance(r, (bytes, ConnectionLost)) for r in results)
                assert loop.time() - t0 < 5  # long before the 10 s deadlines
        finally:
            await a.stop()
            await b.stop()
    asyncio.run(main())
