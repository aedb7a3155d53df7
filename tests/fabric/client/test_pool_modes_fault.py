"""In every placement mode, one of two ``cryptoplane server`` processes is SIGKILLed under
load: every call ends exactly once, with its right answer, or ``ConnectionLost`` for a
call that is not safe to repeat (encrypt under a server-chosen nonce)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from modekit import Cluster

from cryptoplane.fabric import AsyncClient
from cryptoplane.fabric.errors import ConnectionLost

TOTAL = 800
WINDOW = 32
KILL_AFTER = 250


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("modefault"), 2)
    try:
        yield c
    finally:
        c.close()


@pytest.mark.parametrize("mode", ["least-loaded", "round-robin", "size-split", "fail-over"])
def test_a_server_killed_under_load_every_call_ends_once(cluster: Cluster,
                                                         mode: str) -> None:
    if cluster.procs[0] is None or cluster.procs[0].poll() is not None:
        cluster.start(0)
    ended: dict[int, str] = {}
    twice: list[int] = []
    wrong: list[str] = []

    async def main() -> dict[str, dict[str, Any]]:
        async with await AsyncClient.connect(cluster.urls, token=cluster.token,
                                             placement=mode, silence=0.5) as c:
            for name, kind in (("f-aes", "aes256-gcm96"), ("f-rsa", "rsa-2048")):
                if name not in await c.list_keys():
                    await c.create_key(name, kind)
            blob = await c.encrypt("f-aes", b"known plaintext")
            # both servers load the keys first (a key's first use is slow)
            for _ in range(3):
                await asyncio.gather(*(c.sign("f-rsa", b"warm") for _ in range(16)),
                                     *(c.decrypt("f-aes", blob) for _ in range(16)))
            sem = asyncio.Semaphore(WINDOW)
            killed = asyncio.Event()

            async def one(i: int) -> None:
                kind = ("encrypt", "decrypt", "sign", "digest")[i % 4]
                # sizes on both sides of size-split's threshold
                data = b"%d" % i * (1 + (i % 3) * 40)
                async with sem:
                    try:
                        if kind == "encrypt":
                            out = await c.encrypt("f-aes", data)
                            ok = len(out) > len(data)
                        elif kind == "decrypt":
                            ok = await c.decrypt("f-aes", blob) == b"known plaintext"
                        elif kind == "sign":
                            ok = len(await c.sign("f-rsa", data)) > 0
                        else:
                            ok = len(await c.digest(data)) == 32
                        outcome = "ok" if ok else "wrong"
                    except ConnectionLost as e:
                        outcome = "lost" if kind == "encrypt" else f"lost {kind}: {e}"
                    except Exception as e:  # every other ending is a failure
                        outcome = f"{kind}: {type(e).__name__}: {e}"
                if i in ended:
                    twice.append(i)
                ended[i] = outcome
                if outcome not in ("ok", "lost"):
                    wrong.append(outcome)
                if len(ended) == KILL_AFTER and not killed.is_set():
                    killed.set()
                    cluster.signal(0, signal.SIGKILL)

            await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(TOTAL))), 60)
            assert killed.is_set()
            return {**c.per_server_counts(), "pool": c.counters}

    counts = asyncio.run(main())
    lost = sum(1 for v in ended.values() if v == "lost")
    print(f"{mode}: {TOTAL} ended once each, {lost} encrypts lost, "
          f"{counts['pool']['retried']} resent")
    # the kill caught calls on the wire: moved (safe) or lost (encrypt)
    assert lost + int(counts["pool"]["retried"]) > 0, counts
    assert len(ended) == TOTAL and not twice, (len(ended), twice)
    assert not wrong, wrong[:5]
    # the survivor carried on: it answered calls after the kill
    assert counts[cluster.urls[1]]["answered"], counts
