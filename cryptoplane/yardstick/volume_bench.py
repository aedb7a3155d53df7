"""``cryptoplane volume bench``: Cloudflare's dm-crypt experiment, in user space.

One run, side by side, on RAM-backed images in /dev/shm served over Unix sockets:

* ``ours-raw``      our NBD server, the image unencrypted (what the crypto costs is
                    measured against this);
* ``ours-luks1``    our server on a LUKS1 volume (512-byte sectors, aes-xts-plain64);
* ``nbdkit-luks``   ``nbdkit file`` + ``--filter=luks`` on the same LUKS1 image;
* ``qemu-nbd-luks`` ``qemu-nbd`` with qemu's luks driver on the same image;
* ``nbdkit-raw``    ``nbdkit file`` on the unencrypted image;
* ``ours-luks2-4k`` our server on a LUKS2 volume with 4096-byte sectors, alongside.

Loads: nbdcopy (sequential read and write of the whole export) and fio's nbd engine
(sequential 1 MiB read/write, random 4 KiB read/write at queue depth 32). Client and
server share the machine's cores, as in the issue's method. Every command is printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptoplane.exceptions import CryptoplaneError

PASSPHRASE = b"cryptoplane-bench"
MIB = 1 << 20

# the bench formats with a cheap KDF: unlocking is not what it measures
_FAST_KDF = {"hash": "sha256", "iterations": 1000}


class BenchError(CryptoplaneError):
    """A program the bench needs is missing, or a server or load failed."""


@dataclass(frozen=True)
class Server:
    name: str
    argv: list[str]
    socket: Path
    export: str = ""
    encrypted: bool = True

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.export}?socket={self.socket}"


@dataclass(frozen=True)
class Load:
    name: str
    unit: str  # "MiB/s" or "IOPS"
    argv: Callable[[Server, Path], list[str]]
    parse: Callable[[str, float], float]


@dataclass
class Result:
    server: str
    load: str
    unit: str
    value: float  # the median of the rounds' samples
    command: str
    samples: list[float] = field(default_factory=list)
    # the server's CPU per unit of work (µs per I/O, or CPU seconds per GiB), median of
    # the rounds: steadier than the rate on a shared machine, and what batching buys
    cpu: float | None = None
    cpu_samples: list[float] = field(default_factory=list)


@dataclass
class Images:
    workdir: Path
    raw: Path
    luks1: Path
    luks2: Path
    key_file: Path
    source: Path
    data_size: int
    extra: dict[str, Any] = field(default_factory=dict)


def need(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        raise BenchError(f"the volume bench needs {', '.join(missing)} "
                         "(Debian: cryptsetup-bin qemu-utils nbdkit fio libnbd-bin; "
                         "scripts/setup.sh installs them)")


# -- images ---------------------------------------------------------------------------------

def make_images(workdir: Path, data_size: int) -> Images:
    """A raw image, a LUKS1 and a LUKS2 (4 KiB sectors) volume of ``data_size`` bytes each,
    formatted by cryptoplane, and a random source file for the write loads."""
    from cryptoplane.volume import luks

    key_file = workdir / "passphrase"
    key_file.write_bytes(PASSPHRASE)
    key_file.chmod(0o600)
    raw = workdir / "raw.img"
    source = workdir / "source.bin"
    with open(source, "wb") as f:
        chunk = os.urandom(MIB)
        for _ in range(data_size // MIB):
            f.write(chunk)
    _sized(raw, data_size)
    _fill(raw, 0, chunk)
    images = {}
    for name, version, sector in (("luks1", 1, 512), ("luks2", 2, 4096)):
        path = workdir / f"{name}.img"
        _sized(path, (16 << 20) + data_size)  # room for any header; trimmed below
        info = luks.format(path, PASSPHRASE, version=version, sector_size=sector,
                           kdf="pbkdf2", kdf_params=_FAST_KDF)
        os.truncate(path, info.data_offset + data_size)
        _fill(path, info.data_offset, chunk)
        images[name] = path
    return Images(workdir, raw, images["luks1"], images["luks2"], key_file, source, data_size)


def _sized(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def _fill(path: Path, start: int, chunk: bytes) -> None:
    """Write every byte from ``start`` on: a sparse tmpfs file allocates its pages on the
    first write, which would make whichever server writes first look 5-7x slower."""
    fd = os.open(path, os.O_WRONLY)
    try:
        end = os.fstat(fd).st_size
        for offset in range(start, end, len(chunk)):
            os.pwrite(fd, chunk[:end - offset], offset)
    finally:
        os.close(fd)


# -- servers --------------------------------------------------------------------------------

def servers(img: Images, only: Sequence[str] | None = None,
            processes: int | None = None) -> list[Server]:
    """The servers; ours run ``processes`` worker processes (default: one per core, for
    the loads with several jobs; one connection is served by one of them)."""
    d = img.workdir
    me = [sys.executable, "-m", "cryptoplane", "serve", "--processes",
          str(processes or os.cpu_count() or 1)]
    every = [
        Server("ours-raw", [*me, "--raw", "--socket", str(d / "ours-raw.sock"),
                            "--name", "disk", str(img.raw)],
               d / "ours-raw.sock", "disk", encrypted=False),
        Server("ours-luks1", [*me, "--socket", str(d / "ours-luks1.sock"), "--key-file",
                              str(img.key_file), "--name", "disk", str(img.luks1)],
               d / "ours-luks1.sock", "disk"),
        Server("nbdkit-luks", ["nbdkit", "-f", "-U", str(d / "nbdkit-luks.sock"),
                               "--filter=luks", "file", str(img.luks1),
                               f"passphrase=+{img.key_file}"],
               d / "nbdkit-luks.sock"),
        Server("qemu-nbd-luks", ["qemu-nbd", "-k", str(d / "qemu-nbd-luks.sock"), "-e", "16",
                                 "-t", "--cache=none", "--aio=threads",
                                 "--object", f"secret,id=s0,file={img.key_file}",
                                 "--image-opts",
                                 f"driver=luks,key-secret=s0,file.filename={img.luks1}"],
               d / "qemu-nbd-luks.sock"),
        Server("nbdkit-raw", ["nbdkit", "-f", "-U", str(d / "nbdkit-raw.sock"), "file",
                              str(img.raw)],
               d / "nbdkit-raw.sock", encrypted=False),
        Server("ours-luks2-4k", [*me, "--socket", str(d / "ours-luks2.sock"), "--key-file",
                                 str(img.key_file), "--name", "disk", str(img.luks2)],
               d / "ours-luks2.sock", "disk"),
    ]
    return [s for s in every if only is None or s.name in only]


@contextlib.contextmanager
def running(server: Server, timeout: float = 30.0) -> Iterator[subprocess.Popen[bytes]]:
    with contextlib.suppress(FileNotFoundError):
        server.socket.unlink()
    proc = subprocess.Popen(server.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while not _accepts(server.socket):
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise BenchError(f"{server.name} exited with {proc.returncode}: {err.strip()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{server.name} did not listen within {timeout:.0f} s")
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def _accepts(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


# -- loads ----------------------------------------------------------------------------------

def _nbdcopy_rate(out: str, seconds: float) -> float:
    return 0.0  # replaced by the caller: nbdcopy prints nothing; the rate is size / time


def _fio(rw: str, bs: str, depth: int, runtime: float, size: int,
         jobs: int = 1) -> Callable[[Server, Path], list[str]]:
    """fio's nbd engine; with ``jobs`` > 1, that many jobs, each its own connection,
    reported together (``--group_reporting``: the first job in the JSON is the sum)."""
    def argv(server: Server, _: Path) -> list[str]:
        many = [f"--numjobs={jobs}", "--group_reporting"] if jobs > 1 else []
        return ["fio", "--name=bench", "--ioengine=nbd", f"--uri={server.uri}",
                f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}", f"--size={size}",
                # in ms: fio reads "0.5" as 0 seconds, which drops time_based silently
                *many, f"--runtime={round(runtime * 1000)}ms", "--time_based",
                "--ramp_time=500ms",
                "--output-format=json"]
    return argv


def _fio_value(key: str, unit: str) -> Callable[[str, float], float]:
    def parse(out: str, _: float) -> float:
        job = json.loads(out[out.index("{"):])["jobs"][0][key]
        return float(job["bw_bytes"]) / MIB if unit == "MiB/s" else float(job["iops"])
    return parse


def loads(img: Images, runtime: float) -> list[Load]:
    size = img.data_size
    seq = min(size, 1 << 30)
    return [
        Load("nbdcopy read", "MiB/s",
             lambda s, _: ["nbdcopy", s.uri, "null:"], _nbdcopy_rate),
        Load("nbdcopy write", "MiB/s",
             lambda s, _: ["nbdcopy", str(img.source), s.uri], _nbdcopy_rate),
        Load("fio seq read 1M", "MiB/s", _fio("read", "1M", 8, runtime, seq),
             _fio_value("read", "MiB/s")),
        Load("fio seq write 1M", "MiB/s", _fio("write", "1M", 8, runtime, seq),
             _fio_value("write", "MiB/s")),
        Load("fio rand read 4k QD32", "IOPS", _fio("randread", "4k", 32, runtime, size),
             _fio_value("read", "IOPS")),
        Load("fio rand write 4k QD32", "IOPS", _fio("randwrite", "4k", 32, runtime, size),
             _fio_value("write", "IOPS")),
        Load("fio rand read 4k QD32 4 jobs", "IOPS",
             _fio("randread", "4k", 32, runtime, size, jobs=4), _fio_value("read", "IOPS")),
        Load("fio rand write 4k QD32 4 jobs", "IOPS",
             _fio("randwrite", "4k", 32, runtime, size, jobs=4),
             _fio_value("write", "IOPS")),
    ]


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants (all their threads),
    from /proc: our server's workers are child processes, nbdkit's and qemu-nbd's threads."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}  # pid: (parent, seconds)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    tree, total, grew = {pid}, 0.0, True
    while grew:
        grew = False
        for p, (parent, _) in stats.items():
            if parent in tree and p not in tree:
                tree.add(p)
                grew = True
    for p in tree:
        total += stats.get(p, (0, 0.0))[1]
    return total


def cpu_per_unit(cpu_seconds: float, wall_seconds: float, value: float, unit: str) -> float:
    """The server's CPU per unit of work: µs per I/O for IOPS, CPU seconds per GiB for
    MiB/s (its busy cores over the run, divided by the rate)."""
    busy = cpu_seconds / wall_seconds
    return busy / value * 1e6 if unit == "IOPS" else busy / (value / 1024)


def run_load(server: Server, load: Load, img: Images, pid: int | None = None) -> Result:
    """One run of ``load``; with the server's ``pid``, its CPU per unit of work too (the
    load's wall time includes fio's ramp and start, so it is a little high, alike for all)."""
    argv = load.argv(server, img.workdir)
    cpu0 = tree_cpu_seconds(pid) if pid else 0.0
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, timeout=300, check=False)
    seconds = time.perf_counter() - start
    cpu_seconds = tree_cpu_seconds(pid) - cpu0 if pid else 0.0
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed ({done.returncode}): "
                         f"{done.stderr.decode(errors='replace').strip()[-500:]}")
    if load.parse is _nbdcopy_rate:
        value = img.data_size / MIB / seconds
    else:
        value = load.parse(done.stdout.decode(), seconds)
    cpu = cpu_per_unit(cpu_seconds, seconds, value, load.unit) if pid and value > 0 else None
    return Result(server.name, load.name, load.unit, value, " ".join(argv), cpu=cpu)


def warm_up(server: Server) -> None:
    """One unmeasured sequential read of the whole export, for every server alike: a
    server just started has cold buffers and caches (ours read 934, then 1,234, then
    1,483 MiB/s in three nbdcopy runs in a row here), and a disk is served for hours."""
    done = subprocess.run(["nbdcopy", server.uri, "null:"], capture_output=True,
                          timeout=300, check=False)
    if done.returncode != 0:
        raise BenchError(f"warming up {server.name} failed: "
                         f"{done.stderr.decode(errors='replace').strip()[-500:]}")


def run_bench(data_size: int = 1 << 30, runtime: float = 5.0, *,
              only: Sequence[str] | None = None, load_names: Sequence[str] | None = None,
              workdir: str = "/dev/shm", rounds: int = 1,
              progress: Callable[[str], None] | None = None,
              processes: int | None = None) -> list[Result]:
    """Measure every server under every load, ``rounds`` times, and keep each cell's
    median; images are made and removed here.

    Rounds interleave the servers (each round starts each server in turn, in an order
    rotated by one every round) so that a ratio compares figures taken minutes apart
    at most, not a drift of the shared machine: single runs of the same cell moved by
    up to 2x here. Each server is warmed up once it listens (``warm_up``). Servers run
    one at a time: several share the LUKS1 image, and
    qemu-nbd locks it. ``processes``: our servers' ``--processes`` (default: one per
    core); nbdkit and qemu-nbd use their own threads."""
    need("fio", "nbdcopy", "nbdkit", "qemu-nbd")
    if rounds < 1:
        raise BenchError("the bench needs at least one round")
    samples: dict[tuple[str, str], list[Result]] = {}
    with tempfile.TemporaryDirectory(prefix="cryptoplane-bench-", dir=workdir) as tmp:
        img = make_images(Path(tmp), data_size)
        chosen = [ld for ld in loads(img, runtime) if not load_names or ld.name in load_names]
        every = servers(img, only, processes)
        for rnd in range(rounds):
            shift = rnd % max(1, len(every))
            for server in every[shift:] + every[:shift]:
                with running(server) as proc:
                    if progress:
                        progress(f"round {rnd + 1}/{rounds}, {server.name}: warming up")
                    warm_up(server)
                    for load in chosen:
                        if progress:
                            progress(f"round {rnd + 1}/{rounds}, {server.name}: {load.name}")
                        samples.setdefault((server.name, load.name), []).append(
                            run_load(server, load, img, proc.pid))
    order = {s.name: i for i, s in enumerate(every)}
    load_order = {ld.name: i for i, ld in enumerate(chosen)}
    out = []
    for key in sorted(samples, key=lambda k: (order[k[0]], load_order[k[1]])):
        runs = samples[key]
        values = [r.value for r in runs]
        first = runs[0]
        cpus = [r.cpu for r in runs if r.cpu is not None]
        out.append(Result(first.server, first.load, first.unit, statistics.median(values),
                          first.command, values,
                          statistics.median(cpus) if cpus else None, cpus))
    return out


# -- the comparison ---------------------------------------------------------------------

# (numerator, denominator, bar): the acceptance ratios
BARS: list[tuple[str, str, str, float]] = [
    ("seq", "ours-luks1", "nbdkit-luks", 1.5),
    ("seq", "ours-luks1", "ours-raw", 0.70),
    ("seq", "ours-luks1", "nbdkit-raw", 0.45),
    ("rand", "ours-luks1", "nbdkit-luks", 1.25),  # issue 18, point 1
    ("rand", "ours-luks1", "ours-raw", 0.85),
    ("rand", "ours-luks2-4k", "ours-raw", 0.85),
    ("jobs", "ours-luks1", "nbdkit-luks", 1.5),  # issue 18, point 2
]


def ratios(results: Sequence[Result]) -> list[tuple[str, str, str, float, float, bool]]:
    """``(load, ours, peer, ratio, bar, met)`` for every acceptance ratio measurable."""
    by = {(r.server, r.load): r.value for r in results}
    rows = []
    for kind, ours, peer, bar in BARS:
        for (server, load), value in by.items():
            if server != ours or not _is(kind, load):
                continue
            other = by.get((peer, load))
            if other:
                ratio = value / other
                rows.append((load, ours, peer, ratio, bar, ratio >= bar))
    return rows


def _is(kind: str, load: str) -> bool:
    if kind == "jobs":
        return "jobs" in load
    return ("rand" in load and "jobs" not in load) if kind == "rand" else ("rand" not in load)
