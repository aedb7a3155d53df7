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
from .kernels import Buffer
from .kernels.digests import hash_kernel
from .keys import Key
from .session import ONE_REQUEST, Counter, Session, check_engine

# Requests up to this many bytes run inline even through submit()/arun(): handing them
# to a thread costs more (~20-50 µs) than AES-GCM on 64 KiB (~4 µs here).
DEFAULT_FAST_PATH_LIMIT = 64 * 1024


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
        self._counters: dict[tuple[str, str, str], Counter] = {}
        self._sessions: weakref.WeakKeyDictionary[Key, Session] = weakref.WeakKeyDictionary()
        self._live: set[Session] = set()  # sessions whose fast-path counts are not folded
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
        check_engine(self._engines, engine)
        inline = self._inline
        s = Session(self, key, engine, priority,
                    inline is not None and key.algorithm.name in inline.capabilities)
        old = self._sessions.get(key)
        with self._lock:
            self._live.add(s)
        if old is not None:
            self._fold(old)
        else:  # when the key dies, its session's counts move into the plane's counters
            weakref.finalize(key, Plane._fold_dead, weakref.ref(self))
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

    @staticmethod
    def _fold_dead(plane_ref: weakref.ref[Plane]) -> None:
        plane = plane_ref()
        if plane is None:
            return
        with plane._lock:
            ended = [s for s in plane._live if s.key is None]
        for s in ended:
            plane._fold(s)

    def _fold(self, s: Session) -> None:
        """A session ended: keep its fast-path counts in the plane's counters."""
        with self._lock:
            if s not in self._live:
                return
            self._live.discard(s)
        for op, n, b in s.counts():
            c = self._counter("inline", s.algorithm, op)
            c.requests += n
            c.bytes += b

    def _counter(self, engine: str, algorithm: str, op: str) -> Counter:
        k = (engine, algorithm, op)
        c = self._counters.get(k)
        if c is None:
            with self._lock:
                c = self._counters.setdefault(k, Counter())
        return c

    # -- the fast path: synchronous calls -----------------------------------------------
    # Written out by hand, not generated: the common case must be a straight line of
    # one identity test, the library call and one addition. Measured here: a bare Python
    # wrapper costs ~80 ns over a 0.5 us AEAD call; every extra attribute ~10-15 ns.

    def encrypt(self, key: Key, data: Buffer, nonce: bytes | None = None,
                aad: bytes | None = None, padding: bool = False) -> bytes:
        """Encrypt. AEAD returns ciphertext || tag; RSA-OAEP takes ``aad`` as its label."""
        try:
            s = key._session
        except AttributeError:  # not a Key: _slow refuses it with InvalidRequest
            s = self._UNBOUND
        if s.fast_plane is self and not padding:
            try:
                out: bytes = s.enc(nonce, data, aad)
            except Exception as e:
                raise self._fast_error(s, "encrypt", e, data, nonce, aad) from None
            s.c_encrypt += len(data) + ONE_REQUEST
            return out
        return self._slow(key, rq.Encrypt, data, nonce=nonce, aad=aad,  # type: ignore[no-any-return]
                          padding=padding)

    def decrypt(self, key: Key, data: Buffer, nonce: bytes | None = None,
                aad: bytes | None = None, padding: bool = False) -> bytes:
        """Decrypt; AEAD tags are checked first (``AuthenticationFailed``, no plaintext)."""
        try:
            s = key._session
        except AttributeError:  # not a Key: _slow refuses it with InvalidRequest
            s = self._UNBOUND
        if s.fast_plane is self and not padding:
            try:
                out: bytes = s.dec(nonce, data, aad)
            except Exception as e:
                raise self._fast_error(s, "decrypt", e, data, nonce, aad) from None
            s.c_decrypt += len(data) + ONE_REQUEST
            return out
        return self._slow(key, rq.Decrypt, data, nonce=nonce, aad=aad,  # type: ignore[no-any-return]
                          padding=padding)

    # The same two methods in C (_native/fastpath.c), when it is built and not disabled:
    # the interpreter's call and bytecode are most of the fast path's cost (~230 ns over
    # a ~0.45 us AEAD call; ~100 ns in C). The C code hands every call it does not serve
    # itself (other sessions, padding, argument errors) to these Python methods, which
    # stay the specification. inspect.signature() finds theirs through __wrapped__.
    from .session import UNBOUND as _UNBOUND
    _encrypt_py = encrypt
    _decrypt_py = decrypt
    encrypt = _native.fast_aead("encrypt", encrypt)
    decrypt = _native.fast_aead("decrypt", decrypt)

    def sign(self, key: Key, data: Buffer) -> bytes:
        s = key._session
        if s.fast_plane is self:
            out: bytes = self._on_kernel(s, "sign", data)
            s.c_sign += len(data) + ONE_REQUEST
            return out
        return self._slow(key, rq.Sign, data)  # type: ignore[no-any-return]

    def verify(self, key: Key, data: Buffer, signature: bytes) -> None:
        """Returns ``None``; raises ``InvalidSignature`` when the signature is wrong."""
        s = key._session
        if s.fast_plane is self:
            self._on_kernel(s, "verify", data, signature)
            s.c_verify += len(data) + ONE_REQUEST
            return
        self._slow(key, rq.Verify, data, signature)

    def mac(self, key: Key, data: Buffer, *, tag_size: int | None = None) -> bytes:
        s = key._session
        if s.fast_plane is self:
            out: bytes = self._on_kernel(s, "mac", data, tag_size)
            s.c_mac += len(data) + ONE_REQUEST
            return out
        return self._slow(key, rq.Mac, data, tag_size=tag_size)  # type: ignore[no-any-return]

    def _on_kernel(self, s: Session, op: str, *args: Any) -> Any:
        try:
            return getattr(s.kernel, op)(*args)
        except CryptoplaneError as e:
            self._counter("inline", s.algorithm, op).error(e)
            raise

    def _fast_error(self, s: Session, op: str, e: Exception, data: Buffer,
                    nonce: bytes | None, aad: bytes | None) -> BaseException:
        """The typed error for an exception out of a fast-path call. A raw AEAD method
        raises the library's exceptions: ask the kernel, which translates them, to run
        the same inputs (the failure path may be slow; the success path may not)."""
        if not isinstance(e, CryptoplaneError):
            try:
                getattr(s.kernel, op)(data, nonce, aad, False)
            except CryptoplaneError as typed:
                e = typed
        if isinstance(e, CryptoplaneError):
            self._counter("inline", s.algorithm, op).error(e)
        return e

    def _slow(self, key: Key, cls: Any, *args: Any, **kw: Any) -> Any:
        """Not on the fast path: a first use of ``key`` here, a session bound to another
        engine, or CBC padding. Find the session, then take the kernel or the queue."""
        s = self._session(key)
        if s.fast_plane is not self:
            return self.run(cls(key, *args, **kw))
        op = cls.op.value
        if op in ("encrypt", "decrypt"):
            out = self._on_kernel(s, op, args[0], kw["nonce"], kw["aad"], kw["padding"])
            setattr(s, f"c_{op}", getattr(s, f"c_{op}") + len(args[0]) + ONE_REQUEST)
            return out
        return getattr(self, op)(key, *args, **kw)

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
        s = key._session
        if s.fast_plane is not self:
            s = self._session(key)
            if s.fast_plane is not self:
                return self.run(rq.EncryptSectors(key, data, sector=sector,
                                                  sector_size=sector_size, out=out, tweak=tweak))
        layout = rq.check_sectors(data, sector, sector_size, tweak)
        result = self._on_kernel(s, "encrypt_sectors", data, sector, sector_size, out, layout)
        s.c_encrypt_sectors += len(data) + ONE_REQUEST
        return result

    def decrypt_sectors(self, key: Key, data: Buffer, *, sector: int = 0,
                        sector_size: int = 4096, out: Any = None,
                        tweak: str = "plain64") -> Any:
        s = key._session
        if s.fast_plane is not self:
            s = self._session(key)
            if s.fast_plane is not self:
                return self.run(rq.DecryptSectors(key, data, sector=sector,
                                                  sector_size=sector_size, out=out, tweak=tweak))
        layout = rq.check_sectors(data, sector, sector_size, tweak)
        result = self._on_kernel(s, "decrypt_sectors", data, sector, sector_size, out, layout)
        s.c_decrypt_sectors += len(data) + ONE_REQUEST
        return result

    # -- requests: run, submit, arun, map -------------------------------------------------

    def _route(self, request: rq.Request) -> Engine:
        """Choose the engine for a request that is not taking the fast path."""
        if self._closed:
            raise InvalidRequest("this plane is closed")
        bound = self._bound_engine(request)
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
        if key is None or key._session.plane is not self:
            return None
        return key._session.engine  # type: ignore[no-any-return]

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
            items += [(("inline", s.algorithm, op), n, b, {})
                      for s in self._live for op, n, b in s.counts()]
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
