"""The operations endpoint: a tiny HTTP/1.1 server for probes and Prometheus.

    GET /metrics   Prometheus' text format (``FabricMetrics.exposition``)
    GET /healthz   200 "ok" while the event loop answers and ``healthy()``; else 503
    GET /readyz    200 "ready" when ``ready()``, else 503 (a draining server is alive
                   but must get no new clients)
    GET /status    200 JSON of ``extra()``, when the server gives one; else 404

It runs on the server's own event loop, on purpose: a liveness probe then fails exactly
when that loop is stuck. It is written small rather than pulling in a web framework:
GET only, the request head capped at 8 KiB and given 2 s to arrive, one response per
connection, then close. No keep-alive, no bodies, nothing to parse beyond one line, so
nothing for a scanner to exercise. Bind it to an operations network, not the world.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any, Final

from prometheus_client import CONTENT_TYPE_LATEST

from .metrics import FabricMetrics

log = logging.getLogger(__name__)

MAX_HEAD: Final = 8 * 1024
READ_TIMEOUT: Final = 2.0
# probes and a scraper or two: more than this at once is not an operator
MAX_CONNECTIONS: Final = 64

_REASONS: Final = {200: "OK", 400: "Bad Request", 404: "Not Found",
                   405: "Method Not Allowed", 408: "Request Timeout",
                   431: "Request Header Fields Too Large", 500: "Internal Server Error",
                   503: "Service Unavailable"}
_TEXT: Final = "text/plain; charset=utf-8"


class OpsHttp:
    """``start`` it on a host and port, ``close`` it when the server stops."""

    def __init__(self, metrics: FabricMetrics, *, ready: Callable[[], bool],
                 healthy: Callable[[], bool] = lambda: True,
                 extra: Callable[[], dict[str, Any]] | None = None) -> None:
        self._metrics = metrics
        self._ready = ready
        self._healthy = healthy
        self._extra = extra
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host``:``port`` (0: any free port); returns the bound port. Give
        one address: a name that resolves to several would, with port 0, get a different
        free port on each."""
        if self._server is not None:
            raise RuntimeError("already started")
        # limit: a StreamReader refuses a head without its blank line past this size
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEAD)
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._handlers):  # a slow client does not hold up shutdown
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            if len(self._handlers) > MAX_CONNECTIONS:
                return  # closed unanswered: nothing spent on it
            status, ctype, body = await self._answer(reader)
            head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                    f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    "Cache-Control: no-store\r\nConnection: close\r\n")
            if status == 405:
                head += "Allow: GET\r\n"
            writer.write(head.encode("ascii") + b"\r\n" + body)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(writer.drain(), READ_TIMEOUT)
        except ConnectionError:
            pass  # the client left; nothing to answer
        except asyncio.CancelledError:
            # close() cancels handlers still waiting on a client: end quietly, as
            # Python 3.11's StreamReaderProtocol logs a handler task that ends cancelled
            # as an error
            pass
        finally:
            if task is not None:
                self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 0.5)

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes]:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        except TimeoutError:
            return 408, _TEXT, b"request timeout\n"
        except asyncio.LimitOverrunError:
            return 431, _TEXT, b"request head too large\n"
        except asyncio.IncompleteReadError:
            return 400, _TEXT, b"bad request\n"
        line = head.split(b"\r\n", 1)[0]
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return 400, _TEXT, b"bad request\n"
        if parts[0] != b"GET":
            return 405, _TEXT, b"GET only\n"
        path = parts[1].split(b"?", 1)[0]
        try:
            return self._route(path)
        except Exception:  # a failing callback is the server's bug: say 500, log it
            log.exception("ops endpoint %r failed", path.decode("ascii", "replace"))
            return 500, _TEXT, b"internal error\n"

    def _route(self, path: bytes) -> tuple[int, str, bytes]:
        if path == b"/metrics":
            return 200, CONTENT_TYPE_LATEST, self._metrics.exposition()
        if path == b"/healthz":
            return (200, _TEXT, b"ok\n") if self._healthy() else (503, _TEXT, b"unhealthy\n")
        if path == b"/readyz":
            return (200, _TEXT, b"ready\n") if self._ready() else (503, _TEXT, b"not ready\n")
        if path == b"/status" and self._extra is not None:
            body = json.dumps(self._extra(), sort_keys=True, default=str).encode() + b"\n"
            return 200, "application/json", body
        return 404, _TEXT, b"not found\n"


__all__ = ["MAX_HEAD", "READ_TIMEOUT", "OpsHttp"]
