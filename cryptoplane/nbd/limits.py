"""What one NBD server lets its clients make it hold, all connections together.

A server on the internet answers strangers: a 28-byte WRITE header announcing 32 MiB, a
READ whose reply is never read, a thousand connections that never finish the handshake.
``Limits`` are the knobs (``cryptoplane serve`` shows each in ``--help``); ``Budget``
counts the bytes of request payloads and reply buffers that every connection holds, and
makes a connection wait (stop reading from its socket) when more would go over it.

Memory is charged when it is taken and given back when it is freed, whoever frees it:
the buffers are ``PayloadBuffer`` (an anonymous private mapping, so that a page costs
nothing until data is written to it, and goes back to the system when the buffer goes)
and ``ReplyBuffer`` (a bytearray), whose finalizers credit the budget. Nothing can be
charged and forgotten on an error path, or credited twice.

``Watchdog`` keeps the timeouts with one timer per server (not one per connection: a
thousand connections must not mean a thousand timers re-armed on every request), which
looks at every connection a few times per shortest timeout. A connection still
negotiating after ``handshake_timeout`` is closed (a client that says STARTTLS and then
nothing, or nothing at all). A negotiated one is "quiet" while nothing it does changes:
no bytes arrive, its queued replies do not shrink, no request of its completes; work in
the device or a wait for the memory budget is not its fault and does not count. Quiet
with something pending (part of a request, replies it does not read) for
``stall_timeout``: closed, and what it held is given back. Quiet with nothing pending
for ``idle_timeout`` (when set): closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import mmap
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Final, Protocol

from cryptoplane.exceptions import InvalidRequest

log = logging.getLogger("cryptoplane.nbd")

MIB: Final = 1024 * 1024
# the smallest budget: two of the biggest requests (32 MiB) and their headers
MIN_BUDGET: Final = 64 * MIB + 64 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds for one server; the defaults are safe for a server anyone can reach.

    ``memory_budget``: bytes of request payloads and reply buffers held at once, all
    connections together (past it, connections wait). ``max_connections``: more are
    closed as soon as they are accepted. ``handshake_timeout``: seconds from accept to
    the end of negotiation (TLS included). ``idle_timeout``: seconds a negotiated
    connection may send nothing while nothing of its is pending (0: forever, the
    default, as a quiet disk is no fault). ``stall_timeout``: seconds a connection may
    make no progress (send nothing, read nothing) while something of its is pending — a
    half-sent WRITE, replies it does not read — holding memory that others wait for.
    ``max_options``: options per connection (nbdkit allows 32).
    """

    memory_budget: int = 256 * MIB
    max_connections: int = 128
    handshake_timeout: float = 10.0
    idle_timeout: float = 0.0
    stall_timeout: float = 60.0
    max_options: int = 32

    def __post_init__(self) -> None:
        if self.memory_budget < MIN_BUDGET:
            raise InvalidRequest(f"the memory budget must be at least {MIN_BUDGET} bytes "
                                 "(two 32 MiB requests)")
        if self.max_connections < 1:
            raise InvalidRequest("max_connections must be at least 1")
        if self.max_options < 1:
            raise InvalidRequest("max_options must be at least 1")
        for name in ("handshake_timeout", "idle_timeout", "stall_timeout"):
            value = getattr(self, name)
            if not value >= 0:  # NaN too
                raise InvalidRequest(f"{name} must be 0 (never) or a positive number")
        if self.handshake_timeout == 0 or self.stall_timeout == 0:
            # 0 would mean an unbounded hold on a slot or on memory: not a safe setting
            raise InvalidRequest("the handshake and stall timeouts cannot be turned off")

    @property
    def timeouts(self) -> tuple[float, ...]:
        return tuple(t for t in (self.handshake_timeout, self.idle_timeout,
                                 self.stall_timeout) if t > 0)


