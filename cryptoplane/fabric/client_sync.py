"""``Client``: the fabric client's API, synchronous. A private event loop in a daemon
thread runs an ``AsyncClient`` (``client.py``); each call waits for its answer
(``run_coroutine_threadsafe``). Use it as a context manager, or call ``close()``.

    with Client("tcp://127.0.0.1:7700", token=token) as c:
        blob = c.encrypt("orders", b"secret")
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
import threading
from collections.abc import Awaitable, Iterable, Iterator
from typing import IO, Any, TypeVar

from .client import AsyncClient
from .client_streams import sync_iterate
from .placement import DEFAULT_THRESHOLD, Placement
from .pool import SILENCE

T = TypeVar("T")


class Client:
    """``AsyncClient``'s API, synchronous: an event loop in a daemon thread runs it."""

    def __init__(self, url: str | list[str], *, token: str | None = None,
                 ssl: ssl_module.SSLContext | None = None, connections: int = 2,
                 timeout: float = 30.0, name: str = "", silence: float = SILENCE,
                 placement: str | Placement = "least-loaded",
                 threshold: int = DEFAULT_THRESHOLD, big: list[str] | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="cryptoplane-fabric-client")
        self._thread.start()
        try:
            self._a: AsyncClient = self._run(AsyncClient.connect(
                url, token=token, ssl=ssl, connections=connections, timeout=timeout,
                name=name, silence=silence, placement=placement, threshold=threshold,
                big=big))
        except BaseException:
            self._stop()
            raise
        self._closed = False

    def _run(self, coro: Awaitable[T]) -> T:
        async def wrap() -> T:
            return await coro
        return asyncio.run_coroutine_threadsafe(wrap(), self._loop).result()

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        try:
            self._run(self._a.close())
        finally:
            self._stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def capabilities(self) -> dict[str, Any]:
        return self._a.capabilities

    @property
    def counters(self) -> dict[str, int]:
        return self._a.counters

    @property
    def live_connections(self) -> int:
        return self._a.live_connections

    def per_server_counts(self) -> dict[str, dict[str, Any]]:
        """Per server: calls sent, answered, in flight, measured service time."""
        return self._a.per_server_counts()

    def request(self, op: int, key: str = "", fields: dict[int, bytes] | None = None, *,
                timeout: float | None = None, safe: bool | None = None) -> dict[int, bytes]:
        return self._run(self._a.request(op, key, fields, timeout=timeout, safe=safe))

    def encrypt(self, key: str, plaintext: bytes, *, aad: bytes = b"",
                context: bytes | None = None, version: int | None = None,
                timeout: float | None = None) -> bytes:
        return self._run(self._a.encrypt(key, plaintext, aad=aad, context=context,
                                         version=version, timeout=timeout))

    def decrypt(self, key: str, ciphertext: bytes, *, aad: bytes = b"",
                context: bytes | None = None, timeout: float | None = None) -> bytes:
        return self._run(self._a.decrypt(key, ciphertext, aad=aad, context=context,
                                         timeout=timeout))

    def rewrap(self, key: str, ciphertext: bytes, *, aad: bytes = b"",
               context: bytes | None = None, timeout: float | None = None) -> bytes:
        return self._run(self._a.rewrap(key, ciphertext, aad=aad, context=context,
                                        timeout=timeout))

    def datakey(self, key: str, *, bits: int = 256, plaintext: bool = True,
                context: bytes | None = None, timeout: float | None = None
                ) -> tuple[bytes | None, bytes]:
        return self._run(self._a.datakey(key, bits=bits, plaintext=plaintext,
                                         context=context, timeout=timeout))

    def sign(self, key: str, data: bytes, *, hash: str = "sha256", prehashed: bool = False,
             padding: str = "pss", version: int | None = None,
             timeout: float | None = None) -> bytes:
        return self._run(self._a.sign(key, data, hash=hash, prehashed=prehashed,
                                      padding=padding, version=version, timeout=timeout))

    def verify(self, key: str, data: bytes, signature: bytes, *, hash: str = "sha256",
               prehashed: bool = False, padding: str = "pss",
               timeout: float | None = None) -> bool:
        return self._run(self._a.verify(key, data, signature, hash=hash,
                                        prehashed=prehashed, padding=padding,
                                        timeout=timeout))

    def hmac(self, key: str, data: bytes, *, algorithm: str | None = None,
             version: int | None = None, timeout: float | None = None) -> bytes:
        return self._run(self._a.hmac(key, data, algorithm=algorithm, version=version,
                                      timeout=timeout))

    def verify_hmac(self, key: str, data: bytes, mac: bytes, *,
                    algorithm: str | None = None, timeout: float | None = None) -> bool:
        return self._run(self._a.verify_hmac(key, data, mac, algorithm=algorithm,
                                             timeout=timeout))

    def digest(self, data: bytes, algorithm: str = "sha256", *,
               timeout: float | None = None) -> bytes:
        return self._run(self._a.digest(data, algorithm, timeout=timeout))

    def random(self, n: int, *, timeout: float | None = None) -> bytes:
        return self._run(self._a.random(n, timeout=timeout))

    def batch(self, op: str, key: str, items: list[dict[str, object]], *,
              timeout: float | None = None) -> list[object | BaseException]:
        return self._run(self._a.batch(op, key, items, timeout=timeout))

    def create_key(self, name: str, type: str, *, timeout: float | None = None,
                   **policy: Any) -> dict[str, Any]:
        return self._run(self._a.create_key(name, type, timeout=timeout, **policy))

    def import_key(self, name: str, type: str, *, wrapped: bytes | None = None,
                   material: bytes | None = None, **policy: Any) -> dict[str, Any]:
        return self._run(self._a.import_key(name, type, wrapped=wrapped, material=material,
                                            **policy))

    def wrapping_key(self) -> bytes:
        return self._run(self._a.wrapping_key())

    def list_keys(self) -> list[str]:
        return self._run(self._a.list_keys())

    def read_key(self, name: str) -> dict[str, Any]:
        return self._run(self._a.read_key(name))

    def rotate_key(self, name: str) -> dict[str, Any]:
        return self._run(self._a.rotate_key(name))

    def config_key(self, name: str, *, timeout: float | None = None,
                   **changes: Any) -> dict[str, Any]:
        return self._run(self._a.config_key(name, timeout=timeout, **changes))

    def trim_key(self, name: str, min_version: int) -> dict[str, Any]:
        return self._run(self._a.trim_key(name, min_version))

    def delete_key(self, name: str) -> None:
        self._run(self._a.delete_key(name))

    def export_key(self, name: str, version: int | None = None) -> dict[str, Any]:
        return self._run(self._a.export_key(name, version))

    def set_tenant_limits(self, tenant: str, ops: float | None = None,
                          bytes: float | None = None) -> dict[str, Any]:
        return self._run(self._a.set_tenant_limits(tenant, ops, bytes))

    def encrypt_stream(self, key: str, source: Iterable[bytes] | IO[bytes] | bytes, *,
                       context: bytes | None = None) -> Iterator[bytes]:
        return sync_iterate(self._loop, lambda: self._a.encrypt_stream(
            key, source, context=context))

    def decrypt_stream(self, key: str, source: Iterable[bytes] | IO[bytes] | bytes, *,
                       context: bytes | None = None) -> Iterator[bytes]:
        return sync_iterate(self._loop, lambda: self._a.decrypt_stream(
            key, source, context=context))

    def open_session(self, algorithm: str, key_material: bytes) -> int:
        return self._run(self._a.open_session(algorithm, key_material))

    def close_session(self, session: int) -> None:
        self._run(self._a.close_session(session))

    def raw(self, op: str | int, session: int, fields: dict[int, bytes], *,
            timeout: float | None = None) -> dict[int, bytes]:
        return self._run(self._a.raw(op, session, fields, timeout=timeout))
