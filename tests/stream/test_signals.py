"""SIGINT, SIGTERM and SIGHUP stop ``cryptoplane encrypt|decrypt`` cleanly: the real CLI in
a subprocess, fed part of its input through a pipe that stays open (so its worker
threads are blocked reading it), signalled once it is visibly mid-stream.

What must hold: the exit status is 128 + the signal (130, 143, 129, as documented in
--help); stderr has one line and no traceback or "Fatal Python error" (an interpreter
abort at shutdown); the output directory holds exactly what it held before (no
temporary file, no partial OUTPUT); an existing OUTPUT is untouched (bytes, mode, inode,
links).
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
import support

from cryptoplane.stream import X25519Identity, encrypt

SIZE = 8 << 20  # plaintext; the CLI gets a quarter of it, then nothing more
FED = SIZE // 4
SIGNALS = {"INT": signal.SIGINT, "TERM": signal.SIGTERM, "HUP": signal.SIGHUP}


@dataclass
class Files:
    key: Path        # the identity file
    recipient: str   # its age1... key
    plain: bytes
    ct: bytes        # plain, encrypted to recipient


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    work = tmp_path_factory.mktemp("signals")
    ident = X25519Identity.generate()
    key = work / "key.txt"
    key.write_text(ident.to_string() + "\n")
    plain = os.urandom(SIZE)
    ct = io.BytesIO()
    encrypt(io.BytesIO(plain), ct, [str(ident.recipient)])
    return Files(key, str(ident.recipient), plain, ct.getvalue())


def handles_signals(pid: int) -> bool:
    """Whether process ``pid`` has its own SIGTERM handler yet (the CLI's, set when the
    command starts; before it, SIGTERM would kill it outright)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    raise AssertionError("no SigCgt line in /proc/PID/status")


