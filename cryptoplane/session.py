"""Sessions: a key bound to a plane, prepared once, with the fast path's counters.

A session owns the key's kernel (the key schedule done once) and the callables the
plane's fast path invokes. It holds its key only weakly, so a session lives exactly as
long as its key; when the key goes, the plane folds the session's counts into its own.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from . import _native
from ._native import TALLY_OPS
from .exceptions import InvalidRequest, NotSupported
from .kernels import Kernel

if TYPE_CHECKING:
    from .keys import Key
    from .plane import Plane

PRIORITIES = ("high", "normal", "bulk")

# The fast path's ops and their indexes in a session's Tally (``s.tally.add(OP_SIGN,
# len(data))``). Counting costs the fast path one call and no allocation in C: with the
# native module the Tally is uint64 fields that the C encrypt/decrypt add to in place
# (a Python int per call was ~35 ns of its ~100); without it, a pure-Python Tally with
# the same interface and numbers (see cryptoplane._native).
FAST_OPS = TALLY_OPS
(OP_ENCRYPT, OP_DECRYPT, OP_SIGN, OP_VERIFY, OP_MAC, OP_ENCRYPT_SECTORS,
 OP_DECRYPT_SECTORS) = range(len(FAST_OPS))
OP_INDEX = {op: i for i, op in enumerate(FAST_OPS)}
assert FAST_OPS[OP_ENCRYPT] == "encrypt" and FAST_OPS[OP_DECRYPT_SECTORS] == "decrypt_sectors"


class Counter:
    """requests, bytes, errors by type: one per (engine, algorithm, op) in the plane."""

    __slots__ = ("bytes", "errors", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        self.errors: dict[str, int] = {}

    def error(self, e: BaseException) -> None:
        name = type(e).__name__
        self.errors[name] = self.errors.get(name, 0) + 1


class Session:
    """A key bound to a plane (and optionally to one engine, with a priority).

    Made implicitly by the plane's synchronous calls, or explicitly with
    ``plane.session(key, engine=..., priority=...)``.
    """

    __slots__ = ("__weakref__", "_key", "algorithm", "client", "dec", "enc", "engine",
                 "fast_plane", "kernel", "plane", "priority", "tally")

    def __init__(self, plane: Plane, key: Key, engine: str | None, priority: str,
                 inline_serves: bool, client: str = "-") -> None:
        if priority not in PRIORITIES:
            raise InvalidRequest(f"priority must be one of {PRIORITIES}, got {priority!r}")
        self.plane = plane
        self._key = weakref.ref(key)
        self.algorithm = key.algorithm.name
        self.engine = engine
        self.priority = priority
        self.client = client
        self.kernel: Kernel = key.kernel()
        # the plane itself when its fast path may serve this session, else None: the fast
        # path's whole admission test is ``key._session.fast_plane is self``
        fast = engine in (None, "inline") and inline_serves
        self.fast_plane: Plane | None = plane if fast else None
        # (nonce, data, aad) callables: AEAD calls are the cheapest requests there are
        # (~0.5 us), so for them the fast path calls the library's bound methods directly
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

    def __repr__(self) -> str:
        return (f"<Session {self.algorithm} engine={self.engine or 'auto'} "
                f"priority={self.priority} client={self.client}>")


class Unbound:
    """What ``Key._session`` holds before any plane has seen the key: no plane's fast
    path admits it, so the first call takes the slow path and makes a real session."""

    __slots__ = ()
    fast_plane = None
    plane = None
    engine = None


UNBOUND: Any = Unbound()


def check_engine(plane_engines: dict[str, Any], engine: str | None) -> None:
    if engine is not None and engine not in plane_engines:
        raise NotSupported(f"no engine named {engine!r} in this plane "
                           f"(have {', '.join(plane_engines)})")
