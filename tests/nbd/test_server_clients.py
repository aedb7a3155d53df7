"""Real NBD clients (libnbd's nbdinfo/nbdcopy, qemu-io, qemu-img, fio) against the server."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nbdclient as nc
import pytest
import wire as P
from nbdtools import make_image, tool

from cryptoplane.nbd.blockdev import FileDevice
from cryptoplane.nbd.runner import ServerThread


def run(*cmd: str, timeout: float = 60, cwd: Path | None = None) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert res.returncode == 0, f"{cmd}: {res.stderr}"
    return res.stdout


def test_nbdinfo_lists_exports_with_sizes_and_block_sizes(tmp_path: Path, sockdir: str) -> None:
    nbdinfo = tool("nbdinfo")
    make_image(tmp_path / "a.img", 1 << 20)
    make_image(tmp_path / "b.img", 3 << 20)
    with FileDevice(tmp_path / "a.img", block_size=512) as a, \
            FileDevice(tmp_path / "b.img", read_only=True) as b, \
            ServerThread({"alpha": a, "beta": b}, socket_path=f"{sockdir}/s") as s:
        out = json.loads(run(nbdinfo, "--list", "--json", f"nbd+unix:///?socket={s.socket_path}"))
    exports = {e["export-name"]: e for e in out["exports"]}
    assert set(exports) == {"alpha", "beta"}
    assert exports["alpha"]["export-size"] == 1 << 20
    assert exports["beta"]["export-size"] == 3 << 20
    assert exports["alpha"]["block_size_minimum"] == 512
    assert exports["beta"]["block_size_minimum"] == 4096
    assert exports["beta"]["block_size_maximum"] == 32 << 20
    assert exports["beta"]["is_read_only"] and not exports["alpha"]["is_read_only"]
    assert exports["alpha"]["can_multi_conn"] and exports["alpha"]["can_flush"]


def test_qemu_io_write_then_read_pattern(image: tuple[Path, bytes], sockdir: str) -> None:
    qemu_io = tool("qemu-io")
    path, data = image
    with FileDevice(path) as dev, ServerThread({"disk": dev}, socket_path=f"{sockdir}/s") as s:
        out = run(qemu_io, "-f", "raw", s.url_for("disk"), "-c", "write -P 0xab 0 1M",
                  "-c", "read -P 0xab 0 1M")
    assert "Pattern verification failed" not in out
    got = path.read_bytes()
    assert got[:1 << 20] == b"\xab" * (1 << 20)
    assert got[1 << 20:] == data[1 << 20:]


@pytest.mark.parametrize("inline_limit", [None, 0], ids=["inline", "thread-pool"])
def test_nbdcopy_in_and_out(image: tuple[Path, bytes], tmp_path: Path, sockdir: str,
                            inline_limit: int | None) -> None:
    nbdcopy = tool("nbdcopy")
    path, _ = image
    src = make_image(tmp_path / "src.img", 16 << 20, seed=7)
    with FileDevice(path) as dev, ServerThread({"disk": dev}, socket_path=f"{sockdir}/s",
                                               inline_limit=inline_limit) as s:
        run(nbdcopy, str(tmp_path / "src.img"), s.url)
        assert path.read_bytes() == src
        run(nbdcopy, s.url, str(tmp_path / "out.img"))
    assert (tmp_path / "out.img").read_bytes() == src


def test_two_nbdcopy_at_once(image: tuple[Path, bytes], tmp_path: Path, sockdir: str) -> None:
    nbdcopy = tool("nbdcopy")
    path, data = image
    with FileDevice(path) as dev, ServerThread({"disk": dev}, socket_path=f"{sockdir}/s") as s:
        procs = [subprocess.Popen([nbdcopy, "--connections=4", s.url, str(tmp_path / f"o{i}")])
                 for i in range(2)]
        for p in procs:
            assert p.wait(60) == 0
    assert (tmp_path / "o0").read_bytes() == data == (tmp_path / "o1").read_bytes()


def test_qemu_img_convert_equals_source(image: tuple[Path, bytes], tmp_path: Path,
                                        sockdir: str) -> None:
    qemu_img = tool("qemu-img")
    path, data = image
    with FileDevice(path) as dev, ServerThread({"disk": dev}, socket_path=f"{sockdir}/s") as s:
        run(qemu_img, "convert", "-f", "raw", "-O", "raw", s.url, str(tmp_path / "out.img"))
    assert (tmp_path / "out.img").read_bytes() == data


@pytest.mark.parametrize(("jobs", "bs", "inline_limit"), [(1, "4k", None), (2, "4k", None),
                                                          (2, "64k", 0)])
def test_fio_randwrite_verify(image: tuple[Path, bytes], sockdir: str, jobs: int, bs: str,
                              inline_limit: int | None) -> None:
    """fio writes random blocks with checksums, then reads every one back and checks it
    (its verify pass): with a write-only load, fio reads only to verify, so read bytes
    equal to written bytes show that the verify pass ran over all of it."""
    fio = tool("fio")
    path, _ = image
    size = (16 << 20) // jobs
    with FileDevice(path) as dev, ServerThread({"disk": dev}, socket_path=f"{sockdir}/s",
                                               inline_limit=inline_limit) as s:
        out = run(fio, "--name=v", "--ioengine=nbd", f"--uri={s.url}", "--rw=randwrite",
                  f"--bs={bs}", "--iodepth=32", "--verify=crc32c", "--do_verify=1",
                  "--verify_fatal=1", f"--size={size}", f"--numjobs={jobs}",
                  f"--offset_increment={size}", "--verify_state_save=0",
                  "--output-format=json", timeout=90, cwd=path.parent)
    result = json.loads(out[out.index("{"):])
    assert len(result["jobs"]) == jobs
    for job in result["jobs"]:
        assert job["error"] == 0
        assert job["write"]["io_bytes"] == size  # every block written once
        assert job["read"]["io_bytes"] == size  # and read back by the verify pass


def test_read_only_refuses_writes_with_eperm(image: tuple[Path, bytes], sockdir: str) -> None:
    path, data = image
    with FileDevice(path) as dev, \
            ServerThread({"disk": dev}, socket_path=f"{sockdir}/s", read_only=True) as s:
        c = nc.Client(f"{sockdir}/s")
        _, flags = c.go("disk")
        assert flags & P.TF_READ_ONLY
        assert c.command(P.CMD_WRITE, 1, 0, 4096, payload=b"x" * 4096).error == P.EPERM
        assert c.command(P.CMD_WRITE_ZEROES, 2, 0, 4096).error == P.EPERM
        assert c.command(P.CMD_TRIM, 3, 0, 4096).error == P.EPERM
        reply = c.command(P.CMD_READ, 4, 0, 4096)
        assert (reply.error, reply.data) == (0, data[:4096])
        c.close()
    assert path.read_bytes() == data
    qemu_io = tool("qemu-io")
    with FileDevice(path) as dev, \
            ServerThread({"disk": dev}, socket_path=f"{sockdir}/s", read_only=True) as s:
        res = subprocess.run([qemu_io, "-f", "raw", s.url, "-c", "write 0 4k"],
                             capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 or "Permission denied" in res.stdout + res.stderr
    assert path.read_bytes() == data


def test_tcp_listener(image: tuple[Path, bytes]) -> None:
    nbdinfo = tool("nbdinfo")
    path, _ = image
    with FileDevice(path) as dev, ServerThread({"disk": dev}, tcp=("127.0.0.1", 0)) as s:
        assert s.url.startswith("nbd://127.0.0.1:")
        out = json.loads(run(nbdinfo, "--json", s.url))
    assert out["exports"][0]["export-size"] == 16 << 20




def test_plain_asyncio_without_uvloop(image: tuple[Path, bytes], tmp_path: Path,
                                      sockdir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from cryptoplane.nbd import runner

    nbdcopy = tool("nbdcopy")
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if it were not installed
    with pytest.warns(RuntimeWarning, match="uvloop"):
        runner.new_event_loop().close()
    path, _ = image
    src = make_image(tmp_path / "src.img", 16 << 20, seed=3)
    with pytest.warns(RuntimeWarning), FileDevice(path) as dev, \
            ServerThread({"disk": dev}, socket_path=f"{sockdir}/s") as s:
        run(nbdcopy, str(tmp_path / "src.img"), s.url)
        run(nbdcopy, s.url, str(tmp_path / "out.img"))
    assert path.read_bytes() == src == (tmp_path / "out.img").read_bytes()
