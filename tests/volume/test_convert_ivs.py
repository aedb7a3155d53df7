"""``cryptoplane volume convert-ivs``: volumes that cryptoplane 0.1 wrote with the old IVs
(sector-size units) become volumes dm-crypt reads, crash-safe, and cryptsetup's own code
is the judge of the result.

A 0.1 volume is made as 0.1 wrote it: formatted, then written through a ``Volume`` whose
layout counts IVs in sector-size units with ``iv_offset = iv_tweak * 512 // sector_size``
(0.1's ``data_layout``, kept as ``legacy_ivs``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import unavailable

from cryptoplane.exceptions import NotSupported
from cryptoplane.volume import convert_ivs, luks
from cryptoplane.volume.device import Volume
from cryptoplane.volume.errors import CorruptHeader

PASSPHRASE = b"convert me"
FAST = {"iterations": 1000}


def cryptsetup(*argv: str | Path, ok: bool = True) -> subprocess.CompletedProcess[bytes]:
    if shutil.which("cryptsetup") is None:
        unavailable("needs cryptsetup (apt: cryptsetup-bin)")
    done = subprocess.run(["cryptsetup", "--batch-mode", *map(str, argv)],
                          capture_output=True, timeout=120, check=False)
    if ok:
        assert done.returncode == 0, (argv, done.stderr[-2000:])
    return done


def file_like_data(size: int, seed: int) -> bytes:
    """What a file system holds: mostly text and zeros, a few random sectors."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        if rng.random() < 0.2:
            out += rng.randbytes(4096)
        else:
            line = f"block {len(out)} of a file, seed {seed}\n".encode()
            out += (line * (4096 // len(line) + 1))[:4096 - 512] + bytes(512)
    return bytes(out[:size])


def legacy_volume(tmp: Path, size: int, sector_size: int = 4096, *, detached: bool = True,
                  seed: int = 1) -> tuple[Path, Path | None, bytes]:
    """(data, header, plaintext) of a volume as cryptoplane 0.1 wrote it."""
    data = tmp / "data"
    header = tmp / "header" if detached else None
    with open(data, "wb") as f:
        f.truncate(size if detached else size + (16 << 20))
    luks.format(data, PASSPHRASE, sector_size=sector_size, kdf="pbkdf2", kdf_params=FAST,
                header=header)
    layout = luks.unlock(data, passphrase=PASSPHRASE, header=header)
    old = dataclasses.replace(layout, iv_offset=layout.iv_offset * 512 // sector_size,
                              iv_large_sectors=True)
    plain = file_like_data(layout.size, seed)
    with Volume(data, old) as vol:
        vol.pwrite(0, plain)
    return data, header, plain


def decrypted_by_cryptsetup(data: Path, header: Path, tmp: Path) -> bytes:
    key_file = tmp / "pass"
    key_file.write_bytes(PASSPHRASE)
    cryptsetup("reencrypt", "--decrypt", "--header", header, "--key-file", key_file,
               "--force-offline-reencrypt", data)
    return data.read_bytes()


def cli(*args: str | Path, key_file: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "cryptoplane", "volume", "convert-ivs",
                             "--key-file", str(key_file), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def token_offset(header: Path) -> int | None:
    """How far the conversion got, as its header token says (None: no conversion)."""
    done = cryptsetup("luksDump", "--dump-json-metadata", header)
    tokens = json.loads(done.stdout)["tokens"].values()
    found = [int(t["offset"]) for t in tokens if t["type"] == convert_ivs.TOKEN_TYPE]
    return found[0] if found else None


def quick_offset(header: Path) -> int | None:
    """``token_offset`` without a process, for polling (-1: a torn read)."""
    from cryptoplane.volume import luks2
    try:
        meta = luks2.decode(header.read_bytes()[:luks2.READ_SIZE]).metadata
    except Exception:
        return -1
    found = [int(t["offset"]) for t in meta.tokens.values()
             if t.get("type") == convert_ivs.TOKEN_TYPE]
    return found[0] if found else None


def test_a_legacy_volume_is_garbage_to_cryptsetup_until_converted(tmp_path: Path) -> None:
    data, header, plain = legacy_volume(tmp_path, 4 << 20)
    assert header is not None
    copy = tmp_path / "copy"
    shutil.copy(data, copy)
    hdr_copy = tmp_path / "hdr-copy"
    shutil.copy(header, hdr_copy)
    garbled = decrypted_by_cryptsetup(copy, hdr_copy, tmp_path)
    assert garbled[:4096] == plain[:4096] and garbled[4096:8192] != plain[4096:8192]
    assert convert_ivs.inspect(data, PASSPHRASE, header=header).verdict == "legacy"
    assert convert_ivs.convert(data, PASSPHRASE, header=header, hotzone=1 << 20) == len(plain)
    assert convert_ivs.inspect(data, PASSPHRASE, header=header).verdict == "dm-crypt"
    # the header is as it was: no token, no requirement, the journal wiped
    meta = json.loads(cryptsetup("luksDump", "--dump-json-metadata", header).stdout)
    assert meta["tokens"] == {} and "requirements" not in meta["config"]
    assert decrypted_by_cryptsetup(data, header, tmp_path) == plain


def test_sigkill_at_random_points_then_resume(tmp_path: Path) -> None:
    """Acceptance: 10 runs killed with SIGKILL at random moments, each resumed by the
    next; the last run finishes and cryptsetup decrypts the image byte-exact."""
    data, header, plain = legacy_volume(tmp_path, 24 << 20)
    assert header is not None
    key_file = tmp_path / "pass"
    key_file.write_bytes(PASSPHRASE)
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    args = (data, "--header", header, "--yes", "--hotzone-size", "4K")
    landed = []
    for _ in range(10):
        proc = cli(*args, key_file=key_file)
        # from the moment this run has moved the conversion on (past start-up, the KDF
        # and the resume), a random moment within the next 0.15 s: a 4K hotzone is a few
        # header writes and syncs, so the kill falls anywhere in a step
        deadline = time.monotonic() + 60
        while quick_offset(header) in (-1, landed[-1] if landed else None):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.15))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        landed.append(token_offset(header))
    print(f"\nconvert-ivs killed at (bytes converted of {len(plain)}): {landed}")
    mid = [n for n in landed if n is not None and 0 < n < len(plain)]
    assert len(mid) >= 5, f"too few kills landed mid-conversion: {landed}"
    assert mid == sorted(mid), "a resumed conversion went backwards"
    proc = cli(*args, key_file=key_file)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert token_offset(header) is None
    assert decrypted_by_cryptsetup(data, header, tmp_path) == plain


def test_a_half_converted_volume_opens_nowhere(tmp_path: Path) -> None:
    """While a conversion is unfinished, neither cryptoplane nor cryptsetup uses the data
    (half of it has one IV rule and half the other)."""
    data, header, _ = legacy_volume(tmp_path, 4 << 20)

    def stop(done: int, total: int) -> None:
        if done >= 2 << 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_ivs.convert(data, PASSPHRASE, header=header, hotzone=1 << 20, progress=stop)
    found = convert_ivs.inspect(data, PASSPHRASE, header=header)
    # the token still names the hotzone it was converting: [1 MiB, 2 MiB) is redone
    assert (found.verdict, found.converted) == ("converting", 1 << 20)
    with pytest.raises(NotSupported, match=f"{convert_ivs.REQUIREMENT}.*run it again"):
        luks.unlock(data, passphrase=PASSPHRASE, header=header)
    key_file = tmp_path / "pass"
    key_file.write_bytes(PASSPHRASE)
    refused = cryptsetup("reencrypt", "--decrypt", "--header", header, "--key-file",
                         key_file, "--force-offline-reencrypt", data, ok=False)
    assert refused.returncode != 0 and b"requirements" in refused.stderr


def test_a_damaged_journal_stops_the_resume_and_writes_nothing(tmp_path: Path) -> None:
    data, header, _ = legacy_volume(tmp_path, 4 << 20)
    assert header is not None

    def stop(done: int, total: int) -> None:
        if done >= 1 << 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_ivs.convert(data, PASSPHRASE, header=header, hotzone=1 << 20, progress=stop)
    # the token names the next hotzone's journal slot: spoil one byte of it
    meta = json.loads(cryptsetup("luksDump", "--dump-json-metadata", header).stdout)
    token = next(t for t in meta["tokens"].values() if t["type"] == convert_ivs.TOKEN_TYPE)
    spot = int(token["journal"]) + int(token["slot"]) * int(token["hotzone"]) + 100
    with open(header, "r+b") as f:
        f.seek(spot)
        byte = f.read(1)
        f.seek(spot)
        f.write(bytes([byte[0] ^ 1]))
    before = hashlib.sha256(data.read_bytes()).digest()
    with pytest.raises(CorruptHeader, match="journal"):
        convert_ivs.convert(data, PASSPHRASE, header=header)
    assert hashlib.sha256(data.read_bytes()).digest() == before


def test_check_and_refusals(tmp_path: Path) -> None:
    key_file = tmp_path / "pass"
    key_file.write_bytes(PASSPHRASE)
    # dm-crypt's IVs already: the check says so, and convert-ivs leaves it alone
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    data, header = fresh / "data", fresh / "header"
    with open(data, "wb") as f:
        f.truncate(2 << 20)
    luks.format(data, PASSPHRASE, sector_size=4096, kdf="pbkdf2", kdf_params=FAST,
                header=header)
    # nothing written yet: no sector looks like data either way
    assert convert_ivs.inspect(data, PASSPHRASE, header=header).verdict == "unknown"
    before = data.read_bytes()
    proc = cli(data, "--header", header, "--yes", key_file=key_file)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and b"--force" in err and data.read_bytes() == before
    with Volume(data, luks.unlock(data, passphrase=PASSPHRASE, header=header)) as vol:
        vol.pwrite(0, file_like_data(vol.size, 7))
    proc = cli(data, "--header", header, "--check", key_file=key_file)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() == b"dm-crypt"
    before = data.read_bytes()
    proc = cli(data, "--header", header, "--yes", key_file=key_file)
    proc.communicate(timeout=60)
    assert proc.returncode == 0 and data.read_bytes() == before
    # 512-byte sectors: both rules agree
    small = tmp_path / "small"
    small.mkdir()
    data5, header5, _ = legacy_volume(small, 1 << 20, 512)
    assert convert_ivs.inspect(data5, PASSPHRASE, header=header5).verdict == "unaffected"
    with pytest.raises(Exception, match="nothing to convert"):
        convert_ivs.convert(data5, PASSPHRASE, header=header5)
    # a wrong passphrase: exit code 2 as every volume command, nothing written
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"not it")
    proc = cli(data, "--header", header, "--yes", key_file=wrong)
    proc.communicate(timeout=60)
    assert proc.returncode == 2 and data.read_bytes() == before