class Budget:
    """Bytes held for payloads and replies, against ``limit``.

    A request bigger than a sixteenth of the limit may only take the first three
    quarters: the last quarter stays for smaller requests, so that clients which hold
    big buffers and never let go (unread 32 MiB replies) cannot starve the rest until
    the stall timeout closes them. A request is always granted when nothing is held, so
    one bigger than the limit still runs, alone.

    ``take`` is called on the event loop's thread; ``give_back`` (from the buffers'
    finalizers) from any thread. Waiters are called back on the loop, in order.
    """

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._big = limit // 16
        self._big_cap = limit * 3 // 4
        self._lock = threading.Lock()
        self._loop = loop
        self._waiters: dict[Callable[[], None], None] = {}  # ordered, no duplicates
        self._wake_pending = False
        self.on_pressure: Callable[[], None] | None = None  # drops cached buffers

    def _fits(self, n: int) -> bool:
        cap = self.limit if n <= self._big else self._big_cap
        return self.used == 0 or self.used + n <= cap

    def take(self, n: int) -> bool:
        """Charge ``n`` bytes if they fit; if not, first drop what caches hold."""
        for attempt in (0, 1):
            with self._lock:
                if self._fits(n):
                    self.used += n
                    self.peak = max(self.peak, self.used)
                    return True
            if attempt == 0 and self.on_pressure is not None:
                self.on_pressure()  # buffers freed in there are credited at once
        return False

    def give_back(self, n: int) -> None:
        with self._lock:
            self.used -= n
            wake = bool(self._waiters) and not self._wake_pending
            if wake:
                self._wake_pending = True
        if wake and self._loop is not None:
            # never call a waiter from here: a finalizer runs wherever the last
            # reference went, in the middle of anything
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits
                self._loop.call_soon_threadsafe(self._wake)

    def wait(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (once) when memory is given back."""
        self._waiters[callback] = None

    def cancel(self, callback: Callable[[], None]) -> None:
        self._waiters.pop(callback, None)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _wake(self) -> None:
        with self._lock:
            self._wake_pending = False
        waiters = list(self._waiters)
        self._waiters.clear()
        for callback in waiters:
            callback()  # one that still finds no room waits again

    # ---- charged buffers --------------------------------------------------------------

    def payload(self, n: int) -> PayloadBuffer | None:
        """A buffer for a request's payload, or None when ``n`` bytes do not fit now."""
        if not self.take(n):
            return None
        try:
            buf = PayloadBuffer(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except BaseException:
            self.give_back(n)
            raise
        buf.budget = self
        return buf

    def reply(self, n: int) -> ReplyBuffer | None:
        """A buffer for a reply, or None when ``n`` bytes do not fit now."""
        if not self.take(n):
            return None
        try:
            buf = ReplyBuffer(n)
        except BaseException:
            self.give_back(n)
            raise
        buf.budget = self
        return buf


class PayloadBuffer(mmap.mmap):
    """Anonymous memory charged to a ``Budget`` until it is freed; its pages cost
    nothing until written, so a client that announces 32 MiB and sends nothing holds
    nothing but a reservation."""

    __slots__ = ("budget",)
    budget: Budget | None

    def __del__(self) -> None:
        budget = getattr(self, "budget", None)
        if budget is not None:
            self.budget = None
            budget.give_back(len(self))


class ReplyBuffer(bytearray):
    """A reply buffer charged to a ``Budget`` until it is freed."""

    __slots__ = ("budget",)
    budget: Budget | None

    def __del__(self) -> None:
        budget = getattr(self, "budget", None)
        if budget is not None:
            self.budget = None
            budget.give_back(len(self))


_libc: ctypes.CDLL | bool | None = None


def release_free_memory() -> None:
    """Ask glibc to give freed heap memory back to the system. Why: its mmap threshold
    grows with the biggest buffer freed (up to 32 MiB), so after a burst of big replies
    their successors come from the heap, and pages freed in the middle of the heap stay
    in the process until ``malloc_trim`` returns them."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name) if name else None
            _libc = lib if lib is not None and hasattr(lib, "malloc_trim") else False
        except OSError:
            _libc = False
    if _libc:
        assert isinstance(_libc, ctypes.CDLL)
        _libc.malloc_trim(0)


REFUSAL_LOG_EVERY = 10.0  # seconds between warnings about refused connections
TRIM_DELAY = 0.5  # seconds after a connection closes before freed memory is returned


class Receiver(Protocol):
    @property
    def receiving(self) -> bool:
        """Part of a request has arrived, not all of it."""
        ...


class Watched(Protocol):
    """What the watchdog reads of a connection (``server.Connection``), and the two
    marks it keeps there: kept here as an interface so that the limits need not know the
    server that applies them."""

    mark: tuple[int, int]  # (activity, bytes queued) when the watchdog last looked
    quiet_since: float  # since when the mark has not changed
    closing: bool

    @property
    def transport(self) -> asyncio.Transport | None: ...

    @property
    def codec(self) -> Receiver: ...

    @property
    def device(self) -> object:
        """None while the connection is negotiating."""
        ...

    @property
    def born(self) -> float: ...

    @property
    def activity(self) -> int:
        """Bumped by every receive and completion."""
        ...

    @property
    def inflight(self) -> int: ...

    @property
    def starved(self) -> bool:
        """Waiting for the memory budget (not its fault)."""
        ...

    @property
    def held(self) -> object:
        """A request waiting for memory for its reply, or None."""
        ...


class Watchdog:
    """The timeouts of ``limits`` over ``connections`` (the server's live set), and
    the refusals past ``limits.max_connections``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: Limits,
                 connections: Collection[Watched]) -> None:
        self.loop = loop
        self.limits = limits
        self.connections = connections
        self.refused = 0
        self.expired = {"handshake": 0, "idle": 0, "stall": 0}
        self._refused_logged = 0
        self._last_refusal_log = -REFUSAL_LOG_EVERY
        self.period = min(max(min(limits.timeouts) / 4, 0.05), 1.0)
        self._timer: asyncio.TimerHandle | None = self.loop.call_later(self.period,
                                                                      self._sweep)
        self._trim: asyncio.TimerHandle | None = None

    def refuse(self) -> None:
        self.refused += 1
        now = self.loop.time()
        if now - self._last_refusal_log >= REFUSAL_LOG_EVERY:
            log.warning("refused %d NBD connection(s): %d open is the limit "
                        "(--max-connections)", self.refused - self._refused_logged,
                        self.limits.max_connections)
            self._last_refusal_log, self._refused_logged = now, self.refused

    def trim_soon(self) -> None:
        if self._trim is None:
            self._trim = self.loop.call_later(TRIM_DELAY, self._release)

    def _release(self) -> None:
        self._trim = None
        release_free_memory()

    def stop(self) -> None:
        for handle in (self._timer, self._trim):
            if handle is not None:
                handle.cancel()
        self._timer = self._trim = None

    def _sweep(self) -> None:
        now = self.loop.time()
        for conn in list(self.connections):
            self._check(conn, now)
        self._timer = self.loop.call_later(self.period, self._sweep)

    def _check(self, conn: Watched, now: float) -> None:
        t = conn.transport
        if t is None or t.is_closing():
            return
        limits = self.limits
        codec = conn.codec
        if conn.device is None:  # still negotiating
            if now - conn.born > limits.handshake_timeout:
                self._expire(conn, "handshake")
            return
        queued = t.get_write_buffer_size()
        mark = (conn.activity, queued)
        if mark != conn.mark or conn.inflight or conn.starved:
            conn.mark, conn.quiet_since = mark, now
            return
        quiet = now - conn.quiet_since
        if queued or codec.receiving or conn.held is not None:
            if quiet > limits.stall_timeout:
                self._expire(conn, "stall")
        elif limits.idle_timeout and quiet > limits.idle_timeout:
            self._expire(conn, "idle")

    def _expire(self, conn: Watched, why: str) -> None:
        self.expired[why] += 1
        log.info("closing an NBD connection: %s timeout", why)
        conn.closing = True
        assert conn.transport is not None
        conn.transport.abort()  # what it queued is dropped: its client is not reading


__all__ = [
    "MIB",
    "MIN_BUDGET",
    "Budget",
    "Limits",
    "PayloadBuffer",
    "Receiver",
    "ReplyBuffer",
    "Watchdog",
    "Watched",
    "release_free_memory",
]
