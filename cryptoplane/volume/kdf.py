"""Passphrase-based key derivation for LUKS keyslots: PBKDF2 and Argon2i/Argon2id.

PBKDF2 comes from ``cryptography`` (OpenSSL), Argon2 from ``argon2-cffi`` (the reference
implementation), version 0x13 as cryptsetup uses. Costs are either given explicitly or
chosen by timing, as ``cryptsetup --iter-time``: a short trial run, scaled so that one
derivation takes about the target time on this machine.

Costs read from a header are checked against ``Limits`` before any work is done, so a
hostile header cannot make an open take hours or all the memory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import argon2.exceptions
from argon2.low_level import Type, hash_secret_raw
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from cryptoplane.exceptions import InvalidRequest, NotSupported
from cryptoplane.volume.af import hash_algorithm
from cryptoplane.volume.errors import KdfLimitExceeded

DEFAULT_ITER_TIME_MS = 2000
DIGEST_ITER_TIME_MS = 125  # cryptsetup's time for the volume key digest
MIN_PBKDF2_ITERATIONS = 1000
ARGON2_MIN_TIME = 4  # cryptsetup never benchmarks below four passes
ARGON2_MIN_MEMORY_KIB = 32
ARGON2_DEFAULT_MEMORY_KIB = 1024 * 1024
ARGON2_MAX_MEMORY_KIB = 4 * 1024 * 1024  # cryptsetup's own ceiling


@dataclass(frozen=True)
class Pbkdf2:
    """PBKDF2-HMAC with ``hash`` (sha1, sha256, sha512...) and an iteration count."""

    hash: str = "sha256"
    iterations: int = MIN_PBKDF2_ITERATIONS

    type = "pbkdf2"


@dataclass(frozen=True)
class Argon2:
    """Argon2 (``argon2i`` or ``argon2id``): ``time`` passes over ``memory`` KiB with
    ``cpus`` lanes."""

    type: str = "argon2id"
    time: int = ARGON2_MIN_TIME
    memory: int = ARGON2_DEFAULT_MEMORY_KIB
    cpus: int = 4


KdfParams = Pbkdf2 | Argon2


@dataclass(frozen=True)
class Limits:
    """The most a header may ask for. Beyond these, opening is refused with
    ``KdfLimitExceeded`` (cryptsetup's own maxima, and caps on work).

    Work is counted before it is done, in units of the largest derivation one keyslot
    may ask for (``pbkdf2_work`` SHA-256 iterations of one 32-byte output block, or
    ``argon2_work_kib`` KiB x passes), each volume-key digest check included (at most
    ``digest_work`` iterations, a quarter unit): one unlock, whatever the passphrase, spends at most
    ``total_work`` units, so a keyslot at the maximum and its digest fit once.
    Measured on a 2-core machine of this project (OpenSSL's PBKDF2-SHA256 at 8.1M
    iterations/s, Argon2id at 1-1.8 GiB x pass/s): a unit is about 12 s of PBKDF2 or
    13-24 s of Argon2, the whole budget 15-30 s (``python benchmarks/unlock_budget.py``
    times the worst header the caps accept). A keyslot cryptsetup makes by default
    costs 2 s on the machine that made it.
    """

    pbkdf2_iterations: int = 0xFFFFFFFF
    pbkdf2_work: int = 100_000_000  # SHA-256-equivalent iterations
    digest_work: int = 25_000_000  # the volume-key digest's PBKDF2 (cryptsetup: ~1M)
    argon2_memory_kib: int = ARGON2_MAX_MEMORY_KIB
    argon2_time: int = 1000
    argon2_cpus: int = 64
    argon2_work_kib: int = 24 * 1024 * 1024  # memory x passes
    total_work: float = 1.25  # one unlock: at most this many units, digests included


# PBKDF2's cost per iteration and output block relative to SHA-256's (SHA-512's 128-byte
# blocks take about 2.3 times as long here); hashes not named cost as SHA-256
_HASH_WEIGHT = {"sha512": 2.5, "sha384": 2.5, "whirlpool": 4.0}


def _pbkdf2_factor(params: Pbkdf2, length: int) -> float:
    """SHA-256 iterations one iteration of ``params`` is worth when it derives ``length``
    bytes: PBKDF2 runs all its iterations once per hash-sized block of output, so a
    64-byte keyslot key from SHA-256 costs twice its iteration count."""
    blocks = -(-length // hash_algorithm(params.hash).digest_size)
    return _HASH_WEIGHT.get(params.hash, 1.0) * blocks


def cost(params: KdfParams, limits: Limits | None = None, length: int = 32) -> float:
    """The work of deriving ``length`` bytes, as a fraction of the largest a keyslot may
    ask for."""
    limits = limits or LIMITS
    if isinstance(params, Pbkdf2):
        return params.iterations * _pbkdf2_factor(params, length) / limits.pbkdf2_work
    return params.time * params.memory / limits.argon2_work_kib


LIMITS = Limits()


def check(params: KdfParams, limits: Limits | None = None, length: int = 32) -> None:
    """Refuse parameters that are malformed or beyond ``limits`` (default ``LIMITS``) for
    a derivation of ``length`` bytes."""
    limits = limits or LIMITS
    if isinstance(params, Pbkdf2):
        hash_algorithm(params.hash)
        if params.iterations < 1:
            raise KdfLimitExceeded(f"pbkdf2 iterations {params.iterations} is below 1")
        if params.iterations > limits.pbkdf2_iterations or cost(params, limits, length) > 1:
            most = min(limits.pbkdf2_iterations,
                       int(limits.pbkdf2_work / _pbkdf2_factor(params, length)))
            raise KdfLimitExceeded(f"pbkdf2-{params.hash} iterations {params.iterations} "
                                   f"exceed the limit {most}")
        return
    if params.type not in ("argon2i", "argon2id"):
        raise NotSupported(f"KDF {params.type!r} is not supported")
    if not 1 <= params.cpus <= limits.argon2_cpus:
        raise KdfLimitExceeded(f"argon2 cpus {params.cpus} is outside 1..{limits.argon2_cpus}")
    if params.memory < max(8 * params.cpus, 8):
        raise KdfLimitExceeded(f"argon2 memory {params.memory} KiB is below 8 KiB per lane")
    if params.memory > limits.argon2_memory_kib:
        raise KdfLimitExceeded(f"argon2 memory {params.memory} KiB exceeds the limit "
                               f"{limits.argon2_memory_kib} KiB")
    if not 1 <= params.time <= limits.argon2_time:
        raise KdfLimitExceeded(f"argon2 time {params.time} is outside 1..{limits.argon2_time}")
    if params.time * params.memory > limits.argon2_work_kib:
        raise KdfLimitExceeded(f"argon2 cost time x memory = {params.time * params.memory} "
                               f"KiB exceeds the limit {limits.argon2_work_kib} KiB")


def check_digest(params: Pbkdf2, limits: Limits | None = None, length: int = 32) -> None:
    """Refuse a volume-key digest over its own, lower limit (it runs for every keyslot
    tried, so it must cost a fraction of what a keyslot may)."""
    limits = limits or LIMITS
    check(params, limits, length)
    if cost(params, limits, length) * limits.pbkdf2_work > limits.digest_work:
        most = int(limits.digest_work / _pbkdf2_factor(params, length))
        raise KdfLimitExceeded(f"the volume key digest's pbkdf2-{params.hash} iterations "
                               f"{params.iterations} exceed the limit {most}")


def derive(params: KdfParams, passphrase: bytes, salt: bytes, length: int,
           limits: Limits | None = None) -> bytes:
    """The key of ``length`` bytes that ``passphrase`` and ``salt`` give under ``params``."""
    check(params, limits, length)
    if not 1 <= length <= 1024:
        raise InvalidRequest(f"derived key length {length} is outside 1..1024")
    if isinstance(params, Pbkdf2):
        kdf = PBKDF2HMAC(hash_algorithm(params.hash), length, salt, params.iterations)
        return kdf.derive(passphrase)
    kind = Type.ID if params.type == "argon2id" else Type.I
    try:
        return hash_secret_raw(passphrase, salt, params.time, params.memory, params.cpus,
                               length, kind, 0x13)
    except argon2.exceptions.HashingError as e:
        raise KdfLimitExceeded(f"argon2 refused the parameters: {e}") from None


def from_mapping(kdf: str, values: Mapping[str, Any]) -> KdfParams:
    """Explicit costs from a mapping: ``{"iterations": 1000, "hash": "sha256"}`` for
    pbkdf2, ``{"time": 4, "memory": 32768, "cpus": 1}`` for argon2."""
    try:
        if kdf == "pbkdf2":
            return Pbkdf2(str(values.get("hash", "sha256")), int(values["iterations"]))
        if kdf in ("argon2i", "argon2id"):
            return Argon2(kdf, int(values.get("time", ARGON2_MIN_TIME)),
                          int(values["memory"]), int(values.get("cpus", 1)))
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidRequest(f"bad {kdf} parameters: missing or invalid {e}") from None
    raise NotSupported(f"KDF {kdf!r} is not supported (pbkdf2, argon2i, argon2id)")


def _half_ram_kib() -> int:
    """cryptsetup never asks for more than half the physical memory."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2048
    except (ValueError, OSError):
        return ARGON2_MAX_MEMORY_KIB


def _default_cpus() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def benchmark(kdf: str, *, hash_name: str = "sha256", key_size: int = 32,
              iter_time_ms: int = DEFAULT_ITER_TIME_MS,
              max_memory_kib: int = ARGON2_DEFAULT_MEMORY_KIB, cpus: int | None = None,
              clock: Callable[[], float] = time.perf_counter) -> KdfParams:
    """Costs so that one derivation takes about ``iter_time_ms`` here, as cryptsetup
    chooses them: PBKDF2 scales its iterations (at least 1000); Argon2 keeps memory at
    ``max_memory_kib`` and scales passes down to four, then lowers memory."""
    if iter_time_ms < 1:
        raise InvalidRequest("iter_time_ms must be positive")
    target = iter_time_ms / 1000.0
    salt = bytes(32)
    if kdf == "pbkdf2":
        # double a trial run until it is long enough to time, then scale it
        trial, elapsed = 1000, 0.0
        while trial <= 1 << 26:
            t0 = clock()
            derive(Pbkdf2(hash_name, trial), b"benchmark", salt, key_size)
            elapsed = clock() - t0
            if elapsed >= 0.05:
                break
            trial *= 2
        iterations = int(trial * target / max(elapsed, 1e-6))
        return Pbkdf2(hash_name, max(MIN_PBKDF2_ITERATIONS, min(iterations, 0xFFFFFFFF)))
    if kdf not in ("argon2i", "argon2id"):
        raise NotSupported(f"KDF {kdf!r} is not supported (pbkdf2, argon2i, argon2id)")
    lanes = cpus or _default_cpus()
    memory = max(ARGON2_MIN_MEMORY_KIB, min(max_memory_kib, ARGON2_MAX_MEMORY_KIB,
                                            _half_ram_kib()))
    # one pass over a large share of the memory: small trials miss the page faults and
    # cache misses that dominate at full size
    trial_memory = max(min(memory, 256 * 1024), 8 * lanes)
    t0 = clock()
    derive(Argon2(kdf, 1, trial_memory, lanes), b"benchmark", salt, key_size)
    per_kib_pass = max(clock() - t0, 1e-6) / trial_memory
    passes = int(target / (per_kib_pass * memory))
    if passes >= ARGON2_MIN_TIME:
        return Argon2(kdf, min(passes, 1000), memory, lanes)
    memory = int(target / (per_kib_pass * ARGON2_MIN_TIME))
    return Argon2(kdf, ARGON2_MIN_TIME, max(memory, ARGON2_MIN_MEMORY_KIB, 8 * lanes), lanes)


def resolve(kdf: str, params: KdfParams | Mapping[str, Any] | None, iter_time_ms: int | None,
            *, hash_name: str = "sha256", key_size: int = 32) -> KdfParams:
    """The costs for a new keyslot: explicit ``params``, else a benchmark."""
    if isinstance(params, Pbkdf2 | Argon2):
        result: KdfParams = params
    elif params is not None:
        result = from_mapping(kdf, params)
    else:
        result = benchmark(kdf, hash_name=hash_name, key_size=key_size,
                           iter_time_ms=iter_time_ms or DEFAULT_ITER_TIME_MS)
    check(result)
    return result


def to_json(params: KdfParams, salt_b64: str) -> dict[str, Any]:
    """The LUKS2 ``kdf`` object."""
    if isinstance(params, Pbkdf2):
        return {"type": "pbkdf2", "hash": params.hash, "iterations": params.iterations,
                "salt": salt_b64}
    return {"type": params.type, "time": params.time, "memory": params.memory,
            "cpus": params.cpus, "salt": salt_b64}


def describe(params: KdfParams) -> dict[str, Any]:
    """The costs as a dict, without the salt."""
    if isinstance(params, Pbkdf2):
        return {"type": "pbkdf2", "hash": params.hash, "iterations": params.iterations}
    return {"type": params.type, "time": params.time, "memory": params.memory,
            "cpus": params.cpus}


__all__ = ["LIMITS", "Argon2", "KdfParams", "Limits", "Pbkdf2", "benchmark", "check",
           "check_digest", "cost", "derive", "describe", "from_mapping", "resolve", "to_json"]