def test_an_attached_header_volume_converts_in_place(tmp_path: Path) -> None:
    """The journal lies in the image's own keyslots area, before the data."""
    data, header, plain = legacy_volume(tmp_path, 2 << 20, detached=False)
    assert header is None
    convert_ivs.convert(data, PASSPHRASE, hotzone=256 << 10)
    layout = luks.unlock(data, passphrase=PASSPHRASE)
    with Volume(data, layout, read_only=True) as vol:
        assert vol.read(0, vol.size) == plain


def test_the_command_derives_the_key_once(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The check and the conversion share one open: an Argon2 keyslot costs a second and
    a gigabyte per derivation, and the command used to pay it twice."""
    from click.testing import CliRunner

    from cryptoplane.cli.volume_convert import convert_ivs_cmd

    data, header, plain = legacy_volume(tmp_path, 2 << 20)
    key_file = tmp_path / "pass"
    key_file.write_bytes(PASSPHRASE)
    calls = []
    real = convert_ivs.open_key

    def counted(*args: object, **kw: object) -> object:
        calls.append(1)
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(convert_ivs, "open_key", counted)
    done = CliRunner().invoke(convert_ivs_cmd, [str(data), "--header", str(header), "--yes",
                                                "--key-file", str(key_file)])
    assert done.exit_code == 0, done.output
    assert "Converted" in done.output and len(calls) == 1
    monkeypatch.undo()
    assert convert_ivs.inspect(data, PASSPHRASE, header=header).verdict == "dm-crypt"
    with Volume(data, luks.unlock(data, passphrase=PASSPHRASE, header=header),
                read_only=True) as vol:
        assert vol.read(0, vol.size) == plain
