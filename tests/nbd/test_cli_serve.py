"""``cryptoplane serve``: the command line around the NBD server."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from nbdtools import luks2_volume, make_image, tool

from cryptoplane.cli.serve import serve

SERVE = [sys.executable, "-c", "from cryptoplane.cli.serve import serve; serve()"]


def test_help_explains() -> None:
    out = CliRunner().invoke(serve, ["--help"]).output
    for word in ("--socket", "--port", "--read-only", "--raw", "--key-file",
                 "--passphrase-fd", "--tls-cert", "nbd+unix://", "LUKS"):
        assert word in out


@pytest.mark.parametrize("args", [["--raw"], ["--raw", "--socket", "s", "--name", "a",
                                              "--name", "b"],
                                  ["--raw", "--socket", "s", "--key-file", "__IMG__"],
                                  ["--raw", "--socket", "s", "--tls-cert", "__IMG__"]])
def test_usage_errors(tmp_path: Path, args: list[str]) -> None:
    img = tmp_path / "x.img"
    make_image(img, 4096)
    args = [str(img) if a == "__IMG__" else a for a in args]
    res = CliRunner().invoke(serve, [str(img), *args])
    assert res.exit_code == 2, res.output


def start(args: list[str], **kw: object) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen([*SERVE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)  # type: ignore[call-overload]
    urls = []
    assert proc.stdout is not None
    for _ in range(10):
        line = proc.stdout.readline()
        if not line:
            break
        urls.append(line.strip())
        if line.startswith("nbd"):
            break
    return proc, urls


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(20) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_raw_images(tmp_path: Path, sockdir: str) -> None:
    qemu_io = tool("qemu-io")
    data = make_image(tmp_path / "first.img", 1 << 20)
    sock = f"{sockdir}/s"
    proc, urls = start([str(tmp_path / "first.img"), "--raw", "--socket", sock])
    try:
        assert urls == [f"nbd+unix:///first?socket={sock}"]
        res = subprocess.run([qemu_io, "-f", "raw", urls[0], "-c", "write -P 0x5a 0 64k"],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
    finally:
        stop(proc)
    assert not os.path.exists(sock)
    assert (tmp_path / "first.img").read_bytes() == b"\x5a" * 65536 + data[65536:]


def test_serve_luks_volume(tmp_path: Path, sockdir: str) -> None:
    qemu_io = tool("qemu-io")
    img = tmp_path / "vol.img"
    pw = tmp_path / "pw"
    pw.write_bytes(b"correct horse")
    luks2_volume(img, 32 << 20, pw)
    sock = f"{sockdir}/s"
    r, w = os.pipe()
    os.write(w, b"correct horse\n")
    os.close(w)
    proc, urls = start([str(img), "--socket", sock, "--name", "secret", "--passphrase-fd",
                        str(r)], pass_fds=(r,))
    os.close(r)
    try:
        assert urls == [f"nbd+unix:///secret?socket={sock}"], proc.stderr.read() \
            if proc.stderr else ""
        res = subprocess.run([qemu_io, "-f", "raw", urls[0], "-c", "write -P 0x77 0 1M",
                              "-c", "read -P 0x77 0 1M"], capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 0 and "failed" not in res.stdout, res.stdout + res.stderr
    finally:
        stop(proc)
    assert b"\x77" * 4096 not in img.read_bytes()  # what reached the disk is ciphertext
    proc, urls = start([str(img), "--socket", sock, "--key-file", str(pw), "--read-only"])
    try:
        res = subprocess.run([qemu_io, "-r", "-f", "raw", urls[0], "-c", "read -P 0x77 0 1M"],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and "failed" not in res.stdout, res.stdout + res.stderr
    finally:
        stop(proc)


def test_wrong_passphrase_is_an_error(tmp_path: Path, sockdir: str) -> None:
    cryptsetup = shutil.which("cryptsetup")
    if cryptsetup is None:
        import support
        support.unavailable("cryptsetup is not installed")
    img = tmp_path / "vol.img"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    pw = tmp_path / "pw"
    pw.write_bytes(b"right")
    subprocess.run([cryptsetup, "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2",
                    "--pbkdf-force-iterations", "1000", "--key-file", str(pw), str(img)],
                   check=True, capture_output=True, timeout=60)
    res = CliRunner().invoke(serve, [str(img), "--socket", f"{sockdir}/s"], input="wrong\n")
    assert res.exit_code == 1
    assert "wrong" not in res.output.split("Passphrase")[-1]  # never echoed back


def test_fio_verify_on_a_luks_volume(tmp_path: Path, sockdir: str) -> None:
    """The encrypted device under concurrent load: big requests go to the thread pool."""
    import json

    from cryptoplane.nbd.runner import ServerThread
    from cryptoplane.volume import open_volume

    cryptsetup, fio = tool("cryptsetup"), tool("fio")
    img = tmp_path / "vol.img"
    with open(img, "wb") as f:
        f.truncate(48 << 20)
    pw = tmp_path / "pw"
    pw.write_bytes(b"pw")
    subprocess.run([cryptsetup, "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2",
                    "--pbkdf-force-iterations", "1000", "--key-file", str(pw), str(img)],
                   check=True, capture_output=True, timeout=60)
    vol = open_volume(img, key_file=str(pw))
    try:
        with ServerThread({"vol": vol}, socket_path=f"{sockdir}/s") as s:
            res = subprocess.run(
                [fio, "--name=v", "--ioengine=nbd", f"--uri={s.url}", "--rw=randrw",
                 "--bsrange=4k-256k", "--iodepth=16", "--verify=crc32c", "--size=8m",
                 "--numjobs=2", "--offset_increment=8m", "--verify_state_save=0",
                 "--output-format=json"], capture_output=True, text=True, timeout=120,
                cwd=tmp_path)
    finally:
        vol.close()
    assert res.returncode == 0, res.stderr
    for job in json.loads(res.stdout[res.stdout.index("{"):])["jobs"]:
        assert job["error"] == 0 and job["write"]["io_bytes"] > 0
