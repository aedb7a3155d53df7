"""The native code: AES-XTS over whole runs of sectors, and the AEAD fast path in C.

``XtsKey`` is the best implementation available:

* ``"native"``: the C extension ``_sectors`` over OpenSSL's EVP (libcrypto).  The key
  schedule is prepared once per key and the GIL is released around each run, so a
  thread pool can spread one key over several cores.
* ``"python"``: ``fallback.XtsKey`` on the ``cryptography`` package.  Same bytes and
  errors, much slower (a new Cipher per sector, GIL held).  Used when the extension
  could not be built or imported; ``BACKEND_REASON`` says why.

Environment:

``CRYPTOPLANE_NO_NATIVE=1``
    Use the pure-Python fallback even when the extension is available.
``CRYPTOPLANE_NATIVE_DISPATCH=evp``
    (read by the extension at import) drive OpenSSL through plain EVP calls rather than
    the provider's dispatch table; slower on OpenSSL 3.0, for comparison and debugging.

``fast_aead(op, method)`` is ``Plane.encrypt``/``decrypt`` (``method``, the pure-Python
method) as a C method descriptor from ``_fastpath``: the same fast path without the
interpreter's call around the AEAD call, most of the fast path's cost on small messages
(benchmarks/README.md, fastpath); anything off the fast path is handed
to ``method`` unchanged.  It is ``method`` itself where ``_fastpath`` is not available
or ``CRYPTOPLANE_NO_NATIVE`` is set (``FAST_PATH``/``FAST_PATH_REASON`` say which).

``Tally`` is a session's fast-path counters: requests and bytes per op of ``TALLY_OPS``,
``add(op_index, nbytes)`` and ``snapshot() -> [(op, requests, bytes)]``. With the native
fast path it is ``_fastpath.Tally`` (uint64 fields the trampoline adds to in place, with
no Python int allocated per call, which was a third of the fast path's cost); otherwise
``PythonTally``, the same interface and the same numbers.

To get the native kernel, install the OpenSSL headers and a C compiler
(``apt-get install build-essential libssl-dev``) and reinstall cryptoplane.
"""

from __future__ import annotations

import os
import sysconfig
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

from cryptoplane._native import fallback
from cryptoplane._native.fallback import TWEAK_PLAIN64, TWEAK_PLAIN64BE, tweak_step

__all__ = [
    "BACKEND",
    "BACKEND_REASON",
    "CHUNKS_BACKEND",
    "CHUNKS_BACKEND_REASON",
    "FAST_PATH",
    "FAST_PATH_REASON",
    "TALLY_OPS",
    "TWEAK_PLAIN64",
    "TWEAK_PLAIN64BE",
    "ChunkAuthenticationFailed",
    "NativeFastAead",
    "NativeTally",
    "NativeXtsKey",
    "PythonTally",
    "PythonXtsKey",
    "Tally",
    "XtsKey",
    "fast_aead",
    "open_chunks",
    "openssl_version",
    "seal_chunks",
    "tweak_step",
]

PythonXtsKey = fallback.XtsKey

NativeXtsKey: type[fallback.XtsKey] | None
_import_error = ""
try:
    # Absolute module import: a missing .so then reads "No module named ...", not a
    # misleading "partially initialized module" from the from-import form.
    import cryptoplane._native._sectors as _sectors
except ImportError as exc:
    NativeXtsKey = None
    _import_error = (
        f"native extension unavailable ({exc}); "
        "install libssl-dev and a C compiler, then reinstall cryptoplane"
    )
else:
    # The stub declares the same interface as the fallback class.
    NativeXtsKey = _sectors.XtsKey  # type: ignore[assignment]


def _choose() -> tuple[type[fallback.XtsKey], str, str]:
    if os.environ.get("CRYPTOPLANE_NO_NATIVE", "") not in ("", "0"):
        return PythonXtsKey, "python", "CRYPTOPLANE_NO_NATIVE is set"
    if NativeXtsKey is None:
        return PythonXtsKey, "python", _import_error
    return NativeXtsKey, "native", ""


XtsKey, BACKEND, BACKEND_REASON = _choose()


def guard_mapped_reads() -> bool:
    """Make the native kernel's SIGBUS guard the first handler (ahead of faulthandler,
    say), so that decrypting from a mapping whose file shrank raises ``OSError``
    quietly. False when the native kernel is not the one in use: reads must not then
    decrypt from a mapping at all (the fallback has no guard)."""
    if BACKEND != "native":
        return False
    _sectors.guard_sigbus()
    return True


def openssl_version() -> str:
    """The libcrypto behind the native kernel, or "" when it is not loaded."""
    if NativeXtsKey is None:
        return ""
    return _sectors.openssl_version()


# -- the AEAD fast path --------------------------------------------------------------------

_F = TypeVar("_F", bound=Callable[..., Any])

# -- the fast path's counters -------------------------------------------------------------

# The ops a session counts, in index order (the C module has the same tuple: it adds to
# encrypt and decrypt, 0 and 1, itself).
TALLY_OPS = ("encrypt", "decrypt", "sign", "verify", "mac", "encrypt_sectors",
             "decrypt_sectors", "seal_chunks", "open_chunks")

# requests << 64 | bytes in one int, so add() is one addition: 2**64 bytes is 16 EiB, the
# byte half cannot overflow into the request half.
_ONE_REQUEST = 1 << 64
_BYTES = _ONE_REQUEST - 1


