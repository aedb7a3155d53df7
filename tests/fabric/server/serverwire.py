"""Test helpers for the fabric server: a server on its own uvloop thread, an in-memory
token table, and a raw blocking client that speaks frames through the codec.

    with running(service) as srv:            # srv.port, srv.server
        with Wire(srv.port, token) as w:      # HELLO / WELCOME done
            status, fields = w.call(Op.ENCRYPT, b"k", {Field.DATA: b"hi"})
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import uvloop

from cryptoplane.fabric import codec as C
from cryptoplane.fabric.codec import Field, FrameType
from cryptoplane.fabric.errors import Unauthorized
from cryptoplane.fabric.server import Server
from cryptoplane.fabric.service import Service, memory_service


@dataclass(frozen=True)
class Grant:
    token_id: str
    tenant: str
    keys: tuple[str, ...]
    ops: tuple[str, ...]
    expires_at: float | None


class Tokens:
    """check_token over a dict: what the keystore does, without a database."""

    def __init__(self) -> None:
        self.grants: dict[str, Grant] = {}
        self.checks = 0

    def add(self, tenant: str, *, keys: tuple[str, ...] = ("*",),
            ops: tuple[str, ...] = ("*",), expires_at: float | None = None) -> str:
        n = len(self.grants)
        token = f"cpt_{n:016x}_{'s' * 43}{n}"
        self.grants[token] = Grant(f"{n:016x}", tenant, keys, ops, expires_at)
        return token

    def check_token(self, secret: str) -> Grant:
        self.checks += 1
        g = self.grants.get(secret)
        if g is None or (g.expires_at is not None and g.expires_at <= time.time()):
            raise Unauthorized("invalid, revoked or expired token")
        return g


def make_service(tokens: Tokens, **kw: Any) -> Service:
    return memory_service(engines=["inline", "threads"], tokens=tokens, **kw)


class Running:
    """A Server on a background thread's uvloop loop."""

    def __init__(self, service: Service, **kw: Any) -> None:
        self.service = service
        self.kw = kw
        self.loop = uvloop.new_event_loop()
        self.server: Server | None = None
        self.error: BaseException | None = None
        self._started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def boot() -> None:
            kw = {"listen": ["tcp://127.0.0.1:0"], **self.kw}
            self.server = Server(self.service, **kw)
            await self.server.start()

        try:
            self.loop.run_until_complete(boot())
        except BaseException as e:
            self.error = e
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()

    def start(self) -> Running:
        self.thread.start()
        self._started.wait(10)
        if self.error is not None:
            raise self.error
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        addr = next(a for a in self.server.addresses if not a.startswith("unix"))
        return int(addr.rsplit(":", 1)[1])

    def call(self, fn: Any, *args: Any, timeout: float = 30) -> Any:
        """Run ``fn(*args)`` (a coroutine function or plain) on the server's loop."""
        async def run() -> Any:
            out = fn(*args)
            if asyncio.iscoroutine(out):
                out = await out
            return out
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def shutdown(self, grace: float = 5.0) -> None:
        assert self.server is not None
        self.call(self.server.shutdown, grace)

    def stop(self) -> None:
        if self.server is not None and not self.server.stopping:
            with contextlib.suppress(Exception):
                self.shutdown(1.0)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@contextlib.contextmanager
def running(service: Service, **kw: Any) -> Iterator[Running]:
    r = Running(service, **kw).start()
    try:
        yield r
    finally:
        r.stop()


class Wire:
    """A blocking raw client: frames out, frames in, nothing clever."""

    def __init__(self, port: int, token: str | None = None, *, hello: bool = True,
                 tls: ssl.SSLContext | None = None, timeout: float = 10.0,
                 unix: str | None = None) -> None:
        if unix is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(unix)
        else:
            sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname="127.0.0.1")
        self.sock = sock
        self.decoder = C.FrameDecoder()
        self.frames: list[C.Frame] = []
        self.welcome: dict[str, Any] | None = None
        self.ids = iter(range(1, 1 << 62))
        if hello:
            self.hello(token)

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def hello(self, token: str | None) -> C.Frame:
        obj: dict[str, Any] = {"versions": [1], "client": "test"}
        if token is not None:
            obj["token"] = token
        self.send(C.encode_json_frame(FrameType.HELLO, obj))
        f = self.recv()
        assert f.type == FrameType.WELCOME, f
        if f.status == 0:
            self.welcome = C.decode_json_payload(f.payload)
        return f

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> C.Frame:
        while not self.frames:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("closed by the server")
            self.frames.extend(self.decoder.feed(data))
        return self.frames.pop(0)

    def closed(self) -> bool:
        """True when the server has closed (EOF), after any frames it sent."""
        try:
            while True:
                data = self.sock.recv(1 << 20)
                if not data:
                    return True
                self.frames.extend(self.decoder.feed(data))
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def request(self, op: int, key: bytes, fields: dict[int, bytes] | None = None, *,
                fid: int | None = None, payload: bytes | None = None) -> int:
        fid = next(self.ids) if fid is None else fid
        body = payload if payload is not None else C.encode_fields(fields or {})
        self.send(C.encode_frame(FrameType.REQUEST, fid, op=op, key=key, payload=body))
        return fid

    def call(self, op: int, key: bytes = b"", fields: dict[int, bytes] | None = None, *,
             payload: bytes | None = None) -> tuple[int, dict[int, bytes]]:
        fid = self.request(op, key, fields, payload=payload)
        f = self.recv()
        assert f.id == fid, (f, fid)
        return f.status, C.decode_fields(f.payload)

    def json(self, op: int, key: bytes = b"", obj: dict[str, Any] | None = None
             ) -> tuple[int, dict[str, Any]]:
        status, fields = self.call(op, key, payload=C.json_field(obj or {}))
        if status:
            return status, {"message": fields.get(Field.MESSAGE, b"").decode()}
        return status, C.get_json(fields)

    def batch(self, op: int, key: bytes, items: list[dict[int, bytes]]) -> C.Frame:
        fid = next(self.ids)
        payload = C.encode_batch([C.encode_fields(i) for i in items])
        self.send(C.encode_frame(FrameType.BATCH, fid, op=op, key=key, payload=payload))
        f = self.recv()
        assert f.id == fid
        return f


def message(fields: dict[int, bytes]) -> str:
    return fields.get(Field.MESSAGE, b"").decode()


def matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern)
