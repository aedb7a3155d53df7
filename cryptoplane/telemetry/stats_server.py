"""Serve a running plane's statistics on a Unix socket, over minimal HTTP/1.0.

``GET /stats`` answers ``plane.stats()`` as JSON and ``GET /metrics`` the Prometheus text
export (``metrics``); anything else is 404. ``cryptoplane stats --socket PATH`` reads it,
and so can ``curl --unix-socket PATH http://localhost/metrics`` or a Prometheus agent
beside the plane.

A Unix socket, not TCP: the numbers stay on this machine, access is the socket file's
permissions (0o600, the plane's own user), and there is no port to choose or collide on.
The stdlib's server is enough for a scrape every few seconds; each connection gets its
own daemon thread and a deadline for the whole request (a client that trickles a byte at
a time is cut off as one that says nothing), so a stuck client holds that thread for
``REQUEST_DEADLINE`` seconds at most. A client that hangs up early is no error: the
server says nothing about it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import socketserver
import stat
import sys
import threading
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST

from cryptoplane.telemetry.metrics import prometheus_text

if TYPE_CHECKING:
    from cryptoplane.plane import Plane

SOCKET_MODE = 0o600
JSON_TYPE = "application/json"
TEXT_TYPE = "text/plain; charset=utf-8"
# Seconds from accepting a connection to the end of its answer, whatever the client does
# meanwhile: a per-read timeout alone lets a byte every few seconds hold a thread forever.
REQUEST_DEADLINE = 5.0
# What a client that hangs up, resets or stalls makes a handler raise: its business.
_CLIENT_GONE = (ConnectionError, TimeoutError)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_DEADLINE  # per read too, in case the deadline's timer is late
    server_version = "cryptoplane-stats"

    def setup(self) -> None:
        super().setup()
        # At the deadline the socket is shut down: a read or write blocked on it returns
        # at once (EOF or EPIPE), ending the request wherever it is.
        self._deadline = threading.Timer(self.server.request_deadline, self._expire)
        self._deadline.daemon = True
        self._deadline.start()

    def _expire(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self._deadline.cancel()
        with contextlib.suppress(*_CLIENT_GONE):
            super().finish()

    def do_GET(self) -> None:  # the name http.server dispatches to
        route = self.path.split("?", 1)[0]
        try:
            if route == "/stats":
                body = json.dumps(self.server.plane.stats(), indent=1).encode() + b"\n"
                answer = (200, JSON_TYPE, body)
            elif route == "/metrics":
                answer = (200, CONTENT_TYPE_LATEST, prometheus_text(self.server.plane))
            else:
                answer = (404, TEXT_TYPE,
                          b"not found: try /stats (JSON) or /metrics (Prometheus)\n")
        except Exception as e:  # a failing read must not kill the server thread
            answer = (500, TEXT_TYPE, f"stats failed: {type(e).__name__}\n".encode())
        self._send(*answer)  # outside the try: a client gone is not a stats failure

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def address_string(self) -> str:
        # a Unix socket's peer address is "", which the base class would index into
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        # the stdlib writes every request to stderr; a plane's host process does not
        # want a line per scrape on its stderr
        pass


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    plane: Plane
    request_deadline = REQUEST_DEADLINE
    connections_done = 0  # every connection, answered or not, once its thread is done

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The stdlib prints a traceback for any exception; a client that went away or
        # stalled past the deadline is routine, anything else is a bug worth showing.
        if not isinstance(sys.exc_info()[1], _CLIENT_GONE):
            super().handle_error(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        super().shutdown_request(request)
        with _done_lock:
            self.connections_done += 1

    def server_bind(self) -> None:
        # Set the mode on the socket before bind so that the file is created with it
        # (Linux takes the new file's mode from the socket), never briefly wider; chmod
        # after bind too, for systems where fchmod on a socket is refused or ignored.
        with contextlib.suppress(OSError):
            os.fchmod(self.socket.fileno(), SOCKET_MODE)
        super().server_bind()
        os.chmod(self.socket.getsockname(), SOCKET_MODE)


_done_lock = threading.Lock()


def _clear_stale(path: str) -> None:
    """Remove ``path`` if it is a socket that nobody listens on; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket; not replacing it",
                              path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale: left by a process that exited without closing
        return
    except OSError as e:
        raise FileExistsError(errno.EEXIST, f"a socket that cannot be probed ({e.strerror}); "
                              "not replacing it", path) from None
    finally:
        probe.close()
    raise FileExistsError(errno.EADDRINUSE, "another process is serving on this socket", path)


class StatsServer:
    """Serve ``plane``'s ``/stats`` and ``/metrics`` on the Unix socket ``path``.

    Starts at once, in a daemon thread. ``close()`` (or leaving a ``with`` block) stops
    it and removes the socket file. A stale socket at ``path`` (its server exited) is
    replaced; a live one, or any other file, is a ``FileExistsError``.
    """

    def __init__(self, plane: Plane, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        _clear_stale(self.path)
        try:
            server = _Server(self.path, _Handler, bind_and_activate=True)
        except OSError as e:  # say which path: "AF_UNIX path too long" alone is a riddle
            raise OSError(e.errno, f"cannot serve stats here: {e.strerror or e}",
                          self.path) from None
        server.plane = plane
        self._server = server
        # the inode we made: close() removes the file only if it is still ours
        self._ino = os.lstat(self.path).st_ino
        self._closed = False
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="cryptoplane-stats", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()  # waits for serve_forever to return (one poll interval)
        self._server.server_close()
        self._thread.join(5.0)
        try:
            if os.lstat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    @property
    def connections(self) -> int:
        """Connections finished so far, answered or not (diagnostics, tests)."""
        return self._server.connections_done

    def __enter__(self) -> StatsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<StatsServer {self.path}{' closed' if self._closed else ''}>"


def serve_stats(plane: Plane, path: str | os.PathLike[str]) -> StatsServer:
    """Serve ``plane``'s statistics on the Unix socket ``path`` (see ``StatsServer``)."""
    return StatsServer(plane, path)
