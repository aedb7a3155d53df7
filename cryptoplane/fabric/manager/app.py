"""The manager process: the keystore's database opened, its state, the signing key,
the listeners, the reaper, the operations endpoint, the signals.

Stateless over the database: everything a manager knows (servers, leases, grants, the
managers' public keys) is in the keystore's tables, so a restart, or another manager on
the same PostgreSQL, loses nothing. The process holds only its connections, which
grants each is watching, and counters.

The signing key is an Ed25519 private key in a PEM file that every manager of a pool
shares (a grant signed by one renews on another, and servers know one key id); it is
created on first start, mode 0600, when the file does not exist. Each manager
publishes its public key in the database at start; servers learn every published key
when they register and at each heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ...exceptions import CryptoplaneError, InvalidRequest
from ..auth import Authenticator
from ..capability import load_signing_key, new_signing_key_pem
from ..http import OpsHttp
from ..metrics import FabricMetrics
from ..pool import BACKOFF_MAX
from ..server import announce, parse_listen
from .metrics import ManagerMetrics
from .service import ManagerService

if TYPE_CHECKING:
    from ..keystore import Keystore
    from .state import FabricState

log = logging.getLogger("cryptoplane.fabric.manager")

DEFAULT_LISTEN: Final = "tcp://127.0.0.1:7800"
def startup_grace(lease: float) -> float:
    """Seconds a starting manager waits before expiring leases: two leases, plus the
    longest reconnect backoff of a server's manager client (``pool.BACKOFF_MAX`` with its
    jitter)."""
    return 2 * lease + 1.5 * BACKOFF_MAX


# a scrape reads a snapshot at most this old (the reaper's beat, when shorter)
METRICS_PERIOD: Final = 2.0


@dataclass
class ManagerConfig:
    """What ``cryptoplane manager`` takes (see its ``--help``)."""

    store: str
    signing_key: Path
    listen: list[str] = field(default_factory=lambda: [DEFAULT_LISTEN])
    lease: float = 10.0
    overcommit: float = 1.0
    manager_id: str = ""
    http: str | None = None
    ready_file: str | None = None
    tls: ssl.SSLContext | None = None
    cache_ttl: float = 1.0
    threads: int = 4
    token_recheck: float = 5.0


def load_or_create_signing_key(path: Path) -> tuple[Ed25519PrivateKey, bool]:
    """The key in ``path``; made (mode 0600, never overwriting) when it does not exist.
    True when it was made. Two managers starting at once on a new shared file: one
    makes it, the other reads it (``O_EXCL``)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pem = b""
        for _ in range(50):  # another manager may be writing it right now
            pem = path.read_bytes()
            if pem.strip().endswith(b"-----"):
                break
            time.sleep(0.02)
        try:
            return load_signing_key(pem), False
        except ValueError as e:
            raise InvalidRequest(f"{path}: not an Ed25519 private key in PEM ({e})"
                                 ) from None
    with os.fdopen(fd, "wb") as f:
        pem = new_signing_key_pem()
        f.write(pem)
    return load_signing_key(pem), True


def open_state_store(url: str) -> Keystore:
    """The keystore's database, migrated. The manager never unwraps a key, so it needs
    no master key: it reads tokens (digests) and its own tables."""
    from ..keystore import backend

    store = backend(url)
    try:
        store.migrate()
    except BaseException:
        store.close()
        raise
    return store


