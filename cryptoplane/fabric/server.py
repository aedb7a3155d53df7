"""The fabric server: listeners, the connections' shared limits, the watchdog, shutdown.

    server = Server(service, listen=["tcp://127.0.0.1:7700", "unix:///run/cp.sock"],
                    tls=server_ssl_context(...), http="127.0.0.1:9700")
    await server.start()          # bound: server.addresses, server.http_port
    ...
    await server.shutdown(grace=10.0)

Run it on uvloop (``cryptoplane server`` does): the per-request path is the protocol's
``data_received`` and one ``writelines`` per receive, and uvloop's transports are what
make that cheap. TLS (1.3, ``auth.server_ssl_context``) applies to the TCP listeners;
Unix sockets are local and plain (their file mode is their access control).

Shutdown (``shutdown``): listeners close, every connection is sent GOAWAY, requests
already received are answered, requests arriving afterwards are answered SHUTTING_DOWN,
and each connection closes once it owes nothing; after ``grace`` seconds what is left is
cut. ``ready`` turns false at once, so /readyz sends new clients elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import stat
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import urlsplit

from ..exceptions import InvalidRequest
from ..offload import Offloader
from . import bufpool
from . import codec as C
from .connection import HANDSHAKE, Connection
from .http import OpsHttp
from .service import Service

log = logging.getLogger("cryptoplane.fabric")

DEFAULT_PORT: Final = 7700
MAX_CONNECTIONS: Final = 10_000
MAX_IN_FLIGHT: Final = 4096
MAX_IN_FLIGHT_BYTES: Final = 64 * 1024 * 1024  # request payloads at the workers
# what all connections together may make the server hold: frames half received and
# request payloads waiting for or at the workers
MAX_BUFFERED: Final = 1024 * 1024 * 1024
HANDSHAKE_TIMEOUT: Final = 10.0
FRAME_TIMEOUT: Final = 30.0
IDLE_TIMEOUT: Final = 3600.0
WRITE_HIGH_WATER: Final = 8 * 1024 * 1024
_NAMES_MAX: Final = 65_536
_CLASSES_MAX: Final = 65_536
RECHECK_PERIOD: Final = 5.0  # seconds between checks that open connections' tokens stand


def announce(event: dict[str, Any], ready_file: str | None) -> None:
    """A process's ready event (``cryptoplane server``, ``cryptoplane manager``): JSON to
    ``ready_file``, atomically (a watcher never reads half of it), or a line on stdout."""
    line = json.dumps(event)
    if ready_file:
        tmp = f"{ready_file}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(line + "\n")
        os.replace(tmp, ready_file)
    else:
        print(line, flush=True)


def parse_listen(spec: str) -> tuple[str, str, int]:
    """``tcp://host:port``, ``host:port``, ``:port`` or ``unix:///path`` as (kind, host or
    path, port)."""
    if spec.startswith("unix://"):
        path = spec[len("unix://"):]
        if not path:
            raise InvalidRequest(f"{spec!r}: a unix listener needs a path")
        return "unix", path, 0
    text = spec if "://" in spec else f"tcp://{spec}"
    parts = urlsplit(text)
    if parts.scheme != "tcp":
        raise InvalidRequest(f"{spec!r}: listen on tcp://HOST:PORT or unix:///PATH")
    try:
        port = parts.port if parts.port is not None else DEFAULT_PORT
    except ValueError:
        raise InvalidRequest(f"{spec!r}: not a valid port") from None
    return "tcp", parts.hostname or "0.0.0.0", port


class Server:
    """See the module docstring. ``workers``: crypto threads (signatures, big payloads;
    default: the CPU count); ``admin_workers``: threads for the keystore and key
    generation."""

    def __init__(self, service: Service, *, listen: list[str],
                 tls: ssl.SSLContext | None = None, http: str | None = None,
                 workers: int | None = None, admin_workers: int = 2,
                 max_connections: int = MAX_CONNECTIONS, max_in_flight: int = MAX_IN_FLIGHT,
                 max_frame: int = C.MAX_FRAME, handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 frame_timeout: float = FRAME_TIMEOUT, idle_timeout: float = IDLE_TIMEOUT,
                 rotate_interval: float = 0.0, max_buffered: int = MAX_BUFFERED,
                 write_high_water: int = WRITE_HIGH_WATER, unix_mode: int = 0o660) -> None:
        if not listen:
            raise InvalidRequest("a server needs at least one address to listen on")
        self.service = service
        self.specs = [parse_listen(s) for s in listen]
        self.tls = tls
        self.http_spec = http
        self.worker_count = workers or os.cpu_count() or 1
        self.admin_count = admin_workers
        self.max_connections = max_connections
        self.max_in_flight = max_in_flight
        self.max_in_flight_bytes = MAX_IN_FLIGHT_BYTES
        self.max_frame = min(max_frame, C.MAX_FRAME)
        self.handshake_timeout = handshake_timeout
        self.frame_timeout = frame_timeout
        self.idle_timeout = idle_timeout
        self.rotate_interval = rotate_interval
        self.max_buffered = max_buffered
        self.buffered = 0
        self._starved: list[Connection] = []
        self._rotated = 0.0
        self._rotating = False
        self.write_high_water = write_high_water
        self.unix_mode = unix_mode
        self.connections: set[Connection] = set()
        self.names: dict[bytes, str] = {}  # key references seen, decoded once
        # (tenant, key name) -> algorithm class, for charging grants; a key changed in
        # the keystore drops out (deleted and made again, it may be of another type)
        self.key_classes: dict[tuple[str, str], str] = {}
        self.stopping = False
        self.addresses: list[str] = []
        self.http_port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listeners: list[asyncio.AbstractServer] = []
        self._http: OpsHttp | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._empty: asyncio.Event | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._workers: Offloader | None = None
        self._admin: Offloader | None = None
        self._auth: Offloader | None = None
        self.recheck_period = RECHECK_PERIOD
        self._rechecked = 0.0
        self._unix_paths: list[str] = []

    # -- what connections use --------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the server is not started")
        return self._loop

    @property
    def workers(self) -> Offloader:
        assert self._workers is not None
        return self._workers

    @property
    def admin(self) -> Offloader:
        assert self._admin is not None
        return self._admin

    @property
    def auth(self) -> Offloader:
        """Token checks: a thread of their own, so slow key generations on the admin
        threads never hold up a handshake."""
        assert self._auth is not None
        return self._auth

    def charge(self, nbytes: int) -> bool:
        """Count ``nbytes`` (negative: given back) against the memory budget; True when
        the budget is now spent (the connection that charged stops being read)."""
        self.buffered += nbytes
        if nbytes < 0 and self._starved and self.buffered < self.max_buffered * 3 // 4:
            self._feed()
        return self.buffered > self.max_buffered

    def release(self, nbytes: int) -> None:
        if nbytes:
            self.charge(-nbytes)

    def starving(self, conn: Connection) -> None:
        self._starved.append(conn)

    def _feed(self) -> None:
        starved, self._starved = self._starved, []
        for c in starved:
            c.fed()

    def remember_name(self, raw: bytes, name: str) -> None:
        if len(self.names) >= _NAMES_MAX:
            self.names.clear()
        self.names[raw] = name

    def remember_class(self, tenant: str, name: str, cls: str) -> None:
        if len(self.key_classes) >= _CLASSES_MAX:
            self.key_classes.clear()
        self.key_classes[tenant, name] = cls

    @staticmethod
    def kind_of(transport: Any) -> str:
        if transport.get_extra_info("sslcontext") is not None:
            return "tls"
        return "unix" if isinstance(transport.get_extra_info("sockname"), str) else "tcp"

    def connection_gone(self) -> None:
        if not self.connections and self._empty is not None:
            self._empty.set()

    @property
    def ready(self) -> bool:
        return bool(self._listeners) and not self.stopping

    # -- start ----------------------------------------------------------------------------

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._empty = asyncio.Event()
        # signatures and stream pieces: short jobs, so completions may wait for the next
        # (admin jobs may be key generations: those ring at once)
        self._workers = Offloader(loop, self.worker_count, "cryptoplane-fabric", coalesce=32)
        self._admin = Offloader(loop, self.admin_count, "cryptoplane-fabric-admin")
        self._auth = Offloader(loop, 1, "cryptoplane-fabric-auth")
        try:
            for kind, host, port in self.specs:
                if kind == "unix":
                    await self._listen_unix(host)
                else:
                    srv = await loop.create_server(
                        lambda: Connection(self), host, port, ssl=self.tls,
                        ssl_handshake_timeout=self.handshake_timeout if self.tls else None,
                        reuse_address=True, backlog=1024)
                    self._listeners.append(srv)
                    for sock in srv.sockets:
                        h, p = sock.getsockname()[:2]
                        scheme = "tls" if self.tls else "tcp"
                        self.addresses.append(f"{scheme}://{_host(h)}:{p}")
            if self.http_spec:
                _, host, port = parse_listen(self.http_spec)
                self._http = OpsHttp(self.service.metrics, ready=lambda: self.ready,
                                     extra=self.status)
                self.http_port = await self._http.start(host, port)
            self._subscribe()
        except BaseException:
            await self.shutdown(0)
            raise
        self._watchdog = loop.create_task(self._watch())

    async def _listen_unix(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # a socket left by a server that died
        srv = await self.loop.create_unix_server(lambda: Connection(self), path, backlog=1024)
        os.chmod(path, self.unix_mode)
        self._listeners.append(srv)
        self._unix_paths.append(path)
        self.addresses.append(f"unix://{path}")

    def _subscribe(self) -> None:
        """Tenant limits changed in the keystore (here or, on PostgreSQL, by another
        server) become the live limits."""
        store = self.service.store
        if store is None:
            return
        loop = self.loop

        def changed(tenant: str, name: str) -> None:
            with contextlib.suppress(RuntimeError):
                if not name:
                    loop.call_soon_threadsafe(self._reload_limits, tenant)
                else:
                    loop.call_soon_threadsafe(self.key_classes.pop, (tenant, name), None)

        def reset() -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._reload_limits, None)
                loop.call_soon_threadsafe(self.key_classes.clear)

        self._unsubscribe = store.subscribe(changed, reset)

    def _reload_limits(self, tenant: str | None) -> None:
        if self._admin is not None and not self.stopping:
            self._admin.submit(self.service.load_limits, (tenant,), _LimitsOwner(self), None)

    def status(self) -> dict[str, Any]:
        return {"listen": self.addresses, "connections": len(self.connections),
                "stopping": self.stopping,
                "in_flight": sum(c.inflight for c in self.connections)}

    # -- the watchdog ----------------------------------------------------------------------

    async def _watch(self) -> None:
        period = max(0.05, min(1.0, self.frame_timeout / 4, self.handshake_timeout / 4))
        while True:
            await asyncio.sleep(period)
            self.sweep()

    def rotate_due(self) -> None:
        """Every ``rotate_interval`` seconds (0: never), an admin worker rotates the keys
        whose ``auto_rotate_period`` has passed, for every tenant in the keystore."""
        store = self.service.store
        now = self.loop.time()
        if (store is None or not self.rotate_interval or self._rotating or self.stopping
                or now - self._rotated < self.rotate_interval):
            return
        self._rotated = now
        self._rotating = True
        self.admin.submit(_rotate_all, (self.service,), _RotateOwner(self), None)

    def rotation_done(self) -> None:
        self._rotating = False

    def sweep(self) -> None:
        """Close connections past a limit: handshake not done in time, a frame begun and
        not completed in time (slowloris), silent and owed nothing for the idle time."""
        now = self.loop.time()
        in_flight = 0
        recheck = now - self._rechecked >= self.recheck_period
        if recheck:
            self._rechecked = now
        for c in list(self.connections):
            in_flight += c.inflight
            if c.state == HANDSHAKE and now - c.born > self.handshake_timeout:
                log.info("closing a connection: no handshake in %.0f s", self.handshake_timeout)
                c.abort()
                continue
            buffered = c.decoder.buffered
            if c.frames != c.mark[1] or not c.partial:
                c.frame_at = now  # a frame completed, or one just began: its clock starts
            if c.activity != c.mark[0]:
                c.act_at = now
            c.mark, c.partial = (c.activity, c.frames), bool(buffered)
            if buffered and now - c.frame_at > self.frame_timeout:
                log.info("closing a connection: a frame begun %.0f s ago is not complete",
                         now - c.frame_at)
                c.abort()
            elif not buffered and not c.owes() and now - c.act_at > self.idle_timeout:
                c.abort()
            elif recheck:
                c.recheck()
        self.service.metrics.set_in_flight(in_flight)
        self.rotate_due()
        bufpool.RECEIVED.trim()  # the stream buffers a burst left free go back
        bufpool.SEALED.trim()

    # -- shutdown ------------------------------------------------------------------------

    async def shutdown(self, grace: float = 10.0) -> None:
        """See the module docstring. Safe to call twice (the second call with grace 0
        cuts what the first is still waiting for)."""
        first = not self.stopping
        self.stopping = True
        if first:
            for srv in self._listeners:
                srv.close()
            for c in list(self.connections):
                c.goaway()
        if self.connections and grace > 0 and self._empty is not None:
            self._empty.clear()
            if self.connections:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._empty.wait(), grace)
        for c in list(self.connections):
            c.abort()
        if not first:
            return
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._http is not None:
            await self._http.close()
        for srv in self._listeners:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 1.0)
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        for pool in (self._workers, self._admin, self._auth):
            if pool is not None:
                await asyncio.get_running_loop().run_in_executor(None, pool.shutdown, 5.0)
        self._listeners = []


def _rotate_all(service: Service) -> list[str]:
    import time

    assert service.store is not None
    done = []
    for tenant in service.store.list_tenants():
        done += [f"{tenant}/{name}" for name in service.transit.rotate_due(tenant, time.time())]
    return done


class _RotateOwner:
    """Hears how an automatic rotation went."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def completed(self, token: Any, result: Any, error: BaseException | None) -> None:
        self.server.rotation_done()
        if error is not None:
            log.warning("automatic key rotation failed: %s", error)
        elif result:
            log.info("rotated %d keys whose period had passed", len(result))

    def settle(self) -> None:
        pass


class _LimitsOwner:
    """Receives reloaded tenant limits from an admin worker."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def completed(self, token: Any, result: Any, error: BaseException | None) -> None:
        if error is not None:
            log.warning("reloading tenant limits failed: %s", error)
            return
        for limits in result:
            self.server.service.apply_limits(limits)

    def settle(self) -> None:
        pass


def _host(h: str) -> str:
    return f"[{h}]" if ":" in h else h
