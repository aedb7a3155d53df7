"""The pool engine's worker process, and the small wire format it shares with the parent.

A worker owns one shared-memory arena (``shm.Arena``) and one pipe. The parent sends
small tuples over the pipe; payloads stay in the arena:

* ``(KEY, kid, algorithm, form, material)``: prepare a key once (``form`` is ``"raw"``
  for ``Key(alg, raw)`` or ``"der"`` for ``Key.load_der``). The worker keeps the Key and
  its kernel until ``(DROP, kid)``.
* ``(RUN, mid, kid, slot, n, request_type, values)``: rebuild the request around a view
  of the slot's ``n`` input bytes and run ``request.apply(request.kernel())``, the same
  kernels the inline engine runs, and reply ``(mid, status, n, payload, seconds)``.
* ``(STOP,)``: exit. So does EOF, which is what a dead parent looks like.

Nothing here implements a cipher: the worker only moves bytes and calls kernels.
"""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from .. import requests as rq
from ..algorithms import Algorithm, lookup
from ..exceptions import CryptoplaneError
from ..keys import Key
from .shm import Arena

# parent -> worker
KEY, DROP, RUN, STOP = 1, 2, 3, 4
# worker -> parent: result in the slot's output half (n bytes), None, a pickled value
# (an output too big for the slot: never for the catalogue's operations), an exception
R_SHM, R_NONE, R_VALUE, R_ERR = 1, 2, 3, 4

# The request types the pool can carry, by class name.
REQUEST_TYPES: dict[str, type[rq.Request]] = {
    cls.__name__: cls
    for cls in (rq.Encrypt, rq.Decrypt, rq.Sign, rq.Verify, rq.Digest, rq.Mac, rq.VerifyMac,
                rq.Derive, rq.Random, rq.EncryptSectors, rq.DecryptSectors)
}
# What the pool declares: a chunk run's output differs in size from its input and
# belongs in the caller's buffer, which the arena's slots are not built for.
CARRIED_OPS = frozenset(cls.op for cls in REQUEST_TYPES.values())
# Carried by the arena or rebuilt in the worker, never sent as values.
_NOT_SENT = frozenset({"key", "data", "out"})
SECTOR_TYPES = frozenset({"EncryptSectors", "DecryptSectors"})


def fields(cls: type[rq.Request]) -> tuple[str, ...]:
    """The small arguments of a request type: every slot but key, data and out. Derived
    from ``__slots__`` so a field added to a request travels without a change here."""
    names: set[str] = set()
    for klass in cls.__mro__:
        names.update(getattr(klass, "__slots__", ()))
    return tuple(sorted(names - _NOT_SENT))


FIELDS: dict[str, tuple[str, ...]] = {name: fields(cls) for name, cls in REQUEST_TYPES.items()}
HAS_DATA: dict[str, bool] = {name: "data" in {s for k in cls.__mro__
                                              for s in getattr(k, "__slots__", ())}
                             for name, cls in REQUEST_TYPES.items()}


@dataclass(frozen=True, slots=True)
class AlgorithmName:
    """An Algorithm on the wire: the catalogue entry is looked up again by name, so the
    worker's requests hold the catalogue's own objects (compared by identity)."""

    name: str


@dataclass(frozen=True, slots=True)
class KeyPlaceholder:
    """A ``Key`` argument the kernel will refuse anyway (e.g. a ``peer`` for HKDF): sent
    as this marker so the worker raises the same error without any key material."""


def encode_value(name: str, value: Any, algorithm: Algorithm) -> Any:
    """One small argument as a picklable value (no Key object ever crosses)."""
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, Algorithm):
        return AlgorithmName(value.name)
    if isinstance(value, Key):
        # x25519 takes its peer's public key: 32 raw bytes rebuild it in the worker; any
        # other Key there is refused by the kernel (None gets the same refusal)
        if name == "peer" and algorithm.name == "x25519":
            if value.algorithm.name == "x25519" and not value.is_private:
                return value.export_raw()
            return None
        return KeyPlaceholder()
    return value


def _decode_value(value: Any) -> Any:
    if isinstance(value, AlgorithmName):
        return lookup(value.name)
    return value


def export_key(key: Key) -> tuple[str, bytes]:
    """(form, material) to rebuild ``key`` in a worker. Only ever sent down the pipe to
    our own child process: never logged, never part of an exception."""
    if key.algorithm.symmetric:
        return "raw", key.export_raw()
    return "der", key.export_der()  # PKCS#8 for a private key, SPKI for a public one


