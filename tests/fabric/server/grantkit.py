"""Test helpers for servers under a manager: a real ``cryptoplane server`` process over
a SQLite keystore, grants signed with a test manager key, and a HELLO that carries one.

    with ServerProcess(tmp_path, "--manager-key", MANAGER_B64) as srv:
        token = srv.tokens["acme"]
        w = hello_with(srv.port, token, grant=sign(...))
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from serverwire import Wire

from cryptoplane.fabric import codec as C
from cryptoplane.fabric.capability import GrantClaims, public_key_b64, sign_grant
from cryptoplane.fabric.codec import FrameType
from cryptoplane.fabric.keystore import MasterKey, open_keystore

MANAGER_KEY = Ed25519PrivateKey.generate()
MANAGER_B64 = public_key_b64(MANAGER_KEY.public_key())
_grants = iter(range(1, 1 << 30))


def grant(rates: dict[str, tuple[float, float]], *, server_id: str = "s1",
          tenant: str = "acme", ttl: float = 60.0, grant_id: str | None = None,
          key: Ed25519PrivateKey = MANAGER_KEY, issued_at: float | None = None) -> str:
    """A token for ``rates`` (class -> (ops/s, bytes/s)) on ``server_id``."""
    now = time.time() if issued_at is None else issued_at
    claims = GrantClaims(grant_id=grant_id or f"g{next(_grants)}", tenant=tenant,
                         expires_at=now + ttl, issued_at=now,
                         servers={server_id: dict(rates)})
    return sign_grant(key, claims)


def hello_with(port: int, token: str, *, grant: str | None = None) -> tuple[Wire, C.Frame]:
    """A raw connection whose HELLO carries ``grant``; the WELCOME frame (check its
    status: a refused grant is WELCOME with UNAUTHORIZED)."""
    w = Wire(port, hello=False)
    obj: dict[str, Any] = {"versions": [1], "client": "test", "token": token}
    if grant is not None:
        obj["grant"] = grant
    w.send(C.encode_json_frame(FrameType.HELLO, obj))
    f = w.recv()
    assert f.type == FrameType.WELCOME, f
    return w, f


class ServerProcess:
    """``cryptoplane server`` on a free port, with a token per tenant made beforehand."""

    def __init__(self, tmp: Path, *args: str, tenants: tuple[str, ...] = ("acme", "other"),
                 server_id: str = "s1", env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        key = tmp / "master.key"
        key.write_text(os.urandom(32).hex())
        self.store = f"sqlite://{tmp / f'keys-{server_id}.db'}"
        ks = open_keystore(self.store, MasterKey.ring_from_file(key)[0])
        try:
            self.tokens = {t: ks.create_token(t, keys=["*"], ops=["*"]) for t in tenants}
        finally:
            ks.close()
        self.ready = tmp / f"ready-{server_id}.json"
        self.stderr = open(tmp / f"server-{server_id}.log", "w+")  # noqa: SIM115
        cmd = [sys.executable, "-m", "cryptoplane", "server", "--store", self.store,
               "--master-key-file", str(key), "--listen", "tcp://127.0.0.1:0",
               "--http", "127.0.0.1:0", "--ready-file", str(self.ready), "--workers", "2",
               "--server-id", server_id, "--grace", "2", *args]
        self.proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1",
                                               **(env or {})},
                                     stdout=subprocess.DEVNULL, stderr=self.stderr)
        deadline = time.monotonic() + 30
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = self.log()
                self.stop()
                raise AssertionError(f"the server did not start: {text}")
            time.sleep(0.05)
        event = json.loads(self.ready.read_text())
        self.address = next(a for a in event["listen"] if a.startswith("tcp"))
        self.port = int(self.address.rsplit(":", 1)[1])
        self.http = event["http"]

    def log(self) -> str:
        if self.stderr.closed:
            return Path(self.stderr.name).read_text()
        self.stderr.flush()
        self.stderr.seek(0)
        return self.stderr.read()

    def metrics(self) -> str:
        import urllib.request

        return urllib.request.urlopen(f"http://{self.http}/metrics",
                                      timeout=5).read().decode()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
