"""Volume against the real programs: images made by cryptsetup, data written and read by
nbdkit's luks filter and by qemu's luks driver; the volume key comes from
``cryptsetup luksDump --dump-volume-key`` and each layout is built by hand here, so these
tests do not depend on cryptoplane's own LUKS header code."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import support
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

import cryptoplane as cp
from cryptoplane.volume.device import Volume
from cryptoplane.volume.layout import DataLayout

PASSPHRASE = b"volume-interop"
MIB = 1 << 20
DATA = 2 * MIB  # bytes of data after the header in each image
FAST_KDF = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]


def need(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        support.unavailable(f"needs {', '.join(missing)} (Debian: cryptsetup-bin "
                            "qemu-utils nbdkit libnbd-bin)")


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        d = shm / f"cp-volume-interop-{os.getpid()}-{random.getrandbits(32):08x}"
        d.mkdir()
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path


def run(*argv: str | Path, stdin: bytes | None = None, timeout: float = 60) -> bytes:
    done = subprocess.run([str(a) for a in argv], input=stdin, capture_output=True,
                          timeout=timeout, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} failed ({done.returncode}): "
                             f"{done.stderr.decode(errors='replace')[-800:]}")
    return done.stdout


def luks_format(d: Path, name: str, *args: str) -> tuple[Path, Path]:
    """A cryptsetup-made image (header + DATA bytes), and its passphrase file."""
    need("cryptsetup")
    pw = d / "passphrase"
    pw.write_bytes(PASSPHRASE)
    img = d / f"{name}.img"
    img.write_bytes(b"")
    os.truncate(img, 32 * MIB)  # room for any header; cut to header + DATA below
    run("cryptsetup", "luksFormat", "--batch-mode", *FAST_KDF, "--key-file", pw, *args, img)
    os.truncate(img, layout_of(img, pw, key=False).offset + DATA)
    return img, pw


def volume_key(img: Path, pw: Path) -> bytes:
    out = run("cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode", "--key-file",
              pw, img).decode()
    # "MK dump:" (cryptsetup 2.6, LUKS1 and 2) or "Volume key:" later, then hex lines
    m = re.search(r"(?:MK dump|Volume key):\s*((?:[0-9a-f]{2}\s+)+)", out)
    assert m, out
    return bytes.fromhex("".join(m.group(1).split()))


def layout_of(img: Path, pw: Path, *, key: bool = True) -> DataLayout:
    """The data segment as luksDump describes it."""
    head = img.read_bytes()[:8]
    version = int.from_bytes(head[6:8], "big")
    vk = volume_key(img, pw) if key else b""
    if version == 1:
        dump = run("cryptsetup", "luksDump", img).decode()
        fields = dict(re.findall(r"^([A-Za-z ]+):\s*(\S+)", dump, re.M))
        cipher = f"{fields['Cipher name']}-{fields['Cipher mode']}"
        offset = int(fields["Payload offset"]) * 512
        return DataLayout(cipher, vk, offset, _size(img, offset), 512, 0)
    meta = json.loads(run("cryptsetup", "luksDump", "--dump-json-metadata", img))
    seg = meta["segments"]["0"]
    offset = int(seg["offset"])
    return DataLayout(seg["encryption"], vk, offset, _size(img, offset),
                      int(seg["sector_size"]), int(seg["iv_tweak"]))


def _size(img: Path, offset: int) -> int:
    return max(0, img.stat().st_size - offset)


def xts(layout: DataLayout, sector: int, data: bytes, *, encrypt: bool) -> bytes:
    """One sector with ``cryptography``'s XTS and plain64 tweak, counted in 512-byte units
    (cryptsetup's own code is the oracle in test_dmcrypt_oracle.py)."""
    tweak = (layout.iv_offset + sector * layout.sector_size // 512).to_bytes(16, "little")
    c = Cipher(algorithms.AES(layout.volume_key), modes.XTS(tweak))
    ctx = c.encryptor() if encrypt else c.decryptor()
    return ctx.update(data) + ctx.finalize()


def random_writes(vol: Volume, model: bytearray, rng: random.Random, count: int) -> None:
    ss = vol.block_size
    for i in range(count):
        if i % 2:  # aligned
            start = rng.randrange(vol.size // ss) * ss
            n = rng.randrange(1, 9) * ss
        else:
            start = rng.randrange(vol.size)
            n = rng.randrange(1, 3 * ss)
        n = min(n, vol.size - start)
        data = rng.randbytes(n)
        vol.pwrite(start, data)
        model[start:start + n] = data


XTS_IMAGES = [
    pytest.param(["--type", "luks2", "--sector-size", "512"], id="luks2-512"),
    pytest.param(["--type", "luks2", "--sector-size", "4096"], id="luks2-4096"),
    pytest.param(["--type", "luks1", "--key-size", "512"], id="luks1-xts512"),
    pytest.param(["--type", "luks1", "--key-size", "256"], id="luks1-xts256"),
]


@pytest.mark.parametrize("args", XTS_IMAGES)
def test_written_data_decrypts_with_the_dumped_volume_key(
        workdir: Path, plane: cp.Plane, args: list[str]) -> None:
    img, pw = luks_format(workdir, "x", *args)
    layout = layout_of(img, pw)
    assert layout.cipher == "aes-xts-plain64" and layout.size == DATA
    rng = random.Random(1)
    model = bytearray(rng.randbytes(DATA))
    with Volume(img, layout, plane) as vol:
        vol.pwrite(0, model)
        random_writes(vol, model, rng, 60)
        assert vol.read(0, DATA) == model
    raw = img.read_bytes()[layout.offset:]
    ss = layout.sector_size
    for i in range(DATA // ss):
        got = xts(layout, i, raw[i * ss:(i + 1) * ss], encrypt=False)
        assert got == model[i * ss:(i + 1) * ss], f"sector {i}"


@pytest.mark.parametrize("args", XTS_IMAGES[:3])
def test_data_encrypted_by_cryptography_reads_back(
        workdir: Path, plane: cp.Plane, args: list[str]) -> None:
    img, pw = luks_format(workdir, "x", *args)
    layout = layout_of(img, pw)
    ss = layout.sector_size
    rng = random.Random(2)
    plain = rng.randbytes(DATA)
    cipher = b"".join(xts(layout, i, plain[i * ss:(i + 1) * ss], encrypt=True)
                      for i in range(DATA // ss))
    with open(img, "r+b") as f:
        f.seek(layout.offset)
        f.write(cipher)
    with Volume(img, layout, plane, read_only=True) as vol:
        assert vol.read(0, DATA) == plain
        for _ in range(40):
            start = rng.randrange(DATA)
            n = rng.randrange(min(3 * ss, DATA - start) + 1)
            assert vol.read(start, n) == plain[start:start + n]


def test_luks2_iv_tweak_is_honoured(workdir: Path, plane: cp.Plane) -> None:
    """A segment whose IVs start at iv_offset: what cryptography computes with that tweak
    base is what the volume reads."""
    img, pw = luks_format(workdir, "x", "--type", "luks2", "--sector-size", "4096")
    base = layout_of(img, pw)
    layout = DataLayout(base.cipher, base.volume_key, base.offset, base.size, 4096, 1000)
    plain = os.urandom(4096 * 3)
    with open(img, "r+b") as f:
        f.seek(layout.offset)
        f.write(b"".join(xts(layout, i, plain[i * 4096:(i + 1) * 4096], encrypt=True)
                         for i in range(3)))
    with Volume(img, layout, plane) as vol:
        assert vol.read(0, len(plain)) == plain


# -- nbdkit's luks filter (LUKS1, XTS) ----------------------------------------------------

def nbdkit(img: Path, pw: Path, run_cmd: str, stdin: bytes | None = None) -> bytes:
    need("nbdkit", "nbdcopy")
    return run("nbdkit", "-U", "-", "--filter=luks", "file", img, f"passphrase=+{pw}",
               "--run", run_cmd, stdin=stdin)


def test_nbdkit_writes_volume_reads(workdir: Path, plane: cp.Plane) -> None:
    img, pw = luks_format(workdir, "n", "--type", "luks1", "--key-size", "512")
    data = os.urandom(DATA)
    nbdkit(img, pw, 'nbdcopy - "$uri"', stdin=data)
    with Volume(img, layout_of(img, pw), plane) as vol:
        assert vol.size == DATA
        assert vol.read(0, DATA) == data
        assert vol.read(12345, 6789) == data[12345:12345 + 6789]


def test_volume_writes_nbdkit_reads(workdir: Path, plane: cp.Plane) -> None:
    img, pw = luks_format(workdir, "n", "--type", "luks1", "--key-size", "512")
    rng = random.Random(3)
    model = bytearray(rng.randbytes(DATA))
    with Volume(img, layout_of(img, pw), plane) as vol:
        vol.pwrite(0, model)
        random_writes(vol, model, rng, 40)
    assert nbdkit(img, pw, 'nbdcopy "$uri" -') == model


# -- qemu's luks driver: every cipher variant qemu and cryptsetup make for LUKS1 ----------

QEMU_CIPHERS = [
    ("aes-xts-plain64", "512"),
    ("aes-xts-plain", "256"),
    ("aes-xts-essiv:sha256", "512"),
    ("aes-cbc-essiv:sha256", "256"),
    ("aes-cbc-plain", "128"),
    ("aes-cbc-plain64", "256"),
    ("aes-ctr-plain64", "256"),
]


def qemu_io(img: Path, pw: Path, *commands: str) -> str:
    need("qemu-io")
    argv: list[str | Path] = ["qemu-io", "--object", f"secret,id=s0,file={pw}",
                              "--image-opts", f"driver=luks,key-secret=s0,file.filename={img}"]
    for c in commands:
        argv += ["-c", c]
    out = run(*argv).decode()
    assert "failed" not in out.lower(), out
    return out


@pytest.mark.parametrize(("cipher", "bits"), QEMU_CIPHERS)
def test_qemu_writes_volume_reads(workdir: Path, plane: cp.Plane, cipher: str,
                                  bits: str) -> None:
    img, pw = luks_format(workdir, "q", "--type", "luks1", "--cipher", cipher,
                          "--key-size", bits)
    layout = layout_of(img, pw)
    assert layout.cipher == cipher
    qemu_io(img, pw, "write -P 0x5a 0 1M", "write -P 0xa5 1000 3000",
            f"write -P 0x3c {DATA - 4096} 4096")
    expect = bytearray(b"\x5a" * MIB)
    expect[1000:4000] = b"\xa5" * 3000
    with Volume(img, layout, plane) as vol:
        assert vol.read(0, MIB) == expect
        assert vol.read(DATA - 4096, 4096) == b"\x3c" * 4096


@pytest.mark.parametrize(("cipher", "bits"), QEMU_CIPHERS)
def test_volume_writes_qemu_reads(workdir: Path, plane: cp.Plane, cipher: str,
                                  bits: str) -> None:
    img, pw = luks_format(workdir, "q", "--type", "luks1", "--cipher", cipher,
                          "--key-size", bits)
    with Volume(img, layout_of(img, pw), plane) as vol:
        vol.pwrite(0, b"\x5a" * MIB)
        vol.pwrite(1000, b"\xa5" * 3000)  # unaligned: read-modify-write of edge sectors
        vol.write_zeroes(MIB, 70000)
    qemu_io(img, pw, "read -P 0x5a 0 1000", "read -P 0xa5 1000 3000",
            f"read -P 0x5a 4000 {MIB - 4000}", f"read -P 0 {MIB} 70000")
