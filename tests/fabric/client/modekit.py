"""Real ``cryptoplane server`` processes over one SQLite keystore, for the pool's
placement tests: each can be killed, stopped, restarted on its own port, or pinned to
a CPU with ``taskset``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from support import unavailable

MASTER = "5a" * 32


class Cluster:
    def __init__(self, folder: Path, n: int, *, workers: int = 1,
                 cpus: list[int | None] | None = None, start: bool = True) -> None:
        self.folder = folder
        self.workers = workers
        self.extra: list[str] = []  # more server options (``--manager`` ...)
        self.cpus = cpus or [None] * n
        self.env = dict(os.environ)
        self.env["CRYPTOPLANE_MASTER_KEY"] = MASTER
        self.env["CRYPTOPLANE_STORE"] = f"sqlite:///{folder / 'keys.db'}"
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * n
        self.urls: list[str] = [""] * n
        out = subprocess.run([sys.executable, "-m", "cryptoplane", "tokens", "create",
                              "--tenant", "acme"], env=self.env, capture_output=True,
                             text=True, timeout=60, check=True)
        self.token = out.stdout.strip().splitlines()[-1].strip()
        if start:
            for i in range(n):
                self.start(i)

    @property
    def store_url(self) -> str:
        return self.env["CRYPTOPLANE_STORE"]

    def new_token(self, tenant: str) -> str:
        out = subprocess.run([sys.executable, "-m", "cryptoplane", "tokens", "create",
                              "--tenant", tenant], env=self.env, capture_output=True,
                             text=True, timeout=60, check=True)
        return out.stdout.strip().splitlines()[-1].strip()

    def start(self, i: int) -> None:
        """Start server ``i`` (again: on the port it had)."""
        ready = self.folder / f"ready{i}.json"
        ready.unlink(missing_ok=True)
        listen = self.urls[i] or "tcp://127.0.0.1:0"
        argv = [sys.executable, "-m", "cryptoplane", "server", "--listen", listen,
                "--ready-file", str(ready), "--workers", str(self.workers),
                "--log-level", "error", "--server-id", f"s{i}", *self.extra]
        cpu = self.cpus[i]
        if cpu is not None:
            if shutil.which("taskset") is None:
                unavailable("taskset (util-linux) is needed to pin a server to a CPU")
            argv = ["taskset", "-c", str(cpu), *argv]
        log = open(self.folder / f"server{i}.log", "ab")  # noqa: SIM115
        p = subprocess.Popen(argv, env=self.env, stdout=log, stderr=log)
        log.close()
        self.procs[i] = p
        deadline = time.monotonic() + 30
        while not (ready.exists() and ready.stat().st_size):
            assert p.poll() is None, (self.folder / f"server{i}.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.05)
        self.urls[i] = json.loads(ready.read_text())["listen"][0]

    def signal(self, i: int, sig: int) -> None:
        p = self.procs[i]
        if p is not None and p.poll() is None:
            p.send_signal(sig)
            if sig == signal.SIGKILL:
                p.wait(10)

    def close(self) -> None:
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.send_signal(signal.SIGKILL)
                p.wait(10)


class Hog:
    """``yes > /dev/null`` pinned to one CPU: a neighbour eating that core."""

    def __init__(self, cpu: int) -> None:
        if shutil.which("taskset") is None:
            unavailable("taskset (util-linux) is needed for the CPU hog")
        self.proc = subprocess.Popen(["taskset", "-c", str(cpu), "yes"],
                                     stdout=subprocess.DEVNULL)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
