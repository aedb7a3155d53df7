"""Where output goes: an existing OUTPUT is refused without --force (never a partial or
replaced file), --force swaps it atomically keeping its permission bits, a FIFO or device
is written in place rather than renamed over, and the library's atomic output refuses a
file that appears while it writes."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cryptoplane.stream import X25519Identity, decrypt, encrypt
from cryptoplane.stream._io import atomic_output

C = 65536


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "cryptoplane", *args], cwd=cwd,
                          capture_output=True, timeout=60, check=False)


@pytest.fixture
def ident(tmp_path: Path) -> X25519Identity:
    me = X25519Identity.generate()
    (tmp_path / "key.txt").write_text(me.to_string() + "\n")
    return me


def sealed(tmp_path: Path, me: X25519Identity, plain: bytes, name: str = "ct.age") -> Path:
    path = tmp_path / name
    out = io.BytesIO()
    encrypt(io.BytesIO(plain), out, [str(me.recipient)])
    path.write_bytes(out.getvalue())
    return path


def existing(path: Path, data: bytes = b"precious", mode: int = 0o640) -> os.stat_result:
    path.write_bytes(data)
    os.chmod(path, mode)
    os.link(path, path.with_name(path.name + ".link"))
    return os.stat(path)


def test_existing_output_is_refused(tmp_path: Path, ident: X25519Identity) -> None:
    sealed(tmp_path, ident, os.urandom(C + 5))
    (tmp_path / "plain").write_bytes(b"p")
    st = existing(tmp_path / "out")
    for argv in (["decrypt", "-i", "key.txt", "-o", "out", "ct.age"],
                 ["encrypt", "-r", str(ident.recipient), "-o", "out", "plain"]):
        proc = cli(*argv, cwd=tmp_path)
        assert proc.returncode == 1
        assert proc.stderr.decode() == "Error: out exists: give --force to replace it\n"
        now = os.stat(tmp_path / "out")
        assert (tmp_path / "out").read_bytes() == b"precious"
        assert (now.st_ino, now.st_nlink, now.st_mode) == (st.st_ino, 2, st.st_mode)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert b"--force" in cli("decrypt", "--help", cwd=tmp_path).stdout


def test_force_replaces_atomically_keeping_the_mode(tmp_path: Path,
                                                    ident: X25519Identity) -> None:
    plain = os.urandom(3 * C + 1)
    sealed(tmp_path, ident, plain)
    st = existing(tmp_path / "out")
    proc = cli("decrypt", "--force", "-i", "key.txt", "-o", "out", "ct.age", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    now = os.stat(tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == plain
    assert stat.S_IMODE(now.st_mode) == 0o640  # its mode carried over
    assert now.st_ino != st.st_ino  # a rename: the other name keeps the old file
    assert (tmp_path / "out.link").read_bytes() == b"precious"


def test_force_failure_leaves_the_old_file(tmp_path: Path, ident: X25519Identity) -> None:
    ct = sealed(tmp_path, ident, os.urandom(3 * C + 1))
    blob = bytearray(ct.read_bytes())
    blob[-100] ^= 1  # the last chunk fails after three authenticated ones were written
    ct.write_bytes(bytes(blob))
    st = existing(tmp_path / "out")
    before = sorted(os.listdir(tmp_path))
    proc = cli("decrypt", "-f", "-i", "key.txt", "-o", "out", "ct.age", cwd=tmp_path)
    assert proc.returncode == 1 and b"ChunkTampered" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == before
    now = os.stat(tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == b"precious"
    assert (now.st_ino, now.st_nlink, now.st_mode) == (st.st_ino, 2, st.st_mode)


def test_new_output_is_private(tmp_path: Path, ident: X25519Identity) -> None:
    plain = os.urandom(10)
    sealed(tmp_path, ident, plain)
    proc = cli("decrypt", "-i", "key.txt", "-o", "out", "ct.age", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out").read_bytes() == plain
    assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) == 0o600


def test_fifo_output_is_written_not_replaced(tmp_path: Path, ident: X25519Identity) -> None:
    """A FIFO (or /dev/null, a terminal) is a stream: renaming a file over it would
    replace the node itself."""
    plain = os.urandom(2 * C + 3)
    sealed(tmp_path, ident, plain)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []

    def reader() -> None:
        with open(fifo, "rb") as f:
            got.append(f.read())

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    proc = cli("decrypt", "-i", "key.txt", "-o", "fifo", "ct.age", cwd=tmp_path)
    t.join(30)
    assert proc.returncode == 0, proc.stderr
    assert got == [plain] and stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_library_overwrite_flag(tmp_path: Path, ident: X25519Identity) -> None:
    plain = os.urandom(C)
    ct = sealed(tmp_path, ident, plain)
    out = tmp_path / "out"
    existing(out)
    with pytest.raises(FileExistsError):
        decrypt(ct, out, [ident], overwrite=False)
    with pytest.raises(FileExistsError):
        encrypt(io.BytesIO(b"x"), out, [str(ident.recipient)], overwrite=False)
    assert out.read_bytes() == b"precious"
    decrypt(ct, out, [ident])  # the library's default replaces, as before
    assert out.read_bytes() == plain and stat.S_IMODE(os.stat(out).st_mode) == 0o640


def test_atomic_output_refuses_a_file_made_meanwhile(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(FileExistsError), atomic_output(target, overwrite=False) as f:
        f.write(b"new")
        target.write_bytes(b"theirs")  # another process got there first
    assert target.read_bytes() == b"theirs" and os.listdir(tmp_path) == ["out"]


def test_atomic_output_removes_its_file_on_interruption(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), atomic_output(target) as f:
        f.write(b"half")
        assert len(os.listdir(tmp_path)) == 1
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []
