"""Sessions: a key bound to a plane, prepared once, with the fast path's counters.

A session owns the key's kernel (the key schedule done once) and the callables the
plane's fast path invokes. It holds its key only weakly, so a session lives exactly as
long as its key; when the key goes, its counts are folded into the plane's counters.
``Sessions`` is a plane's bookkeeping of them, handed to whoever needs to find a
request's session (the batch planner, the router), so nobody reaches into the plane.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Callable, Container
from typing import Any

from . import _native
from ._native import TALLY_OPS
from .exceptions import CryptoplaneError, InvalidRequest, NotSupported
from .kernels import Buffer, Kernel
from .keys import Key
from .requests import Request
from .stats import Histogram, OpStats, Registry

# (engine, algorithm, op, client), requests, bytes, errors by type, latency (queued work)
StatRow = tuple[tuple[str, str, str, str], int, int, dict[str, int], Histogram | None]

PRIORITIES = ("high", "normal", "bulk")

# The fast path's ops and their indexes in a session's Tally (``s.tally.add(OP_SIGN,
# len(data))``). Counting costs the fast path one call and no allocation in C: with the
# native module the Tally is uint64 fields that the C encrypt/decrypt add to in place
# (a Python int per call was a third of the fast path's cost); without it, a pure-Python Tally with
# the same interface and numbers (see cryptoplane._native).
FAST_OPS = TALLY_OPS
(OP_ENCRYPT, OP_DECRYPT, OP_SIGN, OP_VERIFY, OP_MAC, OP_ENCRYPT_SECTORS,
 OP_DECRYPT_SECTORS, OP_SEAL_CHUNKS, OP_OPEN_CHUNKS) = range(len(FAST_OPS))
OP_INDEX = {op: i for i, op in enumerate(FAST_OPS)}
assert FAST_OPS[OP_ENCRYPT] == "encrypt" and FAST_OPS[OP_DECRYPT_SECTORS] == "decrypt_sectors"


class Session:
    """A key bound to a plane (and optionally to one engine, with a priority).

    Made implicitly by the plane's synchronous calls, or explicitly with
    ``plane.session(key, engine=..., priority=...)``.
    """

    __slots__ = ("__weakref__", "_key", "algorithm", "client", "dec", "enc", "engine",
                 "fast_plane", "kernel", "plane", "priority", "tally")

    def __init__(self, plane: object, key: Key, engine: str | None, priority: str,
                 fast: bool, client: str = "-") -> None:
        if priority not in PRIORITIES:
            raise InvalidRequest(f"priority must be one of {PRIORITIES}, got {priority!r}")
        self.plane = plane
        self._key = weakref.ref(key)
        self.algorithm = key.algorithm.name
        self.engine = engine
        self.priority = priority
        self.client = client
        self.kernel: Kernel = key.kernel()
        # the plane itself when its fast path may serve this session (``fast``, decided
        # by ``Sessions.admit``), else None: the fast path's whole admission test is
        # ``key.session_hint.fast_plane is self``
        self.fast_plane: object | None = plane if fast else None
        # (nonce, data, aad) callables: AEAD calls are the cheapest requests there are
        # (well under a microsecond on small messages), so for them the fast path calls
        # the library's bound methods directly
        kernel = self.kernel
        raw = getattr(kernel, "raw", None)
        self.enc: Any
        self.dec: Any
        if raw is not None:
            self.enc, self.dec = raw
        else:
            self.enc = lambda nonce, data, aad: kernel.encrypt(data, nonce, aad, False)
            self.dec = lambda nonce, data, aad: kernel.decrypt(data, nonce, aad, False)
        # the fast path's counts (the C encrypt/decrypt find it by this slot's name)
        self.tally: Any = _native.Tally()

    @property
    def key(self) -> Key | None:
        return self._key()

    def counts(self) -> list[tuple[str, int, int]]:
        """(op, requests, bytes) for every fast-path op used."""
        return self.tally.snapshot()  # type: ignore[no-any-return]

    @property
    def limit_name(self) -> str:
        """The name its QoS limit is kept under (``plane.limit(session=...)``)."""
        return f"session#{id(self):x}"

    def __repr__(self) -> str:
        return (f"<Session {self.algorithm} engine={self.engine or 'auto'} "
                f"priority={self.priority} client={self.client}>")


def check_engine(plane_engines: dict[str, Any], engine: str | None) -> None:
    if engine is not None and engine not in plane_engines:
        raise NotSupported(f"no engine named {engine!r} in this plane "
                           f"(have {', '.join(plane_engines)})")


class Sessions:
    """A plane's sessions: one per key (held weakly), whether its fast path may serve
    each, and the fast-path counts of those still alive.

    ``owner`` is the plane: the identity a session's ``fast_plane`` carries. ``registry``
    holds the plane's counters, where a session's counts go when its key dies.
    ``inline``: the inline engine's name (where the fast path's work is counted, and the
    one binding a session may name and keep the fast path) and the algorithms it serves;
    None: the plane has no inline engine. ``limited(name)``: whether a QoS limit applies
    under that client or session name.
    """

    def __init__(self, owner: object, registry: Registry,
                 inline: tuple[str, Container[str]] | None,
                 limited: Callable[[str], bool]) -> None:
        self.owner = owner
        self.registry = registry
        self.inline_name: str | None = inline[0] if inline is not None else None
        self._inline: Container[str] | None = inline[1] if inline is not None else None
        self._limited = limited
        self._by_key: weakref.WeakKeyDictionary[Key, Session] = weakref.WeakKeyDictionary()
        self._live: set[Session] = set()  # sessions whose fast-path counts are not folded
        # guards _live together with the folding of a session's counts into the registry,
        # so a reader never sees a session's counts in neither place (nor in both)
        self._lock = threading.Lock()
        # sessions whose key died: a key's finalizer appends here (deque.append takes no
        # lock and runs no Python, so it is safe inside garbage collection); folded later
        self._dead: deque[Session] = deque()

    def bind(self, key: Key, engine: str | None, priority: str, client: str) -> Session:
        """A new session for ``key`` (replacing the one it had here)."""
        self.reap()
        s = Session(self.owner, key, engine, priority, False, client)
        self.admit(s)
        old = self._by_key.get(key)
        with self._lock:
            self._live.add(s)
        if old is not None:
            self._fold(old)
        # when the key dies, its session's counts move into the plane's counters
        weakref.finalize(key, self._dead.append, s)
        self._by_key[key] = s
        key.session_hint = s
        return s

    def admit(self, s: Session) -> None:
        """Decide whether the fast path may serve ``s``: not when it is bound to another
        engine or a QoS limit applies to it (the fast path neither waits nor queues)."""
        limited = self._limited(s.client) or self._limited(s.limit_name)
        inline_ok = self._inline is not None and s.algorithm in self._inline
        fast = s.engine in (None, self.inline_name) and inline_ok and not limited
        s.fast_plane = self.owner if fast else None

    def readmit(self, name: str) -> None:
        """A limit changed under ``name``: decide again for the sessions it covers."""
        with self._lock:
            live = list(self._live)
        for s in live:
            if s.client == name or s.limit_name == name:
                self.admit(s)

    def for_key(self, key: Key) -> Session:
        """The fast path's miss: find or make the implicit session for ``key``."""
        if not isinstance(key, Key):
            raise InvalidRequest(f"expected a cryptoplane Key, not {type(key).__name__}")
        s = self._by_key.get(key)
        if s is None:
            s = self.bind(key, None, "normal", "-")
        key.session_hint = s
        return s

    def of(self, request: Request) -> Session | None:
        """The session of ``request``'s key here, if it has one."""
        key = request.key
        if key is None:
            return None
        s = key.session_hint
        if s.plane is self.owner:
            return s  # type: ignore[no-any-return]
        return self._by_key.get(key)

    def counter(self, s: Session, op: str) -> OpStats:
        """Where an inline operation of ``s`` is counted when its tally cannot count it
        (errors, ops without a tally index)."""
        return self.registry.get(self.inline_name or "-", s.algorithm, op, s.client)

    def explain(self, s: Session, op: str, e: Exception, data: Buffer,
                nonce: bytes | None, aad: bytes | None) -> BaseException:
        """The typed error for an exception out of a fast-path AEAD call, counted. A raw
        AEAD method raises the library's exceptions: ask the kernel, which translates
        them, to run the same inputs (the failure path may be slow; the success path
        may not)."""
        if not isinstance(e, CryptoplaneError):
            try:
                getattr(s.kernel, op)(data, nonce, aad, False)
            except CryptoplaneError as typed:
                e = typed
        if isinstance(e, CryptoplaneError):
            self.counter(s, op).error(e)
        return e

    def reap(self) -> None:
        """Fold the counts of sessions whose key died since the last look."""
        while self._dead:
            self._fold(self._dead.popleft())

    def _fold(self, s: Session) -> None:
        """A session ended: keep its fast-path counts in the plane's counters."""
        counts = [(self.counter(s, op), n, b) for op, n, b in s.counts()]
        with self._lock:
            if s not in self._live:
                return
            self._live.discard(s)
            for c, n, b in counts:
                c.add(n, b)

    def live(self) -> list[Session]:
        """Sessions whose counts are still their own (not yet folded)."""
        with self._lock:
            return list(self._live)

    def stat_rows(self) -> list[StatRow]:
        """Counts per (engine, algorithm, op, client): the registry (queued work, errors,
        sessions that ended) plus the fast-path counts live sessions still hold, read
        together so that a session being folded is counted exactly once."""
        self.reap()
        with self._lock:
            rows: list[StatRow] = [(k, s.requests, s.bytes, dict(s.errors), s.latency)
                                   for k, s in self.registry.items()]
            rows += [((self.inline_name or "-", s.algorithm, op, s.client), n, b, {}, None)
                     for s in self._live for op, n, b in s.counts()]
        return rows
