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
  (``cryptoplane.yardstick.engine_paths``).

These machines are shared and noisy, so paths are timed interleaved, in several short
rounds, and the median round is reported (the best is kept too); ratios between two Python
paths are the median of per-round ratios, so that drift between rounds cancels out.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cryptography
from cryptography.hazmat.backends.openssl import backend as _crypto_backend

from cryptoplane import _native
from cryptoplane._version import __version__
from cryptoplane.plane import Plane
from cryptoplane.yardstick import engine_paths as se
from cryptoplane.yardstick.openssl_speed import OpenSSLSpeed, system_openssl
from cryptoplane.yardstick.timing import (
    AEADS,
    HASHES,
    KEY_BITS,
    KIB,
    MIB,
    SIGNATURES,
    XTS,
    Cell,
    Loop,
    Ratio,
    Result,
    calibrate,
    loops_for,
    paired_ratio,
    timed,
)

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

Progress = Callable[[int, int, str], None]


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
    engines: tuple[str, ...] = ()  # engine paths (engine_paths.PATHS); () = none

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
            results[path].samples.append(cell.rate(counts[path], timed(loops[path],
                                                                        counts[path])))
        if openssl is not None and rnd == rounds // 2:
            ossl = openssl()  # in the middle of the rounds: the same machine weather
    out = list(results.values())
    if ossl is not None:
        out.append(ossl)
    gc.collect()
    return out


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


# -- openssl speed (openssl_speed.py) -------------------------------------------------

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
