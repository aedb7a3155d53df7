"""A manager's pool for the granted client's tests: a real ``cryptoplane manager`` and
``cryptoplane server --manager`` processes, all over one SQLite keystore (so one
tenant's token works at the manager and at the servers)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from modekit import Cluster

from cryptoplane.fabric.manager.client import ManagerClient

_MANAGER_TESTS = str(Path(__file__).resolve().parent.parent / "manager")
if _MANAGER_TESTS not in sys.path:
    sys.path.insert(0, _MANAGER_TESTS)

from managerkit import ManagerProc, start_manager  # noqa: E402

CAPACITY = "rsa2048=400,aead=100000:100000000"


def manager_call(m: ManagerProc, token: str, what: str, *args: Any) -> Any:
    async def run() -> Any:
        client = await ManagerClient.connect(m.url, token=token, timeout=5.0)
        try:
            return await getattr(client, what)(*args)
        finally:
            await client.close()
    return asyncio.run(run())


@contextmanager
def managed_pool(folder: Path, servers: int, *, lease: float = 1.0,
                 overcommit: float = 1.0, workers: int = 1
                 ) -> Iterator[tuple[Cluster, ManagerProc]]:
    cluster = Cluster(folder, servers, start=False, workers=workers)
    m = start_manager(cluster.store_url, folder, lease=lease, overcommit=overcommit)
    try:
        cluster.extra = ["--manager", m.manager_url, "--manager-token", cluster.token,
                         "--capacity", CAPACITY]
        for i in range(servers):
            cluster.start(i)
        deadline = time.monotonic() + 15
        while len(manager_call(m, cluster.token, "status").get("servers", [])) < servers:
            assert time.monotonic() < deadline, "the servers did not register"
            time.sleep(0.1)
        yield cluster, m
    finally:
        cluster.close()
        m.stop()
