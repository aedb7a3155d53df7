"""The Plane: one API for cryptographic work, and the fast path that makes it cheap.

Synchronous calls (``plane.encrypt``...) that the inline engine can serve run at once in
the caller: one attribute check for the session, the library call, two counter updates.
No request object, no future, no lock, no queue. Everything else (``submit``, ``arun``,
``map``, sessions bound to another engine) goes through the scheduler to an engine.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from typing import Any

from . import _native
from . import requests as rq
from .algorithms import Kind
from .engines import REGISTRY, Engine, InlineEngine
from .exceptions import CryptoplaneError, InvalidRequest, NotSupported
from .kernels import Buffer, Kernel
from .kernels.digests import hash_kernel
from .keys import Key

PRIORITIES = ("high", "normal", "bulk")

# Requests up to this many bytes run inline even through submit()/arun(): handing them
# to a thread costs more (~20-50 µs) than AES-GCM on 64 KiB (~4 µs here).
DEFAULT_FAST_PATH_LIMIT = 64 * 1024


class _Counter:
    """requests, bytes, errors by type: one per (engine, algorithm, op)."""

    __slots__ = ("bytes", "errors", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        self.errors: dict[str, int] = {}

    def error(self, e: BaseException) -> None:
        name = type(e).__name__
        self.errors[name] = self.errors.get(name, 0) + 1


FAST_OPS = ("encrypt", "decrypt", "sign", "verify", "mac", "encrypt_sectors",
            "decrypt_sectors")


class _Tally:
    """The fast path's counters for one session: plain slots, the cheapest thing Python
    can increment. Folded into the plane's counters when the session dies."""

    __slots__ = tuple(f"{p}_{op}" for op in FAST_OPS for p in ("n", "b"))
    n_encrypt: int
    b_encrypt: int
    n_decrypt: int
    b_decrypt: int
    n_sign: int
    b_sign: int
    n_verify: int
    b_verify: int
    n_mac: int
    b_mac: int
    n_encrypt_sectors: int
    b_encrypt_sectors: int
    n_decrypt_sectors: int
    b_decrypt_sectors: int

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def items(self) -> list[tuple[str, int, int]]:
        return [(op, getattr(self, f"n_{op}"), getattr(self, f"b_{op}")) for op in FAST_OPS]


class Session:
    """A key bound to a plane: its kernel prepared once, its counters resolved once.

    Made implicitly by the plane's sync calls, or explicitly with ``plane.session(key,
    engine=..., priority=...)`` to bind the key to an engine or give it a priority.
    """

    __slots__ = ("__weakref__", "aead_dec", "aead_enc", "engine", "fast", "kernel", "key",
                 "plane", "priority", "tally")

    def __init__(self, plane: Plane, key: Key, engine: str | None, priority: str) -> None:
        if priority not in PRIORITIES:
            raise InvalidRequest(f"priority must be one of {PRIORITIES}, got {priority!r}")
        if engine is not None and engine not in plane._engines:
            raise NotSupported(f"no engine named {engine!r} in this plane "
                               f"(have {', '.join(plane._engines)})")
        self.plane = plane
        self.key = key
        self.engine = engine
        self.priority = priority
        self.kernel: Kernel = key.kernel()
        # the fast path serves this session only when nothing binds it elsewhere
        self.fast = engine in (None, "inline") and plane._inline_serves(key.algorithm.name)
        # AEAD calls are the cheapest requests there are (~0.5 us), so the fast path calls
        # the library's bound methods directly instead of going through the kernel
        raw = getattr(self.kernel, "raw", None)
        self.aead_enc: Any = raw[0] if raw is not None else None
        self.aead_dec: Any = raw[1] if raw is not None else None
        self.tally = _Tally()
        weakref.finalize(self, plane._fold, key.algorithm.name, self.tally)

    def __repr__(self) -> str:
        return f"<Session {self.key!r} engine={self.engine or 'auto'} priority={self.priority}>"


