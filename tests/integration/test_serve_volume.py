"""A LUKS volume made by cryptsetup, served by ``cryptoplane serve`` and used by the real
clients: nbdinfo lists it, qemu-io and nbdcopy write and read it, fio verifies with
crc32c, qemu-img converts it out, and what reached the image is dm-crypt's format (checked
with ``cryptography``'s XTS and the volume key that cryptsetup reports)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from support import unavailable

PASSPHRASE = b"correct horse battery staple"
DATA = 32 << 20


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        unavailable(f"needs {', '.join(missing)} (apt: cryptsetup-bin qemu-utils "
                    "libnbd-bin fio)")


def run(*argv: str | Path, stdin: bytes | None = None, timeout: float = 120) -> str:
    done = subprocess.run([str(a) for a in argv], input=stdin, capture_output=True,
                          timeout=timeout, check=False)
    assert done.returncode == 0, (argv, done.stdout[-2000:], done.stderr[-2000:])
    return done.stdout.decode(errors="replace")


@pytest.fixture(params=["luks2-4096", "luks2-512", "luks1"])
def volume(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path, dict[str, int]]:
    """(image, key file, {offset, sector_size, key}) of a cryptsetup-formatted volume."""
    need("cryptsetup")
    kind: str = request.param
    img, key_file = tmp_path / "vol.img", tmp_path / "pass"
    key_file.write_bytes(PASSPHRASE)
    extra = ["--type", "luks1"] if kind == "luks1" else [
        "--type", "luks2", "--sector-size", kind.split("-")[1]]
    img.touch()
    os.truncate(img, DATA + (16 << 20))
    run("cryptsetup", "luksFormat", "--batch-mode", "--pbkdf", "pbkdf2",
        "--pbkdf-force-iterations", "1000", "--key-file", key_file, *extra, img)
    dump = run("cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode", "--key-file",
               key_file, img)
    # "MK dump:" then rows of hex pairs (cryptsetup 2.6 prints it so for both versions)
    rows = dump.split("MK dump:")[1].splitlines()
    hexkey = "".join(itertools.takewhile(
        lambda row: re.fullmatch(r"(\s*[0-9a-f]{2})+\s*", row) is not None, rows))
    hexkey = "".join(hexkey.split())
    if kind == "luks1":
        offset = int(run("cryptsetup", "luksDump", img).split("Payload offset:")[1].split()[0])
        info = {"offset": offset * 512, "sector_size": 512}
    else:
        meta = json.loads(run("cryptsetup", "luksDump", "--dump-json-metadata", img))
        seg = meta["segments"]["0"]
        info = {"offset": int(seg["offset"]), "sector_size": int(seg["sector_size"])}
    info["key"] = int(hexkey, 16)
    info["key_len"] = len(hexkey) // 2
    return img, key_file, info


@contextlib.contextmanager
def serving(image: Path, key_file: Path, sock: Path) -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, "-m", "cryptoplane", "serve", "--socket",
                             str(sock), "--key-file", str(key_file), "--name", "disk",
                             str(image)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                _, err = proc.communicate()
                pytest.fail(f"cryptoplane serve exited {proc.returncode}: {err.decode()}")
            if sock.exists():
                with socket.socket(socket.AF_UNIX) as s:
                    try:
                        s.connect(str(sock))
                        break
                    except OSError:
                        pass
            assert time.monotonic() < deadline, "cryptoplane serve did not listen in 30 s"
            time.sleep(0.05)
        yield f"nbd+unix:///disk?socket={sock}"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("cryptoplane serve did not stop on SIGTERM")
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def xts_plain(image: Path, info: dict[str, int], offset: int, n: int) -> bytes:
    """The plaintext of ``n`` bytes at ``offset`` of the volume, decrypted from the
    image with ``cryptography`` alone, by dm-crypt's IV rule (cryptsetup's own code is
    the oracle in tests/volume/test_dmcrypt_oracle.py)."""
    sector = info["sector_size"]
    key = info["key"].to_bytes(info["key_len"], "big")
    out = bytearray()
    with open(image, "rb") as f:
        for s in range(offset // sector, (offset + n + sector - 1) // sector):
            f.seek(info["offset"] + s * sector)
            data = f.read(sector)
            iv = s * sector // 512  # dm-crypt counts LUKS IVs in 512-byte units
            dec = Cipher(algorithms.AES(key), modes.XTS(iv.to_bytes(16, "little"))).decryptor()
            out += dec.update(data) + dec.finalize()
    start = offset % sector
    return bytes(out[start:start + n])


def test_real_clients_through_cryptoplane_serve(volume: tuple[Path, Path, dict[str, int]],
                                                tmp_path: Path) -> None:
    need("nbdinfo", "qemu-io", "nbdcopy", "qemu-img", "fio")
    image, key_file, info = volume
    with serving(image, key_file, tmp_path / "nbd.sock") as uri:
        listing = run("nbdinfo", "--list", "--json", uri)
        exports = json.loads(listing)["exports"]
        assert [e["export-name"] for e in exports] == ["disk"]
        size = exports[0]["export-size"]
        assert size == image.stat().st_size - info["offset"]

        # qemu-io: a pattern written and read back, on and off sector boundaries
        run("qemu-io", "-f", "raw", uri, "-c", "write -P 0xa5 1048576 1048576",
            "-c", "write -P 0x3c 3000 5000", "-c", "read -P 0xa5 1048576 1048576",
            "-c", "read -P 0x3c 3000 5000")
        assert xts_plain(image, info, 1 << 20, 1 << 20) == b"\xa5" * (1 << 20)
        assert xts_plain(image, info, 3000, 5000) == b"\x3c" * 5000

        # nbdcopy in, then out: byte for byte
        payload = tmp_path / "payload"
        payload.write_bytes(os.urandom(size))
        run("nbdcopy", payload, uri)
        out = tmp_path / "out"
        run("nbdcopy", uri, out)
        assert out.read_bytes() == payload.read_bytes()
        assert xts_plain(image, info, size - 8192, 8192) == payload.read_bytes()[-8192:]

        # fio writes, then verifies every block with crc32c, at queue depth 16
        run("fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
            "--bs=4k", "--iodepth=16", "--size=8M", "--verify=crc32c", "--do_verify=1",
            "--verify_fatal=1", "--verify_state_save=0", "--output-format=terse", timeout=120)

        # qemu-img convert copies the plaintext out
        copy = tmp_path / "copy.raw"
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, copy)
        assert copy.stat().st_size == size
        # the copy is what the image decrypts to, and fio (first 8 MiB) left the rest alone
        copied = copy.read_bytes()
        assert copied == xts_plain(image, info, 0, size)
        assert copied[8 << 20:] == payload.read_bytes()[8 << 20:]
