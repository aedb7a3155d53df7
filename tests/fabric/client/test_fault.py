"""The acceptance fault test: two ``cryptoplane server`` processes share one keystore;
four clients (two AsyncClients over both URLs, two planes whose Remote engine spans
both servers) push 10,000 mixed requests; one server is SIGKILLed (or SIGSTOPped)
mid-run. Every request must end exactly once, with a correct result or, for requests
that are not safe to repeat (encrypt under a server-chosen nonce, data keys, random),
``ConnectionLost``; the clients carry on on the surviving server."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

import cryptoplane as cp
from cryptoplane.fabric import AsyncClient, Client
from cryptoplane.fabric.errors import ConnectionLost

TOTAL = 10_000
CLIENTS = 4
PER_CLIENT = TOTAL // CLIENTS
WINDOW = 64  # requests in flight per client
KILL_AFTER = 3_000  # ended requests before the SIGKILL
UNSAFE = {"encrypt", "random", "datakey"}


def _env(folder: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["CRYPTOPLANE_MASTER_KEY"] = "5a" * 32
    env["CRYPTOPLANE_STORE"] = f"sqlite:///{folder / 'keys.db'}"
    return env


def _cli(folder: Path, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "cryptoplane", *args], env=_env(folder),
                         capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[list[subprocess.Popen[bytes]], list[str], str]]:
    token = _cli(tmp_path, "tokens", "create", "--tenant", "acme").splitlines()[-1].strip()
    procs: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    try:
        for i in range(2):
            ready = tmp_path / f"ready{i}.json"
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "cryptoplane", "server", "--listen",
                 "tcp://127.0.0.1:0", "--ready-file", str(ready), "--workers", "2",
                 "--log-level", "error"],
                env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + 30
            while not (ready.exists() and ready.stat().st_size):
                assert procs[-1].poll() is None, "the server exited at start"
                assert time.monotonic() < deadline, "the server did not get ready"
                time.sleep(0.05)
            urls.append(json.loads(ready.read_text())["listen"][0])
        yield procs, urls, token
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait(10)


class Tally:
    """Every request's one ending, checked as it comes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.submitted = 0
        self.ended: dict[tuple[int, int], tuple[str, Any]] = {}
        self.twice = 0
        self.lost_unsafe = 0
        self.wrong: list[str] = []
        self.after_kill = 0
        self.killed_at: float | None = None

    def submit(self) -> None:
        with self.lock:
            self.submitted += 1

    def end(self, rid: tuple[int, int], op: str, ok: bool, detail: object) -> None:
        with self.lock:
            if rid in self.ended:
                self.twice += 1
                return
            self.ended[rid] = (op, detail)
            if not ok:
                if isinstance(detail, ConnectionLost) and op in UNSAFE:
                    self.lost_unsafe += 1
                else:
                    self.wrong.append(f"{op}: {type(detail).__name__}: {detail}")
            elif self.killed_at is not None:
                self.after_kill += 1


SILENCE = 0.5  # a stopped server is probed and cut after about twice this


def _client_worker(n: int, urls: list[str], token: str, fixtures: dict[str, Any],
                   tally: Tally) -> None:
    async def main() -> None:
        async with await AsyncClient.connect(urls, token=token, connections=2,
                                             silence=SILENCE) as c:
            sem = asyncio.Semaphore(WINDOW)

            async def one(i: int) -> None:
                rid = (n, i)
                kind = ("encrypt", "decrypt", "sign", "verify", "hmac", "digest", "random",
                        "datakey")[i % 8]
                data = b"%d-%d" % (n, i)
                try:
                    if kind == "encrypt":
                        ct = await c.encrypt("aes", data)
                        ok = await c.decrypt("aes", ct) == data  # safe: repeated if lost
                    elif kind == "decrypt":
                        ok = await c.decrypt("aes", fixtures["ct"]) == b"fixed"
                    elif kind == "sign":
                        ok = await c.sign("ed", b"fixed") == fixtures["sig"]
                    elif kind == "verify":
                        ok = await c.verify("ed", b"fixed", fixtures["sig"])
                    elif kind == "hmac":
                        ok = await c.hmac("mac", b"fixed") == fixtures["mac"]
                    elif kind == "digest":
                        ok = await c.digest(data) == hashlib.sha256(data).digest()
                    elif kind == "random":
                        ok = len(await c.random(32)) == 32
                    else:
                        plain, wrapped = await c.datakey("aes")
                        ok = plain is not None and len(plain) == 32 and bool(wrapped)
                except Exception as e:
                    tally.end(rid, kind, False, e)
                else:
                    tally.end(rid, kind, True, None) if ok else tally.end(
                        rid, kind, False, AssertionError("wrong result"))
                finally:
                    sem.release()

            tasks = []
            for i in range(PER_CLIENT):
                await sem.acquire()
                tally.submit()
                tasks.append(asyncio.ensure_future(one(i)))
            await asyncio.gather(*tasks)

    asyncio.run(main())


