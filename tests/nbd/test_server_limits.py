"""Hostile clients against ``cryptoplane serve`` run as its own process, so that its
memory (VmRSS, VmHWM in /proc/PID/status) is the server's alone. Clients speak with
literal bytes from proto.md (``wire``) or are other programs (qemu-io, libnbd's nbdsh).
Run with ``-s`` to see the figures."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import wire as W
from nbdtools import make_image, nbdsh, terminate, tool

MIB = 1 << 20
BIG = 32 * MIB  # the largest request the server advertises


def status(pid: int, field: str) -> int:
    """A /proc/PID/status figure, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def sockets_open(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return n


@contextlib.contextmanager
def server(image: Path, sock: str, *options: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-m", "cryptoplane", "serve", "--raw",
                             str(image), "--socket", sock, *options],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the URL, once it listens
        assert line.startswith(b"nbd+unix://"), proc.stderr.read() if proc.stderr else line
        yield proc
    finally:
        terminate(proc)


def connect(sock: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    for _ in range(3000):
        try:
            s.connect(sock)
            return s
        except BlockingIOError:  # the listen backlog is full: the server will accept
            time.sleep(0.01)
    raise AssertionError("the server accepts no more connections")


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def negotiate(s: socket.socket, name: bytes = b"disk") -> None:
    """Fixed newstyle, then NBD_OPT_GO (proto.md), every byte spelled out."""
    magic, ihaveopt, _ = W.GREETING.unpack(recv_exact(s, 18))
    assert (magic, ihaveopt) == (W.NBDMAGIC, W.IHAVEOPT)
    s.sendall(W.CLIENT_FLAGS.pack(W.CLIENT_FIXED_NEWSTYLE | W.CLIENT_NO_ZEROES))
    data = len(name).to_bytes(4, "big") + name + (0).to_bytes(2, "big")
    s.sendall(W.OPTION_HEADER.pack(W.IHAVEOPT, W.OPT_GO, len(data)) + data)
    while True:
        _, opt, kind, length = W.OPTION_REPLY.unpack(recv_exact(s, 20))
        recv_exact(s, length)
        assert opt == W.OPT_GO
        if kind == W.REP_ACK:
            return
        assert kind == W.REP_INFO, hex(kind)


def closed_by_server(s: socket.socket, within: float) -> bool:
    """Whether the server closes ``s`` (reads EOF or a reset) within ``within`` s,
    whatever it sent before."""
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            if not s.recv(1 << 20):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


class RSSWatch:
    """Samples a process's VmRSS until stopped (VmHWM catches what falls between)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with contextlib.suppress(OSError, AssertionError):
                self.peak = max(self.peak, status(self.pid, "VmRSS"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def test_hostile_clients_stay_within_the_memory_budget(tmp_path: Path, sockdir: str) -> None:
    """200 connections announce a 32 MiB WRITE and send nothing; 50 queue two 32 MiB
    READs each and never read. The server's memory grows by less than its budget, a
    qemu-io client is served meanwhile and completes, and once the hostile clients leave
    the memory goes back to within 10% of where it started."""
    qemu_io = tool("qemu-io")
    image = tmp_path / "disk.img"
    make_image(image, 64 * MIB)
    budget = 128 * MIB
    sock = f"{sockdir}/s"
    with server(image, sock, "--memory-budget", str(budget), "--max-connections", "400",
                "--stall-timeout", "600") as proc:
        url = f"nbd+unix:///disk?socket={sock}"
        subprocess.run([qemu_io, "-f", "raw", url, "-c", "read 0 1M"], check=True,
                       capture_output=True, timeout=60)  # a first client, as a baseline
        time.sleep(1)  # the trim after a connection closes
        before = status(proc.pid, "VmRSS")
        watch = RSSWatch(proc.pid)
        writers, readers = [], []
        for i in range(200):
            s = connect(sock)
            negotiate(s)
            s.sendall(W.REQUEST.pack(W.REQUEST_MAGIC, 0, W.CMD_WRITE, i, 0, BIG))
            writers.append(s)
        for i in range(50):
            s = connect(sock)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            negotiate(s)
            s.sendall(W.REQUEST.pack(W.REQUEST_MAGIC, 0, W.CMD_READ, 2 * i, 0, BIG)
                      + W.REQUEST.pack(W.REQUEST_MAGIC, 0, W.CMD_READ, 2 * i + 1, BIG, BIG))
            readers.append(s)
        time.sleep(2)  # the server takes what it will of the requests
        held = status(proc.pid, "VmRSS")
        script = [a for i in range(16) for a in
                  ("-c", f"write -P {i + 1} {i}M 1M", "-c", f"read -P {i + 1} {i}M 1M")]
        honest = subprocess.run([qemu_io, "-f", "raw", url, *script], capture_output=True,
                                text=True, timeout=120)
        assert honest.returncode == 0, honest.stderr
        assert "Pattern verification failed" not in honest.stdout
        assert honest.stdout.count("wrote 1048576/1048576 bytes") == 16, honest.stdout
        assert honest.stdout.count("read 1048576/1048576 bytes") == 16, honest.stdout
        assert all(not closed_by_server(s, 0) for s in writers + readers)  # still there
        peak = max(watch.stop(), status(proc.pid, "VmHWM"))
        for s in writers + readers:
            s.close()
        after = before * 10  # waits for the server to free and return the memory
        for _ in range(100):
            time.sleep(0.2)
            after = status(proc.pid, "VmRSS")
            if after <= before * 1.1 and sockets_open(proc.pid) <= 2:
                break
        print(f"\nRSS before {before / MIB:.1f} MiB, with 250 hostile clients "
              f"{held / MIB:.1f} MiB, peak {peak / MIB:.1f} MiB (budget "
              f"{budget / MIB:.0f} MiB), after they left {after / MIB:.1f} MiB")
    assert peak - before < budget, (before, peak)
    assert peak < budget + 64 * MIB  # the interpreter and its libraries: ~50 MiB here
    assert after <= before * 1.1, (before, after)
    assert image.read_bytes()[:MIB] == bytes([1]) * MIB


def test_connections_past_the_limit_are_refused_and_idle_ones_timed_out(
        tmp_path: Path, sockdir: str) -> None:
    """1,000 connections that say nothing: those past --max-connections are closed
    before the greeting, the others once the handshake timeout passes. Negotiated but
    silent connections go after the idle timeout, one that asks for a 32 MiB reply and
    never reads it after the stall timeout, one that sends more than --max-options
    options at once; and a libnbd client is served all along."""
    image = tmp_path / "disk.img"
    make_image(image, 4 * MIB)
    sock = f"{sockdir}/s"
    limit = 100
    with server(image, sock, "--max-connections", str(limit), "--handshake-timeout", "2",
                "--idle-timeout", "2", "--stall-timeout", "2", "--max-options", "8",
                "--memory-budget", "80M") as proc:
        base = sockets_open(proc.pid)
        conns = [connect(sock) for _ in range(1000)]
        most = sockets_open(proc.pid) - base
        greeted = refused = 0
        for s in conns:
            s.settimeout(30)
            try:
                got = s.recv(18)
            except ConnectionResetError:
                got = b""
            if got:
                greeted += 1
            else:
                refused += 1
        print(f"\n1,000 connections: {greeted} greeted, {refused} refused at once "
              f"(--max-connections {limit}); at most {most} open in the server")
        assert refused >= 1000 - 5 * limit  # a slot freed by a timeout may be reused
        assert greeted >= limit
        assert most <= limit + 10  # refused ones are accepted, then closed at once
        assert all(closed_by_server(s, 60) for s in conns)  # the handshake timeout
        for s in conns:
            s.close()

        idle = [connect(sock) for _ in range(10)]
        for s in idle:
            negotiate(s)
        stalled = connect(sock)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        negotiate(stalled)
        stalled.sendall(W.REQUEST.pack(W.REQUEST_MAGIC, 0, W.CMD_READ, 1, 0, 4 * MIB))
        chatty = connect(sock)
        recv_exact(chatty, 18)
        chatty.sendall(W.CLIENT_FLAGS.pack(W.CLIENT_FIXED_NEWSTYLE)
                       + W.OPTION_HEADER.pack(W.IHAVEOPT, W.OPT_LIST, 0) * 9)
        assert closed_by_server(chatty, 60)
        # libnbd's client keeps working while they wait to be closed
        res = nbdsh("-u", f"nbd+unix:///disk?socket={sock}", "-c",
                    "print(h.get_size()); h.pwrite(b'\\x5a' * 4096, 0); "
                    "assert h.pread(4096, 0) == b'\\x5a' * 4096")
        assert res.returncode == 0 and res.stdout.split() == [str(4 * MIB)], res.stderr
        assert all(closed_by_server(s, 60) for s in idle)  # the idle timeout
        assert closed_by_server(stalled, 60)  # the stall timeout
        print("idle, stalled and over-optioned connections: closed by the server")
        assert sockets_open(proc.pid) == base


def test_limits_refuse_unsafe_settings(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    make_image(image, MIB)
    for bad in (["--memory-budget", "1M"], ["--handshake-timeout", "0"],
                ["--stall-timeout", "0"], ["--max-connections", "0"]):
        res = subprocess.run([sys.executable, "-m", "cryptoplane", "serve", "--raw",
                              str(image), "--socket", str(tmp_path / "s"), *bad],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and bad[0] in res.stderr, (bad, res.stderr)


@pytest.mark.parametrize("options", [8, 9])
def test_max_options_counts_every_option(options: int, tmp_path: Path, sockdir: str) -> None:
    image = tmp_path / "disk.img"
    make_image(image, MIB)
    sock = f"{sockdir}/s"
    with server(image, sock, "--max-options", "8"):
        s = connect(sock)
        recv_exact(s, 18)
        s.sendall(W.CLIENT_FLAGS.pack(W.CLIENT_FIXED_NEWSTYLE))
        for _ in range(options - 1):
            s.sendall(W.OPTION_HEADER.pack(W.IHAVEOPT, W.OPT_LIST, 0))
            _, _, kind, length = W.OPTION_REPLY.unpack(recv_exact(s, 20))
            recv_exact(s, length)  # the export, then the ACK
            _, _, kind, length = W.OPTION_REPLY.unpack(recv_exact(s, 20))
            assert kind == W.REP_ACK
        data = (4).to_bytes(4, "big") + b"disk" + bytes(2)
        s.sendall(W.OPTION_HEADER.pack(W.IHAVEOPT, W.OPT_GO, len(data)) + data)
        if options <= 8:
            negotiated = W.OPTION_REPLY.unpack(recv_exact(s, 20))
            assert negotiated[2] == W.REP_INFO
        else:
            assert closed_by_server(s, 30)
        s.close()
