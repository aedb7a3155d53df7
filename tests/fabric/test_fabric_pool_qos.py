"""Issue 17, acceptance 4: QoS across the pool. A client granted N ops/s stays within
±5% of N over 10 s, spread over two servers, while another tenant, in another process,
saturates the same servers (unpaced: as fast as the servers answer, its excess
THROTTLED by them, plus RSA-2048 signatures keeping their workers busy).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pg import PostgresCluster
from poolkit import PoolFabric

from cryptoplane.fabric import errors as fe
from cryptoplane.fabric.client import AsyncClient
from cryptoplane.fabric.granted import connect_managed
from cryptoplane.fabric.manager.client import ManagerClient
from cryptoplane.fabric.manager.protocol import QuotaRequest
from cryptoplane.fabric.pool import Pool

N = 3000.0  # tenant a's grant, aead ops/s
WINDOW_S = 10.0
CAPACITY = "aead=10000:1e9,rsa2048=1000"


@pytest.fixture(scope="module")
def pool(pg_cluster: PostgresCluster, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[PoolFabric]:
    f = PoolFabric.create(pg_cluster, tmp_path_factory.mktemp("pool-qos"),
                          database="fabric_pool_qos", lease=2.0)
    try:
        f.start_manager("m1")
        f.start_server("s1", capacity=CAPACITY)
        f.start_server("s2", capacity=CAPACITY)
        f.wait_servers({"s1", "s2"})

        async def keys() -> None:
            async with await AsyncClient.connect(f.servers["s1"].url,
                                                 token=f.tokens["tenant-a"]) as a:
                await a.create_key("qa", "aes256-gcm96")
            async with await AsyncClient.connect(f.servers["s1"].url,
                                                 token=f.tokens["tenant-b"]) as b:
                await b.create_key("qb", "aes256-gcm96")
                await b.create_key("qb-rsa", "rsa-2048")
        asyncio.run(keys())
        yield f
    finally:
        f.close()


def _saturate(manager: str, token: str, seconds: float, out: Any) -> None:
    """Tenant b: a grant for the rest of the pool, then everything it can send, unpaced,
    to both servers (a plain pool presenting the grant: no pacing of its own)."""
    async def go() -> dict[str, int]:
        mc = await ManagerClient.connect(manager, token=token)
        answer = await mc.request_grant(QuotaRequest(
            quota={"aead": {"ops": 2 * 10000 - N}, "rsa2048": {"ops": 2000}}, ttl=60))
        assert answer.grant is not None
        p = Pool([s.address for s in answer.grant.servers], token=token, connections=2,
                 timeout=30, placement="round-robin", max_retry_wait=0.0)
        p.hello_extra = {"grant": answer.token}
        await p.start()
        c = AsyncClient(p)
        counts = {"ok": 0, "throttled": 0, "signs": 0}
        stop = time.monotonic() + seconds

        async def encrypts() -> None:
            while time.monotonic() < stop:
                try:
                    await c.encrypt("qb", b"x" * 64, timeout=5)
                    counts["ok"] += 1
                except fe.Throttled:
                    counts["throttled"] += 1

        async def signs() -> None:
            items: list[dict[str, object]] = [{"data": os.urandom(32)} for _ in range(20)]
            while time.monotonic() < stop:
                try:
                    res = await c.batch("sign", "qb-rsa", items, timeout=10)
                except fe.Throttled as e:
                    counts["throttled"] += 1
                    await asyncio.sleep(e.retry_after)
                    continue
                counts["signs"] += sum(1 for r in res if isinstance(r, bytes))

        await asyncio.gather(*(encrypts() for _ in range(128)),
                             *(signs() for _ in range(4)))
        await c.close()
        await mc.release(answer.grant.grant_id)
        await mc.close()
        return counts

    try:
        out.put(asyncio.run(go()))
    except BaseException as e:  # the test reports it
        out.put({"error": repr(e)})
        raise


def test_granted_rate_holds_within_5_percent_while_another_tenant_saturates(
        pool: PoolFabric) -> None:
    ctx = multiprocessing.get_context("fork")
    results: Any = ctx.Queue()
    hog = ctx.Process(target=_saturate, args=(pool.manager_url, pool.tokens["tenant-b"],
                                              WINDOW_S + 6, results))
    hog.start()
    time.sleep(2.0)  # tenant b's load is on before the window opens

    async def measure() -> tuple[float, dict[str, Any]]:
        async with await connect_managed(
                pool.manager_url, token=pool.tokens["tenant-a"],
                quota={"aead": {"ops": N}}, key_classes={"qa": "aead"}) as c:
            assert c.grant is not None and len(c.grant.servers) == 2
            done = 0
            t_end = 0.0
            t0 = time.monotonic() + 1.0  # one second to settle, then the window
            stop = t0 + WINDOW_S

            async def worker() -> None:
                nonlocal done
                while time.monotonic() < stop:
                    await c.encrypt("qa", b"y" * 64)
                    if t0 <= time.monotonic() <= stop:
                        done += 1

            await asyncio.gather(*(worker() for _ in range(64)))
            t_end = time.monotonic()
            assert t_end >= stop
            return done / WINDOW_S, {**c.per_server_counts(), "counters": c.counters}

    try:
        rate, per_server = asyncio.run(measure())
    finally:
        hog.join(30)
        if hog.is_alive():
            hog.kill()
    other = results.get(timeout=5)
    assert "error" not in other, other
    counters = per_server.pop("counters")
    print(f"tenant a: {rate:,.1f} ops/s of {N:,.0f} granted; per server "
          f"{ {u: s['answered'] for u, s in per_server.items()} }; its counters "
          f"{counters}; tenant b meanwhile: {other}")
    assert abs(rate - N) <= 0.05 * N, rate
    # spread over both servers, and the other tenant really was pushing
    answered = [s["answered"] for s in per_server.values()]
    assert len(answered) == 2 and min(answered) >= 0.25 * sum(answered)
    assert other["throttled"] > 0 and other["signs"] > 0
