"""Helpers the NBD tests share (a module, not conftest: several test directories have a
conftest, and ``from conftest import`` would get whichever was imported first)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import support


def make_image(path: Path, size: int, *, seed: int = 1) -> bytes:
    """An image of pseudo-random bytes (so misplaced data shows)."""
    import random

    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data



def tool(name: str) -> str:
    """The path of program ``name``; fails under CI, skips elsewhere, when missing."""
    path = shutil.which(name)
    if path is None:
        support.unavailable(f"{name} is not installed")
    return path


def luks2_volume(img: Path, size: int, passphrase_file: Path) -> None:
    """A LUKS2 volume made by cryptsetup itself (the other implementation) in ``img``
    (``size`` bytes), unlocked by the passphrase in ``passphrase_file``; a cheap PBKDF2
    so tests open it fast."""
    cryptsetup = tool("cryptsetup")
    with open(img, "wb") as f:
        f.truncate(size)
    res = subprocess.run([cryptsetup, "luksFormat", "-q", "--type", "luks2", "--pbkdf",
                          "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file",
                          str(passphrase_file), str(img)],
                         capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        support.unavailable(f"cryptsetup luksFormat failed here: {res.stderr}")


def nbdsh(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run libnbd's ``nbdsh`` (an independent NBD client: Python bindings of libnbd,
    Debian's python3-libnbd). Its bindings are built for the system's python3, which
    the wrapper script runs by name, so that one comes first on PATH."""
    path = tool("nbdsh")
    env = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONHOME", None)
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)


def terminate(proc: subprocess.Popen[str] | subprocess.Popen[bytes],
              timeout: float = 30) -> None:
    """Stop a server the way an operator does (SIGTERM), killing it only if it does not
    end within ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
