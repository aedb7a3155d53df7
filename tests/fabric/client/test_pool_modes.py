"""The pool's placement modes against real ``cryptoplane server`` processes: round-robin
alternates, size-split splits at the threshold, fail-over keeps to the first live
server, least-loaded gives a server sharing its core with a CPU hog a smaller share;
``set_servers`` adds and retires servers while calls flow."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from modekit import Cluster, Hog
from support import unavailable

from cryptoplane.fabric import AsyncClient
from cryptoplane.fabric.placement import SizeSplit


async def _until(cond: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("modes"), 3)
    try:
        yield c
    finally:
        c.close()


def _sent(client: AsyncClient) -> dict[str, int]:
    return {u: int(v["sent"]) for u, v in client.per_server_counts().items()}


async def _connect(urls: list[str], token: str, **kw: Any) -> AsyncClient:
    """A client once every server is connected (``connect`` returns at the first)."""
    client = await AsyncClient.connect(urls, token=token, **kw)
    await _until(lambda: all(v["live"] for v in client.per_server_counts().values()))
    return client


def test_round_robin_alternates_per_server(cluster: Cluster) -> None:
    async def main() -> None:
        async with await _connect(cluster.urls, cluster.token, placement="round-robin") as c:
            for i in range(31):
                await c.digest(b"x" * i)
            counts = _sent(c)
            assert sum(counts.values()) == 31
            assert max(counts.values()) - min(counts.values()) <= 1, counts
            # a server's two connections share its turn: every server got some
            assert min(counts.values()) == 10, counts
    asyncio.run(main())


def test_size_split_at_the_threshold(cluster: Cluster) -> None:
    big, small = cluster.urls[0], cluster.urls[1]

    async def main() -> None:
        async with await _connect([big, small], cluster.token, placement="size-split") as c:
            for _ in range(5):
                await c.digest(b"s" * 127)
            assert _sent(c) == {big: 0, small: 5}
            for _ in range(7):
                await c.digest(b"b" * 128)
            assert _sent(c) == {big: 7, small: 5}
        # the big set named explicitly, and another threshold
        split = SizeSplit(threshold=1000, big=[small])
        async with await _connect([big, small], cluster.token, placement=split) as c:
            await c.digest(b"s" * 999)
            await c.digest(b"b" * 1000)
            assert _sent(c) == {big: 1, small: 1}
            assert c.pool.describe()["placement"]["threshold"] == 1000
    asyncio.run(main())


def test_size_split_a_set_with_no_live_server_hands_over(cluster: Cluster) -> None:
    async def main() -> None:
        async with await _connect(cluster.urls[:2], cluster.token, placement="size-split") as c:
            await c.digest(b"s" * 10)
            cluster.signal(1, signal.SIGKILL)  # the only small server
            for _ in range(4):
                assert len(await c.digest(b"s" * 10)) == 32
            counts = _sent(c)
            assert counts[cluster.urls[0]] == 4, counts
    try:
        asyncio.run(main())
    finally:
        cluster.start(1)


def test_fail_over_uses_the_secondary_only_while_the_primary_is_down(
        cluster: Cluster) -> None:
    primary, secondary = cluster.urls[0], cluster.urls[1]

    async def main() -> None:
        async with await _connect([primary, secondary], cluster.token,
                                  placement="fail-over", silence=0.3) as c:
            await asyncio.gather(*(c.digest(b"a" * i) for i in range(20)))
            assert _sent(c) == {primary: 20, secondary: 0}
            cluster.signal(0, signal.SIGKILL)
            await asyncio.gather(*(c.digest(b"b" * i) for i in range(20)))
            after_kill = _sent(c)
            assert after_kill[secondary] == 20, after_kill
            cluster.start(0)  # the same port: the pool's reconnects find it
            await _until(lambda: c.per_server_counts()[primary]["live"])
            await asyncio.gather(*(c.digest(b"c" * i) for i in range(20)))
            back = _sent(c)
            assert back[primary] == after_kill[primary] + 20, back
            assert back[secondary] == 20, back

            # a stopped primary: its connections are cut after the silence and probe,
            # what it held moves, and calls go back to it once it runs again
            cluster.signal(0, signal.SIGSTOP)
            try:
                pending = [asyncio.ensure_future(c.digest(b"d" * i)) for i in range(10)]
                assert all(len(x) == 32 for x in await asyncio.gather(*pending))
                stopped = _sent(c)
                assert stopped[secondary] >= 30, stopped
                assert not c.per_server_counts()[primary]["live"]
            finally:
                cluster.signal(0, signal.SIGCONT)
            await _until(lambda: c.per_server_counts()[primary]["live"])
            before = _sent(c)
            await c.digest(b"e")
            assert _sent(c)[primary] == before[primary] + 1
    asyncio.run(main())


def test_set_servers_adds_and_retires_while_calls_flow(cluster: Cluster) -> None:
    a, b, c3 = cluster.urls

    async def main() -> None:
        async with await _connect([a], cluster.token, placement="round-robin") as c:
            await c.create_key("rsa-sets", "rsa-2048")
            pool = c.pool
            running = [asyncio.ensure_future(c.sign("rsa-sets", b"m%d" % i))
                       for i in range(40)]
            await asyncio.sleep(0)
            pool.set_servers([b, c3])  # a retired with calls in flight, b and c added
            sigs = await asyncio.gather(*running)
            assert all(await asyncio.gather(*(c.verify("rsa-sets", b"m%d" % i, sig)
                                              for i, sig in enumerate(sigs))))
            await _until(lambda: all(v["live"] for v in pool.per_server_counts().values()))
            assert set(pool.per_server_counts()) == {b, c3}
            first = {u: v["sent"] for u, v in pool.per_server_counts().items()}
            for i in range(10):
                await c.digest(b"%d" % i)
            later = {u: v["sent"] for u, v in pool.per_server_counts().items()}
            assert later[b] - first[b] == 5 and later[c3] - first[c3] == 5
            # nothing is left on a's connections: retired and closed once answered
            await _until(lambda: all(x.endpoint.url != a for x in pool.conns))
            # a grant shown to every live connection, and to the HELLO of new ones
            assert pool.present_grant("grant-token-1") == c.live_connections
            assert pool.hello_extra["grant"] == "grant-token-1"
    asyncio.run(main())


@pytest.fixture
def pinned(tmp_path: Path) -> Iterator[Cluster]:
    if (os.cpu_count() or 1) < 2:
        unavailable("two CPUs, to pin two servers apart")
    c = Cluster(tmp_path, 2, cpus=[0, 1])
    try:
        yield c
    finally:
        c.close()


def test_least_loaded_gives_the_hogged_server_a_smaller_share(pinned: Cluster) -> None:
    fast, slow = pinned.urls

    async def run(n: int) -> dict[str, int]:
        async with await _connect([fast, slow], pinned.token) as c:
            sem = asyncio.Semaphore(16)

            async def one(i: int) -> None:
                async with sem:
                    await c.sign("rsa-ll", b"%d" % i)

            await asyncio.gather(*(one(k) for k in range(32)))  # both load the key
            start = _sent(c)
            deadline = time.monotonic() + 4.0
            i = 0
            while i < n and time.monotonic() < deadline:
                await asyncio.gather(*(one(i + k) for k in range(64)))
                i += 64
            return {u: k - start[u] for u, k in _sent(c).items()}

    async def create() -> None:
        async with await AsyncClient.connect(fast, token=pinned.token) as c:
            await c.create_key("rsa-ll", "rsa-2048")

    asyncio.run(create())
    even = asyncio.run(run(1024))
    hogs = [Hog(1) for _ in range(3)]  # three quarters of the second server's core
    try:
        counts = asyncio.run(run(3008))
    finally:
        for h in hogs:
            h.close()
    share = counts[fast] / sum(counts.values())
    print(f"least-loaded: no hog {even}; a hog on the second server's core {counts}, "
          f"the first's share {share:.2f}")
    # (without the hog the shares are near even, 0.50-0.57 measured, but the test's
    # own process shares the first server's core, so that is not asserted)
    assert share >= 0.6, (even, counts)