def _plane_worker(n: int, urls: list[str], token: str, tally: Tally) -> None:
    remote = cp.Remote(urls, token=token, connections=2, name="remote", silence=SILENCE)
    with cp.Plane(engines=["inline", remote]) as plane, cp.Plane(["inline"]) as local:
        gcm = cp.Key.generate("aes-256-gcm")
        ed = cp.Key.generate("ed25519")
        mac = cp.Key.generate("hmac-sha256")
        for k in (gcm, ed, mac):
            plane.session(k, engine="remote")
        sem = threading.Semaphore(WINDOW)
        for i in range(PER_CLIENT):
            rid = (n, i)
            req: cp.Request
            if i % 3 == 0:
                req = cp.Encrypt(gcm, b"%d" % i, nonce=i.to_bytes(12, "big"), aad=b"a")
            elif i % 3 == 1:
                req = cp.Sign(ed, b"%d" % i)
            else:
                req = cp.Mac(mac, b"%d" % i)
            want = local.run(req)
            sem.acquire()
            tally.submit()
            fut = plane.submit(req)

            def done(f: Future[Any], rid: tuple[int, int] = rid, want: bytes = want,
                     op: str = req.op.value) -> None:
                e = f.exception()
                if e is not None:
                    tally.end(rid, op, False, e)
                elif f.result() != want:
                    tally.end(rid, op, False, AssertionError("differs from inline"))
                else:
                    tally.end(rid, op, True, None)
                sem.release()

            fut.add_done_callback(done)
        for _ in range(WINDOW):
            sem.acquire()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["SIGKILL", "SIGSTOP"])
def test_one_of_two_servers_dies_or_stops_mid_run(
        servers: tuple[list[subprocess.Popen[bytes]], list[str], str],
        how: signal.Signals) -> None:
    """SIGKILL: the kernel resets its connections at once. SIGSTOP: they stay open and
    silent, so the clients find out by PING (``silence``) and cut them."""
    procs, urls, token = servers
    fixtures: dict[str, Any] = {}
    with Client(urls, token=token) as c:
        c.create_key("aes", "aes256-gcm96")
        c.create_key("ed", "ed25519")
        c.create_key("mac", "hmac")
        fixtures["ct"] = c.encrypt("aes", b"fixed")
        fixtures["sig"] = c.sign("ed", b"fixed")
        fixtures["mac"] = c.hmac("mac", b"fixed")
    tally = Tally()
    threads = [threading.Thread(target=_client_worker, args=(n, urls, token, fixtures,
                                                             tally)) for n in range(2)]
    threads += [threading.Thread(target=_plane_worker, args=(n, urls, token, tally))
                for n in range(2, 4)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    while len(tally.ended) < KILL_AFTER and any(t.is_alive() for t in threads):
        time.sleep(0.005)
    procs[0].send_signal(how)
    tally.killed_at = time.monotonic()
    for t in threads:
        t.join(100)
    took = time.monotonic() - t0
    assert not any(t.is_alive() for t in threads), "a client never finished"
    print(f"\n{how.name}: {TOTAL} requests in {took:.1f} s; stopped after {KILL_AFTER}; "
          f"{tally.after_kill} succeeded after; {tally.lost_unsafe} unsafe "
          f"requests ended ConnectionLost")
    assert tally.submitted == TOTAL
    assert len(tally.ended) == TOTAL and tally.twice == 0
    assert not tally.wrong, tally.wrong[:10]
    assert tally.after_kill > TOTAL - KILL_AFTER - 1000  # the rest carried on on server 2
    assert procs[1].poll() is None
    if how is signal.SIGSTOP:
        procs[0].send_signal(signal.SIGCONT)