class Manager:
    """A running manager: ``await start()``, then ``await stop()``."""

    def __init__(self, config: ManagerConfig) -> None:
        if config.lease <= 0:
            raise InvalidRequest("the lease must be above 0 seconds")
        if config.overcommit <= 0:
            raise InvalidRequest("the overcommit factor must be above 0")
        self.config = config
        self.manager_id = config.manager_id or f"{os.uname().nodename}:{os.getpid()}"
        self.metrics = ManagerMetrics()
        self.addresses: list[str] = []
        self.http_port: int | None = None
        self.key_created = False
        self.store: Keystore | None = None
        self.state: FabricState | None = None
        self.service: ManagerService | None = None
        self._listeners: list[asyncio.AbstractServer] = []
        self._unix_paths: list[str] = []
        self._http: OpsHttp | None = None
        self._reaper: asyncio.Task[None] | None = None
        self.stopping = False

    async def start(self) -> None:
        from .state import FabricState

        cfg = self.config
        specs = [parse_listen(s) for s in cfg.listen]
        key, self.key_created = await asyncio.to_thread(load_or_create_signing_key,
                                                        cfg.signing_key)
        self.store = store = await asyncio.to_thread(open_state_store, cfg.store)
        try:
            self.state = state = FabricState(store, lease_seconds=cfg.lease,
                                             overcommit=cfg.overcommit,
                                             manager_id=self.manager_id)
            auth = Authenticator(store, cache_ttl=cfg.cache_ttl)
            self.service = svc = ManagerService(state, auth, key, metrics=self.metrics,
                                                threads=cfg.threads)
            await asyncio.to_thread(state.publish_signing_key, svc.key_id, svc.public_b64)
            svc.start()
            loop = asyncio.get_running_loop()
            for kind, host, port in specs:
                if kind == "unix":
                    with contextlib.suppress(FileNotFoundError):
                        if stat.S_ISSOCK(os.lstat(host).st_mode):
                            os.unlink(host)  # left by a manager that died
                    srv = await loop.create_unix_server(svc.protocol, host)
                    os.chmod(host, 0o660)
                    self._unix_paths.append(host)
                    self.addresses.append(f"unix://{host}")
                else:
                    srv = await loop.create_server(svc.protocol, host, port, ssl=cfg.tls,
                                                   reuse_address=True)
                    for sock in srv.sockets:
                        h, p = sock.getsockname()[:2]
                        h = f"[{h}]" if ":" in h else h
                        self.addresses.append(f"{'tls' if cfg.tls else 'tcp'}://{h}:{p}")
                self._listeners.append(srv)
            await self._refresh()
            if cfg.http:
                _, host, port = parse_listen(cfg.http)
                # OpsHttp only calls exposition(), which ManagerMetrics has
                self._http = OpsHttp(cast(FabricMetrics, self.metrics), ready=self.ready,
                                     extra=self.metrics.snapshot)
                self.http_port = await self._http.start(host, port)
        except BaseException:
            await self.stop()
            raise
        self._reaper = asyncio.get_running_loop().create_task(self._reap())

    def ready(self) -> bool:
        return bool(self._listeners) and not self.stopping and self.metrics.database_up

    async def _refresh(self) -> None:
        assert self.service is not None and self.state is not None
        try:
            status = await self.service.call(self.state.status)
        except Exception as e:  # the database is down: keep the last snapshot
            log.warning("reading the pool's state failed: %s", e)
            self.metrics.update(None)
        else:
            self.metrics.update(status)

    async def _expire(self) -> bool:
        """One round of lease expiry; True if the pool changed (or the database is back)."""
        assert self.service is not None and self.state is not None
        try:
            report = await self.service.call(self.state.expire)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("expiring leases failed (will retry): %s", e)
            self.metrics.update(None)
            return False
        changed = False
        if report.removed_servers or report.moved:
            log.info("leases lapsed: removed %s; %d grant(s) moved",
                     ", ".join(report.removed_servers) or "no server", len(report.moved))
            self.metrics.expired(len(report.removed_servers), len(report.moved))
            changed = True
        if report.expired_grants:
            log.info("%d expired grant(s) deleted", len(report.expired_grants))
        return changed or not self.metrics.database_up  # back: ready again

    async def _unattended_grace(self) -> float:
        """Seconds to wait before the first expiry. After an outage of every manager,
        every lease looks lapsed: the servers had no one to heartbeat to. When no server
        has beaten for longer than a heartbeat period (no manager was taking them), a
        starting manager lets them reach it first (their reconnect backoff, then a
        beat); while another manager is up, it reaps from the start."""
        assert self.service is not None and self.state is not None
        try:
            rows = await self.service.call(self.state.servers)
        except Exception:
            return startup_grace(self.config.lease)
        newest = max((r.heartbeat_at for r in rows), default=None)
        if newest is None or time.time() - newest <= self.config.lease / 3 + 0.5:
            return 0.0
        log.info("no server has reached a manager for %.1f s: leases expire after %.1f s",
                 time.time() - newest, startup_grace(self.config.lease))
        return startup_grace(self.config.lease)

    async def _reap(self) -> None:
        """Every lease/4: expire lapsed leases (every manager asks; the one holding the
        database's advisory lock does the work) and refresh the metrics' snapshot."""
        assert self.service is not None
        svc = self.service
        period = max(0.05, self.config.lease / 4)
        refresh_at = rechecked = 0.0
        loop = asyncio.get_running_loop()
        grace_until = loop.time() + await self._unattended_grace()
        while not self.stopping:
            await asyncio.sleep(period)
            changed = False
            if loop.time() >= grace_until:
                changed = await self._expire()
            now = loop.time()
            if now - rechecked >= self.config.token_recheck:
                rechecked = now
                svc.recheck()
            if now >= refresh_at or changed:
                await self._refresh()
                # a big pool's snapshot (every live grant) costs: at most a tenth of
                # the time goes to it
                took = loop.time() - now
                refresh_at = now + max(min(METRICS_PERIOD, period), 10 * took)

    async def stop(self) -> None:
        """Stop accepting, tell connections GOAWAY, close everything."""
        self.stopping = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reaper
            self._reaper = None
        for srv in self._listeners:
            srv.close()
        self._listeners.clear()
        if self.service is not None:
            await self.service.close()
        if self._http is not None:
            await self._http.close()
            self._http = None
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._unix_paths.clear()
        state, self.state = self.state, None
        store, self.store = self.store, None
        if state is not None:
            await asyncio.to_thread(state.close)
        if store is not None:
            await asyncio.to_thread(store.close)


async def serve(config: ManagerConfig) -> int:
    """Run a manager until SIGTERM or SIGINT; the exit status."""
    manager = Manager(config)
    try:
        await manager.start()
    except (OSError, CryptoplaneError) as e:
        print(f"cryptoplane manager: {e}", file=sys.stderr)
        return 1
    if manager.key_created:
        print(f"cryptoplane manager: created signing key {config.signing_key} (share it "
              "with every manager of this pool)", file=sys.stderr)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, on_signal, s)
    assert manager.service is not None
    http_host = parse_listen(config.http)[1] if config.http else ""
    announce({"event": "ready", "listen": manager.addresses,
              "http": f"{http_host}:{manager.http_port}" if manager.http_port else None,
              "manager_id": manager.manager_id, "key_id": manager.service.key_id,
              "pid": os.getpid()}, config.ready_file)
    await stop.wait()
    await manager.stop()
    if config.ready_file:
        with contextlib.suppress(OSError):
            os.unlink(config.ready_file)
    return 0


def run(config: ManagerConfig) -> int:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(config))


__all__ = ["DEFAULT_LISTEN", "Manager", "ManagerConfig", "load_or_create_signing_key",
           "open_state_store", "run", "serve"]
