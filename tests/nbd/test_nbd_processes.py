"""``cryptoplane serve --processes N``: worker processes sharing one listening socket."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nbdclient as nc
import pytest
from click.testing import CliRunner
from nbdtools import luks2_volume, make_image, terminate, tool

from cryptoplane.cli.serve import serve
from cryptoplane.exceptions import InvalidRequest
from cryptoplane.nbd import protocol as P
from cryptoplane.nbd.limits import MIB, MIN_BUDGET, Limits
from cryptoplane.nbd.processes import auto_processes, share

SERVE = [sys.executable, "-c", "from cryptoplane.cli.serve import serve; serve()"]


def workers_of(pid: int, n: int, timeout: float = 20) -> list[int]:
    """The ``n`` worker pids of server ``pid``, once all are there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            if len(kids) == n:
                return [int(k) for k in kids]
        time.sleep(0.05)
    raise AssertionError(f"server {pid} did not have {n} workers")


@contextlib.contextmanager
def serving(args: list[str], processes: int = 2) -> Iterator[tuple[subprocess.Popen[str],
                                                                     str, list[int]]]:
    proc = subprocess.Popen([*SERVE, *args, "--processes", str(processes)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("nbd"), proc.stderr.read() if proc.stderr else ""
        yield proc, url, workers_of(proc.pid, processes)
    finally:
        terminate(proc)


def sockets_of(pid: int) -> int:
    """How many sockets process ``pid`` holds (its connections, and a few of its own)."""
    fds = Path(f"/proc/{pid}/fd")
    return sum(1 for fd in fds.iterdir()
               if os.readlink(fd).startswith("socket:"))


def connect(sock: str) -> nc.Client:
    c = nc.Client(sock)
    c.go("disk")
    return c


def test_share_divides_the_bounds() -> None:
    limits = Limits(memory_budget=256 * MIB, max_connections=128)
    assert share(limits, 2) == Limits(memory_budget=128 * MIB, max_connections=64)
    assert share(limits, 1) == limits
    with pytest.raises(InvalidRequest, match="cannot be divided"):
        share(limits, 4)  # 64 MiB each is under MIN_BUDGET
    with pytest.raises(InvalidRequest, match="connections"):
        share(Limits(max_connections=1), 2)
    assert 1 <= auto_processes(limits) <= min(os.cpu_count() or 1, 256 * MIB // MIN_BUDGET)


def test_processes_option_is_checked(tmp_path: Path) -> None:
    img = tmp_path / "x.img"
    make_image(img, 4096)
    for bad in (["--processes", "0"], ["--processes", "many"],
                ["--processes", "8", "--memory-budget", "256M"]):
        res = CliRunner().invoke(serve, [str(img), "--raw", "--socket", "s", *bad])
        assert res.exit_code == 2, res.output
    assert "--processes" in CliRunner().invoke(serve, ["--help"]).output


def test_fio_verify_four_jobs_on_a_luks_volume(tmp_path: Path, sockdir: str) -> None:
    fio = tool("fio")
    img = tmp_path / "vol.img"
    pw = tmp_path / "pw"
    pw.write_bytes(b"correct horse")
    luks2_volume(img, 72 << 20, pw)
    with serving([str(img), "--socket", f"{sockdir}/s", "--name", "disk", "--key-file",
                  str(pw)]) as (_, url, _workers):
        # 4 jobs, 4 connections, each writing then verifying its own 16 MiB
        res = subprocess.run([fio, "--name=v", "--ioengine=nbd", f"--uri={url}",
                              "--rw=randwrite", "--bs=4k", "--iodepth=32", "--numjobs=4",
                              "--size=16M", "--offset_increment=16M", "--verify=crc32c",
                              "--verify_fatal=1", f"--directory={tmp_path}"],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "verify" not in res.stderr.lower()


def test_flush_on_one_worker_covers_writes_of_another(tmp_path: Path,
                                                      sockdir: str) -> None:
    """A write completed on worker B's connection and a FLUSH answered on worker A's:
    then every process of the server is SIGKILLed (no shutdown, no flush of its own)
    and the image holds the write. The parent gives each new connection to the worker
    with the fewest, so two connections are on two workers. That nothing is buffered per
    process is what this shows; that the flush makes it durable is fdatasync's promise
    for the whole file, whichever process dirtied its pages."""
    img = tmp_path / "disk.img"
    data = make_image(img, 8 << 20)
    sock = f"{sockdir}/s"
    with serving([str(img), "--raw", "--socket", sock, "--name", "disk"]) as (proc, _, w):
        before = [sockets_of(pid) for pid in w]
        on_b = connect(sock)
        on_a = connect(sock)
        assert [sockets_of(pid) - n for pid, n in zip(w, before, strict=True)] == [1, 1]
        payloads = {i: bytes([i + 1]) * 65536 for i in range(8)}
        for i, payload in payloads.items():
            assert on_b.command(P.CMD_WRITE, i, i * 131072, 65536,
                                payload=payload).error == 0
        assert on_a.command(P.CMD_FLUSH, 99).error == 0
        for pid in (proc.pid, *w):
            os.kill(pid, signal.SIGKILL)
        proc.wait(10)
    got = img.read_bytes()
    for i, payload in payloads.items():
        assert got[i * 131072:i * 131072 + 65536] == payload
    assert got[65536:131072] == data[65536:131072]


def test_sigterm_stops_every_worker_and_removes_the_socket(tmp_path: Path,
                                                           sockdir: str) -> None:
    img = tmp_path / "disk.img"
    make_image(img, 1 << 20)
    sock = f"{sockdir}/s"
    with serving([str(img), "--raw", "--socket", sock, "--name", "disk"]) as (proc, _, w):
        c = connect(sock)
        assert c.command(P.CMD_WRITE, 1, 0, 4096, payload=b"\x42" * 4096).error == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
    for pid in w:
        assert not Path(f"/proc/{pid}").exists()
    assert not os.path.exists(sock)
    assert img.read_bytes()[:4096] == b"\x42" * 4096


def test_a_killed_worker_is_replaced(tmp_path: Path, sockdir: str) -> None:
    img = tmp_path / "disk.img"
    data = make_image(img, 1 << 20)
    sock = f"{sockdir}/s"
    with serving([str(img), "--raw", "--socket", sock, "--name", "disk"]) as (proc, _, w):
        os.kill(w[0], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            now = workers_of(proc.pid, 2)
            if w[0] not in now:
                break
            time.sleep(0.05)
        assert w[0] not in now and w[1] in now
        [new] = [pid for pid in now if pid != w[1]]
        before = {pid: sockets_of(pid) for pid in now}
        clients = [connect(sock) for _ in range(2)]  # one each: the new worker serves
        for c in clients:
            assert c.command(P.CMD_READ, 1, 0, 4096).data == data[:4096]
        assert sockets_of(new) - before[new] == 1 == sockets_of(w[1]) - before[w[1]]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert proc.stderr is not None
        assert f"worker {w[0]} was killed by SIGKILL: starting another" in proc.stderr.read()


def test_the_connection_limit_holds_across_workers(tmp_path: Path, sockdir: str) -> None:
    """--max-connections 2 over 2 workers: one each; the third is refused by whichever
    worker gets it (each at its share)."""
    img = tmp_path / "disk.img"
    make_image(img, 1 << 20)
    sock = f"{sockdir}/s"
    with serving([str(img), "--raw", "--socket", sock, "--name", "disk",
                  "--max-connections", "2"]):
        clients = [connect(sock) for _ in range(2)]
        with pytest.raises((EOFError, ConnectionResetError)):
            nc.Client(sock)
        for c in clients:
            assert c.command(P.CMD_READ, 1, 0, 4096).error == 0
