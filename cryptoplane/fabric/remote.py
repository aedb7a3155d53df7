"""The ``remote`` engine: a plane's work offloaded to fabric servers.

    plane = cp.Plane(engines=["inline", "threads",
                              cp.Remote("tcp://10.0.0.5:7300", token=token)])

A crypto device like the others (``engines/base.py``): it declares what the servers
serve over offload sessions (docs/wire-protocol.md, 4.4: AEAD encrypt/decrypt,
RSA/ECDSA/Ed25519 sign/verify, HMAC mac/verify_mac), takes batches from the scheduler's
dispatcher and completes each job exactly once through its ``Completion``. Each job is a
RAW_* request on an offload session that carries the job's own ``Key``, opened once per
key per connection (virtio-crypto's sessions; cached by key identity, closed when the
``Key`` dies). The answers are the server plane's, the same OpenSSL calls a local plane
makes: byte for byte what the inline engine gives for deterministic operations.

Work runs on the engine's own event loop (a daemon thread): ``submit`` only queues the
jobs and wakes the loop, which pipelines them over a small pool of connections, many in
flight (``pool.py``). The meter learns each job's round trip and the loop's CPU per job,
so the balancer sends work here only when it completes sooner than locally.

Failures: a dead connection's retry-safe jobs go to another connection or server of the
engine's URL list; when no server is reachable the engine is ``BROKEN`` and jobs end at
once with ``ConnectionLost`` (an ``EngineFailed``), which the scheduler hands to another
engine when repeating the job is safe (plane requests with a caller-given nonce are);
reconnects continue in the background with backoff, and health returns to ``OK``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import ssl as ssl_module
import struct
import threading
import time
import weakref
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, Final, TypeVar

from .. import requests as rq
from ..algorithms import CATALOGUE, Algorithm, Kind, Op
from ..engines.base import Engine, Health, Job, Traits, Work
from ..exceptions import (
    AuthenticationFailed,
    Busy,
    EngineFailed,
    InvalidRequest,
    InvalidSignature,
    QuotaExceeded,
)
from ..keys import Key
from . import codec
from .capacity import class_of_session
from .codec import Field, Frame, FrameType, Status
from .connection_client import Call, SessionSpec, read_field
from .errors import QuotaRefused, ShuttingDown, Unauthorized
from .pool import SILENCE, Pool

T = TypeVar("T")

# what an offload session serves, by kind (the servers' plane runs every one of these)
SERVED: Final = (
    "aes-128-gcm", "aes-192-gcm", "aes-256-gcm", "chacha20-poly1305",
    "rsa-pss-sha256", "rsa-pkcs1v15-sha256", "ecdsa-p256-sha256", "ecdsa-p384-sha384",
    "ed25519", "hmac-sha256", "hmac-sha384", "hmac-sha512",
)
_OPS_BY_KIND: Final = {
    Kind.AEAD: frozenset({Op.ENCRYPT, Op.DECRYPT}),
    Kind.AKCIPHER: frozenset({Op.SIGN, Op.VERIFY}),
    Kind.MAC: frozenset({Op.MAC, Op.VERIFY_MAC}),
}
_CARRIED: Final = (rq.Encrypt, rq.Decrypt, rq.Sign, rq.Verify, rq.Mac, rq.VerifyMac)
_CRYPTO_ANSWERS: Final = (AuthenticationFailed, InvalidSignature)
MAX_REQUEST: Final = codec.MAX_PAYLOAD - 64 * 1024  # room for the other fields
DEFAULT_CAPACITY: Final = 1024  # jobs in flight (the scheduler keeps the rest queued)
MAX_RETRY_WAIT: Final = 0.05  # longer RETRY_AFTERs: the job goes back to the scheduler
DECODE_SECONDS: Final = 3e-6  # the loop's share of reading an answer, not timed per job
# jobs on the wire above which a submit does not wake the loop: an answer will come
# soon and the loop sends what queued meanwhile when it handles it (each wake-up is a
# thread switch and a turn of the GIL in the plane's process, ~10 µs of its core)
WAKE_BELOW: Final = 16
_FIELD_HEAD: Final = struct.Struct("!BI").pack  # a field: u8 tag, u32 length, value
_DATA, _NONCE, _AAD, _SIGNATURE, _MAC, _TAG_SIZE = (
    int(Field.DATA), int(Field.NONCE), int(Field.AAD), int(Field.SIGNATURE), int(Field.MAC),
    int(Field.TAG_SIZE))
_RAW_SIGN, _RAW_VERIFY, _RAW_ENCRYPT, _RAW_DECRYPT, _RAW_MAC, _RAW_VERIFY_MAC = (
    int(codec.Op.RAW_SIGN), int(codec.Op.RAW_VERIFY), int(codec.Op.RAW_ENCRYPT),
    int(codec.Op.RAW_DECRYPT), int(codec.Op.RAW_MAC), int(codec.Op.RAW_VERIFY_MAC))
_REQUEST: Final = int(FrameType.REQUEST)


def _field(tag: int, value: bytes) -> bytes:
    return _FIELD_HEAD(tag, len(value)) + value


class Remote(Engine):
    """An engine whose work runs on fabric servers. ``url``: one server or a list
    (failover between them); ``token``/``ssl`` as for ``AsyncClient.connect``;
    ``connections`` per server; ``timeout``: a job's deadline on the wire (the
    scheduler's own ``timeout=`` still applies); ``capacity``: jobs in flight;
    ``silence``: seconds a server owing answers may say nothing before it is sent a
    PING, and then before its connection is cut (its jobs fail over); ``placement``:
    which server a job goes to (``placement.py``).

    ``manager`` (``manager://host:port``) and ``quota`` (``{"rsa2048": {"ops": 500}}``)
    instead of ``url``: the servers are those a manager grants the quota on
    (``granted.py``), jobs paced to the grant by their algorithm class
    (``capacity.class_of_session``); the grant is released on ``close``."""

    name = "remote"
    priority = 5
    traits = Traits(local=False, in_process=False, pulls=False, takes_lanes=False)
    max_request = MAX_REQUEST

    def __init__(self, url: str | Sequence[str] | None = None, *,
                 token: str | None = None,
                 ssl: ssl_module.SSLContext | None = None, connections: int = 2,
                 timeout: float = 30.0, connect_timeout: float = 10.0,
                 capacity: int = DEFAULT_CAPACITY, name: str = "remote",
                 silence: float = SILENCE, placement: str = "least-loaded",
                 manager: str | Sequence[str] | None = None,
                 quota: Mapping[str, Mapping[str, float]] | None = None,
                 grant_options: Mapping[str, Any] | None = None) -> None:
        super().__init__(algorithms=[CATALOGUE[n] for n in SERVED])
        self.name = name
        self.timeout = timeout
        self.capacity = capacity
        # Little's law: the measured round trip already holds the queueing of every job
        # in flight, so each in-flight job is a lane
        self.parallelism = capacity
        common: dict[str, Any] = dict(
            token=token, ssl=ssl, connections=connections, timeout=connect_timeout,
            name=f"cryptoplane engine {name}", fail_fast=True,
            max_retry_wait=MAX_RETRY_WAIT, silence=silence, placement=placement)
        if manager is not None:
            if quota is None:
                raise InvalidRequest("a remote engine under a manager needs a quota")
            from .granted import ManagedPool  # only planes that use a manager load it
            self._pool: Pool = ManagedPool(manager, quota=quota, **common,
                                           **dict(grant_options or {}))
            self.urls: list[str] = []
        else:
            if url is None:
                raise InvalidRequest("a remote engine needs a server URL or a manager")
            self.urls = [url] if isinstance(url, str) else list(url)
            self._pool = Pool(self.urls, **common)
        self._pool.on_state = self._on_state
        self._loop = _new_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name=f"cryptoplane-{name}")
        self._incoming: collections.deque[Job] = collections.deque()
        self._woken = False  # a _drain is scheduled on the loop
        self._inflight = 0  # accepted and not ended (queued here or on the wire)
        self._closed = False
        self._specs: dict[int, SessionSpec] = {}  # id(Key) -> its session spec
        self._dropped: collections.deque[SessionSpec] = collections.deque()
        self._cpu = 20e-6  # the loop's CPU seconds per job (moving average)
        self._healthy = Health.OK  # what it returns to when a server is back
        self.last_error: BaseException | None = None

    # -- lifetime ------------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if not self._thread.is_alive() and not self._closed:
            self._thread.start()  # the loop's thread starts with the engine, not before
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self, *, self_test: bool = True) -> None:
        """Connect (waiting up to ``connect_timeout`` for one server), then run the
        known answers through the servers. Unreachable servers leave the engine
        ``BROKEN`` and reconnecting; a refused token raises ``Unauthorized``."""
        try:
            self._run(self._pool.start(wait=True, keep_trying=True))
        except (Unauthorized, QuotaRefused):  # a refusal, not an outage: say so now
            self.close()
            raise
        except Exception as e:
            self.last_error = e
            self.health = Health.BROKEN
            super().start(self_test=False)
            self.health = Health.BROKEN
            return
        offered = self._pool.info.get("session_algorithms")
        if isinstance(offered, list):  # a server that lists what its sessions serve
            self._algorithms = [a for a in self._algorithms if a.name in offered]
        super().start(self_test=self_test)
        if self.health is Health.DEGRADED:  # some known answers failed: they stay out
            self._healthy = Health.DEGRADED

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                fut = asyncio.run_coroutine_threadsafe(self._close_all(), self._loop)
                fut.result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    async def _close_all(self) -> None:
        self._drain()  # jobs still queued end with ConnectionLost, like those in flight
        await self._pool.close()

    def _on_state(self, live: bool) -> None:
        if live:
            if self.health is Health.BROKEN:
                self.health = self._healthy
        else:
            self.health = Health.BROKEN

    # -- what it serves ------------------------------------------------------------------

    def ops_for(self, algorithm: Algorithm) -> frozenset[Op]:
        return algorithm.ops & _OPS_BY_KIND.get(algorithm.kind, frozenset())

    def can_serve(self, request: Work) -> bool:
        if not isinstance(request, _CARRIED) or self._closed:
            return False
        if isinstance(request, (rq.Encrypt, rq.Decrypt)) and request.padding:
            return False
        return super().can_serve(request)

    @property
    def inflight(self) -> int:
        return self._inflight

    # -- submit --------------------------------------------------------------------------

    def submit(self, jobs: Sequence[Job]) -> int:
        if self._closed:
            return 0
        with self._lock:
            self._incoming.extend(jobs)
            self._inflight += len(jobs)
            # enough on the wire: the next answer's _end schedules the drain (under
            # this lock, so either it sees these jobs or this sees the wire emptied)
            wake = not self._woken and self._inflight - len(self._incoming) < WAKE_BELOW
            self._woken = self._woken or wake
        if wake:
            self._loop.call_soon_threadsafe(self._drain)
        return len(jobs)

    def _drain(self) -> None:
        """On the loop: turn the queued jobs into calls and send them."""
        with self._lock:
            jobs = list(self._incoming)
            self._incoming.clear()
            self._woken = False
        while self._dropped:
            self._pool.drop_session(self._dropped.popleft())
        if not jobs:
            return
        t0 = time.thread_time()
        deadline = self._loop.time() + self.timeout
        for request, done in jobs:
            try:
                call = self._call(request, done, deadline)
            except Exception as e:  # cannot be encoded (a key with no export...)
                self._end(done, None, e)
                continue
            self._pool.submit(call)
        per_job = (time.thread_time() - t0) / len(jobs)
        self._cpu += 0.2 * (per_job + DECODE_SECONDS - self._cpu)

    def _spec(self, key: Key) -> SessionSpec:
        addr = id(key)
        spec = self._specs.get(addr)
        if spec is None:
            alg = key.algorithm
            material = key.export_raw() if alg.symmetric else key.export_der()
            cls = class_of_session(alg.name, key.size if alg.name.startswith("rsa-")
                                   else 0)
            spec = self._specs[addr] = SessionSpec(alg.name, material, cls)
            fin = weakref.finalize(key, _forget, self._specs, addr, self._dropped)
            fin.atexit = False
        return spec

    def _call(self, request: Work, done: Any, deadline: float) -> Call:
        assert isinstance(request, _CARRIED) and request.key is not None
        # the payload's fields packed straight from int tags (no dict, no IntEnum
        # lookups): this runs once per job on the loop, in the plane's process
        if isinstance(request, rq.Sign):
            op = _RAW_SIGN
            payload = _field(_DATA, bytes(request.data))
        elif isinstance(request, (rq.Encrypt, rq.Decrypt)):
            op = _RAW_ENCRYPT if isinstance(request, rq.Encrypt) else _RAW_DECRYPT
            payload = _field(_DATA, bytes(request.data))
            if request.nonce is not None:
                payload += _field(_NONCE, bytes(request.nonce))
            if request.aad is not None:
                payload += _field(_AAD, bytes(request.aad))
        elif isinstance(request, rq.Verify):
            op = _RAW_VERIFY
            payload = (_field(_DATA, bytes(request.data))
                       + _field(_SIGNATURE, bytes(request.signature)))
        elif isinstance(request, rq.Mac):
            op = _RAW_MAC
            payload = _field(_DATA, bytes(request.data))
            if request.tag_size:
                payload += _field(_TAG_SIZE, codec.u32(request.tag_size))
        else:
            op = _RAW_VERIFY_MAC
            payload = _field(_DATA, bytes(request.data)) + _field(_MAC, bytes(request.tag))
        spec = self._spec(request.key)
        sent = time.perf_counter()

        def finished(frame: Frame | None, error: BaseException | None) -> None:
            result: Any = None
            if error is None:
                assert frame is not None
                result, error = _outcome(op, frame)
                if error is None or isinstance(error, _CRYPTO_ANSWERS):
                    # it ran: a result or a crypto verdict teaches the meter its cost
                    self.meter.record(request.algorithm.name, request.op.value,
                                      request.nbytes, time.perf_counter() - sent, self._cpu)
            if isinstance(error, (QuotaExceeded, Busy, ShuttingDown)):
                # refused, not run (throttled, a session quota, draining): another
                # engine may take it at once
                error = EngineFailed(f"the fabric server refused it: {error}")
            self._end(done, result, error)

        call = Call(_REQUEST, op, b"", payload, request.retry_safe, finished, deadline, spec)
        call.cls = spec.cls
        call.nbytes = request.nbytes
        return call

    def _end(self, done: Any, result: Any, error: BaseException | None) -> None:
        with self._lock:
            self._inflight -= 1
            drain = bool(self._incoming) and not self._woken
            self._woken = self._woken or drain
        if drain:  # on the loop: after this receive's answers, one send for all
            self._loop.call_soon(self._drain)
        with contextlib.suppress(Exception):  # a caller's callback must not kill the loop
            done(result, error)

    # -- introspection -------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """The pool's: sent, retried, throttled, lost, timeouts, reconnects, goaways."""
        return dict(self._pool.counters)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(urls=[s.url for s in self._pool.servers],
                    server=self._pool.info.get("server"),
                    tenant=self._pool.info.get("tenant"), counters=self.counters(),
                    live_connections=sum(1 for c in self._pool.conns if c.usable),
                    pool=self._pool.describe())
        return info



def remote_engine(remote: str | Sequence[str],
                  quota: Mapping[str, Mapping[str, float]] | None = None,
                  token: str | None = None) -> Remote:
    """The engine ``cp.Plane(remote=..., quota=..., token=...)`` adds: fabric servers
    (``tcp://``, ``tls://``, ``unix://`` URLs) or ``manager://host:port`` with the
    ``quota`` to ask for; ``token`` defaults to the environment's ``CRYPTOPLANE_TOKEN``."""
    token = token if token is not None else os.environ.get("CRYPTOPLANE_TOKEN")
    urls = [remote] if isinstance(remote, str) else list(remote)
    if any(u.startswith("manager://") for u in urls):
        if quota is None:
            raise InvalidRequest("remote='manager://...' needs quota= (what to ask for)")
        return Remote(manager=urls, quota=quota, token=token)
    if quota is not None:
        raise InvalidRequest("quota= goes with remote='manager://...'")
    return Remote(urls, token=token)

def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed: the engine's loop runs in the plane's process, and every
    microsecond of its CPU per job is one the local engines lose (its loop and transports
    are C; measured a few µs less of the plane's CPU per remote RSA sign than asyncio's
    selector loop: benchmarks/README.md)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _outcome(op: int, frame: Frame) -> tuple[Any, BaseException | None]:
    if frame.status != Status.OK:
        return None, codec.error_from(frame.status, frame.payload)
    if op in (_RAW_VERIFY, _RAW_VERIFY_MAC):
        return None, None
    tag = _SIGNATURE if op == _RAW_SIGN else (_MAC if op == _RAW_MAC else _DATA)
    try:
        value = read_field(frame.payload, tag)
    except Exception as e:
        return None, e
    if not value and op != _RAW_DECRYPT and op != _RAW_ENCRYPT:
        return None, codec.error_for(Status.INTERNAL, "the server's answer had no result")
    return value, None


def _forget(specs: dict[int, SessionSpec], addr: int,
            dropped: collections.deque[SessionSpec]) -> None:
    """A Key died (weakref.finalize, any thread): only atomic container operations; the
    loop closes its sessions on its next turn."""
    spec = specs.pop(addr, None)
    if spec is not None:
        dropped.append(spec)


__all__ = ["SERVED", "Remote", "remote_engine"]
