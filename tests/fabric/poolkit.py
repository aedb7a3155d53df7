"""A whole pool for the fabric's end-to-end and fault tests: one PostgreSQL database (the
tests' own cluster), managers and crypto servers as real ``cryptoplane`` processes on
loopback, tokens for two tenants, a server token and an operator's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pg import PostgresCluster

from cryptoplane.fabric.capability import new_signing_key_pem
from cryptoplane.fabric.keystore import open_keystore
from cryptoplane.fabric.keystore.master import MasterKey

CLI = [sys.executable, "-m", "cryptoplane"]


@dataclass
class Proc:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes]
    url: str
    http: str
    log: Path
    ready: Path

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def _spawn(name: str, argv: list[str], folder: Path, *, cpu: int | None = None,
           timeout: float = 60.0) -> Proc:
    ready = folder / f"{name}.ready"
    ready.unlink(missing_ok=True)
    log = folder / f"{name}.log"
    full = [*argv, "--ready-file", str(ready)]
    if cpu is not None:
        full = ["taskset", "-c", str(cpu), *full]
    proc = subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=log.open("ab"))
    deadline = time.monotonic() + timeout
    while not ready.exists() or not ready.read_text().strip():
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited: {log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{name} not ready: {log.read_text()[-3000:]}")
        time.sleep(0.05)
    event = json.loads(ready.read_text())
    listen = event.get("listen") or [event.get("url")]
    return Proc(name, full, proc, str(listen[0]), str(event.get("http") or ""), log, ready)


@dataclass
class PoolFabric:
    cluster: PostgresCluster
    dsn: str
    folder: Path
    master_file: Path
    signing_key: Path
    lease: float
    tokens: dict[str, str] = field(default_factory=dict)
    managers: dict[str, Proc] = field(default_factory=dict)
    servers: dict[str, Proc] = field(default_factory=dict)

    @classmethod
    def create(cls, cluster: PostgresCluster, folder: Path, *, database: str,
               lease: float = 2.0) -> PoolFabric:
        dsn = cluster.create_database(database)
        master_file = folder / "master.key"
        master_file.write_text(os.urandom(32).hex())
        master_file.chmod(0o600)
        signing = folder / "manager-signing.pem"
        signing.write_bytes(new_signing_key_pem())
        signing.chmod(0o600)
        f = cls(cluster, dsn, folder, master_file, signing, lease)
        with open_keystore(dsn, MasterKey.from_file(master_file)) as store:
            f.tokens["tenant-a"] = store.create_token("tenant-a", label="pool a")
            f.tokens["tenant-b"] = store.create_token("tenant-b", label="pool b")
            f.tokens["server"] = store.create_token("operator", ops=("fabric-server",),
                                                    label="pool servers")
            f.tokens["admin"] = store.create_token("operator", label="pool operator")
        return f

    # -- processes ----------------------------------------------------------------------

    def start_manager(self, name: str, *, overcommit: float = 1.0) -> Proc:
        argv = [*CLI, "manager", "--store", self.dsn, "--listen", "tcp://127.0.0.1:0",
                "--http", "127.0.0.1:0", "--signing-key", str(self.signing_key),
                "--lease", str(self.lease), "--overcommit", str(overcommit),
                "--manager-id", name]
        old = self.managers.get(name)
        if old is not None:  # a restart keeps its port, so clients' URLs stay good
            argv[argv.index("tcp://127.0.0.1:0")] = old.url
            argv[argv.index("127.0.0.1:0")] = old.http.replace("http://", "")
        p = _spawn(name, argv, self.folder)
        self.managers[name] = p
        return p

    @property
    def manager_url(self) -> str:
        """``manager://h:p,h:p`` over every manager started so far."""
        return "manager://" + ",".join(m.url.removeprefix("tcp://")
                                       for m in self.managers.values())

    def start_server(self, name: str, *, capacity: str | None = None,
                     cpu: int | None = None, workers: int | None = None) -> Proc:
        argv = [*CLI, "server", "--store", self.dsn, "--master-key-file",
                str(self.master_file), "--listen", "tcp://127.0.0.1:0", "--http",
                "127.0.0.1:0", "--server-id", name, "--grace", "2",
                "--manager", self.manager_url, "--manager-token", self.tokens["server"]]
        if capacity:
            argv += ["--capacity", capacity]
        if workers:
            argv += ["--workers", str(workers)]
        old = self.servers.get(name)
        if old is not None:
            argv[argv.index("tcp://127.0.0.1:0")] = old.url
        p = _spawn(name, argv, self.folder, cpu=cpu)
        self.servers[name] = p
        return p

    def close(self) -> None:
        for p in [*self.servers.values(), *self.managers.values()]:
            p.stop()

    # -- the operator's view ------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        out = subprocess.run([*CLI, "fabric", "status", "--json", "--manager",
                              self.manager_url, "--token", self.tokens["admin"]],
                             capture_output=True, timeout=60)
        assert out.returncode == 0, out.stderr.decode()[-2000:]
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def status_table(self) -> str:
        out = subprocess.run([*CLI, "fabric", "status", "--manager", self.manager_url,
                              "--token", self.tokens["admin"]], capture_output=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr.decode()[-2000:]
        return out.stdout.decode()

    def wait_servers(self, names: set[str], timeout: float = 20.0) -> dict[str, Any]:
        """The status once exactly ``names`` are the live servers."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            live = {s["server_id"] for s in st["servers"]}
            if live == names:
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"servers {sorted(live)}, wanted {sorted(names)}")
            time.sleep(0.1)
