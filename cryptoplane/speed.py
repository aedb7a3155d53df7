"""The yardstick: the plane's fast path beside the bare library and ``openssl speed``.

For each algorithm and request size it times, in one run and on the same keys:

* ``direct``: the bare ``cryptography`` call on an object made once (``AESGCM(k).encrypt``,
  ``rsa_key.sign(msg, PSS(...), SHA256())``); for sector runs, the sector kernel itself;
* ``plane``: the plane's synchronous fast path (``plane.encrypt(key, data, nonce=n)``...);
* ``naive`` (sector runs): a new ``Cipher(AES(k), XTS(tweak))`` per sector in a Python
  loop, which is what Python code does without cryptoplane;
* ``fallback`` (sector runs): the pure-Python sector kernel;
* ``openssl``: ``openssl speed`` run in the same session, its output parsed;
* with ``Config.engines``: one path per engine (``inline``, ``threads``, ``pool``,
  ``auto``), each on a plane of its own, work submitted concurrently
  (``cryptoplane.speed_engines``).

These machines are shared and noisy, so paths are timed interleaved, in several short
rounds, and the median round is reported (the best is kept too); ratios between two Python
paths are the median of per-round ratios, so that drift between rounds cancels out.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cryptography
from cryptography.hazmat.backends.openssl import backend as _crypto_backend
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from . import __version__, _native
from .kernels.digests import hash_algorithm
from .keys import Key
from .plane import Plane
from .speed_openssl import OpenSSLSpeed, system_openssl
from .speed_openssl import parse_openssl_bytes as parse_openssl_bytes  # re-exported
from .speed_openssl import parse_openssl_signatures as parse_openssl_signatures

KIB = 1024
MIB = 1024 * KIB
DEFAULT_SIZES = (64, KIB, 16 * KIB, MIB)
DEFAULT_SECTOR_SIZES = (512, 4096)
SECTOR_RUN = MIB  # bytes per encrypt_sectors call: a large sequential I/O
DEFAULT_ALGORITHMS = ("aes-256-gcm", "aes-128-gcm", "chacha20-poly1305", "aes-256-xts",
                      "rsa-pss-sha256", "ecdsa-p256-sha256", "ed25519", "sha256",
                      "hmac-sha256")
QUICK_ALGORITHMS = ("aes-256-gcm", "aes-256-xts", "rsa-pss-sha256")
QUICK_SIZES = (64, 16 * KIB)
QUICK_SECTOR_SIZES = (4096,)
QUICK_SECONDS = 0.2
DEFAULT_SECONDS = 1.0
DEFAULT_ROUNDS = 10
MIN_CHUNK_S = 0.02  # shorter timed chunks measure the timer and the scheduler

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
# The acceptance targets: (algorithm, op, size, ratio) -> the least acceptable value.
TARGETS: dict[tuple[str, str, int, str], float] = {
    ("aes-256-gcm", "encrypt", KIB, "plane/direct"): 0.70,
    ("aes-256-gcm", "encrypt", 16 * KIB, "plane/direct"): 0.95,
    ("aes-256-gcm", "encrypt", MIB, "plane/direct"): 0.95,
    ("rsa-pss-sha256", "sign", 2048, "plane/direct"): 0.95,
    ("ecdsa-p256-sha256", "sign", 256, "plane/direct"): 0.95,
    ("aes-256-xts", "encrypt_sectors", 4096, "plane/openssl"): 0.80,
    ("aes-256-xts", "encrypt_sectors", 4096, "plane/naive"): 15.0,
    ("aes-256-xts", "encrypt_sectors", 512, "plane/openssl"): 0.60,
}

Loop = Callable[[int], None]
Progress = Callable[[int, int, str], None]


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


@dataclass
class Config:
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    sizes: tuple[int, ...] = DEFAULT_SIZES
    sector_sizes: tuple[int, ...] = DEFAULT_SECTOR_SIZES
    seconds: float = DEFAULT_SECONDS  # per path per cell, split over the rounds
    rounds: int = DEFAULT_ROUNDS
    engine: str = "inline"  # the plane path's engine
    openssl: bool = True
    all_paths: bool = False
    engines: tuple[str, ...] = ()  # engine paths (speed_engines.PATHS); () = none

    @property
    def effective_rounds(self) -> int:
        """``rounds``, fewer where that would make a timed chunk shorter than 20 ms."""
        return max(1, min(self.rounds, int(self.seconds / MIN_CHUNK_S)))

    @property
    def chunk_ns(self) -> int:
        return max(1, int(self.seconds / self.effective_rounds * 1e9))


@dataclass
class Report:
    meta: dict[str, Any]
    results: list[Result]
    ratios: list[Ratio]

    def figure(self, algorithm: str, op: str, size: int, path: str) -> Result | None:
        for r in self.results:
            c = r.cell
            if (c.algorithm, c.op, c.size, r.path) == (algorithm, op, size, path):
                return r
        return None

    def overhead_ns(self) -> dict[str, float] | None:
        """Per-call cost of the plane over the bare call, AES-256-GCM on 64 bytes: the
        median of per-round differences (each pair was timed back to back)."""
        direct = self.figure("aes-256-gcm", "encrypt", 64, "direct")
        plane = self.figure("aes-256-gcm", "encrypt", 64, "plane")
        if direct is None or plane is None or not direct.samples or not plane.samples:
            return None
        per_call = [(64e3 / p - 64e3 / d) for d, p in zip(direct.samples, plane.samples,
                                                            strict=False)]
        return {"direct_ns": 64e3 / direct.median,  # type: ignore[operator]
                "plane_ns": 64e3 / plane.median,  # type: ignore[operator]
                "overhead_ns": statistics.median(per_call)}

    def targets_missed(self) -> list[Ratio]:
        return [r for r in self.ratios if r.met is False]

    def to_json(self) -> dict[str, Any]:
        return {"meta": {**self.meta, "fast_path_overhead": self.overhead_ns()},
                "rows": [r.row() for r in self.results],
                "ratios": [r.row() for r in self.ratios]}


# -- configuration ------------------------------------------------------------------------

def size_label(n: int) -> str:
    for unit, scale in (("MiB", MIB), ("KiB", KIB)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def cells(config: Config) -> list[Cell]:
    out: list[Cell] = []
    for name in config.algorithms:
        if name in XTS:
            out += [Cell(name, "encrypt_sectors", s, SECTOR_RUN) for s in config.sector_sizes]
        elif name in SIGNATURES:
            out += [Cell(name, op, KEY_BITS[name], 0) for op in SIGNATURES[name]]
        else:
            op = "encrypt" if name in AEADS else "digest" if name in HASHES else "mac"
            out += [Cell(name, op, s, s) for s in config.sizes]
    return out


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

def _time(loop: Loop, n: int) -> int:
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
        ns = _time(loop, n)
        if ns * 8 >= chunk_ns or n >= 1 << 24:
            per_call = ns / n
            return max(1, math.ceil(chunk_ns / max(per_call, 1.0))), per_call
        n *= 4


def measure_cell(cell: Cell, loops: dict[str, Loop], config: Config,
                 openssl: Callable[[], Result] | None) -> list[Result]:
    chunk = config.chunk_ns
    counts: dict[str, int] = {}
    results = {p: Result(cell, p) for p in loops}
    for path, loop in loops.items():
        counts[path], per_call = calibrate(loop, chunk)
        if path == "fallback" and per_call > chunk and not config.all_paths:
            results[path].note = (f"skipped: {per_call / 1e6:.0f} ms per call is longer than "
                                  "a round; --all-paths measures it")
            del counts[path]
    order = list(counts)
    ossl: Result | None = None
    rounds = config.effective_rounds
    for rnd in range(rounds):
        # alternate the order so that no path always runs after the same neighbour
        for path in order if rnd % 2 == 0 else order[::-1]:
            results[path].samples.append(cell.rate(counts[path], _time(loops[path],
                                                                        counts[path])))
        if openssl is not None and rnd == rounds // 2:
            ossl = openssl()  # in the middle of the rounds: the same machine weather
    out = list(results.values())
    if ossl is not None:
        out.append(ossl)
    gc.collect()
    return out


def paired_ratio(num: Result, den: Result) -> float:
    """``num`` over ``den``: the median of per-round ratios where both were timed in the
    same rounds (each round's two figures back to back), else the ratio of medians."""
    if len(num.samples) == len(den.samples):
        return statistics.median(n / d for n, d in zip(num.samples, den.samples, strict=True))
    return num.median / den.median  # type: ignore[operator]


def ratios(cell: Cell, results: Sequence[Result]) -> list[Ratio]:
    by = {r.path: r for r in results if r.samples}
    plane = by.get("plane")
    out: list[Ratio] = []
    if plane is None:
        return out
    for other in ("direct", "openssl", "naive"):
        base = by.get(other)
        if base is None:
            continue
        name = f"plane/{other}"
        out.append(Ratio(cell, name, paired_ratio(plane, base),
                         TARGETS.get((cell.algorithm, cell.op, cell.size, name))))
    return out


# -- openssl speed (cryptoplane.speed_openssl) ------------------------------------------

def measure_openssl(ossl: OpenSSLSpeed, cell: Cell) -> Result:
    value, note = ossl.figure(cell.algorithm, cell.op, cell.size, bool(cell.nbytes))
    return Result(cell, "openssl", [] if value is None else [value], note)


# -- the run ------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Neighbours:
    """CPU that other processes took during a run, in cores: a neighbour on one of two
    cores caps any scaling ratio near 1x. Linux only (``/proc``); None elsewhere."""

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        """(wall seconds, machine busy CPU seconds, ours: this process and descendants)."""
        try:
            with open("/proc/stat", encoding="ascii") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
            tick = os.sysconf("SC_CLK_TCK")
            busy = (sum(fields[:8]) - fields[3] - fields[4]) / tick  # less idle, iowait
            parents: dict[int, int] = {}
            cpu: dict[int, float] = {}
            for entry in os.scandir("/proc"):
                if entry.name.isdigit():
                    try:
                        with open(f"/proc/{entry.name}/stat", encoding="ascii") as f:
                            rest = f.read().rsplit(")", 1)[1].split()
                    except OSError:  # gone meanwhile
                        continue
                    pid = int(entry.name)
                    parents[pid] = int(rest[1])
                    cpu[pid] = (int(rest[11]) + int(rest[12])) / tick  # utime, stime
        except (OSError, ValueError, IndexError):
            return None
        me, ours = os.getpid(), 0.0
        for pid in cpu:  # pool workers descend from us through the forkserver
            p = pid
            while p > 1 and p != me:
                p = parents.get(p, 0)
            if p == me:
                ours += cpu[pid]
        return time.monotonic(), busy, ours

    def cores(self) -> float | None:
        end = self._sample()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return None
        # our exited children's time is lost from the tally: a slight over-estimate
        other = (end[1] - self._start[1]) - (end[2] - self._start[2])
        return round(max(0.0, other) / (end[0] - self._start[0]), 2)


def metadata(config: Config) -> dict[str, Any]:
    return {
        "cryptoplane": __version__,
        "cryptography": cryptography.__version__,
        "cryptography_openssl": _crypto_backend.openssl_version_text(),
        "system_openssl": system_openssl(),
        "sector_kernel": {"backend": _native.BACKEND, "reason": _native.BACKEND_REASON,
                          "openssl": _native.openssl_version()},
        "cpu": {"model": cpu_model(), "cores": os.cpu_count()},
        "python": platform.python_version(),
        "engine": config.engine,
        "engine_paths": list(config.engines),
        "seconds_per_cell": config.seconds,
        "rounds": config.effective_rounds,
        "chunk_ms": config.chunk_ns / 1e6,
        "statistic": "median of rounds (best kept); Python ratios are medians of "
                     "per-round ratios",
        "sector_run_bytes": SECTOR_RUN,
        "openssl_command": "openssl speed -elapsed -seconds S (-evp ALG | -hmac H) -bytes N"
                           " | rsa2048 | ecdsap256 | ed25519",
    }


def run(config: Config, progress: Progress | None = None) -> Report:
    """Measure every cell of ``config``; ``progress(done, total, label)`` before each."""
    from . import speed_engines as se  # built on this module: imported when needed

    started, neighbours = time.perf_counter(), Neighbours()
    meta = metadata(config)
    todo = cells(config)
    ossl = OpenSSLSpeed(config.seconds) if config.openssl else None
    results: list[Result] = []
    ratio_rows: list[Ratio] = []
    # the engine planes start once, before any cell: pool workers take a while to start
    with (Plane(engines=[config.engine]) as plane,
          se.EnginePaths(config.engines, min(se.WARMUP_S, config.seconds)) as engines):
        for i, cell in enumerate(todo):
            if progress is not None:
                progress(i, len(todo), f"{cell.algorithm} {cell.op} {cell.label}")
            loops = loops_for(plane, cell)
            extra = engines.prepare(cell)  # warmed up: the balancer has its estimates
            openssl_cb = (lambda c=cell: measure_openssl(ossl, c)) if ossl is not None \
                else None
            got = measure_cell(cell, {**loops, **extra.loops}, config, openssl_cb)
            if ossl is None:
                got.append(Result(cell, "openssl", note="not measured (--no-openssl)"))
            ratio_rows += ratios(cell, got) + engines.finish(cell, extra, got)
            results += got
        meta["engine_planes"] = engines.describe()
    if config.engines:
        meta["engine_warmup_s"] = engines.warmup_s
        meta["engine_usage"] = engines.usage
    if progress is not None:
        progress(len(todo), len(todo), "done")
    meta["elapsed_s"] = round(time.perf_counter() - started, 2)
    meta["other_processes_cores"] = neighbours.cores()
    return Report(meta, results, ratio_rows)
