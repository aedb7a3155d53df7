"""The fabric client's throughput against a ``cryptoplane server`` subprocess on this
machine (loopback; client and server share the cores).

    .venv/bin/python benchmarks/fabric_client.py [--requests 200000] [--json]

Prints:
- pipelined 64-byte transit encrypts/s through one AsyncClient with 1,024 in flight
  (and with 1 in flight, for the round trip);
- batch items/s (64-byte encrypts, batches of 1,000, 8 batches in flight);
- RSA-2048 PSS signs/s through a plane with and without a Remote engine (plane.map).
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

import cryptoplane as cp
from cryptoplane.fabric.client import AsyncClient


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(folder: Path, workers: int) -> tuple[subprocess.Popen[bytes], str, str]:
    env = dict(os.environ, CRYPTOPLANE_MASTER_KEY="11" * 32,
               CRYPTOPLANE_STORE=f"sqlite:///{folder / 'keys.db'}")
    token = subprocess.run([sys.executable, "-m", "cryptoplane", "tokens", "create",
                            "--tenant", "bench"], env=env, capture_output=True, text=True,
                           check=True).stdout.strip().splitlines()[-1]
    ready = folder / "ready.json"
    proc = subprocess.Popen([sys.executable, "-m", "cryptoplane", "server", "--listen",
                             "tcp://127.0.0.1:0", "--ready-file", str(ready), "--workers",
                             str(workers), "--log-level", "error"], env=env)
    while not (ready.exists() and ready.stat().st_size):
        if proc.poll() is not None:
            raise SystemExit("the server did not start")
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())["listen"][0], token


async def pipelined(url: str, token: str, total: int, depth: int,
                    server_pid: int = 0) -> dict[str, float]:
    async with await AsyncClient.connect(url, token=token, connections=2) as c:
        await c.create_key("k64", "aes256-gcm96") if "k64" not in await c.list_keys() else None
        data = os.urandom(64)
        left = total

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await c.encrypt("k64", data)

        left = min(total, 5000)
        await asyncio.gather(*(worker() for _ in range(min(depth, 64))))  # warm up
        left = total
        c0 = time.process_time()
        s0 = cpu_seconds(server_pid) if server_pid else 0.0
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(depth)))
        out = {"per_s": total / (time.perf_counter() - t0),
               "client_cpu_us": (time.process_time() - c0) / total * 1e6}
        if server_pid:
            out["server_cpu_us"] = (cpu_seconds(server_pid) - s0) / total * 1e6
        return out


async def batched(url: str, token: str, total: int, size: int = 1000,
                  depth: int = 8) -> float:
    async with await AsyncClient.connect(url, token=token, connections=2) as c:
        items: list[dict[str, object]] = [{"data": os.urandom(64)} for _ in range(size)]
        left = total // size

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                out = await c.batch("encrypt", "k64", items)
                assert not any(isinstance(x, BaseException) for x in out)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(depth)))
        return (total // size) * size / (time.perf_counter() - t0)


def signs(url: str, token: str, n: int) -> dict[str, float]:
    key = cp.Key.generate("rsa-pss-sha256", size=2048)
    out: dict[str, float] = {}
    for label, engines in (("local", ["inline", "threads"]),
                           ("local+remote", ["inline", "threads",
                                             cp.Remote(url, token=token)])):
        with cp.Plane(engines=engines) as plane:
            reqs = [cp.Sign(key, b"m%d" % i) for i in range(n)]
            plane.map(reqs[: n // 4])  # warm up: the balancer measures each engine
            t0 = time.perf_counter()
            plane.map(reqs)
            out[label] = n / (time.perf_counter() - t0)
            if label != "local":
                stats = plane.stats() if hasattr(plane, "stats") else {}
                out["remote_share"] = _share(stats)
    return out


def remote_aead(url: str, token: str, n: int) -> dict[str, float]:
    """64-byte AES-256-GCM encrypts through a plane whose session is bound to the Remote
    engine (RAW_ENCRYPT on an offload session), with plane.map, against inline alone."""
    key = cp.Key.generate("aes-256-gcm")
    reqs = [cp.Encrypt(key, os.urandom(64), nonce=i.to_bytes(12, "big")) for i in range(n)]
    out: dict[str, float] = {}
    remote = cp.Remote(url, token=token)
    with cp.Plane(engines=["inline", remote]) as plane:
        plane.session(key, engine=remote.name)
        plane.map(reqs[: n // 10])
        t0 = time.perf_counter()
        plane.map(reqs)
        out["remote_bound"] = n / (time.perf_counter() - t0)
    with cp.Plane(engines=["inline"]) as plane:
        t0 = time.perf_counter()
        plane.map(reqs)
        out["inline"] = n / (time.perf_counter() - t0)
    return out


def _share(stats: Any) -> float:
    try:
        rows = stats["engines"]
        total = sum(r["requests"] for r in rows.values())
        return rows.get("remote", {}).get("requests", 0) / total if total else 0.0
    except Exception:
        return -1.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200_000)
    ap.add_argument("--signs", type=int, default=4000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        proc, url, token = start_server(Path(d), args.workers)
        try:
            res: dict[str, Any] = {}
            res["encrypt64_1024_in_flight"] = asyncio.run(
                pipelined(url, token, args.requests, 1024, proc.pid))
            res["encrypt64_1_in_flight"] = asyncio.run(
                pipelined(url, token, min(args.requests, 20_000), 1, proc.pid))
            res["batch_items_per_s"] = asyncio.run(batched(url, token, args.requests))
            res["rsa2048_sign_per_s"] = signs(url, token, args.signs)
            res["aes64_plane_map_per_s"] = remote_aead(url, token, 20_000)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            if isinstance(v, dict):
                print(f"{k}: " + ", ".join(f"{kk} {vv:,.0f}" if abs(vv) >= 10
                                           else f"{kk} {vv:.2f}" for kk, vv in v.items()))
            else:
                print(f"{k}: {v:,.0f}")


if __name__ == "__main__":
    main()
