"""Throughput of the sector kernel against `openssl speed`, measured side by side.

    python benchmarks/native_sectors.py [--seconds 0.5] [--repeat 3] [--check]

Prints MB/s (10**6 bytes/s) for AES-256-XTS encryption of whole runs of sectors:
the native kernel, the pure-Python fallback, a naive loop (a new `cryptography`
Cipher per sector, which is what the kernel replaces), `openssl speed -evp`, and the
native kernel driven by two threads on one key.  Each figure is the best of
--repeat timed loops of about --seconds each; machines are noisy, so ratios between
figures taken in the same run are what count.  --check exits 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

# Run from a checkout without installing: the package sits next to benchmarks/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cryptoplane import _native

MIB = 1 << 20

# Targets from the kernel's brief: ratios, never absolute speeds.
TARGET_VS_OPENSSL = {4096: 0.80, 512: 0.60}
TARGET_VS_NAIVE = 15.0


def rate(fn: Callable[[], object], nbytes: int, seconds: float, repeat: int) -> float:
    """Best bytes/s over `repeat` loops of at least `seconds` each."""
    fn()  # warm: pools, page faults, first-call costs
    best = 0.0
    for _ in range(repeat):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        best = max(best, calls * nbytes / elapsed)
    return best


def openssl_speed(nbytes: int, repeat: int) -> float | None:
    """`openssl speed -evp aes-256-xts` in bytes/s (it prints 1000s of bytes/s)."""
    exe = shutil.which("openssl")
    if exe is None:
        return None
    best = 0.0
    for _ in range(repeat):
        cmd = [exe, "speed", "-evp", "aes-256-xts", "-bytes", str(nbytes), "-seconds", "1"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        match = re.search(r"^AES-256-XTS\s+([\d.]+)k", out, re.MULTILINE | re.IGNORECASE)
        if match is None:
            raise RuntimeError(f"cannot parse openssl speed output:\n{out}")
        best = max(best, float(match.group(1)) * 1000)
    return best


def naive_loop(key: bytes, data: bytes, sector_size: int) -> bytes:
    """Per-sector key setup: the cost the native kernel exists to remove."""
    parts = []
    for i in range(len(data) // sector_size):
        tweak = i.to_bytes(8, "little") + bytes(8)
        enc = Cipher(algorithms.AES(key), modes.XTS(tweak)).encryptor()
        parts.append(enc.update(data[i * sector_size : (i + 1) * sector_size]) + enc.finalize())
    return b"".join(parts)


def two_threads(key: _native.fallback.XtsKey, data: bytes, ss: int, seconds: float) -> float:
    """Aggregate bytes/s of two threads encrypting with the same key at once."""
    counts = [0, 0]
    stop = time.perf_counter() + seconds
    barrier = threading.Barrier(3)

    def work(slot: int) -> None:
        out = bytearray(len(data))
        barrier.wait()
        while time.perf_counter() < stop:
            key.encrypt(data, slot << 32, ss, out)
            counts[slot] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    start = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    return sum(counts) * len(data) / (time.perf_counter() - start)


def mbs(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1e6:10.1f} MB/s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)

    print(f"backend: {_native.BACKEND} {_native.BACKEND_REASON}".rstrip())
    if _native.NativeXtsKey is not None:
        from cryptoplane._native import _sectors

        print(f"libcrypto: {_sectors.openssl_version()}; dispatch: {_sectors.DISPATCH}")
    key = os.urandom(64)
    misses: list[str] = []
    results: dict[str, float | None] = {}

    for ss in (512, 4096):
        ossl = openssl_speed(ss, 2)
        results[f"openssl {ss}"] = ossl
        print(f"\n-- {ss}-byte sectors, AES-256-XTS --")
        print(f"openssl speed -evp -bytes {ss:<5}          {mbs(ossl)}")
        native_1m: float | None = None
        if _native.NativeXtsKey is not None:
            nk = _native.NativeXtsKey(key)
            for size in (MIB, 4 * MIB):
                data, out = os.urandom(size), bytearray(size)
                run = partial(nk.encrypt, data, 0, ss, out)
                r = rate(run, size, args.seconds, args.repeat)
                label = f"native {size // MIB} MiB runs"
                ratio = f"  {r / ossl:5.2f}x openssl" if ossl else ""
                print(f"{label:<40}{mbs(r)}{ratio}")
                if size == MIB:
                    native_1m = r
        data = os.urandom(MIB)
        pk = _native.PythonXtsKey(key)
        fb = rate(partial(pk.encrypt, data, 0, ss), MIB, args.seconds, 1)
        naive = rate(partial(naive_loop, key, data, ss), MIB, args.seconds, 1)
        print(f"{'fallback (python) 1 MiB runs':<40}{mbs(fb)}")
        print(f"{'naive loop (Cipher per sector) 1 MiB':<40}{mbs(naive)}")
        if native_1m is not None:
            print(
                f"native / naive: {native_1m / naive:.1f}x   "
                f"native / fallback: {native_1m / fb:.1f}x"
            )
            if ossl and native_1m / ossl < TARGET_VS_OPENSSL[ss]:
                misses.append(f"{ss}: native {native_1m / ossl:.2f}x openssl")
            if native_1m / naive < TARGET_VS_NAIVE:
                misses.append(f"{ss}: native {native_1m / naive:.1f}x naive")

    if _native.NativeXtsKey is not None:
        nk = _native.NativeXtsKey(key)
        data = os.urandom(4 * MIB)
        out = bytearray(len(data))
        one = rate(partial(nk.encrypt, data, 0, 4096, out), len(data), 0.5, 3)
        two = max(two_threads(nk, data, 4096, 1.0) for _ in range(args.repeat))
        print("\n-- one XtsKey, 4 MiB runs of 4096-byte sectors --")
        print(f"{'1 thread':<40}{mbs(one)}")
        print(f"{'2 threads, same key':<40}{mbs(two)}  {two / one:.2f}x (cores: {os.cpu_count()})")
    else:
        misses.append("native kernel unavailable")

    if misses:
        print("\nMISSED: " + "; ".join(misses))
    else:
        print("\nall targets met")
    return 1 if args.check and misses else 0


if __name__ == "__main__":
    sys.exit(main())
