"""What the plane's fast path adds to one AEAD call, native trampoline vs pure Python.

    python benchmarks/fastpath.py [--algorithm aes-256-gcm] [--op encrypt]
        [--sizes 64,1k,16k,1m] [--rounds 15] [--seconds 0.02] [--json] [--check]

Three paths on the same data, timed in interleaved rounds (each round times every path
once, in a rotating order, so drift and noise hit them alike):

* direct: the library's bound method, ``AESGCM(key).encrypt(nonce, data, None)``;
* native: ``plane.encrypt(key, data, nonce=nonce)`` with the C trampoline
  (``cryptoplane._native._fastpath``);
* python: the same call on a Plane whose encrypt/decrypt are the pure-Python methods
  (they count through the session's Tally, the C one unless ``CRYPTOPLANE_NO_NATIVE=1``:
  run with it set for the numbers of an install without the native module).

Per size: the median ns per call of each path, the overhead (median of the per-round
differences to direct) and plane/direct (throughput ratio, direct time / plane time).
Targets: native plane/direct >= 0.95 at 16 KiB and >= 0.70 at 1 KiB; --check exits 1
when one is missed or when the native trampoline is not available.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import timeit
from pathlib import Path
from typing import Any

# Run from a checkout without installing: the package sits next to benchmarks/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cryptoplane as cp
from cryptoplane import _native
from cryptoplane.plane import Plane

TARGETS = {1024: 0.70, 16 * 1024: 0.95}
PATHS = ("direct", "native", "python")


class PythonPlane(Plane):
    """A Plane with the pure-Python fast path, whatever _native provides."""

    encrypt = Plane._encrypt_py  # type: ignore[assignment]
    decrypt = Plane._decrypt_py  # type: ignore[assignment]


def parse_size(text: str) -> int:
    text = text.strip().lower()
    mult = {"k": 1024, "m": 1024 * 1024}.get(text[-1:], 1)
    return int(text[:-1] if mult > 1 else text) * mult


def calibrate(timer: timeit.Timer, seconds: float) -> int:
    n = 1
    while True:
        if timer.timeit(n) >= seconds / 4:
            return max(1, int(n * 4))
        n *= 4


def measure(algorithm: str, op: str, size: int, rounds: int, seconds: float,
            native: Plane | None, python: Plane) -> dict[str, Any]:
    material = cp.Key.generate(algorithm).export_raw()  # one key, one Key object per plane
    key_n, key_p = cp.Key(algorithm, material), cp.Key(algorithm, material)
    nonce = os.urandom(12)
    data = os.urandom(size)
    if op == "decrypt":
        data = python.encrypt(key_p, data, nonce=nonce)
    planes = {"native": (native, key_n), "python": (python, key_p)}
    for plane, key in planes.values():
        if plane is not None:
            getattr(plane, op)(key, data, nonce=nonce)  # bind the session: fast path from now
    direct = getattr(key_p.session_hint, op[:3])  # the library's own bound method
    env = {"f": direct, "n": nonce, "d": data, "np": native, "kn": key_n, "pp": python,
           "kp": key_p}
    stmts = {
        "direct": "f(n, d, None)",
        "native": f"np.{op}(kn, d, nonce=n)",
        "python": f"pp.{op}(kp, d, nonce=n)",
    }
    paths = [p for p in PATHS if p != "native" or native is not None]
    timers = {p: timeit.Timer(stmts[p], globals=env) for p in paths}
    number = {p: calibrate(timers[p], seconds) for p in paths}
    ns: dict[str, list[float]] = {p: [] for p in paths}
    for r in range(rounds):
        for i in range(len(paths)):
            p = paths[(i + r) % len(paths)]
            ns[p].append(timers[p].timeit(number[p]) / number[p] * 1e9)
    out: dict[str, Any] = {"size": size}
    for p in paths:
        out[p] = statistics.median(ns[p])
        if p != "direct":
            out[f"{p}_overhead"] = statistics.median(
                t - d for t, d in zip(ns[p], ns["direct"], strict=True))
            out[f"{p}_ratio"] = statistics.median(
                d / t for t, d in zip(ns[p], ns["direct"], strict=True))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--algorithm", default="aes-256-gcm",
                    choices=["aes-128-gcm", "aes-256-gcm", "chacha20-poly1305"])
    ap.add_argument("--op", default="encrypt", choices=["encrypt", "decrypt"])
    ap.add_argument("--sizes", default="64,1k,16k,1m")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--seconds", type=float, default=0.02, help="per path per round")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    a = ap.parse_args(argv)
    sizes = [parse_size(s) for s in a.sizes.split(",")]

    with Plane(self_test=False) as native_plane, PythonPlane(self_test=False) as py_plane:
        native = native_plane if _native.FAST_PATH == "native" else None
        rows = [measure(a.algorithm, a.op, size, a.rounds, a.seconds, native, py_plane)
                for size in sizes]

    missed = []
    if native is None:
        missed.append(f"native trampoline not in use: {_native.FAST_PATH_REASON}")
    for row in rows:
        target = TARGETS.get(row["size"])
        if target is not None and native is not None and row["native_ratio"] < target:
            missed.append(f"{row['size']} B: plane/direct {row['native_ratio']:.3f} "
                          f"< {target}")
    if a.json:
        print(json.dumps({"algorithm": a.algorithm, "op": a.op, "rounds": a.rounds,
                          "fast_path": _native.FAST_PATH, "rows": rows, "missed": missed},
                         indent=2))
    else:
        print(f"{a.algorithm} {a.op}: median of {a.rounds} interleaved rounds, ns per call "
              f"(fast path: {_native.FAST_PATH})")
        print(f"{'size':>8} {'direct':>10} {'native':>10} {'python':>10} "
              f"{'+native':>8} {'+python':>8} {'nat/dir':>8} {'py/dir':>8}")
        for row in rows:
            nat = (f"{row['native']:10.1f}", f"{row['native_overhead']:8.1f}",
                   f"{row['native_ratio']:8.3f}") if native is not None else ("-",) * 3
            print(f"{row['size']:>8} {row['direct']:10.1f} {nat[0]:>10} "
                  f"{row['python']:10.1f} {nat[1]:>8} {row['python_overhead']:8.1f} "
                  f"{nat[2]:>8} {row['python_ratio']:8.3f}")
        for m in missed:
            print(f"MISSED: {m}")
    return 1 if a.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
