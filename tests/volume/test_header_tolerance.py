"""Headers that cryptsetup made and then were patched: each defect of issue 13 on a
volume whose every other byte cryptsetup wrote, with cryptsetup asked live for its verdict.

A LUKS1 header whose disabled slot points into the payload is refused before anything
is written; a keyslot cryptoplane cannot use is shown and skipped, not a lock-out;
leftover KDF fields are tolerated and dropped; a keyslot bound to no segment still has
its passphrase checked by ``open-test -S``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import support
from click.testing import CliRunner
from test_header_validation import extracted, sha, sparse_copy

from cryptoplane.cli.volume import volume
from cryptoplane.exceptions import NotSupported
from cryptoplane.volume import luks
from cryptoplane.volume.errors import CorruptHeader, KeyslotError, WrongPassphrase

FAST = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")


def cryptsetup(*args: str | Path, input: str | None = None, check: bool = True,
               ) -> subprocess.CompletedProcess[str]:
    if shutil.which("cryptsetup") is None:
        support.unavailable("cryptsetup is not installed")
    proc = subprocess.run(["cryptsetup", "--batch-mode", *map(str, args)],
                          capture_output=True, text=True, input=input, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"cryptsetup {args[0]} failed: {proc.stderr}")
    return proc


def made(tmp_path: Path, version: int, size: int = 20 << 20) -> Path:
    img = tmp_path / "v.img"
    with open(img, "wb") as f:
        f.truncate(size)
    cryptsetup("luksFormat", "--type", f"luks{version}", *FAST, "--key-file", "-", img,
               input="zero")
    return img


def json_of(img: Path) -> dict[str, Any]:
    blob = img.read_bytes()[:16384]
    return json.loads(blob[4096:].rstrip(b"\0"))  # type: ignore[no-any-return]


def patch_json(img: Path, mutate: Callable[[dict[str, Any]], None]) -> None:
    """Change both LUKS2 header copies' JSON and re-checksum them, as cryptsetup's own
    test generators do."""
    with open(img, "r+b") as f:
        for offset in (0, 16384):
            f.seek(offset)
            copy = bytearray(f.read(16384))
            j = json.loads(bytes(copy[4096:]).rstrip(b"\0"))
            mutate(j)
            copy[4096:] = json.dumps(j, separators=(",", ":")).encode().ljust(12288, b"\0")
            copy[448:512] = bytes(64)
            copy[448:480] = hashlib.sha256(bytes(copy)).digest()
            f.seek(offset)
            f.write(copy)


def keyfile(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_luks1_disabled_slot_in_the_payload_is_refused_before_any_write(
        tmp_path: Path) -> None:
    img = made(tmp_path, 1, 4 << 20)
    payload = struct.unpack_from(">I", img.read_bytes(), 104)[0]
    with open(img, "r+b") as f:
        f.seek(208 + 48 + 40)  # slot 1 (disabled): its key material offset
        f.write(struct.pack(">I", payload - 100))
        f.seek(payload * 512)
        f.write(b"user data " * 1000)
    before = sha(img)
    r = cryptsetup("luksDump", img, check=False)
    assert r.returncode != 0 and "keyslot 1 is invalid" in r.stderr
    with pytest.raises(CorruptHeader, match=r"slot 1 is invalid.*payload"):
        luks.add_key(img, passphrase=b"zero", new_passphrase=b"one", kdf="pbkdf2",
                     kdf_params={"iterations": 1000})
    new = keyfile(tmp_path, "new", "one")
    old = keyfile(tmp_path, "old", "zero")
    out = CliRunner().invoke(volume, ["add-key", str(img), "--key-file", str(old),
                                      "--new-key-file", str(new), "--pbkdf", "pbkdf2",
                                      "--pbkdf-force-iterations", "1000"])
    assert out.exit_code == 1 and "slot 1 is invalid" in out.output
    assert "Added" not in out.output
    assert sha(img) == before


def luks2_with_two_slots(tmp_path: Path) -> Path:
    img = made(tmp_path, 2)
    new = keyfile(tmp_path, "one", "one")
    cryptsetup("luksAddKey", *FAST, "--key-file", "-", img, new, input="zero")
    assert sorted(json_of(img)["keyslots"]) == ["0", "1"]
    return img


def test_a_keyslot_with_an_unknown_kdf_is_shown_and_skipped(tmp_path: Path) -> None:
    img = luks2_with_two_slots(tmp_path)
    patch_json(img, lambda j: j["keyslots"]["1"]["kdf"].update(type="argon2"))
    # cryptsetup loads it and opens slot 0
    assert "argon2" in cryptsetup("luksDump", img).stdout
    cryptsetup("open", "--test-passphrase", "--key-file", "-", img, input="zero")
    d = luks.dump(img)
    assert d["keyslots"]["1"]["unusable"] == "KDF 'argon2' is not supported"
    assert d["keyslots"]["1"]["kdf"] == {"type": "argon2"}
    table = CliRunner().invoke(volume, ["dump", str(img)])
    assert table.exit_code == 0 and "unusable" in table.output
    assert luks.test_passphrase(img, passphrase=b"zero") == 0
    assert luks.unlock(img, passphrase=b"zero").size > 0
    # a wrong passphrase is a wrong passphrase while a usable slot exists
    with pytest.raises(WrongPassphrase):
        luks.unlock(img, passphrase=b"wrong")
    with pytest.raises(NotSupported, match="argon2"):
        luks.test_passphrase(img, passphrase=b"one", slot=1)
    # changes keep the unknown slot as it was: cryptsetup still reads it
    raw = json_of(img)["keyslots"]["1"]
    assert luks.add_key(img, passphrase=b"zero", new_passphrase=b"two", kdf="pbkdf2",
                        kdf_params={"iterations": 1000}) == 2
    assert json_of(img)["keyslots"]["1"] == raw
    cryptsetup("open", "--test-passphrase", "-S", "2", "--key-file", "-", img, input="two")
    # with no usable slot left, the unknown one is named
    luks.remove_key(img, passphrase=b"zero")
    luks.remove_key(img, passphrase=b"two")
    with pytest.raises(NotSupported, match=r"keyslot 1 .*KDF 'argon2'"):
        luks.unlock(img, passphrase=b"one")


def test_leftover_argon2_fields_in_a_pbkdf2_keyslot_are_tolerated(tmp_path: Path) -> None:
    img = made(tmp_path, 2)
    patch_json(img, lambda j: j["keyslots"]["0"]["kdf"].update(time=4, memory=32, cpus=1))
    cryptsetup("open", "--test-passphrase", "--key-file", "-", img, input="zero")
    assert luks.test_passphrase(img, passphrase=b"zero") == 0
    luks.add_key(img, passphrase=b"zero", new_passphrase=b"one", kdf="pbkdf2",
                 kdf_params={"iterations": 1000})
    # the next write drops them, as cryptsetup's would
    assert set(json_of(img)["keyslots"]["0"]["kdf"]) == {"type", "hash", "iterations", "salt"}
    for slot, pw in (("0", "zero"), ("1", "one")):
        cryptsetup("open", "--test-passphrase", "-S", slot, "--key-file", "-", img, input=pw)


@pytest.mark.parametrize("mutate, match", [
    (lambda j: j["digests"]["0"].update(keyslots=["0"]), "keyslot 1 is bound to 0"),
    (lambda j: j["digests"].update({"1": {**j["digests"]["0"], "segments": []}}),
     "bound to 2 digests"),
], ids=["no-digest", "two-digests"])
def test_keyslot_digest_bindings_must_be_unique(tmp_path: Path, mutate: Any,
                                                match: str) -> None:
    img = luks2_with_two_slots(tmp_path)
    patch_json(img, mutate)
    assert cryptsetup("luksDump", img, check=False).returncode != 0
    before = sha(img)
    with pytest.raises(CorruptHeader, match=match):
        luks.add_key(img, passphrase=b"zero", new_passphrase=b"x", kdf="pbkdf2",
                     kdf_params={"iterations": 1000})
    assert sha(img) == before


def test_open_test_checks_an_unbound_keyslot(tmp_path: Path) -> None:
    img = sparse_copy(extracted("luks2_keyslot_unassigned.img"), tmp_path / "u.img")
    pw1 = keyfile(tmp_path, "pw1", "93R4P4pIqAH8")
    cryptsetup("open", "--test-passphrase", "-S", "1", "--key-file", pw1, img)
    assert cryptsetup("open", "--test-passphrase", "--key-file", pw1, img,
                      check=False).returncode == 2
    runner = CliRunner()
    r = runner.invoke(volume, ["open-test", str(img), "-S", "1", "--key-file", str(pw1)])
    assert r.exit_code == 0 and "keyslot 1" in r.output
    r = runner.invoke(volume, ["open-test", str(img), "--key-file", str(pw1)])
    assert r.exit_code == 2
    assert luks.dump(img)["keyslots"]["1"]["bound"] is False
    # its key opens no data: refusing to take it for the volume key is right
    with pytest.raises(KeyslotError, match="not bound"):
        luks.unlock(img, passphrase=b"93R4P4pIqAH8", slot=1)
    assert luks.unlock(img, passphrase=b"compatkey").offset == 4 << 20


def test_a_luks2_device_smaller_than_its_keyslots_area_is_refused(tmp_path: Path) -> None:
    img = made(tmp_path, 2)
    with open(img, "r+b") as f:
        f.truncate(8 << 20)  # the keyslots area ends at 16 MiB
    r = cryptsetup("luksDump", img, check=False)
    assert r.returncode != 0 and "too small" in r.stderr
    with pytest.raises(CorruptHeader, match="too small"):
        luks.dump(img)
