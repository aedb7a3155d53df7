"""Real ``cryptoplane manager`` processes for tests (this folder's and others').

    m = start_manager(keystore_url, tmp_path)          # tcp on a free port, /metrics
    m.url        # tcp://127.0.0.1:PORT      m.manager_url  # manager://127.0.0.1:PORT
    m.http       # http://127.0.0.1:PORT     m.key_id, m.ready (the ready event)
    m.stop()     # SIGTERM, wait             m.kill()       # SIGKILL, wait

``tokens(store_url)`` makes the usual tokens (a server's, two tenants', an admin's)
straight in the keystore: the manager needs no master key, nor do they.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptoplane.fabric.capability import new_signing_key_pem

CLI = [sys.executable, "-m", "cryptoplane"]


@dataclass
class ManagerProc:
    proc: subprocess.Popen[bytes]
    argv: list[str]
    url: str
    http: str
    signing_key: Path
    log: Path
    ready: dict[str, Any] = field(default_factory=dict)

    @property
    def manager_url(self) -> str:
        return "manager://" + self.url.removeprefix("tcp://")

    @property
    def key_id(self) -> str:
        return str(self.ready.get("key_id", ""))

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM; the exit status (killed if it does not stop within ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """GET on the operations endpoint: (status, body)."""
        try:
            with urllib.request.urlopen(self.http + path, timeout=timeout) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as e:
            return int(e.code), e.read().decode()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_manager(store_url: str, tmp_path: Path, *, signing_key: Path | None = None,
                  lease: float = 2.0, overcommit: float = 1.0,
                  extra: Sequence[str] = (), name: str = "manager",
                  listen: str = "tcp://127.0.0.1:0", http: str = "127.0.0.1:0",
                  timeout: float = 30.0) -> ManagerProc:
    """A ``cryptoplane manager`` over ``store_url`` on a free loopback port (or
    ``listen``; pass a previous ``url`` to restart on the same port), its operations
    endpoint on ``http``, ready when this returns. ``signing_key``: the PEM file the
    managers of one pool share (made in ``tmp_path`` if None)."""
    if signing_key is None:
        signing_key = tmp_path / "manager-signing.pem"
        if not signing_key.exists():
            signing_key.write_bytes(new_signing_key_pem())
            signing_key.chmod(0o600)
    ready = tmp_path / f"{name}.ready"
    ready.unlink(missing_ok=True)
    log = tmp_path / f"{name}.log"
    argv = [*CLI, "manager", "--store", store_url, "--listen", listen, "--http", http,
            "--signing-key", str(signing_key), "--lease", str(lease), "--overcommit",
            str(overcommit), "--manager-id", name, "--ready-file", str(ready), *extra]
    with log.open("ab") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + timeout
    while not ready.exists() or not ready.read_text().strip():
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited {proc.returncode}: "
                                 f"{log.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(5)
            raise AssertionError(f"{name} not ready in {timeout:g} s: "
                                 f"{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)
    event = json.loads(ready.read_text())
    url = next((a for a in event["listen"] if a.startswith(("tcp://", "tls://"))),
               event["listen"][0])
    return ManagerProc(proc, argv, url, f"http://{event['http']}" if event.get("http")
                       else "", signing_key, log, event)


def tokens(store_url: str) -> dict[str, str]:
    """``server`` (fabric-server scope), ``a`` and ``b`` (quota, tenants a and b),
    ``admin`` (admin and quota, tenant ops), ``all`` (every scope, tenant ops),
    ``none`` (a data op only, tenant a)."""
    from cryptoplane.fabric.manager.app import open_state_store

    store = open_state_store(store_url)
    try:
        return {
            "server": store.create_token("ops", ops=("fabric-server",)),
            "a": store.create_token("a", ops=("quota",)),
            "b": store.create_token("b", ops=("quota",)),
            "admin": store.create_token("ops", ops=("admin", "quota")),
            "all": store.create_token("ops"),
            "none": store.create_token("a", ops=("encrypt",)),
        }
    finally:
        store.close()


__all__ = ["CLI", "ManagerProc", "start_manager", "tokens"]
