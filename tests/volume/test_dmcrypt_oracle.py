"""Data compatibility with dm-crypt, with cryptsetup's own code as the oracle.

cryptsetup's offline ``reencrypt`` runs dm-crypt's data format in user space (no
device-mapper): ``--encrypt`` turns a plain image into a LUKS volume, ``--decrypt`` turns
a volume (with a detached header whose data offset is 0) back into plain bytes. So:
data cryptsetup wrote must read byte-exact through cryptoplane (the API and ``serve``
over NBD), and data cryptoplane wrote must come back byte-exact from cryptsetup. No IV
or tweak is computed here: an earlier suite compared cryptoplane with its own reading of
the format and passed while every 4 KiB-sector volume was garbage to dm-crypt.

LUKS1 goes through ``cryptsetup convert`` (a header rewrite; the data is untouched):
cryptsetup's LUKS1 reencryption needs device-mapper, its LUKS2 one does not.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import unavailable

import cryptoplane as cp
from cryptoplane.volume import luks
from cryptoplane.volume.device import Volume

PASSPHRASE = b"oracle passphrase"
DATA = 1 << 20  # the plaintext each image holds
REDUCE = 4 << 20  # room cryptsetup's --encrypt takes for the header (data at 2 MiB)
CIPHERS = {  # spec: key bits (XTS takes two AES keys)
    "aes-xts-plain64": 512,
    "aes-xts-plain": 512,
    "aes-cbc-essiv:sha256": 256,
    "aes-cbc-plain64": 256,
}
KINDS = [("luks2", 512), ("luks2", 1024), ("luks2", 2048), ("luks2", 4096), ("luks1", 512)]
CASES = [pytest.param(kind, ss, spec, id=f"{kind}-{ss}-{spec}")
         for kind, ss in KINDS for spec in CIPHERS]


def cryptsetup(*argv: str | Path, timeout: float = 60) -> str:
    if shutil.which("cryptsetup") is None:
        unavailable("needs cryptsetup (apt: cryptsetup-bin)")
    done = subprocess.run(["cryptsetup", "--batch-mode", *map(str, argv)],
                          capture_output=True, timeout=timeout, check=False)
    assert done.returncode == 0, (argv, done.stdout[-2000:], done.stderr[-2000:])
    return done.stdout.decode(errors="replace")


def plaintext(seed: str) -> bytes:
    return random.Random(seed).randbytes(DATA)


def encrypted_by_cryptsetup(path: Path, key_file: Path, kind: str, sector_size: int,
                            spec: str) -> bytes:
    """A volume at ``path`` whose data cryptsetup encrypted; returns its plaintext."""
    plain = plaintext(f"{kind}-{sector_size}-{spec}")
    path.write_bytes(plain + bytes(REDUCE))
    cryptsetup("reencrypt", "--encrypt", "--type", "luks2", "--reduce-device-size",
               f"{REDUCE}", "--force-offline-reencrypt", "--key-file", key_file,
               "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
               "--cipher", spec, "--key-size", str(CIPHERS[spec]),
               "--sector-size", str(sector_size), path)
    if kind == "luks1":
        cryptsetup("convert", "--type", "luks1", path)
    assert f"Version:       \t{kind[-1]}" in cryptsetup("luksDump", path)
    return plain


@pytest.fixture(scope="module")
def cryptsetup_images(tmp_path_factory: pytest.TempPathFactory,
                      ) -> tuple[Path, dict[str, tuple[Path, bytes]]]:
    """Every case's image, made once: (key file, {case id: (image, plaintext)})."""
    top = tmp_path_factory.mktemp("by-cryptsetup")
    key_file = top / "pass"
    key_file.write_bytes(PASSPHRASE)
    images = {}
    for kind, ss in KINDS:
        for spec in CIPHERS:
            name = f"{kind}-{ss}-{spec}"
            img = top / f"{name.replace(':', '_')}.img"
            images[name] = (img, encrypted_by_cryptsetup(img, key_file, kind, ss, spec))
    return key_file, images


