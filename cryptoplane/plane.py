"""The Plane: one API for cryptographic work, and the fast path that makes it cheap.

Synchronous calls (``plane.encrypt``...) that the inline engine can serve run at once in
the caller: one identity check for the session, the library call, one counter update
(in C for AEAD: what it adds to the bare library call is measured by
benchmarks/fastpath.py). No request object, no future, no lock, no queue. Everything
else (``submit``, ``arun``, ``map``, sessions bound to another engine) goes through the
scheduler to an engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from typing import Any

from . import _native, sector_runs
from . import requests as rq
from ._native.memory import tune_allocator
from .chain import Chain, annotate
from .engines import REGISTRY, Engine
from .exceptions import CryptoplaneError, InvalidRequest, NotSupported
from .kernels import Buffer
from .kernels.digests import hash_kernel
from .keys import UNBOUND, Key
from .scheduler import batch
from .scheduler.bucket import Clock
from .scheduler.core import Scheduler
from .scheduler.policy import POLICIES, Policy
from .scheduler.router import Router
from .session import (
    OP_DECRYPT,
    OP_DECRYPT_SECTORS,
    OP_ENCRYPT,
    OP_ENCRYPT_SECTORS,
    OP_INDEX,
    OP_MAC,
    OP_OPEN_CHUNKS,
    OP_SEAL_CHUNKS,
    OP_SIGN,
    OP_VERIFY,
    Session,
    Sessions,
    StatRow,
    check_engine,
)
from .stats import OpStats, Registry, aggregate

# Requests up to this many bytes run inline even through submit()/arun(): handing them
# to a thread costs more than AES-GCM on 64 KiB (benchmarks/README.md, plane_speed).
DEFAULT_FAST_PATH_LIMIT = 64 * 1024
DEFAULT_ENGINES = ("inline", "threads")

Submittable = rq.Request | Chain


class Plane:
    """The crypto plane. Use as a context manager, or call ``close()``.

    ``engines``: names from ``cryptoplane.engines.REGISTRY`` or ``Engine`` instances
    (default: ``inline`` and ``threads``; add ``pool`` for worker processes).
    ``policy``: the balancer (``least-completion``, ``round-robin``, ``size-split``, or a
    ``Policy`` object). ``max_queued``: bound on queued requests (then ``submit`` waits,
    or raises ``Busy`` with ``block=False``). ``self_test``: run each engine's known
    answers at start and withdraw algorithms that fail them.
    """

    def __init__(self, engines: Sequence[str | Engine] | None = None, *,
                 policy: str | Policy = "least-completion", max_queued: int = 10_000,
                 self_test: bool = True, fast_path_limit: int = DEFAULT_FAST_PATH_LIMIT,
                 clock: Clock = time.monotonic) -> None:
        self.fast_path_limit = fast_path_limit
        tune_allocator()
        self._registry = Registry()
        self._closed = False
        self._engines: dict[str, Engine] = {}
        if isinstance(policy, str):
            if policy not in POLICIES:
                raise NotSupported(f"unknown policy {policy!r} (known: {', '.join(POLICIES)})")
            policy = POLICIES[policy]()
        try:
            for spec in engines if engines is not None else DEFAULT_ENGINES:
                if isinstance(spec, str) and spec not in REGISTRY:
                    raise NotSupported(
                        f"unknown engine {spec!r} (known: {', '.join(REGISTRY)})")
                engine = REGISTRY[spec]() if isinstance(spec, str) else spec
                self._engines[engine.name] = engine
                engine.start(self_test=self_test)
        except BaseException:
            for e in self._engines.values():
                e.close()
            raise
        self._scheduler = Scheduler(self._engines, self._registry, policy=policy,
                                    max_queued=max_queued, clock=clock)
        # the engine whose traits say it runs work in the caller's thread: the fast path's
        self._inline = self._scheduler.inline
        self._router = Router(self._engines, self._scheduler, fast_path_limit)
        limits = self._scheduler.limits

        def limited(name: str) -> bool:
            lim = limits.get(name)
            return lim is not None and not lim.unlimited

        inline = self._inline
        self._sessions = Sessions(self, self._registry, (inline.name, inline.capabilities)
                                  if inline is not None else None, limited)

    @property
    def sessions(self) -> Sessions:
        """This plane's sessions (lookups, fast-path counts), for the batch planner."""
        return self._sessions

    @property
    def router(self) -> Router:
        """Where requests that leave the fast path go, for the batch planner."""
        return self._router

    # -- sessions -------------------------------------------------------------------------

    def session(self, key: Key, *, engine: str | None = None, priority: str = "normal",
                client: str | None = None) -> Session:
        """Bind ``key`` to this plane: optionally to one engine, with a priority for its
        queued work, and on behalf of a named client (for QoS limits and statistics)."""
        if not isinstance(key, Key):
            raise InvalidRequest(f"a session needs a Key, not {type(key).__name__}")
        check_engine(self._engines, engine)
        return self._sessions.bind(key, engine, priority, client or "-")

    def _counter(self, s: Session, op: str) -> OpStats:
        return self._sessions.counter(s, op)

    # -- QoS ------------------------------------------------------------------------------

    def limit(self, client: str | None = None, *, session: Session | None = None,
              ops: float | None = None, bytes: float | None = None) -> None:
        """Limit a named client or a session to ``ops`` requests/s and ``bytes``/s
        (QEMU's throttle-ops/throttle-bps). 0 lifts a limit; ``None`` leaves it as is.
        Takes effect at once, for work already queued too."""
        if (client is None) == (session is None):
            raise InvalidRequest("limit() needs exactly one of client= or session=")
        for value in (ops, bytes):
            if value is not None and value < 0:
                raise InvalidRequest(f"limits must be >= 0, got {value}")
        name = client if client is not None else session.limit_name  # type: ignore[union-attr]
        self._scheduler.limit(name, ops, bytes)
        self._sessions.readmit(name)

    # -- the fast path: synchronous calls -----------------------------------------------
    # Written out by hand, not generated: the common case must be a straight line of
    # one identity test, the library call and one addition: on a small AEAD call even a
    # bare Python wrapper is a visible share, and so is every extra attribute read
    # (benchmarks/README.md, profile_fast_path).

    def encrypt(self, key: Key, data: Buffer, nonce: bytes | None = None,
                aad: bytes | None = None, padding: bool = False) -> bytes:
        """Encrypt. AEAD returns ciphertext || tag; RSA-OAEP takes ``aad`` as its label."""
        try:
            s = key.session_hint
        except AttributeError:  # not a Key: _slow refuses it with InvalidRequest
            s = self._UNBOUND
        if s.fast_plane is self and not padding:
            try:
                out: bytes = s.enc(nonce, data, aad)
            except Exception as e:
                raise self._fast_error(s, "encrypt", e, data, nonce, aad) from None
            s.tally.add(OP_ENCRYPT, len(data))
            return out
        return self._slow(key, rq.Encrypt, data, nonce=nonce, aad=aad,  # type: ignore[no-any-return]
                          padding=padding)

    def decrypt(self, key: Key, data: Buffer, nonce: bytes | None = None,
                aad: bytes | None = None, padding: bool = False) -> bytes:
        """Decrypt; AEAD tags are checked first (``AuthenticationFailed``, no plaintext)."""
        try:
            s = key.session_hint
        except AttributeError:  # not a Key: _slow refuses it with InvalidRequest
            s = self._UNBOUND
        if s.fast_plane is self and not padding:
            try:
                out: bytes = s.dec(nonce, data, aad)
            except Exception as e:
                raise self._fast_error(s, "decrypt", e, data, nonce, aad) from None
            s.tally.add(OP_DECRYPT, len(data))
            return out
        return self._slow(key, rq.Decrypt, data, nonce=nonce, aad=aad,  # type: ignore[no-any-return]
                          padding=padding)

    # The same two methods in C (_native/fastpath.c), when it is built and not disabled:
    # the interpreter's call and bytecode are most of the fast path's cost (figures:
    # benchmarks/README.md, fastpath). The C code hands every call it does not serve
    # itself (other sessions, padding, argument errors) to these Python methods, which
    # stay the specification. inspect.signature() finds theirs through __wrapped__.
    _UNBOUND = UNBOUND
    _encrypt_py = encrypt
    _decrypt_py = decrypt
    encrypt = _native.fast_aead("encrypt", encrypt)
    decrypt = _native.fast_aead("decrypt", decrypt)

    def sign(self, key: Key, data: Buffer) -> bytes:
        s = key.session_hint
        if s.fast_plane is self:
            try:
                out: bytes = s.kernel.sign(data)
            except CryptoplaneError as e:
                self._counter(s, "sign").error(e)
                raise
            s.tally.add(OP_SIGN, len(data))
            return out
        return self._slow(key, rq.Sign, data)  # type: ignore[no-any-return]

    def verify(self, key: Key, data: Buffer, signature: bytes) -> None:
        """Returns ``None``; raises ``InvalidSignature`` when the signature is wrong."""
        s = key.session_hint
        if s.fast_plane is self:
            try:
                s.kernel.verify(data, signature)
            except CryptoplaneError as e:
                self._counter(s, "verify").error(e)
                raise
            s.tally.add(OP_VERIFY, len(data))
            return
        self._slow(key, rq.Verify, data, signature)

    def mac(self, key: Key, data: Buffer, *, tag_size: int | None = None) -> bytes:
        s = key.session_hint
        if s.fast_plane is self:
            out: bytes = self._on_kernel(s, "mac", data, tag_size)
            s.tally.add(OP_MAC, len(data))
            return out
        return self._slow(key, rq.Mac, data, tag_size=tag_size)  # type: ignore[no-any-return]

    def _on_kernel(self, s: Session, op: str, *args: Any) -> Any:
        try:
            return getattr(s.kernel, op)(*args)
        except CryptoplaneError as e:
            self._counter(s, op).error(e)
            raise

    def _fast_error(self, s: Session, op: str, e: Exception, data: Buffer,
                    nonce: bytes | None, aad: bytes | None) -> BaseException:
        # the C fast path (_native/fastpath.c) asks the plane for this by name
        return self._sessions.explain(s, op, e, data, nonce, aad)

    def _slow(self, key: Key, cls: Any, *args: Any, **kw: Any) -> Any:
        """Not on the fast path: a first use of ``key`` here, a session bound to another
        engine, or CBC padding. Find the session, then take the kernel or the queue."""
        s = self._sessions.for_key(key)
        if s.fast_plane is not self:
            return self.run(cls(key, *args, **kw))
        op = cls.op.value
        if op in ("encrypt", "decrypt"):
            out = self._on_kernel(s, op, args[0], kw["nonce"], kw["aad"], kw["padding"])
            s.tally.add(OP_INDEX[op], len(args[0]))
            return out
        return getattr(self, op)(key, *args, **kw)

    def verify_mac(self, key: Key, data: Buffer, tag: bytes) -> None:
        """Constant-time tag check; ``AuthenticationFailed`` when it does not match."""
        return self.run(rq.VerifyMac(key, data, tag))  # type: ignore[no-any-return]

    def digest(self, algorithm: str, data: Buffer) -> bytes:
        kernel = hash_kernel(algorithm)
        if self._inline is None or kernel.algorithm.name not in self._inline.capabilities:
            return self.run(rq.Digest(algorithm, data))  # type: ignore[no-any-return]
        c = self._registry.get(self._inline.name, kernel.algorithm.name, "digest")
        out = kernel.digest(data)
        c.add(1, len(data))
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
                        tweak: str = "plain64", tweak_unit: int | None = None) -> Any:
        """XTS over a run of sectors in one native call; ``out`` may be ``data`` itself.
        Sector ``i`` of the run takes tweak ``sector + i``; with ``tweak_unit=512`` the
        tweak counts 512-byte units, as dm-crypt's LUKS2 IVs do at every sector size
        (the second 4096-byte sector's tweak is ``sector + 8``)."""
        s = key.session_hint
        if s.fast_plane is not self:
            s = self._sessions.for_key(key)
            if s.fast_plane is not self:
                return self.run(rq.EncryptSectors(key, data, sector=sector,
                                                  sector_size=sector_size, out=out, tweak=tweak,
                                                  tweak_unit=tweak_unit))
        layout = rq.check_sectors(data, sector, sector_size, tweak, tweak_unit)
        result = self._on_kernel(s, "encrypt_sectors", data, sector, sector_size, out, layout)
        s.tally.add(OP_ENCRYPT_SECTORS, len(data))
        return result

    def decrypt_sectors(self, key: Key, data: Buffer, *, sector: int = 0,
                        sector_size: int = 4096, out: Any = None,
                        tweak: str = "plain64", tweak_unit: int | None = None) -> Any:
        s = key.session_hint
        if s.fast_plane is not self:
            s = self._sessions.for_key(key)
            if s.fast_plane is not self:
                return self.run(rq.DecryptSectors(key, data, sector=sector,
                                                  sector_size=sector_size, out=out, tweak=tweak,
                                                  tweak_unit=tweak_unit))
        layout = rq.check_sectors(data, sector, sector_size, tweak, tweak_unit)
        result = self._on_kernel(s, "decrypt_sectors", data, sector, sector_size, out, layout)
        s.tally.add(OP_DECRYPT_SECTORS, len(data))
        return result

    # -- sector batches (issue 18: at 4 KiB the Python around a run costs more than the
    # cipher): on the fast path one native call and one tally; else one run per item.

    def decrypt_sectors_gather(self, key: Key, src: Buffer,
                               items: Sequence[tuple[int, int, Any]], *,
                               sector_size: int = 4096, tweak: str = "plain64",
                               tweak_unit: int | None = None) -> None:
        """Each item ``(offset in src, first sector, out)`` fills ``out`` with the
        plaintext of ``src[offset:offset + len(out)]`` (``src``: an image's mapping,
        say); tweaks as ``decrypt_sectors``'. Items are all checked before any runs
        (by the kernel on the fast path: no Python per item there)."""
        code = rq.tweak_code(sector_size, tweak, tweak_unit)
        s = self._batch_session(key, "decrypt_gather")
        if s is None:
            sector_runs.gather_per_item(self, key, src, items, sector_size, tweak,
                                        tweak_unit)
            return
        n = self._on_kernel(s, "decrypt_gather", src, items, sector_size, code)
        s.tally.add(OP_DECRYPT_SECTORS, n)

    def encrypt_sectors_scatter(self, key: Key, fd: int,
                                items: Sequence[tuple[int, int, Any]], scratch: Any, *,
                                sector_size: int = 4096, tweak: str = "plain64",
                                tweak_unit: int | None = None) -> tuple[int, int]:
        """Each item ``(file offset, first sector, plaintext)`` is encrypted into
        ``scratch`` (as long as the longest item) and pwritten to ``fd`` at its offset,
        in order, so overlapping writes keep their order. Returns (items written, errno
        of the first that failed or 0): each failed write is its own request's error."""
        code = rq.tweak_code(sector_size, tweak, tweak_unit)
        s = self._batch_session(key, "encrypt_scatter")
        if s is None:
            return sector_runs.scatter_per_item(self, key, fd, items, scratch, sector_size,
                                                tweak, tweak_unit)
        done, err, written = self._on_kernel(s, "encrypt_scatter", fd, items, sector_size,
                                             code, scratch)
        s.tally.add(OP_ENCRYPT_SECTORS, written)
        return done, err

    def _batch_session(self, key: Key, op: str) -> Session | None:
        """``key``'s session when this plane's fast path serves it (bound here on first
        use, as ``decrypt_sectors`` binds it), else None: the batch goes item by item."""
        s = getattr(key, "session_hint", self._UNBOUND)
        if s.fast_plane is not self:
            s = self._sessions.for_key(key)
            if s.fast_plane is not self:
                return None
        if not hasattr(s.kernel, op):
            raise InvalidRequest(f"{s.algorithm} does not offer sector runs (AES-XTS does)")
        return s  # type: ignore[no-any-return]

    def seal_chunks(self, key: Key, data: Buffer, out: Any, *, counter: int,
                    final: bool) -> int:
        """A run of age STREAM chunks sealed into ``out`` (each chunk, then its tag) in
        one native call, GIL released: what ``SealChunks`` does, on the fast path (a
        stream's batch cost ~16 µs more through a request and its future). Returns the
        bytes written."""
        return self._chunks(rq.SealChunks, OP_SEAL_CHUNKS, key, data, out, counter, final)

    def open_chunks(self, key: Key, data: Buffer, out: Any, *, counter: int,
                    final: bool) -> int:
        """The inverse of ``seal_chunks``: ``ChunkAuthenticationFailed`` (naming the
        chunk) for one that does not authenticate."""
        return self._chunks(rq.OpenChunks, OP_OPEN_CHUNKS, key, data, out, counter, final)

    def _chunks(self, cls: type[rq.SealChunks] | type[rq.OpenChunks], index: int, key: Key,
                data: Buffer, out: Any, counter: int, final: bool) -> int:
        s = key.session_hint
        if s.fast_plane is not self:
            s = self._sessions.for_key(key)
            if s.fast_plane is not self:
                written: int = self.run(cls(key, data, out, counter=counter, final=final))
                return written
        rq.check_chunks(data, counter)
        n: int = self._on_kernel(s, cls.op.value, data, out, counter, final)
        s.tally.add(index, len(data))
        return n

    def guard_mapped_reads(self) -> bool:
        """Whether ``decrypt_sectors`` may read its input from a shared file mapping. A
        file that shrinks under one makes the read SIGBUS; the native sector kernel
        guards its runs (this arms the guard, ahead of faulthandler, say) and raises
        ``OSError`` instead. False on the Python fallback, which has no guard."""
        return _native.guard_mapped_reads()

    # -- requests: run, submit, arun, map -------------------------------------------------

    def submit(self, request: Submittable, *, priority: str | None = None,
               client: str | None = None, timeout: float | None = None,
               block: bool = True) -> Future[Any]:
        """Submit a request (or a ``Chain``); a ``concurrent.futures.Future`` completes
        with its result or its typed error. Small work runs at once in this thread; the
        rest is queued by ``priority`` (``high``, ``normal``, ``bulk``; default: the key's
        session's). ``timeout``: seconds until the request fails with ``Timeout``.
        ``block=False``: raise ``Busy`` instead of waiting when the queues are full.
        ``future.cancel()`` works until an engine has taken the request."""
        return self._submit(request, priority, client, timeout, block, lend=False)

    def _submit(self, request: Submittable, priority: str | None, client: str | None,
                timeout: float | None, block: bool, *, lend: bool) -> Future[Any]:
        if self._closed:
            raise InvalidRequest("this plane is closed")
        if isinstance(request, Chain):
            return self._submit_chain(request, priority, client, timeout, block)
        if not isinstance(request, rq.Request):
            raise InvalidRequest(f"expected a request, not {type(request).__name__}")
        session = self._sessions.of(request)
        return self._router.submit(request, session, priority=priority, client=client,
                                   timeout=timeout, block=block, lend=lend,
                                   session_limit=session.limit_name if session else None)

    def run(self, request: Submittable, *, priority: str | None = None,
            client: str | None = None, timeout: float | None = None) -> Any:
        """Run one request (or chain) and wait for its result (raises its typed error)."""
        fut = self._submit(request, priority, client, timeout, True, lend=True)
        if not fut.done():
            self._router.help_while_waiting([fut])
        return fut.result()

    async def arun(self, request: Submittable, *, priority: str | None = None,
                   client: str | None = None, timeout: float | None = None) -> Any:
        """Run a request from asyncio without blocking the event loop on big work."""
        fut = self._submit(request, priority, client, timeout, True, lend=False)
        if fut.done():
            return fut.result()
        return await asyncio.wrap_future(fut)

    def map(self, requests: Iterable[Submittable], *, return_exceptions: bool = False,
            priority: str | None = None, client: str | None = None,
            timeout: float | None = None) -> list[Any]:
        """Run a batch; results in order. Work is queued in one go (a GIL-free run on
        one key as a few lane jobs that share it) and this thread runs what it can
        inline while it waits. With ``return_exceptions`` errors take the place of
        results; otherwise the first error is raised, after every request has
        completed."""
        return batch.run_map(self, list(requests), return_exceptions=return_exceptions,
                             priority=priority, client=client, timeout=timeout)

    def _submit_chain(self, chain: Chain, priority: str | None, client: str | None,
                      timeout: float | None, block: bool) -> Future[Any]:
        """Each step is submitted when the previous one completes, so each may run on a
        different engine; the chain's future gets every step's output, or the first
        failing step's own error."""
        out: Future[Any] = Future()
        out.set_running_or_notify_cancel()
        results: list[Any] = []

        def start(index: int, request: rq.Request) -> None:
            try:
                fut = self._submit(request, priority, client, timeout, block, lend=False)
            except Exception as e:  # the step's own typed error ends the chain
                out.set_exception(annotate(e, index, chain))
                return
            fut.add_done_callback(lambda f: advance(index, f))

        def advance(index: int, fut: Future[Any]) -> None:
            err = fut.exception()
            if err is not None:
                out.set_exception(annotate(err, index, chain))
                return
            results.append(fut.result())
            if index + 1 == len(chain):
                out.set_result(tuple(results))
                return
            try:
                following = chain.next_request(index + 1, results[-1])
            except Exception as e:
                out.set_exception(annotate(e, index + 1, chain))
                return
            start(index + 1, following)

        start(0, chain.first)
        return out

    # -- introspection and lifetime -------------------------------------------------------

    @property
    def engines(self) -> dict[str, Engine]:
        return dict(self._engines)

    def stat_rows(self) -> list[StatRow]:
        """Counts per (engine, algorithm, op, client) with each one's latency histogram
        (queued work only): the breakdown ``stats()`` folds away, for exporters."""
        return self._sessions.stat_rows()

    def stats(self) -> dict[str, Any]:
        """Everything counted, as a plain dict (never key material): per engine,
        algorithm/operation and client: requests, bytes, errors by type; latency
        percentiles of queued work; queue depths; QoS limits; scheduler counters."""
        agg = aggregate(self.stat_rows())
        agg.pop("_histograms")  # the Prometheus export reads histograms itself
        engines: dict[str, Any] = {}
        for name, e in self._engines.items():
            counts = agg["engines"].get(name, {"requests": 0, "bytes": 0, "errors": {}})
            extra = e.counters() if hasattr(e, "counters") else {}
            engines[name] = {**counts, "health": e.health.value,
                             "algorithms": len(e.capabilities), "inflight": e.inflight,
                             "capacity": e.capacity, "parallelism": e.parallelism,
                             "busy_seconds": round(e.meter.busy, 6),
                             "rates": e.meter.rates(), **extra}
        sched = self._scheduler
        return {
            "sector_kernel": {"backend": _native.BACKEND, "reason": _native.BACKEND_REASON},
            "fast_path": {"backend": _native.FAST_PATH, "reason": _native.FAST_PATH_REASON},
            "engines": engines,
            "algorithms": agg["algorithms"],
            "clients": agg["clients"],
            "latency": agg["latency"],
            "queues": sched.depth(),
            "scheduler": {"policy": sched.policy.name, **sched.counters},
            "limits": {name: lim.describe() for name, lim in sched.limits.items()},
        }

    def close(self) -> None:
        """Fail queued work with ``EngineFailed``, let in-flight work finish, stop engines."""
        if self._closed:
            return
        self._closed = True
        self._scheduler.close()
        for engine in self._engines.values():
            engine.close()

    def __enter__(self) -> Plane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Plane engines={list(self._engines)}{' closed' if self._closed else ''}>"