def start(argv: list[str], out_dir: Path, feed: bytes) -> tuple[subprocess.Popen[bytes],
                                                                 list[bytes]]:
    """The CLI on a pipe: ``feed`` written to its stdin (which stays open), its stdout
    drained into the returned list."""
    proc = subprocess.Popen([sys.executable, "-m", "cryptoplane", *argv], cwd=out_dir,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    got: list[bytes] = []

    def feeder(pipe: IO[bytes]) -> None:
        try:
            pipe.write(feed)
            pipe.flush()
        except BrokenPipeError:  # it stopped before taking all of it: seen by the test
            pass

    def drain(pipe: IO[bytes]) -> None:
        while chunk := pipe.read1(1 << 16):
            got.append(chunk)

    threading.Thread(target=feeder, args=(proc.stdin,), daemon=True).start()
    threading.Thread(target=drain, args=(proc.stdout,), daemon=True).start()
    return proc, got


def wait_until(cond: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.02)


def temp_files(d: Path) -> list[str]:
    return [n for n in os.listdir(d) if n.endswith(".tmp")]


def stop(proc: subprocess.Popen[bytes], signum: int) -> str:
    # a moment more, so that every worker thread is blocked on the pipe, not just one
    time.sleep(0.3)
    proc.send_signal(signum)
    try:
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace")
    assert "Fatal Python error" not in err and "Traceback" not in err, err
    assert proc.returncode == 128 + signum, (proc.returncode, err)
    assert err.strip() == f"cryptoplane: stopped by {signal.Signals(signum).name}", err
    return err


@pytest.mark.parametrize("name", list(SIGNALS))
@pytest.mark.parametrize("workers", [None, "1"])
def test_decrypt_to_new_output(files: Files, tmp_path: Path, name: str,
                               workers: str | None) -> None:
    before = sorted(os.listdir(tmp_path))
    argv = ["decrypt", "-i", str(files.key), "-o", "out.bin",
            *(["-j", workers] if workers else [])]
    proc, _ = start(argv, tmp_path, files.ct[:FED])
    wait_until(lambda: temp_files(tmp_path), "wrote to its temporary file")
    stop(proc, SIGNALS[name])
    assert sorted(os.listdir(tmp_path)) == before  # neither out.bin nor its temp file


@pytest.mark.parametrize("name", list(SIGNALS))
def test_decrypt_force_leaves_existing_output(files: Files, tmp_path: Path,
                                              name: str) -> None:
    out = tmp_path / "out.bin"
    out.write_bytes(b"precious")
    os.chmod(out, 0o640)
    os.link(out, tmp_path / "link")
    st = os.stat(out)
    before = sorted(os.listdir(tmp_path))
    argv = ["decrypt", "--force", "-i", str(files.key), "-o", "out.bin"]
    proc, _ = start(argv, tmp_path, files.ct[:FED])
    wait_until(lambda: temp_files(tmp_path), "wrote to its temporary file")
    stop(proc, SIGNALS[name])
    assert sorted(os.listdir(tmp_path)) == before
    now = os.stat(out)
    assert out.read_bytes() == b"precious" and (tmp_path / "link").read_bytes() == b"precious"
    assert (now.st_ino, now.st_nlink, stat.S_IMODE(now.st_mode)) == \
        (st.st_ino, 2, 0o640)


@pytest.mark.parametrize("name", list(SIGNALS))
def test_decrypt_to_stdout(files: Files, tmp_path: Path, name: str) -> None:
    before = sorted(os.listdir(tmp_path))
    proc, got = start(["decrypt", "-i", str(files.key)], tmp_path,
                      files.ct[:FED])
    wait_until(lambda: got, "wrote plaintext")
    stop(proc, SIGNALS[name])
    assert sorted(os.listdir(tmp_path)) == before
    out = b"".join(got)
    assert 0 < len(out) <= FED and files.plain.startswith(out)


@pytest.mark.parametrize("name", ["INT", "TERM"])
def test_encrypt_to_new_output(files: Files, tmp_path: Path, name: str) -> None:
    before = sorted(os.listdir(tmp_path))
    proc, _ = start(["encrypt", "-r", files.recipient, "-o", "out.age"], tmp_path,
                    files.plain[:FED])
    wait_until(lambda: temp_files(tmp_path), "wrote to its temporary file")
    stop(proc, SIGNALS[name])
    assert sorted(os.listdir(tmp_path)) == before


def test_signal_at_the_passphrase_prompt(tmp_path: Path) -> None:
    """Stopped while it waits for a passphrase on its descriptor: the same clean exit."""
    r, w = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "cryptoplane", "encrypt",
                                 "--passphrase-fd", str(r), "-o", "out.age"], cwd=tmp_path,
                                stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, pass_fds=(r,))
        wait_until(lambda: handles_signals(proc.pid), "set its signal handlers")
        stop(proc, signal.SIGTERM)  # blocked reading the descriptor, which says nothing
    finally:
        os.close(r)
        os.close(w)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["INT", "TERM"])
def test_stream_bench_removes_its_files(tmp_path: Path, name: str) -> None:
    """The bench's work directory (a file of --size and every tool's output) goes too."""
    if shutil.which("age") is None:
        support.unavailable("the age CLI is not installed")
    proc = subprocess.Popen([sys.executable, "-m", "cryptoplane", "stream", "bench",
                             "--size", "32M", "--rounds", "50", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_until(lambda: any(p.suffix == ".age" for p in tmp_path.rglob("*")),
               "encrypted a file")
    stop(proc, SIGNALS[name])
    assert os.listdir(tmp_path) == []


CLEANUP = """
import os, signal, time
from cryptoplane.cli.signals import exit_on_signals
with exit_on_signals():
    try:
        print("ready", flush=True)
        time.sleep(60)
    finally:
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal while cleaning up
        time.sleep(0.1)
        print("cleaned", flush=True)
    print("not reached", flush=True)
"""


def test_second_signal_does_not_cut_the_cleanup_short() -> None:
    proc = subprocess.Popen([sys.executable, "-c", CLEANUP], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    err = stop(proc, signal.SIGINT)  # the first signal decides the status
    assert proc.stdout.read() == b"cleaned\n", err
