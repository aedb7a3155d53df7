"""Throughput of ``Volume`` (the user-space dm-crypt data path) against its parts.

    python benchmarks/volume_device.py [--size-mib 1024] [--dir /dev/shm] [--seconds 1]
                                       [--repeat 3] [--profile]

On one image (random ciphertext, ``--size-mib`` of data after a 16 MiB header area) it
measures, side by side:

* raw file: ``os.preadv`` / ``os.pwrite`` of 1 MiB requests (the I/O floor);
* the XTS kernel alone: ``plane.decrypt_sectors`` / ``encrypt_sectors`` on 1 MiB in
  place (the cipher floor), and ``openssl speed -evp aes-256-xts -bytes 4096``;
* ``Volume.preadinto`` / ``Volume.pwrite`` of 1 MiB, for 4096- and 512-byte sectors, and
  its ratio to the budget ``1 / (1/raw + 1/xts)`` (raw I/O then cipher, one core);
* 4 KiB random reads per second, single-threaded, raw and through ``Volume``; and
  aligned 1 MiB reads from two threads (the GIL is released in the I/O and the cipher).

MiB/s throughout (2**20 bytes). Each figure is the best of ``--repeat`` loops of about
``--seconds``; the machine is shared, so the ratios within one run are what count.
``--profile`` adds a cProfile of the aligned 1 MiB read loop.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cryptoplane as cp
from cryptoplane.volume.device import Volume
from cryptoplane.volume.layout import DataLayout

MIB = 1 << 20
HEADER = 16 * MIB
REQ = MIB


def best_rate(fn: Callable[[], int], seconds: float, repeat: int) -> float:
    """Best bytes/s over ``repeat`` loops; ``fn`` returns the bytes one call moved."""
    best = 0.0
    for _ in range(repeat):
        moved, start = 0, time.perf_counter()
        deadline = start + seconds
        while True:
            moved += fn()
            now = time.perf_counter()
            if now >= deadline:
                break
        best = max(best, moved / (now - start))
    return best


def sequential(step: Callable[[int], object], size: int) -> Callable[[], int]:
    """Calls ``step(offset)`` over ``[0, size)`` in REQ steps, wrapping around."""
    state = [0]

    def one() -> int:
        step(state[0])
        state[0] = (state[0] + REQ) % size
        return REQ

    return one


def threaded_read(vol: Volume, size: int, seconds: float, threads: int = 2) -> float:
    """Aggregate bytes/s of ``threads`` threads each reading 1 MiB requests of its own
    half of the volume."""
    moved = [0] * threads
    stop = time.perf_counter() + seconds

    def work(t: int) -> None:
        buf = bytearray(REQ)
        span = size // threads
        o = 0
        while time.perf_counter() < stop:
            vol.preadinto(t * span + o, buf)
            moved[t] += REQ
            o = (o + REQ) % span

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    start = time.perf_counter()
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    return sum(moved) / (time.perf_counter() - start)


def openssl_xts(seconds: int) -> float | None:
    """``openssl speed -evp aes-256-xts -bytes 4096`` in MiB/s, or None without it."""
    if shutil.which("openssl") is None:
        return None
    out = subprocess.run(["openssl", "speed", "-evp", "aes-256-xts", "-bytes", "4096",
                          "-seconds", str(seconds)], capture_output=True, text=True,
                         timeout=120, check=False).stdout
    m = re.search(r"^aes-256-xts\s+([\d.]+)k", out, re.M | re.I)
    return float(m.group(1)) * 1000 / MIB if m else None


def make_image(directory: str, size: int) -> Path:
    fd, name = tempfile.mkstemp(prefix="cp-volume-bench-", suffix=".img", dir=directory)
    with os.fdopen(fd, "wb") as f:
        f.truncate(HEADER)
        f.seek(HEADER)
        chunk = os.urandom(16 * MIB)  # ciphertext is indistinguishable from this
        for _ in range(size // len(chunk)):
            f.write(chunk)
    return Path(name)


def interleaved(fns: dict[str, Callable[[], int]], seconds: float,
                repeat: int) -> dict[str, float]:
    """Best bytes/s (or ops/s) of each function, the functions taking turns round by
    round so that the machine's changing load falls on all of them alike."""
    best = dict.fromkeys(fns, 0.0)
    for _ in range(repeat):
        for name, fn in fns.items():
            best[name] = max(best[name], best_rate(fn, seconds, 1))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--chunk-kib", type=int, default=1024,
                    help="Volume's region/chunk size (its default: 1024)")
    args = ap.parse_args()
    size = args.size_mib * MIB
    sec, rep = args.seconds, args.repeat
    img = make_image(args.dir, size)

    def row(name: str, value: float, note: str = "") -> None:
        print(f"{name:44s} {value:12,.0f} {note}", flush=True)

    fd = os.open(img, os.O_RDWR)
    try:
        print(f"image {img} ({args.size_mib} MiB data), {os.cpu_count()} cores, load "
              f"{os.getloadavg()[0]:.2f}; MiB/s unless marked", flush=True)
        ossl = openssl_xts(max(1, round(sec)))
        if ossl:
            row("openssl speed -evp aes-256-xts 4096", ossl)
        buf = bytearray(REQ)
        view = memoryview(buf)
        data = os.urandom(REQ)
        small = memoryview(bytearray(4096))
        nblk = size // 4096
        rng = random.Random(1)
        raw_read = sequential(lambda o: os.preadv(fd, [view], HEADER + o) and None, size)
        raw_write = sequential(lambda o: os.pwrite(fd, data, HEADER + o) and None, size)

        def raw_4k() -> int:
            os.preadv(fd, [small], HEADER + rng.randrange(nblk) * 4096)
            return 1

        with cp.Plane() as plane:
            key_bytes = os.urandom(64)
            key = cp.Key("aes-256-xts", key_bytes)
            for ss in (4096, 512):
                layout = DataLayout("aes-xts-plain64", key_bytes, HEADER, size, ss, 0)
                with Volume(img, layout, plane, chunk=args.chunk_kib * 1024) as vol:

                    def dec(ss: int = ss) -> int:
                        plane.decrypt_sectors(key, buf, sector=0, sector_size=ss, out=buf)
                        return REQ

                    def enc(ss: int = ss) -> int:
                        plane.encrypt_sectors(key, data, sector=0, sector_size=ss, out=buf)
                        return REQ

                    def vol_4k(v: Volume = vol) -> int:
                        v.preadinto(rng.randrange(nblk) * 4096, small)
                        return 1

                    r = interleaved({
                        "raw read": raw_read, "xts dec": dec,
                        "vol read": sequential(lambda o, v=vol: v.preadinto(o, buf), size),
                        "raw write": raw_write, "xts enc": enc,
                        "vol write": sequential(lambda o, v=vol: v.pwrite(o, data), size),
                        "raw 4k": raw_4k, "vol 4k": vol_4k,
                    }, sec, rep)
                    print(f"-- {ss}-byte sectors (load {os.getloadavg()[0]:.2f})")
                    row("raw preadv 1 MiB", r["raw read"] / MIB)
                    row("plane xts decrypt 1 MiB in place", r["xts dec"] / MIB)
                    budget = 1 / (1 / r["raw read"] + 1 / r["xts dec"])
                    row("Volume preadinto 1 MiB", r["vol read"] / MIB,
                        f"= {r['vol read'] / budget:.0%} of raw+xts budget "
                        f"{budget / MIB:,.0f}; {r['vol read'] / r['raw read']:.0%} of raw")
                    row("raw pwrite 1 MiB", r["raw write"] / MIB)
                    row("plane xts encrypt 1 MiB", r["xts enc"] / MIB)
                    budget = 1 / (1 / r["raw write"] + 1 / r["xts enc"])
                    row("Volume pwrite 1 MiB", r["vol write"] / MIB,
                        f"= {r['vol write'] / budget:.0%} of raw+xts budget "
                        f"{budget / MIB:,.0f}; {r['vol write'] / r['raw write']:.0%} of raw")
                    row("raw 4 KiB random preadv", r["raw 4k"], "IOPS")
                    row("Volume 4 KiB random preadinto", r["vol 4k"],
                        f"IOPS, {r['vol 4k'] / r['raw 4k']:.0%} of raw")
                    two = threaded_read(vol, size, sec)
                    row("Volume preadinto 1 MiB, 2 threads", two / MIB,
                        f"= {two / r['vol read']:.2f}x one thread")
                    unal = best_rate(sequential(
                        lambda o, v=vol: v.preadinto(min(o + 100, size - REQ), buf), size),
                        sec, rep)
                    row("Volume preadinto 1 MiB unaligned (+100)", unal / MIB)
                    if args.profile and ss == 4096:
                        prof = cProfile.Profile()
                        step = sequential(partial(vol.preadinto, buf=buf), size)
                        prof.enable()
                        for _ in range(2000):
                            step()
                        prof.disable()
                        pstats.Stats(prof).sort_stats("tottime").print_stats(10)
        print(f"load after: {os.getloadavg()[0]:.2f}")
    finally:
        os.close(fd)
        img.unlink()


if __name__ == "__main__":
    main()
