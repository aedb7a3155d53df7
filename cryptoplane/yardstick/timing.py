"""What ``cryptoplane speed`` times, and how: a cell (an algorithm, an operation, a size),
the loops that run each path of it, and the timing of one loop.

The engine paths (``engine_paths``) build on these as much as ``speed`` does, so they
live apart from both.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from cryptoplane import _native
from cryptoplane.kernels.digests import hash_algorithm
from cryptoplane.keys import Key
from cryptoplane.plane import Plane

KIB = 1024
MIB = 1024 * KIB

AEADS = ("aes-128-gcm", "aes-192-gcm", "aes-256-gcm", "chacha20-poly1305")
XTS = ("aes-128-xts", "aes-256-xts")
SIGNATURES = {"rsa-pss-sha256": ("sign", "verify"), "rsa-pkcs1v15-sha256": ("sign", "verify"),
              "ecdsa-p256-sha256": ("sign",), "ecdsa-p384-sha384": ("sign",),
              "ed25519": ("sign",)}
HASHES = ("sha256", "sha384", "sha512", "sha3-256", "sha3-512")
MACS = ("hmac-sha256", "hmac-sha384", "hmac-sha512")
SUPPORTED = (*AEADS, *XTS, *SIGNATURES, *HASHES, *MACS)
KEY_BITS = {"rsa-pss-sha256": 2048, "rsa-pkcs1v15-sha256": 2048, "ecdsa-p256-sha256": 256,
            "ecdsa-p384-sha384": 384, "ed25519": 256}

Loop = Callable[[int], None]


@dataclass(frozen=True)
class Cell:
    """One row of the table: an algorithm, an operation and a size. ``size`` is bytes per
    request, the sector size for sector runs, and key bits for signatures."""

    algorithm: str
    op: str
    size: int
    nbytes: int  # payload per call; 0 where the figure is operations per second

    @property
    def unit(self) -> str:
        return "MB/s" if self.nbytes else "ops/s"

    @property
    def label(self) -> str:
        if not self.nbytes:
            return f"{self.size}-bit"
        text = size_label(self.size)
        return f"{text} sectors" if self.op.endswith("_sectors") else text

    def rate(self, calls: int, ns: int) -> float:
        """MB/s (10**6 bytes/s, as openssl counts) or operations/s."""
        ns = max(ns, 1)
        return calls * self.nbytes * 1e3 / ns if self.nbytes else calls * 1e9 / ns


@dataclass
class Result:
    cell: Cell
    path: str
    samples: list[float] = field(default_factory=list)  # one rate per round
    note: str | None = None  # why there is no figure, or how it was taken

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def best(self) -> float | None:
        return max(self.samples) if self.samples else None

    def row(self) -> dict[str, Any]:
        c, key = self.cell, ("mb_per_s" if self.cell.nbytes else "ops_per_s")
        med, best = self.median, self.best
        return {"algorithm": c.algorithm, "op": c.op, "size": c.size, "path": self.path,
                key: None if med is None else round(med, 3),
                f"best_{key}": None if best is None else round(best, 3),
                "rounds": len(self.samples), "note": self.note}


@dataclass
class Ratio:
    cell: Cell
    name: str  # "plane/direct", "plane/openssl", "plane/naive"
    value: float
    target: float | None

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.value >= self.target

    def row(self) -> dict[str, Any]:
        c = self.cell
        return {"algorithm": c.algorithm, "op": c.op, "size": c.size, "ratio": self.name,
                "value": round(self.value, 4), "target": self.target, "met": self.met}


def size_label(n: int) -> str:
    for unit, scale in (("MiB", MIB), ("KiB", KIB)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"




# -- the timed loops ----------------------------------------------------------------------
# Every path is a function running n calls as `f = <bound callable>; for _ in range(n):
# f(...)`, with its arguments in locals: direct and plane loops have the same shape, so
# any difference between them is the plane's own cost.

def _bound(fn: Callable[..., object], *args: object) -> Loop:
    # one body per arity: a star-call would add a cost the plane's loops do not pay
    if len(args) == 1:
        (a,) = args

        def loop1(n: int) -> None:
            f, x = fn, a
            for _ in range(n):
                f(x)
        return loop1
    if len(args) == 2:
        a, b = args

        def loop2(n: int) -> None:
            f, x, y = fn, a, b
            for _ in range(n):
                f(x, y)
        return loop2
    if len(args) == 3:
        a, b, c = args

        def loop3(n: int) -> None:
            f, x, y, z = fn, a, b, c
            for _ in range(n):
                f(x, y, z)
        return loop3
    a, b, c, d = args

    def loop4(n: int) -> None:
        f, x, y, z, w = fn, a, b, c, d
        for _ in range(n):
            f(x, y, z, w)
    return loop4


def _aead_loops(plane: Plane, cell: Cell) -> dict[str, Loop]:
    key = Key.generate(cell.algorithm)
    cls = ChaCha20Poly1305 if cell.algorithm == "chacha20-poly1305" else AESGCM
    lib = cls(key.export_raw())
    data, nonce = os.urandom(cell.nbytes), bytes(12)  # nonce reuse is harmless here

    def fast(n: int) -> None:
        enc, k, d, nn = plane.encrypt, key, data, nonce
        for _ in range(n):
            enc(k, d, nonce=nn)

    return {"direct": _bound(lib.encrypt, nonce, data, None), "plane": fast}


def _sector_loops(plane: Plane, cell: Cell, fallback: bool) -> dict[str, Loop]:
    key = Key.generate(cell.algorithm)
    raw, size = key.export_raw(), cell.size
    data, out = os.urandom(cell.nbytes), bytearray(cell.nbytes)
    # output into one reused buffer, as a volume does: a fresh 1 MiB result per call
    # would time page faults, not the cipher

    def fast(n: int) -> None:
        enc, k, d, o, s = plane.encrypt_sectors, key, data, out, size
        for _ in range(n):
            enc(k, d, sector=0, sector_size=s, out=o)

    def naive(n: int) -> None:
        view, o, s, count = memoryview(data), out, size, len(data) // size
        for _ in range(n):
            for i in range(count):
                off = i * s
                ctx = Cipher(algorithms.AES(raw), modes.XTS(i.to_bytes(16, "little"))).encryptor()
                o[off:off + s] = ctx.update(view[off:off + s])
                ctx.finalize()

    loops = {"direct": _bound(_native.XtsKey(raw).encrypt, data, 0, size, out), "plane": fast,
             "naive": naive}
    if fallback:
        loops["fallback"] = _bound(_native.PythonXtsKey(raw).encrypt, data, 0, size, out)
    return loops


def _signature_loops(plane: Plane, cell: Cell) -> dict[str, Loop]:
    key = Key.generate(cell.algorithm, size=cell.size if cell.size >= 1024 else None)
    priv: Any = key.cryptography_key()
    msg = os.urandom(64)
    args: tuple[object, ...] = ()
    if cell.algorithm.startswith("rsa"):
        h = hashes.SHA256()
        # the same padding the plane's kernel uses: PSS with salt = digest length
        pad = (padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size)
               if cell.algorithm.startswith("rsa-pss") else padding.PKCS1v15())
        args = (pad, h)
    elif cell.algorithm.startswith("ecdsa"):
        args = (ec.ECDSA(hashes.SHA384() if "384" in cell.algorithm else hashes.SHA256()),)
    if cell.op == "sign":
        def sign(n: int) -> None:
            s, k, m = plane.sign, key, msg
            for _ in range(n):
                s(k, m)
        return {"direct": _bound(priv.sign, msg, *args), "plane": sign}
    sig = priv.sign(msg, *args)

    def verify(n: int) -> None:
        v, k, m, g = plane.verify, key, msg, sig
        for _ in range(n):
            v(k, m, g)
    return {"direct": _bound(priv.public_key().verify, sig, msg, *args), "plane": verify}


def _hash_loops(plane: Plane, cell: Cell) -> dict[str, Loop]:
    data = os.urandom(cell.nbytes)
    alg = hash_algorithm(cell.algorithm)

    def direct(n: int) -> None:
        new, a, d = hashes.Hash, alg, data
        for _ in range(n):
            h = new(a)
            h.update(d)
            h.finalize()

    def fast(n: int) -> None:
        dg, name, d = plane.digest, cell.algorithm, data
        for _ in range(n):
            dg(name, d)

    return {"direct": direct, "plane": fast}


def _mac_loops(plane: Plane, cell: Cell) -> dict[str, Loop]:
    key = Key.generate(cell.algorithm)
    raw, data = key.export_raw(), os.urandom(cell.nbytes)
    alg = hash_algorithm(cell.algorithm.removeprefix("hmac-"))

    def direct(n: int) -> None:
        new, k, a, d = hmac.HMAC, raw, alg, data
        for _ in range(n):
            h = new(k, a)
            h.update(d)
            h.finalize()

    def fast(n: int) -> None:
        mac, k, d = plane.mac, key, data
        for _ in range(n):
            mac(k, d)

    return {"direct": direct, "plane": fast}


def loops_for(plane: Plane, cell: Cell) -> dict[str, Loop]:
    if cell.algorithm in AEADS:
        return _aead_loops(plane, cell)
    if cell.algorithm in XTS:
        # with the Python backend, direct already is the fallback
        return _sector_loops(plane, cell, _native.BACKEND == "native")
    if cell.algorithm in SIGNATURES:
        return _signature_loops(plane, cell)
    if cell.algorithm in HASHES:
        return _hash_loops(plane, cell)
    return _mac_loops(plane, cell)


# -- timing -------------------------------------------------------------------------------

def timed(loop: Loop, n: int) -> int:
    # the collector would charge one path for another's garbage, as timeit avoids too
    enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter_ns()
        loop(n)
        return time.perf_counter_ns() - t0
    finally:
        if enabled:
            gc.enable()


def calibrate(loop: Loop, chunk_ns: int) -> tuple[int, float]:
    """(calls per timed chunk, ns per call), after a warm-up call (first use makes the
    plane's session, faults pages in and fills caches)."""
    loop(1)
    n = 1
    while True:
        ns = timed(loop, n)
        if ns * 8 >= chunk_ns or n >= 1 << 24:
            per_call = ns / n
            return max(1, math.ceil(chunk_ns / max(per_call, 1.0))), per_call
        n *= 4


def paired_ratio(num: Result, den: Result) -> float:
    """``num`` over ``den``: the median of per-round ratios where both were timed in the
    same rounds (each round's two figures back to back), else the ratio of medians."""
    if len(num.samples) == len(den.samples):
        return statistics.median(n / d for n, d in zip(num.samples, den.samples, strict=True))
    return num.median / den.median  # type: ignore[operator]
