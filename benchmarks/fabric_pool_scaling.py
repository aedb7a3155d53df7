"""Issue 17, acceptance 6: RSA-2048 signs/s through a managed pool of 1 and 2 crypto
servers (one per core, ``taskset``), and what the manager itself sustains (grant
requests/s, heartbeats/s), measured in one run on this machine.

    .venv/bin/python benchmarks/fabric_pool_scaling.py [--duration 5] [--servers 1,2]
        [--store postgresql://...] [--json]

Everything runs here on loopback: one ``cryptoplane manager``, N ``cryptoplane server
--manager`` processes each pinned to its own core, and the client in this process,
holding a grant and sending batches of signatures (100 per batch, several batches in
flight) to the grant's servers with the pool's default placement (least-loaded). The
local figure beside it is ``cryptography`` signing on one core, in the same run: the
pool's figure over it is the speed-up the pool gives (client, servers and manager share
these cores, so N servers cannot reach N times on a machine of N cores).

The keystore is SQLite in a temporary folder unless ``--store`` names one (a PostgreSQL
DSN: the several-managers configuration).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from cryptoplane.fabric.capability import new_signing_key_pem
from cryptoplane.fabric.client import AsyncClient
from cryptoplane.fabric.errors import QuotaRefused
from cryptoplane.fabric.keystore import open_keystore
from cryptoplane.fabric.keystore.master import MasterKey
from cryptoplane.fabric.manager.client import ManagerClient
from cryptoplane.fabric.manager.protocol import Heartbeat, QuotaRequest, Registration
from cryptoplane.fabric.pool import Pool

CLI = [sys.executable, "-m", "cryptoplane"]
KEY = "bench-rsa"
BATCH = 100
IN_FLIGHT = 8  # batches


def _spawn(argv: list[str], folder: Path, name: str
           ) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    ready = folder / f"{name}.ready"
    ready.unlink(missing_ok=True)
    log = (folder / f"{name}.log").open("ab")
    proc = subprocess.Popen([*argv, "--ready-file", str(ready)], stdout=subprocess.DEVNULL,
                            stderr=log)
    deadline = time.monotonic() + 60
    while not ready.exists() or not ready.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"{name} did not start: "
                             f"{(folder / f'{name}.log').read_text()[-2000:]}")
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def local_rsa_rate(seconds: float) -> float:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        key.sign(b"x" * 32, pss, hashes.SHA256())
        n += 1
    return n / (time.perf_counter() - t0)


async def pool_signs(manager: str, token: str, seconds: float, ops: float
                     ) -> tuple[float, dict[str, int]]:
    """Signs/s through the grant's servers, and how many each server answered."""
    mc = await ManagerClient.connect(manager, token=token)
    try:
        left = (await mc.status())["left"]["rsa2048"]["ops"]
        answer = await mc.request_grant(QuotaRequest(
            quota={"rsa2048": {"ops": min(ops, left), "bytes": 0}}, spread=8, ttl=600,
            label="scaling"))
        assert answer.grant is not None
        urls = [s.address for s in answer.grant.servers]
        pool = Pool(urls, token=token, connections=2, timeout=30)
        pool.hello_extra = {"grant": answer.token}
        await pool.start()
        client = AsyncClient(pool)
        items: list[dict[str, object]] = [{"data": os.urandom(32)} for _ in range(BATCH)]
        done = 0
        stop_at = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                results = await client.batch("sign", KEY, items)
                done += sum(1 for r in results if isinstance(r, bytes))

        await client.batch("sign", KEY, items[:4])  # warm: key cached on each server
        t0 = time.perf_counter()
        stop_at = t0 + seconds
        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        rate = done / (time.perf_counter() - t0)
        per_server = {u: int(c["answered"]) for u, c in client.per_server_counts().items()}
        await client.close()
        await mc.release(answer.grant.grant_id)
        return rate, per_server
    finally:
        await mc.close()


async def manager_cost(manager: str, token: str, server_token: str, seconds: float,
                       concurrency: int = 32) -> dict[str, float]:
    """Grant request+release pairs/s and heartbeats/s one manager sustains, many
    concurrent callers on a few connections."""
    mc = await ManagerClient.connect(manager, token=token)
    sc = await ManagerClient.connect(manager, token=server_token)
    out: dict[str, float] = {}
    try:
        n = 0
        stop_at = time.perf_counter() + seconds

        async def granting() -> None:
            nonlocal n
            while time.perf_counter() < stop_at:
                try:
                    a = await mc.request_grant(QuotaRequest(
                        quota={"ed25519": {"ops": 1, "bytes": 0}}, ttl=60, spread=1))
                except QuotaRefused:
                    continue
                assert a.grant is not None
                await mc.release(a.grant.grant_id)
                n += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(granting() for _ in range(concurrency)))
        out["grants_per_s"] = n / (time.perf_counter() - t0)
        ids = [f"sim-{i}" for i in range(concurrency)]
        for sid in ids:
            await sc.register(Registration(sid, "tcp://127.0.0.1:1",
                                           {"ed25519": {"ops": 10.0, "bytes": 0.0}}))
        beats = 0
        stop_at = time.perf_counter() + seconds

        async def beating(sid: str) -> None:
            nonlocal beats
            while time.perf_counter() < stop_at:
                await sc.heartbeat(Heartbeat(sid, {"ed25519": {"ops": 1.0, "bytes": 0.0}}, 0))
                beats += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(beating(s) for s in ids))
        out["heartbeats_per_s"] = beats / (time.perf_counter() - t0)
        for sid in ids:
            await sc.leave(sid)
    finally:
        await mc.close()
        await sc.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per figure")
    ap.add_argument("--servers", default="1,2", help="pool sizes to measure, e.g. 1,2,4,8")
    ap.add_argument("--store", default=None, help="keystore URL (default: SQLite in a temp dir)")
    ap.add_argument("--postgres", action="store_true",
                    help="start a throwaway PostgreSQL (tests/fabric/pg.py) for the keystore")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.servers.split(",") if x]
    if args.postgres:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "fabric"))
        from pg import PostgresCluster  # type: ignore[import-not-found]

        with PostgresCluster() as cluster:
            args.store = cluster.create_database("poolscaling")
            return measure(args, sizes)
    return measure(args, sizes)