def _load_key(algorithm: str, form: str, material: bytes) -> Key:
    if form == "raw":
        return Key(algorithm, material)
    return Key.load_der(algorithm, material)


def _transferable(error: BaseException) -> BaseException:
    """The exception to send back. Ours pickle by design (message only, no material);
    anything else crosses as its type name, since its arguments are not ours to vouch
    for."""
    if isinstance(error, CryptoplaneError) or type(error) in (
        ValueError, TypeError, OverflowError, KeyError, MemoryError
    ):
        return error
    return CryptoplaneError(f"worker raised {type(error).__name__}")


def _run(arena: Arena, keys: dict[int, Key | BaseException], msg: tuple[Any, ...]) -> tuple[
        int, int, int, Any]:
    """Run one RUN message; returns the reply without its timing."""
    _, mid, kid, slot, n, type_name, values = msg
    cls = REQUEST_TYPES[type_name]
    # The parent already validated the request: rebuild it without running the
    # constructor again, then call the very apply() the inline engine calls.
    request = cls.__new__(cls)
    key: Key | BaseException | None = None if kid < 0 else keys[kid]
    if isinstance(key, BaseException):
        raise key
    request.key = key
    for field, value in zip(FIELDS[type_name], values, strict=True):
        setattr(request, field, _decode_value(value))
    with arena.input(slot, n) as data, arena.output(slot) as out:
        if HAS_DATA[type_name]:
            # CbcKernel.encrypt with padding adds bytes to what the padder returns, a
            # memoryview for a memoryview input: give that one legacy case a bytes copy
            padded = getattr(request, "padding", False)
            request.data = bytes(data) if padded else data  # type: ignore[attr-defined]
        if type_name in SECTOR_TYPES:
            with out[:n] as dest:
                request.out = dest  # type: ignore[attr-defined]
                request.apply(request.kernel())  # writes straight into the arena
                del request
            return mid, R_SHM, n, None
        result = request.apply(request.kernel())
        del request  # drop the view of the slot before the with-block releases it
        if result is None:
            return mid, R_NONE, 0, None
        size = len(result)
        if isinstance(result, bytes) and size <= len(out):
            out[:size] = result
            return mid, R_SHM, size, None
        return mid, R_VALUE, 0, result


def serve(conn: Connection, arena_name: str, slots: int, in_size: int) -> None:
    """A worker's life: attach the arena, answer messages until STOP or EOF."""
    # Ctrl-C belongs to the parent, which stops us; a worker traceback helps nobody.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    arena = Arena(slots, in_size, name=arena_name)
    keys: dict[int, Key | BaseException] = {}
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return  # the parent is gone: so are we
            tag = msg[0]
            if tag == RUN:
                # CPU time, not wall time: on a busy machine the wall clock would charge
                # this engine for its neighbours (the threads engine measures the same)
                t0 = time.thread_time()
                try:
                    reply = _run(arena, keys, msg)
                except BaseException as e:  # every outcome goes back to the parent
                    reply = (msg[1], R_ERR, 0, _transferable(e))
                try:
                    # + the work's seconds: the parent's meter learns the worker's speed
                    conn.send((*reply, time.thread_time() - t0))
                except (EOFError, OSError):
                    return
                except Exception as e:  # an unpicklable value or error: say what it was
                    conn.send((msg[1], R_ERR, 0,
                               CryptoplaneError(f"result not transferable: {type(e).__name__}"),
                               0.0))
            elif tag == KEY:
                _, kid, algorithm, form, material = msg
                try:
                    keys[kid] = _load_key(algorithm, form, material)
                except Exception as e:  # requests on this key will fail with it
                    keys[kid] = _transferable(e)
                del material
            elif tag == DROP:
                keys.pop(msg[1], None)
            elif tag == STOP:
                return
    finally:
        keys.clear()
        with contextlib.suppress(Exception):
            conn.close()
        arena.close(unlink=False)


__all__ = ["DROP", "FIELDS", "HAS_DATA", "KEY", "REQUEST_TYPES", "RUN", "R_ERR", "R_NONE",
           "R_SHM", "R_VALUE", "SECTOR_TYPES", "STOP", "AlgorithmName", "KeyPlaceholder",
           "encode_value", "export_key", "fields", "serve"]