@pytest.mark.parametrize(("kind", "sector_size", "spec"), CASES)
def test_data_cryptsetup_wrote_reads_byte_exact(
        cryptsetup_images: tuple[Path, dict[str, tuple[Path, bytes]]], plane: cp.Plane,
        kind: str, sector_size: int, spec: str) -> None:
    img, plain = cryptsetup_images[1][f"{kind}-{sector_size}-{spec}"]
    layout = luks.unlock(img, passphrase=PASSPHRASE)
    assert (layout.cipher, layout.sector_size) == (spec, sector_size)
    with Volume(img, layout, plane, read_only=True) as vol:
        assert vol.read(0, DATA) == plain
        # unaligned reads take the per-sector edges; runs cross region boundaries
        rng = random.Random(sector_size)
        for _ in range(20):
            start = rng.randrange(DATA - 1)
            n = rng.randrange(1, min(3 * sector_size, DATA - start) + 1)
            assert vol.read(start, n) == plain[start:start + n], (start, n)


@pytest.mark.parametrize(("kind", "sector_size", "spec"), CASES)
def test_data_cryptoplane_wrote_decrypts_with_cryptsetup(
        tmp_path: Path, plane: cp.Plane, kind: str, sector_size: int, spec: str) -> None:
    data, header = tmp_path / "data", tmp_path / "header"
    data.write_bytes(bytes(DATA))
    luks.format(data, PASSPHRASE, version=int(kind[-1]), cipher=spec,
                key_size=CIPHERS[spec], sector_size=sector_size, kdf="pbkdf2",
                kdf_params={"iterations": 1000}, header=header)
    layout = luks.unlock(data, passphrase=PASSPHRASE, header=header)
    assert layout.offset == 0 and layout.size == DATA
    plain = plaintext(f"ours-{kind}-{sector_size}-{spec}")
    rng = random.Random(1)
    with Volume(data, layout, plane) as vol:
        # whole runs, then unaligned writes through the read-modify-write edges
        vol.pwrite(0, plain[:DATA // 2])
        vol.pwrite(DATA // 2, plain[DATA // 2:])
        for _ in range(20):
            start = rng.randrange(DATA - 1)
            n = rng.randrange(1, min(3 * sector_size, DATA - start) + 1)
            vol.pwrite(start, plain[start:start + n])
    assert decrypted_by_cryptsetup(data, header, kind, tmp_path) == plain


def decrypted_by_cryptsetup(data: Path, header: Path, kind: str, tmp: Path) -> bytes:
    """The plaintext cryptsetup decrypts a detached-header volume to (in place)."""
    key_file = tmp / "oracle-pass"
    key_file.write_bytes(PASSPHRASE)
    if kind == "luks1":
        cryptsetup("convert", "--type", "luks2", "--header", header, data)
    cryptsetup("reencrypt", "--decrypt", "--header", header, "--key-file", key_file,
               "--force-offline-reencrypt", data)
    return data.read_bytes()


def test_luks2_iv_tweak_is_honoured_as_cryptsetup_does(tmp_path: Path,
                                                        plane: cp.Plane) -> None:
    """A segment whose first IV is iv_tweak (512-byte units, whatever the sector size).

    cryptsetup's reencrypt ignores iv_tweak, so the oracle shifts the data instead: IVs
    that start at 24 are those of a volume with iv_tweak 0 whose data starts 24 * 512
    bytes earlier. cryptsetup decrypts that longer device, and from byte 12288 on it must
    read what cryptoplane wrote."""
    data, header = tmp_path / "data", tmp_path / "header"
    data.write_bytes(bytes(DATA))
    luks.format(data, PASSPHRASE, sector_size=4096, kdf="pbkdf2",
                kdf_params={"iterations": 1000}, header=header)
    set_iv_tweak(header, 24)  # three 4096-byte sectors' worth
    layout = luks.unlock(data, passphrase=PASSPHRASE, header=header)
    assert layout.iv_offset == 24 and layout.iv_step == 8
    plain = plaintext("iv-tweak")
    with Volume(data, layout, plane) as vol:
        vol.pwrite(0, plain)
    shifted = luks.unlock(data, passphrase=PASSPHRASE, header=header)
    with Volume(data, shifted.__class__(**{**vars(shifted), "iv_offset": 0}), plane,
                read_only=True) as vol:
        assert vol.read(0, 4096) != plain[:4096]  # iv_tweak 0 would read garbage
    set_iv_tweak(header, 0)
    data.write_bytes(bytes(24 * 512) + data.read_bytes())
    assert decrypted_by_cryptsetup(data, header, "luks2", tmp_path)[24 * 512:] == plain


def set_iv_tweak(header: Path, tweak: int) -> None:
    """Rewrite both copies of a LUKS2 header with segment 0's iv_tweak set (cryptsetup
    has no command for it; it sets iv_tweak itself during data-shift reencryption)."""
    from cryptoplane.volume import luks2
    blob = header.read_bytes()[:luks2.READ_SIZE]
    h = luks2.decode(blob)
    seg = h.metadata.segments[0]
    segments = {0: seg.__class__(**{**vars(seg), "iv_tweak": tweak})}
    meta = h.metadata.__class__(**{**vars(h.metadata), "segments": segments})
    new = h.replace(metadata=meta, seqid=h.seqid + 1)
    with open(header, "r+b") as f:
        f.write(luks2.encode_copy(new, False))
        f.seek(h.hdr_size)
        f.write(luks2.encode_copy(new, True))


def test_serve_reads_what_cryptsetup_wrote_over_nbd(
        cryptsetup_images: tuple[Path, dict[str, tuple[Path, bytes]]],
        tmp_path: Path) -> None:
    """Every case's image served by one ``cryptoplane serve`` and copied out by nbdcopy."""
    if shutil.which("nbdcopy") is None:
        unavailable("needs nbdcopy (apt: libnbd-bin)")
    key_file, images = cryptsetup_images
    names = sorted(images)
    argv = [sys.executable, "-m", "cryptoplane", "serve", "--read-only", "--socket",
            str(tmp_path / "nbd.sock"), "--key-file", str(key_file)]
    for i in range(len(names)):
        argv += ["--name", f"e{i}"]
    argv += [str(images[n][0]) for n in names]
    with serving(argv, tmp_path / "nbd.sock"):
        for i, name in enumerate(names):
            out = tmp_path / f"out{i}"
            done = subprocess.run(["nbdcopy", f"nbd+unix:///e{i}?socket={tmp_path}/nbd.sock",
                                   str(out)], capture_output=True, timeout=60, check=False)
            assert done.returncode == 0, (name, done.stderr[-2000:])
            assert out.read_bytes()[:DATA] == images[name][1], name


def test_serve_writes_what_cryptsetup_decrypts(tmp_path: Path) -> None:
    """nbdcopy writes through ``cryptoplane serve`` to a 4096-byte-sector LUKS2 volume;
    cryptsetup decrypts the image to exactly what was copied in."""
    if shutil.which("nbdcopy") is None:
        unavailable("needs nbdcopy (apt: libnbd-bin)")
    data, header, key_file = tmp_path / "data", tmp_path / "header", tmp_path / "pass"
    data.write_bytes(bytes(DATA))
    key_file.write_bytes(PASSPHRASE)
    luks.format(data, PASSPHRASE, sector_size=4096, kdf="pbkdf2",
                kdf_params={"iterations": 1000}, header=header)
    payload = tmp_path / "payload"
    payload.write_bytes(plaintext("over-nbd"))
    sock = tmp_path / "nbd.sock"
    with serving([sys.executable, "-m", "cryptoplane", "serve", "--socket", str(sock),
                  "--key-file", str(key_file), "--header", str(header), "--name", "d",
                  str(data)], sock):
        done = subprocess.run(["nbdcopy", str(payload), f"nbd+unix:///d?socket={sock}"],
                              capture_output=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
    assert decrypted_by_cryptsetup(data, header, "luks2", tmp_path) == payload.read_bytes()


class serving:
    """``cryptoplane serve`` running until the block ends (stopped with SIGTERM)."""

    def __init__(self, argv: list[str], sock: Path) -> None:
        self.argv, self.sock = argv, sock

    def __enter__(self) -> None:
        import socket
        import time
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                assert self.proc.stderr is not None
                pytest.fail(f"serve exited {self.proc.returncode}: "
                            f"{self.proc.stderr.read().decode()[-2000:]}")
            if self.sock.exists():
                with socket.socket(socket.AF_UNIX) as s:
                    try:
                        s.connect(str(self.sock))
                        return
                    except OSError:
                        pass
            assert time.monotonic() < deadline, "serve did not listen in 30 s"
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            assert self.proc.stderr is not None
            self.proc.stderr.close()
