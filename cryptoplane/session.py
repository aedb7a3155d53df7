"""Sessions: a key bound to a plane, prepared once, with the fast path's counters.

A session owns the key's kernel (the key schedule done once) and the callables the
plane's fast path invokes. It holds its key only weakly, so a session lives exactly as
long as its key; when the key goes, the plane folds the session's counts into its own.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from .exceptions import InvalidRequest, NotSupported
from .kernels import Kernel

if TYPE_CHECKING:
    from .keys import Key
    from .plane import Plane

PRIORITIES = ("high", "normal", "bulk")

FAST_OPS = ("encrypt", "decrypt", "sign", "verify", "mac", "encrypt_sectors",
            "decrypt_sectors")

# The fast path keeps requests and bytes in one integer, requests << 64 | bytes, so a
# call costs one addition instead of two (~25 ns of a ~0.5 us AEAD call). 2**64 bytes
# is 16 EiB: the byte half cannot overflow into the request half.
ONE_REQUEST = 1 << 64
_BYTES = ONE_REQUEST - 1


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

    __slots__ = ("__weakref__", "_key", "algorithm", "c_decrypt", "c_decrypt_sectors",
                 "c_encrypt", "c_encrypt_sectors", "c_mac", "c_sign", "c_verify", "client",
                 "dec", "enc", "engine", "fast_plane", "kernel", "plane", "priority")

    c_encrypt: int
    c_decrypt: int
    c_sign: int
    c_verify: int
    c_mac: int
    c_encrypt_sectors: int
    c_decrypt_sectors: int

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
        for op in FAST_OPS:
            setattr(self, f"c_{op}", 0)

    @property
    def key(self) -> Key | None:
        return self._key()

    def counts(self) -> list[tuple[str, int, int]]:
        """(op, requests, bytes) for every fast-path op used."""
        out = []
        for op in FAST_OPS:
            packed: int = getattr(self, f"c_{op}")
            if packed:
                out.append((op, packed >> 64, packed & _BYTES))
        return out

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
