"""The client's connections: a small pool over one or more servers, and what happens to a
request between being asked and being answered.

Runs entirely on one event loop (no locks): ``submit(call)`` sends a ``Call`` to the
server its placement mode chooses (``placement.py``: least-loaded by default,
round-robin, size-split, fail-over), on that server's connection with the fewest
requests in flight; calls that find no room (every connection at its server's
``max_in_flight``) or no connection wait in order. ``set_servers`` changes the servers
while calls flow (a removed server is retired as on GOAWAY); ``pacer`` (a granted pool's,
``granted.py``) may hold a call back before its first send.

What the pool does for each call, so that it ends exactly once (``Call.done``):
- THROTTLED, BUSY, SHUTTING_DOWN (the request did not run): sent again after the
  answer's RETRY_AFTER, on any connection, until its deadline; then the error is its end.
- its deadline passes: ``Timeout``; a late answer is dropped.
- its connection dies unanswered: sent again elsewhere if repeating it cannot change the
  outcome (``Call.safe``), else ``ConnectionLost``.
- GOAWAY: nothing new goes to that connection; a replacement is opened at once.

Each (server, slot) keeps one connection, reopened after a failure with exponential
backoff and jitter. ``fail_fast`` (the remote engine): a call that finds no live
connection ends at once with ``ConnectionLost`` instead of waiting, so the plane's
scheduler can give it to another engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import ssl as ssl_module
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

from ..exceptions import Timeout
from . import codec
from .codec import Frame, FrameType, Status
from .connection_client import (
    INTERNAL,
    Call,
    ClientConnection,
    Endpoint,
    SessionSpec,
    connect,
)
from .errors import ConnectionLost, ProtocolError, ShuttingDown, Unauthorized
from .placement import DEFAULT_THRESHOLD, Placement, ServerState, make_placement

BACKOFF_FIRST: Final = 0.05  # seconds before the first reconnect
BACKOFF_MAX: Final = 2.0
MAX_ATTEMPTS: Final = 4  # sends of one safe call across connection deaths
TICK: Final = 0.02  # deadline resolution, seconds
SILENCE: Final = 5.0  # seconds a server may say nothing while owing answers, then PING
RETRY_FLOOR: Final = 0.001  # a RETRY_AFTER of 0 still yields the loop once
_RETRYABLE: Final = frozenset(int(s) for s in codec.RETRYABLE)


def backoff(failures: int) -> float:
    """Exponential, capped, with full jitter in [0.5, 1.5) of the step."""
    step = min(BACKOFF_MAX, BACKOFF_FIRST * (2 ** max(0, failures - 1)))
    return float(step * (0.5 + random.random()))


class Pacer(Protocol):
    """Holds calls back to a rate (``granted.py``)."""

    def admit(self, call: Call) -> bool:
        """True: send it now; False: the pacer sends it (``Pool.dispatch``) later."""

    def throttled(self, call: Call, delay: float, now: float) -> None:
        """A server answered THROTTLED: ``call`` was early by ``delay`` seconds."""


class Pool:
    """``placement``: a mode's name or a ``Placement``; ``threshold`` and ``big`` (URLs
    of the big servers, default the first) are size-split's."""

    needs_urls = True  # a granted pool learns its servers from its grant

    def __init__(self, urls: Sequence[str], *, token: str | None = None,
                 ssl: ssl_module.SSLContext | None = None, connections: int = 2,
                 timeout: float = 30.0, name: str = "", fail_fast: bool = False,
                 max_retry_wait: float = math.inf, silence: float = SILENCE,
                 on_event: Callable[[dict[str, Any]], None] | None = None,
                 placement: str | Placement = "least-loaded",
                 threshold: int = DEFAULT_THRESHOLD,
                 big: Sequence[str] | None = None) -> None:
        if not urls and self.needs_urls:
            raise ValueError("at least one server URL is needed")
        self.servers: list[ServerState] = [ServerState(u)
                                           for u in dict.fromkeys(urls)]
        self.placement = make_placement(placement, threshold=threshold, big=big)
        self._measure = False  # time answers (least-loaded over several servers)
        self._measuring()
        self.pacer: Pacer | None = None
        self.token = token
        self.ssl = ssl
        self.per_server = max(1, connections)
        self.timeout = timeout
        self.name = name
        self.fail_fast = fail_fast
        # a RETRY_AFTER longer than this ends the call with its error at once (the
        # engine: local engines can take the work rather than wait)
        self.max_retry_wait = max_retry_wait
        self.silence = silence
        # EVENT frames (a manager's pushes), as their JSON; ignored when None
        self.on_event = on_event
        # more HELLO fields for connections opened from now on (``grant``)
        self.hello_extra: dict[str, Any] = {}
        self.conns: list[ClientConnection] = []
        self.info: dict[str, Any] = {}  # the last WELCOME
        self.waiting: deque[Call] = deque()
        self.on_state: Callable[[bool], None] | None = None  # live or not (the engine)
        self.last_error: BaseException | None = None
        self.counters = dict.fromkeys(("sent", "retried", "throttled", "busy", "lost",
                                       "timeouts", "reconnects", "goaways",
                                       "grant_refused"), 0)
        self._tasks: list[asyncio.Task[None]] = []
        self._buckets: dict[int, set[Call]] = {}  # deadline tick -> calls due then
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # service times are timed on the monotonic clock, not the loop's: uvloop's
        # (the remote engine's) moves in milliseconds, once per loop turn
        self._time: Callable[[], float] = time.monotonic
        self._changed: asyncio.Event | None = None
        self._attempted: set[tuple[str, int]] = set()  # (url, slot) tried once (start)

    @property
    def endpoints(self) -> list[Endpoint]:
        return [s.endpoint for s in self.servers]

    def _all_failed(self) -> bool:
        return self.last_error is not None and all(
            (s.url, i) in self._attempted for s in self.servers
            for i in range(self.per_server))

    # -- lifetime ------------------------------------------------------------------------

    async def start(self, wait: bool = True, keep_trying: bool = False) -> None:
        """Open every slot's connection; with ``wait``, return once one is live, or raise
        the failure (Unauthorized at once; others once every slot has failed). With
        ``keep_trying`` a failure other than Unauthorized leaves the pool reconnecting
        in the background (the engine starts ``BROKEN`` and heals)."""
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        for s in self.servers:
            self._spawn(s)
        self._tasks.append(self._loop.create_task(self._watch()))
        if not wait:
            return
        deadline = self._loop.time() + self.timeout
        while not self.conns:
            if isinstance(self.last_error, Unauthorized) or self._all_failed():
                err = self.last_error
                assert err is not None
                if not keep_trying or isinstance(err, Unauthorized):
                    await self.close()
                raise err
            left = deadline - self._loop.time()
            if left <= 0:
                if not keep_trying:
                    await self.close()
                raise ConnectionLost(f"no server answered within {self.timeout:g} s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    def _spawn(self, server: ServerState) -> None:
        assert self._loop is not None
        self._tasks = [t for t in self._tasks if not t.done()]
        for i in range(self.per_server):
            self._tasks.append(self._loop.create_task(self._keep(i, server)))

    async def _keep(self, slot: int, server: ServerState) -> None:
        failures = 0
        endpoint = server.endpoint
        while not self._closing and not server.retired:
            try:
                conn, info = await connect(self, endpoint, token=self.token,
                                           name=self.name, ssl=self.ssl,
                                           timeout=min(self.timeout, 10.0),
                                           extra=self.hello_extra)
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # refused, reset, TLS, Unauthorized...
                self.last_error = e if isinstance(e, Exception) else ConnectionLost(str(e))
                if not isinstance(e, (Unauthorized, ConnectionLost)) and not isinstance(
                        e, ProtocolError):
                    self.last_error = ConnectionLost(f"{endpoint}: {e}")
                self._attempted.add((server.url, slot))
                server.failures += 1
                self._notify()
                if isinstance(e, Unauthorized) and not self.live:
                    # the token was revoked or expired: what waits would only time out
                    waiting, self.waiting = list(self.waiting), deque()
                    for call in waiting:
                        self.finish(call, None, e)
                failures += 1
                await asyncio.sleep(backoff(failures))
                continue
            if self._closing or server.retired:
                conn.close()
                return
            if failures or (server.url, slot) in self._attempted:
                self.counters["reconnects"] += 1
            failures = 0
            server.failures = 0
            self._attempted.add((server.url, slot))
            self.info = info
            was_live = self.live  # a draining connection still listed is not live
            conn.server = server
            server.conns.append(conn)
            self.conns.append(conn)
            self._notify()
            if not was_live and self.on_state is not None:
                self.on_state(True)
            self._drain()
            # a GOAWAY or the connection's end: this slot opens another
            await asyncio.shield(conn.retired)
            if conn.closed and not conn.goaway:
                failures = 1
                await asyncio.sleep(backoff(failures))

    async def _watch(self) -> None:
        """Probe connections whose server has gone silent while it owes answers."""
        loop = asyncio.get_running_loop()
        while not self._closing:
            await asyncio.sleep(min(1.0, self.silence / 4))
            now = loop.time()
            for c in list(self.conns):
                if not c.closed:
                    c.probe(now, self.silence)

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def close(self) -> None:
        """Close every connection; what is still waiting or in flight ends with
        ``ConnectionLost``."""
        self._closing = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        self._tasks.clear()
        conns, self.conns = list(self.conns), []
        for c in conns:
            c.close()
        waiting, self.waiting = list(self.waiting), deque()
        for call in waiting:
            self.finish(call, None, ConnectionLost("the client was closed"))
        for c in conns:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(c.closed_future), 1.0)

    @property
    def live(self) -> bool:
        return any(c.usable for c in self.conns)

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the pool runs on (None until ``start``)."""
        return self._loop

    # -- the servers -----------------------------------------------------------------------

    def set_servers(self, urls: Sequence[str]) -> None:
        """Use these servers from now on, in this order (placement's order): new ones
        are connected, removed ones retired (nothing new goes to them; what they hold
        is answered there, or moves or fails as on a GOAWAY)."""
        want = list(dict.fromkeys(urls))
        if not want:
            raise ValueError("at least one server URL is needed")
        old = {s.url: s for s in self.servers}
        servers = [old.pop(u) if u in old else ServerState(u) for u in want]
        added = [s for s in servers if s.url not in {o.url for o in self.servers}]
        self.servers = servers
        self._measuring()
        for s in old.values():
            s.retired = True
            for c in list(s.conns):
                if not c.goaway and not c.closed:
                    c.retire()
        if self._loop is not None and not self._closing:
            for s in added:
                self._spawn(s)
        self._notify()
        if self.waiting:
            self._drain()
        if not self.live and self.on_state is not None:
            self.on_state(False)

    def _measuring(self) -> None:
        self._measure = self.placement.measures and len(self.servers) > 1

    def present_grant(self, token: str) -> int:
        """Show a (renewed) grant token to every live connection (GRANT_PRESENT), and
        in the HELLO of connections opened from now on. The number of connections it
        went to; a refusal leaves the connection on its earlier grant."""
        self.hello_extra["grant"] = token
        payload = codec.json_field({"grant": token})
        sent = 0
        for c in self.conns:
            if c.usable:
                call = Call(FrameType.REQUEST, codec.Op.GRANT_PRESENT, b"", payload, True,
                            _ignore, math.inf)
                call.kind = INTERNAL
                call.on_frame = self._presented
                c.send(call)
                sent += 1
        return sent

    def _presented(self, frame: Frame) -> None:
        if frame.status != Status.OK:
            self.counters["grant_refused"] += 1

    def per_server_counts(self) -> dict[str, dict[str, Any]]:
        """Per server URL: calls sent there (resends included), answered, in flight,
        the measured service time (ms per call), live, retired."""
        return {s.url: {"sent": s.sent, "answered": s.answered, "inflight": s.inflight,
                        "service_ms": None if s.ewma is None else round(s.ewma * 1e3, 4),
                        "live": s.live}
                for s in self.servers}

    def describe(self) -> dict[str, Any]:
        return {"placement": self.placement.describe(), "servers": self.per_server_counts()}

    # -- sending -------------------------------------------------------------------------

    def submit(self, call: Call) -> None:
        """Send ``call`` (on the loop's thread). Its deadline is armed here: calls are
        kept in buckets of ``TICK`` seconds, one loop timer per bucket (a timer per call
        costs a heap push of Python comparisons and halved throughput at 1,024 in
        flight), so a deadline fires up to ``TICK`` late."""
        loop = self._loop
        assert loop is not None
        b = math.ceil(call.deadline / TICK)
        bucket = self._buckets.get(b)
        if bucket is None:
            bucket = self._buckets[b] = set()
            loop.call_at(b * TICK, self._sweep, b)
        bucket.add(call)
        call.bucket = bucket
        if self.pacer is not None and not self.pacer.admit(call):
            return
        self.dispatch(call)

    def _sweep(self, b: int) -> None:
        for call in list(self._buckets.pop(b, ())):
            self._expire(call)

    def pick(self, call: Call | None = None) -> ClientConnection | None:
        servers = self.servers
        if len(servers) == 1:  # the common case, without the placement's call
            return servers[0].conn()
        if call is not None and call.pin:
            for s in servers:  # a few servers: a scan costs less than a dict kept
                if s.url == call.pin:
                    if s.live:
                        return s.conn()  # None when full: it waits for that server
                    break
        return self.placement.choose(servers, call)

    def _send(self, conn: ClientConnection, call: Call) -> None:
        self.counters["sent"] += 1
        server = conn.server
        if server is not None:
            call.server = server
            server.sent += 1
            if self._measure:
                call.inflight_at_send = server.inflight
                call.sent_at = self._time()
            server.inflight += 1
        conn.send(call)

    def _settle(self, call: Call, frame: Frame | None) -> None:
        """``call`` is off the wire; an answer teaches its server's service time."""
        server = call.server
        if server is None:
            return
        call.server = None
        server.inflight -= 1
        if frame is not None:
            server.answered += 1
            if call.sent_at and frame.status not in _RETRYABLE:
                server.learn(self._time() - call.sent_at, call.inflight_at_send)
                call.sent_at = 0.0

    def dispatch(self, call: Call) -> None:
        """Send ``call`` now, or queue it until a connection has room (a pacer calls this
        when a call's turn comes)."""
        if call.finished:
            return
        conn = self.pick(call)
        if conn is None:
            if self.fail_fast and not self.live:
                self.finish(call, None, ConnectionLost(
                    "no fabric server is reachable" + (f" ({self.last_error})"
                                                      if self.last_error else "")))
                return
            if self._closing:
                self.finish(call, None, ConnectionLost("the client was closed"))
                return
            call.conn = None
            self.waiting.append(call)
            return
        # _send, inlined: this runs once per request
        self.counters["sent"] += 1
        server = conn.server
        if server is not None:
            call.server = server
            server.sent += 1
            if self._measure:
                call.inflight_at_send = server.inflight
                call.sent_at = self._time()
            server.inflight += 1
        conn.send(call)

    def _drain(self) -> None:
        while self.waiting:
            conn = self.pick(self.waiting[0])
            if conn is None:
                return
            call = self.waiting.popleft()
            if not call.finished:
                self._send(conn, call)

    def _expire(self, call: Call) -> None:
        if call.finished:
            return
        if call.conn is not None:
            call.conn.forget(call)
            self._settle(call, None)
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(call)
        self.counters["timeouts"] += 1
        self.finish(call, None, Timeout("the request did not complete within its "
                                        "deadline"))

    def finish(self, call: Call, frame: Frame | None, error: BaseException | None) -> None:
        if call.finished:
            return
        call.finished = True
        if call.bucket is not None:
            call.bucket.discard(call)
            call.bucket = None
        call.done(frame, error)

    # -- what connections report ---------------------------------------------------------

    def answered(self, conn: ClientConnection, call: Call, frame: Frame | None,
                 error: BaseException | None = None) -> None:
        server = call.server
        if server is not None:  # _settle, inlined: once per answer
            call.server = None
            server.inflight -= 1
            if frame is not None:
                server.answered += 1
                if call.sent_at and frame.status not in _RETRYABLE:
                    server.learn(self._time() - call.sent_at, call.inflight_at_send)
                    call.sent_at = 0.0
        if frame is not None and frame.status in _RETRYABLE and not call.finished:
            err = codec.error_from(frame.status, frame.payload)
            delay = max(RETRY_FLOOR, float(getattr(err, "retry_after", 0.0)))
            loop = self._loop
            assert loop is not None
            if frame.status == Status.THROTTLED:
                self.counters["throttled"] += 1
                if self.pacer is not None:
                    self.pacer.throttled(call, delay, loop.time())
            elif frame.status == Status.BUSY:
                self.counters["busy"] += 1
            if isinstance(err, ShuttingDown) and not conn.goaway:
                conn.retire()
                self.goaway(conn)
            if loop.time() + delay < call.deadline and delay <= self.max_retry_wait:
                call.conn = None
                self.waiting_retry(call, delay)
                self._drain()
                return
            self.finish(call, None, err)
        else:
            self.finish(call, frame, error)
        if conn.goaway and not conn.pending:
            conn.close()
        if self.waiting:
            self._drain()

    def waiting_retry(self, call: Call, delay: float) -> None:
        loop = self._loop
        assert loop is not None
        self.counters["retried"] += 1
        loop.call_later(delay, self.dispatch, call)

    def lost(self, conn: ClientConnection, calls: list[Call], streams: list[Call],
             exc: BaseException | None) -> None:
        with contextlib.suppress(ValueError):
            self.conns.remove(conn)
        if conn.server is not None:
            with contextlib.suppress(ValueError):
                conn.server.conns.remove(conn)
        self._notify()
        why = f"the connection to {conn.endpoint} was lost" + (f" ({exc})" if exc else "")
        for call in streams:
            if call.on_frame is not None and not call.finished:
                call.on_frame(Frame(0, 0, call.id, call.op, Status.CONNECTION_LOST, b"",
                                    codec.error_fields(why)))
        for call in sorted(calls, key=lambda c: c.id):
            if call.finished:
                continue
            call.conn = None
            self._settle(call, None)
            if call.safe and call.attempts < MAX_ATTEMPTS:
                call.attempts += 1
                self.counters["retried"] += 1
                self.dispatch(call)
            else:
                self.counters["lost"] += 1
                self.finish(call, None, ConnectionLost(why))
        if not self.live and self.on_state is not None:
            self.on_state(False)
        if self.fail_fast and not self.live:
            waiting, self.waiting = list(self.waiting), deque()
            for call in waiting:
                self.dispatch(call)
        elif self.waiting:
            self._drain()  # fail-over: what waited for this server may go to the next

    def event(self, conn: ClientConnection, frame: Frame) -> None:
        """An EVENT frame: a manager telling this client that its grants changed."""
        if self.on_event is None:
            return
        try:
            obj = codec.decode_json_payload(frame.payload)
        except ProtocolError:
            return  # a malformed push is not worth the connection; renewal re-syncs
        self.on_event(obj)

    def goaway(self, conn: ClientConnection) -> None:
        self.counters["goaways"] += 1
        self._notify()
        if not self.live and self.on_state is not None:
            self.on_state(False)
        if self.waiting:
            self._drain()

    # -- sessions ------------------------------------------------------------------------

    def drop_session(self, spec: SessionSpec) -> None:
        """A key died: close its session on every connection that holds one."""
        for c in self.conns:
            if c.usable:
                c.close_session(spec)


def _ignore(frame: Frame | None, error: BaseException | None) -> None:
    pass