class PythonTally:
    """A session's fast-path counters without the C module: the same interface and
    numbers as ``_fastpath.Tally``. ``add`` is exact under threads with a GIL: its
    subscript, addition and store run no Python code and reach no point where the
    interpreter switches threads (see ``LockedTally`` for builds without one)."""

    __slots__ = ("_packed",)

    def __init__(self) -> None:
        self._packed = [0] * len(TALLY_OPS)

    def add(self, op: int, nbytes: int, /) -> None:
        """Count one request of ``nbytes`` (a ``len()``) for ``TALLY_OPS[op]``."""
        self._packed[op] += nbytes + _ONE_REQUEST

    def snapshot(self) -> list[tuple[str, int, int]]:
        """``[(op, requests, bytes)]`` for every op counted, in ``TALLY_OPS`` order."""
        packed = list(self._packed)  # one moment, as the C version
        return [(name, p >> 64, p & _BYTES) for name, p in zip(TALLY_OPS, packed, strict=True)
                if p]


class LockedTally(PythonTally):
    """``PythonTally`` for a free-threaded build, where ``+=`` on a list item can lose
    counts: a lock around it. (Importing the C module re-enables the GIL
    there: it does not declare that it can run without one.)"""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def add(self, op: int, nbytes: int, /) -> None:
        with self._lock:
            self._packed[op] += nbytes + _ONE_REQUEST

    def snapshot(self) -> list[tuple[str, int, int]]:
        with self._lock:
            return super().snapshot()


_PyTally: type[PythonTally] = (LockedTally if sysconfig.get_config_var("Py_GIL_DISABLED")
                               else PythonTally)

NativeFastAead: type[Any] | None
try:
    import cryptoplane._native._fastpath as _fastpath
except ImportError as exc:
    NativeFastAead = None
    _fast_error = f"native fast path unavailable ({exc}); install a C compiler and reinstall"
else:
    if tuple(getattr(_fastpath, "TALLY_OPS", ())) != TALLY_OPS:
        # a stale build of fastpath.c: it would count into the wrong ops
        NativeFastAead = None
        _fast_error = "native fast path out of date (TALLY_OPS differ); reinstall"
    else:
        NativeFastAead = _fastpath.FastAead
        _fast_error = ""

if os.environ.get("CRYPTOPLANE_NO_NATIVE", "") not in ("", "0"):
    FAST_PATH, FAST_PATH_REASON = "python", "CRYPTOPLANE_NO_NATIVE is set"
elif NativeFastAead is None:
    FAST_PATH, FAST_PATH_REASON = "python", _fast_error
else:
    FAST_PATH, FAST_PATH_REASON = "native", ""

NativeTally: type[Any] | None = _fastpath.Tally if NativeFastAead is not None else None
# The trampoline counts in place only into a native Tally, so the two go together.
Tally: type[Any] = NativeTally if FAST_PATH == "native" and NativeTally else _PyTally


def fast_aead(op: str, method: _F) -> _F:
    """``method`` (``Plane.encrypt`` or ``decrypt``, pure Python) as the native method
    descriptor when that is in use, else ``method`` itself. Typed as ``method``: calls
    behave the same; ``inspect.signature`` finds the signature through ``__wrapped__``."""
    if FAST_PATH != "native" or NativeFastAead is None:
        return method
    return cast(_F, NativeFastAead(op, method))


# -- STREAM chunks (age payloads) -----------------------------------------------------------

# ``seal_chunks``/``open_chunks`` implement the contract in ``chunks_fallback``: the native
# ``_chunks`` (one EVP context per batch, the GIL released for the whole batch, so threads
# scale) where it imports, else the pure-Python one (same bytes and errors, GIL held: a
# caller should not spread it over threads). ``CHUNKS_BACKEND`` says which, and
# ``CHUNKS_BACKEND_REASON`` why not native. ``ChunkAuthenticationFailed`` is the fallback's
# class either way: the native module raises that very class.
from cryptoplane._native import chunks_fallback as _chunks_fallback  # noqa: E402
from cryptoplane._native.chunks_fallback import ChunkAuthenticationFailed  # noqa: E402

_ChunkFn = Callable[..., int]
_chunks_error = ""
_native_seal: _ChunkFn | None = None
_native_open: _ChunkFn | None = None
try:
    import cryptoplane._native._chunks as _chunks
except ImportError as exc:
    _chunks_error = (f"native STREAM kernel unavailable ({exc}); install libssl-dev and a "
                     "C compiler, then reinstall cryptoplane")
else:
    _native_seal, _native_open = _chunks.seal_chunks, _chunks.open_chunks

seal_chunks: _ChunkFn
open_chunks: _ChunkFn
if os.environ.get("CRYPTOPLANE_NO_NATIVE", "") not in ("", "0"):
    CHUNKS_BACKEND, CHUNKS_BACKEND_REASON = "python", "CRYPTOPLANE_NO_NATIVE is set"
elif _native_seal is None or _native_open is None:
    CHUNKS_BACKEND, CHUNKS_BACKEND_REASON = "python", _chunks_error
else:
    CHUNKS_BACKEND, CHUNKS_BACKEND_REASON = "native", ""
if CHUNKS_BACKEND == "native" and _native_seal is not None and _native_open is not None:
    seal_chunks, open_chunks = _native_seal, _native_open
else:
    seal_chunks, open_chunks = _chunks_fallback.seal_chunks, _chunks_fallback.open_chunks
