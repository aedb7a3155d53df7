"""Running an NBD server: listening sockets, the event loop, signals and graceful stop.

``serve`` is the command-line entry point (runs until SIGTERM or SIGINT);
``ServerThread`` runs the same server on a background thread, for tests and benchmarks.
The per-connection protocol and transport (``Connection``) and what a server's
connections share (``Server``) live in ``cryptoplane.nbd.server``; this module makes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import stat
import tempfile
import threading
import warnings
from collections.abc import Callable
from typing import Any, Protocol

from cryptoplane.exceptions import InvalidRequest
from cryptoplane.nbd.blockdev import BlockDevice
from cryptoplane.nbd.limits import Limits
from cryptoplane.nbd.server import Connection, Server
from cryptoplane.nbd.tls import ServerTLS

Ready = Callable[[list[str]], None]


SOCKET_MODE = 0o600  # Unix sockets: only the owner connects, unless told otherwise


class Listening(Protocol):
    """Where a parent process listens (``processes.Listeners``): it accepts, and hands
    the connections over."""

    unix_path: str | None
    tcp_address: tuple[str, int] | None


def remove_stale_socket(path: str) -> None:
    """Remove a socket left by a server that died; refuse a live one or another file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise InvalidRequest(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: stale
    else:
        raise InvalidRequest(f"another server is listening on {path}")
    finally:
        probe.close()


def bind_unix(path: str, mode: int = SOCKET_MODE) -> socket.socket:
    """A Unix socket bound at ``path`` with permissions ``mode``, never more open than
    that: it is bound in a private (0700) directory beside ``path``, given its mode
    there, and only then linked to ``path`` (which must not exist: no clobbering)."""
    if not 0 <= mode <= 0o777:
        raise InvalidRequest(f"socket mode {mode:#o} is not a permission mode")
    target = os.path.abspath(path)
    private = tempfile.mkdtemp(prefix=".nbd-", dir=os.path.dirname(target))
    staged = os.path.join(private, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(staged)
        except OSError as exc:
            if len(os.fsencode(staged)) >= 108:  # sun_path's size on Linux
                raise InvalidRequest(f"the socket path {path} is too long to stage "
                                     "beside it: use a shorter one") from exc
            raise
        os.chmod(staged, mode)
        os.link(staged, target)
    except BaseException:
        sock.close()
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged)
        os.rmdir(private)
    return sock


def urls(names: list[str], *, unix: str | None = None, tcp: tuple[str, int] | None = None,
         tls: bool = False) -> list[str]:
    """NBD URIs (as qemu and libnbd read them) for each export."""
    out = []
    s = "s" if tls else ""
    for name in names:
        if unix is not None:
            out.append(f"nbd{s}+unix:///{name}?socket={unix}")
        if tcp is not None:
            host = f"[{tcp[0]}]" if ":" in tcp[0] else tcp[0]
            out.append(f"nbd{s}://{host}:{tcp[1]}/{name}")
    return out


async def serve_async(exports: dict[str, BlockDevice], *, unix: str | None = None,
                      tcp: tuple[str, int] | None = None, tls: ServerTLS | None = None,
                      read_only: bool = False, ready: Ready | None = None,
                      stop: asyncio.Event | None = None, inline_limit: int | None = None,
                      workers: int | None = None, limits: Limits | None = None,
                      socket_mode: int = SOCKET_MODE,
                      listening: Listening | None = None,
                      handoff: socket.socket | None = None) -> None:
    """Serve ``exports`` until ``stop`` is set, then shut down gracefully. The Unix
    socket gets permissions ``socket_mode`` (0600: its owner only). ``workers``:
    threads for big requests, one per core by default (measured on 2 cores with nbdcopy:
    2 workers read as fast as 4 and wrote 3-20% faster than 3 or 4, whose extra threads
    only contend for the GIL; 1 worker read 15-30% slower). ``limits``: what clients
    may make the server hold (``Limits()``'s defaults when None). ``listening``: the
    addresses a parent process listens on (this server is a worker of
    ``processes.serve_processes``): named in ``ready``'s URLs, neither bound nor removed
    here. ``handoff``: a Unix SEQPACKET socket over which that parent hands this server
    the connections it accepted (``handed_over``)."""
    if listening is not None:
        unix, tcp = listening.unix_path, listening.tcp_address
    if unix is None and tcp is None:
        raise InvalidRequest("serve needs a Unix socket path or a TCP address")
    loop = asyncio.get_running_loop()
    server = Server(exports, tls=tls, read_only=read_only, inline_limit=inline_limit,
                     workers=workers or os.cpu_count() or 2, limits=limits)
    listeners: list[asyncio.AbstractServer] = []
    bound_tcp = None
    own_socket: str | None = None  # removed at exit only if this server made it
    try:
        if listening is not None:
            bound_tcp = listening.tcp_address
        if handoff is not None:
            handed_over(loop, server, handoff)
        if unix is not None and listening is None:
            remove_stale_socket(unix)
            sock = bind_unix(unix, socket_mode)
            own_socket = unix
            listeners.append(await loop.create_unix_server(lambda: Connection(server),
                                                           sock=sock))
        if tcp is not None and listening is None:
            tcp_srv = await loop.create_server(lambda: Connection(server), tcp[0], tcp[1])
            listeners.append(tcp_srv)
            bound_tcp = (tcp[0], tcp_srv.sockets[0].getsockname()[1])
        if ready is not None:
            ready(urls(list(server.exports), unix=unix, tcp=bound_tcp, tls=tls is not None))
        await (stop or asyncio.Event()).wait()
    finally:
        if handoff is not None:
            loop.remove_reader(handoff.fileno())
        for listener in listeners:
            listener.close()
        await server.shutdown()
        for listener in listeners:
            await listener.wait_closed()
        if own_socket is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(own_socket)


class _Reported(Connection):
    """A connection handed over by a parent process, which is told when it closes: the
    parent gives each new connection to the worker that serves the fewest."""

    def __init__(self, server: Server, channel: socket.socket) -> None:
        super().__init__(server)
        self._channel = channel

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            closed(self._channel)


def closed(channel: socket.socket) -> None:
    """Tell the parent a connection closed. Never blocks the loop: a parent that reads
    nothing (it is stopping, or gone) needs no count."""
    with contextlib.suppress(OSError):
        channel.send(b"c", socket.MSG_DONTWAIT)


def handed_over(loop: asyncio.AbstractEventLoop, server: Server,
                channel: socket.socket) -> None:
    """Serve the connections that arrive on ``channel`` (each a message carrying one
    descriptor, ``SCM_RIGHTS``); say on it when each closes."""
    tasks: set[asyncio.Task[Any]] = set()

    async def adopt(sock: socket.socket) -> None:
        try:
            await loop.connect_accepted_socket(lambda: _Reported(server, channel), sock)
        except OSError:
            sock.close()
            closed(channel)

    def readable() -> None:
        while True:
            try:
                msg, fds, _, _ = socket.recv_fds(channel, 16, 8, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                msg, fds = b"", []
            if not msg and not fds:  # the parent closed it (or died)
                loop.remove_reader(channel.fileno())
                return
            for fd in fds:
                sock = socket.socket(fileno=fd)
                sock.setblocking(False)
                task = loop.create_task(adopt(sock))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

    loop.add_reader(channel.fileno(), readable)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop, or asyncio's (slower: its writelines copies) with a warning."""
    try:
        import uvloop
    except ImportError:
        warnings.warn("uvloop is not installed: the NBD server runs on plain asyncio, "
                      "slower", RuntimeWarning, stacklevel=2)
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def serve(exports: dict[str, BlockDevice], *, unix: str | None = None,
          tcp: tuple[str, int] | None = None, tls: ServerTLS | None = None,
          read_only: bool = False, ready: Ready | None = None,
          inline_limit: int | None = None, limits: Limits | None = None,
          socket_mode: int = SOCKET_MODE, listening: Listening | None = None,
          handoff: socket.socket | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then finish in-flight requests, flush and close."""
    loop = new_event_loop()

    async def main() -> None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await serve_async(exports, unix=unix, tcp=tcp, tls=tls, read_only=read_only,
                              ready=ready, stop=stop, inline_limit=inline_limit,
                              limits=limits, socket_mode=socket_mode,
                              listening=listening, handoff=handoff)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


class ServerThread:
    """An NBD server on a background thread (for tests): ``with ServerThread(...) as s``."""

    def __init__(self, exports: dict[str, BlockDevice], *, socket_path: str | None = None,
                 tcp: tuple[str, int] | None = None, tls: ServerTLS | None = None,
                 read_only: bool = False, inline_limit: int | None = None,
                 limits: Limits | None = None,
                 socket_mode: int = SOCKET_MODE) -> None:
        self.socket_path = socket_path
        self._kw: dict[str, Any] = dict(unix=socket_path, tcp=tcp, tls=tls,
                                        read_only=read_only, inline_limit=inline_limit,
                                        limits=limits,
                                        socket_mode=socket_mode)
        self._exports = exports
        self.urls: list[str] = []
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="nbd-server", daemon=True)

    @property
    def url(self) -> str:
        """The first export's URL."""
        return self.urls[0]

    def url_for(self, name: str) -> str:
        return next(u for u in self.urls if u.split("?")[0].endswith("/" + name))

    def _run(self) -> None:
        loop = self._loop = new_event_loop()

        async def main() -> None:
            self._stop = asyncio.Event()
            await serve_async(self._exports, ready=self._on_ready, stop=self._stop,
                              **self._kw)
        try:
            loop.run_until_complete(main())
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()
            loop.close()

    def _on_ready(self, urls_: list[str]) -> None:
        self.urls = urls_
        self._ready.set()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError("the NBD server did not start")
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._thread.is_alive() and self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def __exit__(self, *exc: object) -> None:
        self.stop()
