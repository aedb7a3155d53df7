"""NBD server yardstick: cryptoplane's server against nbdkit on the same image.

A ``FileDevice`` on an image in /dev/shm over a Unix socket: nbdcopy sequential read and
write (MB/s) and fio 4 KiB random read at QD32 (IOPS). Every command is printed before it
runs. The two servers are measured in alternation, ``--rounds`` times, and the median,
min and max are reported with the load average, because the machine is shared: compare
ratios from one run, never absolute figures across runs.

    python benchmarks/nbd_server.py [--size-mib 1024] [--runtime 10] [--rounds 3]
        [--only ours|nbdkit] [--inline-limit BYTES]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from cryptoplane.nbd.blockdev import FileDevice
from cryptoplane.nbd.runner import ServerThread


def run(cmd: list[str]) -> tuple[float, str]:
    print("$", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - t0, out


def cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system) of this process (``None``) or of process ``pid``."""
    if pid is None:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(url: str, source: str, size: int, runtime: int,
            pid: int | None) -> dict[str, float]:
    """``pid``: the server's process (None: this one) for CPU time per request."""
    res: dict[str, float] = {}
    dt, _ = run(["nbdcopy", url, "null:"])
    res["nbdcopy read MB/s"] = size / dt / 1e6
    dt, _ = run(["nbdcopy", source, url])
    res["nbdcopy write MB/s"] = size / dt / 1e6
    cpu = cpu_seconds(pid)
    _, out = run(["fio", "--name=rr", "--ioengine=nbd", f"--uri={url}", "--rw=randread",
                  "--bs=4k", "--iodepth=32", f"--runtime={runtime}", "--time_based",
                  "--output-format=json"])
    job = json.loads(out[out.index("{"):])["jobs"][0]["read"]
    res["fio randread 4k QD32 IOPS"] = job["iops"]
    # server CPU per request: robust to the load others put on the machine
    res["server CPU us/4k read"] = (cpu_seconds(pid) - cpu) / job["total_ios"] * 1e6
    return res


@contextmanager
def ours(image: str, sock: str, inline_limit: int | None) -> Iterator[tuple[str, None]]:
    with FileDevice(image) as dev, ServerThread({"disk": dev}, socket_path=sock,
                                                inline_limit=inline_limit) as s:
        yield s.url, None


@contextmanager
def nbdkit(image: str, sock: str) -> Iterator[tuple[str, int]]:
    cmd = ["nbdkit", "--exit-with-parent", "-f", "-U", sock, "file", image]
    print("$", shlex.join(cmd), flush=True)
    proc = subprocess.Popen(cmd)
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        yield f"nbd+unix:///?socket={sock}", proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=["ours", "nbdkit"])
    ap.add_argument("--inline-limit", type=int, default=None,
                    help="requests above this go to the thread pool (default: server's)")
    args = ap.parse_args()
    size = args.size_mib << 20
    d = tempfile.mkdtemp(dir="/dev/shm", prefix="nbdbench-")
    image, src = os.path.join(d, "disk.img"), os.path.join(d, "src.img")
    results: dict[str, list[dict[str, float]]] = {"cryptoplane": [], "nbdkit": []}
    loads = []
    try:
        with open(src, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        shutil.copyfile(src, image)
        for r in range(args.rounds):
            loads.append(os.getloadavg()[0])
            if args.only != "nbdkit":
                with ours(image, os.path.join(d, f"c{r}.sock"), args.inline_limit) as (url,
                                                                                       pid):
                    results["cryptoplane"].append(measure(url, src, size, args.runtime, pid))
            if args.only != "ours":
                with nbdkit(image, os.path.join(d, f"k{r}.sock")) as (url, kpid):
                    results["nbdkit"].append(measure(url, src, size, args.runtime, kpid))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print(f"\n{args.rounds} rounds, {args.size_mib} MiB image in /dev/shm, Unix socket; "
          f"1-min load average at each round: {', '.join(f'{x:.2f}' for x in loads)} "
          f"on {os.cpu_count()} CPUs")
    for server, rows in results.items():
        if not rows:
            continue
        for metric in rows[0]:
            values = [row[metric] for row in rows]
            print(f"{server:12} {metric:27} median {statistics.median(values):>10,.1f}  "
                  f"(min {min(values):,.1f}, max {max(values):,.1f})")
    if results["cryptoplane"] and results["nbdkit"]:
        for metric in results["nbdkit"][0]:
            a = statistics.median(row[metric] for row in results["cryptoplane"])
            b = statistics.median(row[metric] for row in results["nbdkit"])
            print(f"ratio cryptoplane/nbdkit {metric:27} {a / b:.2f}")


if __name__ == "__main__":
    main()
