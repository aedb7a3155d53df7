"""``cryptoplane volume``: the commands end to end on image files, through click."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from cryptoplane.cli.volume import volume
from cryptoplane.volume import luks

FAST = ["--pbkdf", "argon2id", "--pbkdf-force-iterations", "1", "--pbkdf-memory", "8192",
        "--pbkdf-parallel", "1"]
FAST1 = ["--pbkdf-force-iterations", "1000"]


@pytest.fixture
def env(tmp_path: Path) -> tuple[CliRunner, Path, Path]:
    img = tmp_path / "v.img"
    with open(img, "wb") as f:
        f.truncate(20 << 20)
    pw = tmp_path / "pw"
    pw.write_bytes(b"secret one")
    return CliRunner(), img, pw


def ok(runner: CliRunner, args: list[str], input: str | bytes | None = None) -> str:
    r = runner.invoke(volume, args, input=input, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


def test_lifecycle(env: tuple[CliRunner, Path, Path], tmp_path: Path) -> None:
    runner, img, pw = env
    out = ok(runner, ["format", str(img), "--yes", "--key-file", str(pw), *FAST,
                      "--label", "demo"])
    assert "LUKS2 volume" in out and "keyslot 0" in out
    assert "keyslot 0" in ok(runner, ["open-test", str(img), "--key-file", str(pw)])
    r = runner.invoke(volume, ["open-test", str(img), "--passphrase-fd", "0"], input="bad\n")
    assert r.exit_code == 2 and "no keyslot" in r.output
    new = tmp_path / "new"
    new.write_bytes(b"secret two")
    assert "keyslot 1" in ok(runner, ["add-key", str(img), "--key-file", str(pw),
                                      "--new-key-file", str(new), *FAST])
    d = json.loads(ok(runner, ["dump", str(img), "--json"]))
    assert sorted(d["keyslots"]) == ["0", "1"] and d["label"] == "demo"
    assert "secret" not in json.dumps(d)
    table = ok(runner, ["dump", str(img)])
    assert "Keyslots" in table and "argon2id" in table
    # change via prompts: current, then new twice
    ok(runner, ["change-key", str(img), *FAST], input="secret two\nthird\nthird\n")
    assert luks.test_passphrase(img, passphrase=b"third") == 1
    ok(runner, ["remove-key", str(img), "--key-slot", "1", "--key-file", str(pw)])
    assert list(luks.dump(img)["keyslots"]) == ["0"]
    backup = tmp_path / "backup"
    ok(runner, ["backup-header", str(img), str(backup)])
    r = runner.invoke(volume, ["erase", str(img)], input="n\n")
    assert r.exit_code != 0 and luks.dump(img)["keyslots"]
    ok(runner, ["erase", str(img), "--yes"])
    assert luks.dump(img)["keyslots"] == {}
    ok(runner, ["restore-header", str(img), str(backup), "--yes"])
    assert luks.test_passphrase(img, key_file=pw) == 0


def test_prompted_format_luks1_and_errors(env: tuple[CliRunner, Path, Path]) -> None:
    runner, img, _ = env
    r = runner.invoke(volume, ["format", str(img), "--yes", "--type", "luks1", *FAST1],
                      input="typed\nmistyped\ntyped\ntyped\n")
    assert r.exit_code == 0, r.output
    assert luks.dump(img)["version"] == 1
    assert luks.test_passphrase(img, passphrase=b"typed") == 0
    r = runner.invoke(volume, ["open-test", str(img), "--key-file", "/nonexistent"])
    assert r.exit_code == 1 and "cannot read key file" in r.output
    r = runner.invoke(volume, ["dump", str(img), "--header", str(img) + ".missing"])
    assert r.exit_code == 1 and "InvalidRequest" in r.output
    r = runner.invoke(volume, ["format", str(img), "--yes", "--cipher", "aes-gcm-random",
                               *FAST], input="a\na\n")
    assert r.exit_code == 1 and "NotSupported" in r.output


def test_help_explains() -> None:
    out = CliRunner().invoke(volume, ["--help"]).output
    for cmd in ("format", "open-test", "dump", "add-key", "remove-key", "change-key",
                "backup-header", "restore-header", "erase"):
        assert cmd in out
    assert "--passphrase-fd" in CliRunner().invoke(volume, ["format", "--help"]).output


def test_format_wipe_writes_encrypted_zeros(tmp_path: Path) -> None:
    img = tmp_path / "w.img"
    with open(img, "wb") as f:
        f.truncate((16 << 20) + (256 << 10))
    pw = tmp_path / "pw"
    pw.write_bytes(b"x")
    ok(CliRunner(), ["format", str(img), "--yes", "--key-file", str(pw), "--wipe", *FAST])
    layout = luks.unlock(img, key_file=pw)
    raw = img.read_bytes()[layout.offset:]
    assert len(raw) == 256 << 10 and raw != bytes(len(raw))
    for n in (0, 1, 63):  # 4096-byte sectors: dm-crypt's IVs are 0, 8, ..., 504
        iv = n * 4096 // 512
        c = Cipher(algorithms.AES(layout.volume_key), modes.XTS(iv.to_bytes(16, "little")))
        d = c.decryptor()
        block = raw[n * 4096:(n + 1) * 4096]
        assert d.update(block) + d.finalize() == bytes(4096)


def test_cli_volume_opens_in_cryptsetup(env: tuple[CliRunner, Path, Path]) -> None:
    if shutil.which("cryptsetup") is None:
        import support
        support.unavailable("cryptsetup is not installed")
    runner, img, pw = env
    ok(runner, ["format", str(img), "--yes", "--key-file", str(pw), "--sector-size", "512",
                "--pbkdf", "pbkdf2", *FAST1])
    proc = subprocess.run(["cryptsetup", "open", "--test-passphrase", "--key-file", str(pw),
                           str(img)], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_passphrase_fd(env: tuple[CliRunner, Path, Path]) -> None:
    runner, img, pw = env
    ok(runner, ["format", str(img), "--yes", "--key-file", str(pw), *FAST])
    r_fd, w_fd = os.pipe()
    try:
        os.write(w_fd, b"secret one\nignored\n")
        os.close(w_fd)
        assert "keyslot 0" in ok(runner, ["open-test", str(img), "--passphrase-fd",
                                          str(r_fd)])
    finally:
        os.close(r_fd)
    assert "keyslot 0" in ok(runner, ["open-test", str(img), "--key-file", "-"],
                             input=b"secret one")
