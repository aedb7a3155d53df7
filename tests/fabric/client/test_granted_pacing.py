"""The acceptance figure for pacing: a client granted N RSA-2048 signatures a second,
spread over two servers, completes N a second within 5% over 10 s while another tenant,
granted more than the servers can do, keeps them saturated; the servers hardly ever
have to THROTTLE it (it waits for its turn instead of being refused)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from grantedkit import managed_pool

from cryptoplane.fabric.granted import connect_managed

N = 200  # ops/s granted to the measured client (100 a server: a burst of 2 there)
SECONDS = 10.0


def test_a_granted_rate_is_kept_over_two_servers_under_a_neighbours_load(
        tmp_path: Path) -> None:
    with managed_pool(tmp_path, 2, overcommit=2.0) as (cluster, m):
        other_token = cluster.new_token("other")

        async def main() -> tuple[int, dict[str, int], int]:
            mine = await connect_managed(
                m.manager_url, token=cluster.token, quota={"rsa2048": {"ops": N}},
                spread=2)
            other = await connect_managed(
                m.manager_url, token=other_token, quota={"rsa2048": {"ops": 700}},
                spread=2)
            try:
                assert mine.grant is not None and len(mine.grant.servers) == 2
                await mine.create_key("p-rsa", "rsa-2048")
                await other.create_key("p-rsa", "rsa-2048")
                stop = asyncio.Event()
                other_done = 0

                async def neighbour() -> None:
                    nonlocal other_done
                    while not stop.is_set():
                        await asyncio.gather(*(other.sign("p-rsa", b"n")
                                               for _ in range(64)))
                        other_done += 64

                hog = asyncio.ensure_future(neighbour())
                await asyncio.sleep(1.0)  # the neighbour's load is on
                ended: list[float] = []
                sem = asyncio.Semaphore(64)
                # measured over SECONDS in the middle of the run: not the first second
                # (the burst allowed at the start) nor the calls still on their way
                begin = time.monotonic() + 1.0
                end = begin + SECONDS + 1.0

                async def one() -> None:
                    try:
                        await mine.sign("p-rsa", b"m")
                        ended.append(time.monotonic())
                    finally:
                        sem.release()

                tasks = []
                while time.monotonic() < end:
                    await sem.acquire()
                    tasks.append(asyncio.ensure_future(one()))
                await asyncio.gather(*tasks)
                stop.set()
                await hog
                done = sum(1 for t in ended if begin <= t < begin + SECONDS)
                return done, mine.counters, other_done
            finally:
                await mine.close()
                await other.close()

        done, counters, other_done = asyncio.run(main())
        rate = done / SECONDS
        print(f"granted {N}/s: {rate:.1f}/s over {SECONDS:g} s ({done} signatures), "
              f"throttled {counters['throttled']}, busy {counters['busy']}; the neighbour did "
              f"{other_done / (SECONDS + 3):.0f}/s")
        assert abs(rate - N) <= 0.05 * N, rate
        assert counters["throttled"] <= 0.1 * done, counters