def measure(args: argparse.Namespace, sizes: list[int]) -> int:
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="cp-pool-scaling-") as tmp:
        folder = Path(tmp)
        store = args.store or f"sqlite://{folder / 'keystore.db'}"
        master_file = folder / "master.key"
        master_file.write_text(os.urandom(32).hex())
        master_file.chmod(0o600)
        signing = folder / "signing.pem"
        signing.write_bytes(new_signing_key_pem())
        with open_keystore(store, MasterKey.from_file(master_file)) as ks:
            tenant = ks.create_token("bench", label="scaling")
            server_tok = ks.create_token("operator", ops=("fabric-server",), label="servers")
        figures: dict[str, Any] = {"cores": cores, "store": store.split(":")[0]}
        print(f"local RSA-2048 PSS signs/s on one core: measuring {args.duration:g} s",
              file=sys.stderr)
        figures["local_one_core"] = local_rsa_rate(args.duration)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            mproc, mready = _spawn([*CLI, "manager", "--store", store, "--listen",
                                    "tcp://127.0.0.1:0", "--signing-key", str(signing),
                                    "--lease", "5", "--overcommit", "4"], folder, "manager")
            procs.append(mproc)
            murl = str((mready.get("listen") or [mready.get("url")])[0])
            manager = "manager://" + murl.removeprefix("tcp://")
            for n in sizes:
                servers: list[subprocess.Popen[bytes]] = []
                for i in range(n):
                    p, _ = _spawn(["taskset", "-c", str(i % cores), *CLI, "server",
                                   "--store", store, "--master-key-file", str(master_file),
                                   "--listen", "tcp://127.0.0.1:0", "--server-id",
                                   f"s{n}-{i}", "--workers", "1", "--manager", manager,
                                   "--manager-token", server_tok], folder, f"s{n}-{i}")
                    servers.append(p)
                if n == sizes[0]:
                    async def create_key() -> None:
                        mc = await ManagerClient.connect(manager, token=tenant)
                        st = await mc.status()
                        await mc.close()
                        url = st["servers"][0]["address"]
                        c = await AsyncClient.connect(url, token=tenant)
                        await c.create_key(KEY, "rsa-2048")
                        await c.close()
                    asyncio.run(create_key())
                print(f"{n} server(s): signing for {args.duration:g} s", file=sys.stderr)
                rate, per_server = asyncio.run(pool_signs(manager, tenant, args.duration,
                                                          1e6))
                figures[f"pool_{n}_servers"] = rate
                figures[f"pool_{n}_batches_per_server"] = sorted(per_server.values())
                figures[f"pool_{n}_over_local"] = rate / figures["local_one_core"]
                _stop(servers)
            print("manager cost: measuring", file=sys.stderr)
            admin = ""
            with open_keystore(store, MasterKey.from_file(master_file)) as ks:
                admin = ks.create_token("bench", ops=("quota",), label="manager cost")
            # one live server so grants have somewhere to go
            p, _ = _spawn([*CLI, "server", "--store", store, "--master-key-file",
                           str(master_file), "--listen", "tcp://127.0.0.1:0", "--server-id",
                           "cost", "--manager", manager, "--manager-token", server_tok,
                           "--capacity", "ed25519=1000000"], folder, "cost")
            procs.append(p)
            figures.update(asyncio.run(manager_cost(manager, admin, server_tok,
                                                    args.duration)))
        finally:
            _stop(procs)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"machine: {cores} cores; keystore {figures['store']}")
        print(f"local RSA-2048 PSS signs/s, one core:   {figures['local_one_core']:10,.0f}")
        for n in sizes:
            print(f"through the pool, {n} server(s):        "
                  f"{figures[f'pool_{n}_servers']:10,.0f}  "
                  f"({figures[f'pool_{n}_over_local']:.2f}x one core; batches per server "
                  f"{figures[f'pool_{n}_batches_per_server']})")
        print(f"manager: grant request+release pairs/s: {figures['grants_per_s']:10,.0f}")
        print(f"manager: heartbeats/s:                  {figures['heartbeats_per_s']:10,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
