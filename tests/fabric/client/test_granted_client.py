"""A client holding a manager's grant, against a real manager and real servers: the
grant's servers serve it, renewal re-presents the token (calls go on past the first
token's expiry), a server's death moves the grant and the client follows, a revocation
makes it ask for a new grant, and close releases the grant."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from grantedkit import managed_pool, manager_call

from cryptoplane.fabric.errors import QuotaRefused
from cryptoplane.fabric.granted import connect_managed
from cryptoplane.fabric.manager.client import ManagerClient


def test_granted_client_lifecycle(tmp_path: Path) -> None:
    with managed_pool(tmp_path, 3) as (cluster, m):
        async def main() -> str:
            c = await connect_managed(
                m.manager_url, token=cluster.token, quota={"rsa2048": {"ops": 300}},
                spread=2, ttl=2.0)
            try:
                g = c.grant
                assert g is not None and len(g.servers) == 2
                granted = {s.address for s in g.servers}
                await c.create_key("g-rsa", "rsa-2048")  # key management: not charged
                msgs = [b"m%d" % i for i in range(60)]
                sigs = await asyncio.gather(*(c.sign("g-rsa", x) for x in msgs))
                assert all(await asyncio.gather(*(c.verify("g-rsa", x, s)
                                                  for x, s in zip(msgs, sigs,
                                                                  strict=True))))
                counts = c.per_server_counts()
                assert set(counts) == granted
                assert all(v["sent"] > 0 for v in counts.values()), counts

                # past the first token's expiry: renewed and re-presented
                first_token = c.pool.hello_extra["grant"]
                end = time.monotonic() + 2.6
                while time.monotonic() < end:
                    await c.sign("g-rsa", b"renewed")
                    await asyncio.sleep(0.1)
                stats = c.pool.describe()["grant_counters"]
                assert stats["renewed"] >= 1, stats
                assert c.pool.hello_extra["grant"] != first_token
                assert c.counters.get("grant_refused", 0) == 0, c.counters

                # one of the grant's servers dies: its lease lapses, the grant moves
                # to the third server (an EVENT, or the next renewal) and calls follow
                victim = g.servers[0].address
                cluster.signal(cluster.urls.index(victim), signal.SIGKILL)
                deadline = time.monotonic() + 10
                while victim in {s.address for s in c.grant.servers}:  # type: ignore[union-attr]
                    assert time.monotonic() < deadline, "the grant did not move"
                    await c.sign("g-rsa", b"moving")
                    await asyncio.sleep(0.1)
                moved = {s.address for s in c.grant.servers}  # type: ignore[union-attr]
                (third,) = set(cluster.urls) - granted
                assert third in moved
                for _ in range(20):
                    await c.sign("g-rsa", b"after")
                assert c.per_server_counts()[third]["answered"] > 0
                assert victim not in c.per_server_counts()
                return c.grant.grant_id  # type: ignore[union-attr]
            finally:
                await c.close()

        grant_id = asyncio.run(main())
        left = manager_call(m, cluster.token, "list_grants")
        assert grant_id not in {g["grant_id"] for g in left}, left


def test_a_moved_event_switches_servers(tmp_path: Path) -> None:
    """A long grant (no renewal for 30 s): only the manager's push can move it."""
    with managed_pool(tmp_path, 2) as (cluster, m):
        async def main() -> None:
            async with await connect_managed(
                    m.manager_url, token=cluster.token, quota={"rsa2048": {"ops": 100}},
                    spread=1, ttl=60.0) as c:
                g = c.grant
                assert g is not None and len(g.servers) == 1
                first = g.servers[0].address
                (other,) = set(cluster.urls) - {first}
                await c.create_key("e-rsa", "rsa-2048")
                await c.sign("e-rsa", b"before")
                cluster.signal(cluster.urls.index(first), signal.SIGKILL)
                deadline = time.monotonic() + 10
                while c.pool.describe()["grant_counters"]["moved"] == 0:
                    assert time.monotonic() < deadline, "no 'moved' event came"
                    await asyncio.sleep(0.05)
                assert c.pool.describe()["grant_counters"]["renewed"] == 0
                assert [s.address for s in c.grant.servers] == [other]  # type: ignore[union-attr]
                assert await c.verify("e-rsa", b"after", await c.sign("e-rsa", b"after"))
                assert set(c.per_server_counts()) == {other}

                # revoked (an operator): the push makes the client ask for a new grant
                old = c.grant.grant_id  # type: ignore[union-attr]
                mc = await ManagerClient.connect(m.url, token=cluster.token)
                try:
                    await mc.revoke(old)
                finally:
                    await mc.close()
                deadline = time.monotonic() + 10
                while c.grant is None or c.grant.grant_id == old:
                    assert time.monotonic() < deadline, "no new grant after a revocation"
                    await asyncio.sleep(0.05)
                assert c.pool.describe()["grant_counters"]["revoked"] == 1
                assert await c.verify("e-rsa", b"new", await c.sign("e-rsa", b"new"))
        asyncio.run(main())


def test_a_quota_the_pool_cannot_carry_is_refused_with_what_is_left(tmp_path: Path) -> None:
    with managed_pool(tmp_path, 1) as (cluster, m):
        async def main() -> None:
            try:
                await connect_managed(m.manager_url, token=cluster.token,
                                                  quota={"rsa2048": {"ops": 10_000}})
            except QuotaRefused as e:
                assert e.left["rsa2048"]["ops"] == 400
            else:
                raise AssertionError("a quota over capacity was granted")
        asyncio.run(main())