class Plane:
    """The crypto plane. Use as a context manager, or call ``close()``.

    ``engines``: names from ``cryptoplane.engines.REGISTRY`` or ``Engine`` instances
    (default: ``inline`` and ``threads``). ``self_test``: run each engine's known answers
    at start and withdraw algorithms that fail them.
    """

    def __init__(self, engines: Sequence[str | Engine] | None = None, *,
                 self_test: bool = True,
                 fast_path_limit: int = DEFAULT_FAST_PATH_LIMIT) -> None:
        self.fast_path_limit = fast_path_limit
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, str, str], _Counter] = {}
        self._sessions: weakref.WeakKeyDictionary[Key, Session] = weakref.WeakKeyDictionary()
        self._live: dict[int, tuple[str, _Tally]] = {}
        self._closed = False
        self._engines: dict[str, Engine] = {}
        for spec in engines if engines is not None else ("inline", "threads"):
            if isinstance(spec, str) and spec not in REGISTRY:
                raise NotSupported(f"unknown engine {spec!r} (known: {', '.join(REGISTRY)})")
            engine = REGISTRY[spec]() if isinstance(spec, str) else spec
            engine.start(self_test=self_test)
            self._engines[engine.name] = engine
        inline = self._engines.get("inline")
        self._inline: InlineEngine | None = inline if isinstance(inline, InlineEngine) else None

    # -- sessions -------------------------------------------------------------------------

    def session(self, key: Key, *, engine: str | None = None,
                priority: str = "normal") -> Session:
        """Bind ``key`` to this plane (and optionally to an engine, with a priority)."""
        if not isinstance(key, Key):
            raise InvalidRequest(f"a session needs a Key, not {type(key).__name__}")
        s = Session(self, key, engine, priority)
        with self._lock:
            self._live[id(s.tally)] = (key.algorithm.name, s.tally)
        self._sessions[key] = s
        key._session = s
        return s

    def _session(self, key: Key) -> Session:
        """The fast path's miss: find or make the implicit session for ``key``."""
        if not isinstance(key, Key):
            raise InvalidRequest(f"expected a cryptoplane Key, not {type(key).__name__}")
        s = self._sessions.get(key)
        if s is None:
            s = self.session(key)
        key._session = s
        return s

    def _fold(self, algorithm: str, tally: _Tally) -> None:
        """A session died: keep its counts in the plane's counters."""
        with self._lock:
            self._live.pop(id(tally), None)
        for op, n, b in tally.items():
            if n:
                c = self._counter("inline", algorithm, op)
                c.requests += n
                c.bytes += b

    def _inline_serves(self, algorithm: str) -> bool:
        return self._inline is not None and algorithm in self._inline.capabilities

    def _counter(self, engine: str, algorithm: str, op: str) -> _Counter:
        k = (engine, algorithm, op)
        c = self._counters.get(k)
        if c is None:
            with self._lock:
                c = self._counters.setdefault(k, _Counter())
        return c

    # -- the fast path: synchronous calls -----------------------------------------------
    # Written out by hand, not generated: the common case must be a straight line of
    # session check, library call and two slot increments (measured: each extra Python
    # call layer costs ~60 ns against a 0.5 us AEAD call).

    def encrypt(self, key: Key, data: Buffer, *, nonce: bytes | None = None,
                aad: bytes | None = None, padding: bool = False) -> bytes:
        """Encrypt. AEAD returns ciphertext || tag; RSA-OAEP takes ``aad`` as its label."""
        s = key._session
        if s is not None and s.plane is self and s.fast:
            enc = s.aead_enc
            if enc is not None and not padding:
                try:
                    out: bytes = enc(nonce, data, aad)
                except Exception as e:
                    raise self._fast_error(s, "encrypt", e, data, nonce, aad, padding) from None
            else:
                out = self._on_kernel(s, "encrypt", data, nonce, aad, padding)
            t = s.tally
            t.n_encrypt += 1
            t.b_encrypt += len(data)
            return out
        return self._slow(key, rq.Encrypt, data, nonce=nonce, aad=aad,  # type: ignore[no-any-return]
                          padding=padding)

    def decrypt(self, key: Key, data: Buffer, *, nonce: bytes | None = None,
                aad: bytes | None = None, padding: bool = False) -> bytes:
        """Decrypt; AEAD tags are checked first (``AuthenticationFailed``, no plaintext)."""
        s = key._session
        if s is not None and s.plane is self and s.fast:
            dec = s.aead_dec
            if dec is not None and not padding:
                try:
                    out: bytes = dec(nonce, data, aad)
                except Exception as e:
                    raise self._fast_error(s, "decrypt", e, data, nonce, aad, padding) from None
            else:
                out = self._on_kernel(s, "decrypt", data, nonce, aad, padding)
            t = s.tally
            t.n_decrypt += 1
            t.b_decrypt += len(data)
            return out
        return self._slow(key, rq.Decrypt, data, nonce=nonce, aad=aad,  # type: ignore[no-any-return]
                          padding=padding)

    def sign(self, key: Key, data: Buffer) -> bytes:
        s = key._session
        if s is not None and s.plane is self and s.fast:
            out: bytes = self._on_kernel(s, "sign", data)
            s.tally.n_sign += 1
            s.tally.b_sign += len(data)
            return out
        return self._slow(key, rq.Sign, data)  # type: ignore[no-any-return]

    def verify(self, key: Key, data: Buffer, signature: bytes) -> None:
        """Returns ``None``; raises ``InvalidSignature`` when the signature is wrong."""
        s = key._session
        if s is not None and s.plane is self and s.fast:
            self._on_kernel(s, "verify", data, signature)
            s.tally.n_verify += 1
            s.tally.b_verify += len(data)
            return
        self._slow(key, rq.Verify, data, signature)

    def mac(self, key: Key, data: Buffer, *, tag_size: int | None = None) -> bytes:
        s = key._session
        if s is not None and s.plane is self and s.fast:
            out: bytes = self._on_kernel(s, "mac", data, tag_size)
            s.tally.n_mac += 1
            s.tally.b_mac += len(data)
            return out
        return self._slow(key, rq.Mac, data, tag_size=tag_size)  # type: ignore[no-any-return]

    def _on_kernel(self, s: Session, op: str, *args: Any) -> Any:
        try:
            return getattr(s.kernel, op)(*args)
        except CryptoplaneError as e:
            self._counter("inline", s.key.algorithm.name, op).error(e)
            raise

    def _fast_error(self, s: Session, op: str, e: Exception, *args: Any) -> BaseException:
        """Turn a library exception from a raw AEAD call into the typed error the kernel
        gives for the same inputs (the failure path may be slow; the success path not)."""
        try:
            getattr(s.kernel, op)(*args)
        except CryptoplaneError as typed:
            self._counter("inline", s.key.algorithm.name, op).error(typed)
            return typed
        return e  # the kernel succeeded where the raw call failed: should never happen

    def _slow(self, key: Key, cls: Any, *args: Any, **kw: Any) -> Any:
        """Not on the fast path: a first use of ``key`` here, or a session bound to
        another engine. Make the implicit session, then take the fast path or the queue."""
        s = self._session(key)
        if s.fast:
            return getattr(self, cls.op.value)(key, *args, **kw)
        return self.run(cls(key, *args, **kw))

    def verify_mac(self, key: Key, data: Buffer, tag: bytes) -> None:
        """Constant-time tag check; ``AuthenticationFailed`` when it does not match."""
        return self.run(rq.VerifyMac(key, data, tag))  # type: ignore[no-any-return]

    def digest(self, algorithm: str, data: Buffer) -> bytes:
        kernel = hash_kernel(algorithm)
        if self._inline is None or kernel.algorithm.name not in self._inline.capabilities:
            return self.run(rq.Digest(algorithm, data))  # type: ignore[no-any-return]
        c = self._counter("inline", kernel.algorithm.name, "digest")
        out = kernel.digest(data)
        c.requests += 1
        c.bytes += len(data)
        return out

    def derive(self, key: Key, peer: Key | bytes | None = None, *, length: int | None = None,
               salt: bytes | None = None, info: bytes | None = None) -> bytes:
        """x25519: the shared secret with ``peer``; hkdf-*: ``length`` bytes of output."""
        return self.run(  # type: ignore[no-any-return]
            rq.Derive(key, peer, length=length, salt=salt, info=info))

    def random(self, n: int) -> bytes:
        return self.run(rq.Random(n))  # type: ignore[no-any-return]

    def encrypt_sectors(self, key: Key, data: Buffer, *, sector: int = 0,
                        sector_size: int = 4096, out: Any = None,
                        tweak: str = "plain64") -> Any:
        """XTS over a run of sectors in one native call; ``out`` may be ``data`` itself."""
        return self._sectors(key, data, sector, sector_size, out, tweak, True)

    def decrypt_sectors(self, key: Key, data: Buffer, *, sector: int = 0,
                        sector_size: int = 4096, out: Any = None,
                        tweak: str = "plain64") -> Any:
        return self._sectors(key, data, sector, sector_size, out, tweak, False)

    def _sectors(self, key: Key, data: Buffer, sector: int, sector_size: int, out: Any,
                 tweak: str, encrypt: bool) -> Any:
        cls = rq.EncryptSectors if encrypt else rq.DecryptSectors
        s = key._session
        if s is None or s.plane is not self:
            s = self._session(key)
        if not s.fast:
            return self.run(cls(key, data, sector=sector, sector_size=sector_size, out=out,
                                tweak=tweak))
        layout = rq.check_sectors(data, sector, sector_size, tweak)
        result = self._on_kernel(s, cls.op.value, data, sector, sector_size, out, layout)
        t = s.tally
        if encrypt:
            t.n_encrypt_sectors += 1
            t.b_encrypt_sectors += len(data)
        else:
            t.n_decrypt_sectors += 1
            t.b_decrypt_sectors += len(data)
        return result

    # -- requests: run, submit, arun, map -------------------------------------------------

    def _route(self, request: rq.Request) -> Engine:
        """Choose the engine for a request that is not taking the fast path."""
        if self._closed:
            raise InvalidRequest("this plane is closed")
        bound = request.key._session.engine if (
            request.key is not None and request.key._session is not None
            and request.key._session.plane is self) else None
        if bound is not None:
            engine = self._engines[bound]
            if not engine.can_serve(request):
                raise NotSupported(f"engine {bound!r} cannot serve {request!r}")
            return engine
        candidates = [e for e in self._engines.values() if e.can_serve(request)]
        if not candidates:
            raise NotSupported(f"no engine of this plane can serve {request!r}")
        if self._runs_inline(request) and self._inline in candidates:
            assert self._inline is not None
            return self._inline
        return max(candidates, key=lambda e: (e.name != "inline", e.priority))

    def _runs_inline(self, request: rq.Request) -> bool:
        """Small symmetric work is cheaper here than anywhere else; asymmetric work and
        big payloads go to an engine that can run them beside the caller."""
        kind = request.algorithm.kind
        if kind in (Kind.AKCIPHER, Kind.KPP):
            return False
        return request.nbytes <= self.fast_path_limit

    def _completion(self, engine: Engine, request: rq.Request,
                    future: Future[Any]) -> Any:
        c = self._counter(engine.name, request.algorithm.name, request.op.value)
        n = request.nbytes

        def done(result: Any, error: BaseException | None) -> None:
            if error is not None:
                c.error(error)
                if future.set_running_or_notify_cancel():
                    future.set_exception(error)
                return
            c.requests += 1
            c.bytes += n
            if future.set_running_or_notify_cancel():
                future.set_result(result)

        return done

    def run(self, request: rq.Request) -> Any:
        """Run one request and wait for its result (raises its typed error)."""
        if not isinstance(request, rq.Request):
            raise InvalidRequest(f"expected a request, not {type(request).__name__}")
        engine = self._engines["inline"] if (
            self._inline is not None and self._inline.can_serve(request)
            and self._bound_engine(request) in (None, "inline")
        ) else self._route(request)
        if engine is self._inline:
            c = self._counter("inline", request.algorithm.name, request.op.value)
            try:
                out = request.apply(request.kernel())
            except CryptoplaneError as e:
                c.error(e)
                raise
            c.requests += 1
            c.bytes += request.nbytes
            return out
        return self._submit_to(engine, request).result()

    def _bound_engine(self, request: rq.Request) -> str | None:
        key = request.key
        if key is None or key._session is None or key._session.plane is not self:
            return None
        return key._session.engine

    def _submit_to(self, engine: Engine, request: rq.Request) -> Future[Any]:
        fut: Future[Any] = Future()
        engine.submit([(request, self._completion(engine, request, fut))])
        return fut

    def submit(self, request: rq.Request) -> Future[Any]:
        """Submit a request; a ``concurrent.futures.Future`` completes with its result."""
        if not isinstance(request, rq.Request):
            raise InvalidRequest(f"expected a request, not {type(request).__name__}")
        return self._submit_to(self._route(request), request)

    async def arun(self, request: rq.Request) -> Any:
        """Run a request from asyncio without blocking the event loop."""
        if not isinstance(request, rq.Request):
            raise InvalidRequest(f"expected a request, not {type(request).__name__}")
        engine = self._route(request)
        if engine is self._inline:
            return self.run(request)
        return await asyncio.wrap_future(self._submit_to(engine, request))

    def map(self, requests: Iterable[rq.Request], *,
            return_exceptions: bool = False) -> list[Any]:
        """Run a batch; results in order. With ``return_exceptions`` errors take the place
        of results instead of the first one being raised (after all have completed)."""
        reqs = list(requests)
        futures: list[Future[Any] | None] = []
        inline_results: dict[int, tuple[Any, BaseException | None]] = {}
        by_engine: dict[str, list[tuple[rq.Request, Any]]] = {}
        for i, r in enumerate(reqs):
            try:
                engine = self._route(r)
            except CryptoplaneError as e:
                inline_results[i] = (None, e)
                futures.append(None)
                continue
            if engine is self._inline:
                futures.append(None)
                try:
                    inline_results[i] = (self.run(r), None)
                except CryptoplaneError as e:
                    inline_results[i] = (None, e)
                continue
            fut: Future[Any] = Future()
            futures.append(fut)
            by_engine.setdefault(engine.name, []).append(
                (r, self._completion(engine, r, fut)))
        for name, jobs in by_engine.items():  # one burst per engine
            self._engines[name].submit(jobs)
        out: list[Any] = []
        first_error: BaseException | None = None
        for i, f in enumerate(futures):
            if f is None:
                value, err = inline_results[i]
            else:
                err = f.exception()
                value = None if err is not None else f.result()
            if err is not None:
                first_error = first_error or err
                out.append(err)
            else:
                out.append(value)
        if first_error is not None and not return_exceptions:
            raise first_error
        return out

    # -- introspection and lifetime -------------------------------------------------------

    @property
    def engines(self) -> dict[str, Engine]:
        return dict(self._engines)

    def stats(self) -> dict[str, Any]:
        """Counters as a plain dict (never key material)."""
        per_engine: dict[str, dict[str, Any]] = {}
        per_alg: dict[str, dict[str, Any]] = {}
        with self._lock:
            items = [(k, c.requests, c.bytes, c.errors) for k, c in self._counters.items()]
            items += [(("inline", alg, op), n, b, {})
                      for alg, t in self._live.values() for op, n, b in t.items() if n]
        for (engine, alg, op), requests, nbytes, errors in items:
            e = per_engine.setdefault(engine, {"requests": 0, "bytes": 0, "errors": 0})
            e["requests"] += requests
            e["bytes"] += nbytes
            e["errors"] += sum(errors.values())
            a = per_alg.setdefault(alg, {}).setdefault(
                op, {"requests": 0, "bytes": 0, "errors": {}})
            a["requests"] += requests
            a["bytes"] += nbytes
            for name, n in errors.items():
                a["errors"][name] = a["errors"].get(name, 0) + n
        return {
            "sector_kernel": {"backend": _native.BACKEND, "reason": _native.BACKEND_REASON},
            "engines": {
                name: {**per_engine.get(name, {"requests": 0, "bytes": 0, "errors": 0}),
                       "health": e.health.value,
                       "algorithms": len(e.capabilities)}
                for name, e in self._engines.items()
            },
            "algorithms": per_alg,
        }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for engine in self._engines.values():
            engine.close()

    def __enter__(self) -> Plane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Plane engines={list(self._engines)}{' closed' if self._closed else ''}>"
