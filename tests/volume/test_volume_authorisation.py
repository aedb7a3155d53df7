"""Issue 14, acceptance 3: keyslot commands change an image only when cryptsetup's own
command, given the same credentials, would. Each case runs cryptoplane on one copy of a
volume cryptsetup made and cryptsetup on another, and compares the images' hashes
before and after (and the exit codes: a wrong passphrase is 2 in both)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from support import unavailable

from cryptoplane.cli.volume import volume

FAST = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
PASS = {"slot0": b"zero zero", "slot1": b"one one", "wrong": b"not a passphrase"}


def cryptsetup(*argv: str | Path) -> int:
    if shutil.which("cryptsetup") is None:
        unavailable("needs cryptsetup (apt: cryptsetup-bin)")
    return subprocess.run(["cryptsetup", "--batch-mode", *map(str, argv)],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
                          check=False).returncode


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """A LUKS2 volume cryptsetup made, passphrases in slots 0 and 1, and key files."""
    top = tmp_path_factory.mktemp("authorisation")
    files = {}
    for name, secret in {**PASS, "new": b"a new one"}.items():
        files[name] = top / name
        files[name].write_bytes(secret)
    img = top / "original.img"
    with open(img, "wb") as f:
        f.truncate(20 << 20)
    assert cryptsetup("luksFormat", "--type", "luks2", *FAST, "--key-file", files["slot0"],
                      img) == 0
    assert cryptsetup("luksAddKey", *FAST, "--key-file", files["slot0"], img,
                      files["slot1"]) == 0
    return img, files


def digest(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


# (ours, cryptsetup's): each a function of (image, key file or None, files)
Args = list[str]
OPS: dict[str, tuple[object, object]] = {
    "add-key": (
        lambda img, k, f: ["add-key", img, *k, "--new-key-file", f["new"], *FAST],
        lambda img, k, f: ["luksAddKey", *FAST, *k, img, f["new"]]),
    "change-key": (
        lambda img, k, f: ["change-key", img, *k, "--new-key-file", f["new"], *FAST],
        lambda img, k, f: ["luksChangeKey", *FAST, *k, img, f["new"]]),
    "remove-key": (
        lambda img, k, f: ["remove-key", img, *k, "--yes"],
        lambda img, k, f: ["luksRemoveKey", img, *(k[1:] if k else [])]),
    "kill-slot-1": (
        lambda img, k, f: ["remove-key", img, "--key-slot", "1", *k, "--yes"],
        lambda img, k, f: ["luksKillSlot", img, "1", *k]),
    "erase": (
        lambda img, k, f: ["erase", img, "--yes"],
        lambda img, k, f: ["luksErase", img]),
}


@pytest.mark.parametrize("credential", ["slot0", "slot1", "wrong", "missing"])
@pytest.mark.parametrize("op", list(OPS))
def test_the_image_changes_only_when_cryptsetup_s_would(
        original: tuple[Path, dict[str, Path]], tmp_path: Path, op: str,
        credential: str) -> None:
    img, files = original
    ours, theirs = tmp_path / "ours.img", tmp_path / "theirs.img"
    shutil.copy(img, ours)
    shutil.copy(img, theirs)
    before = digest(img)
    key = [] if credential == "missing" else ["--key-file", str(files[credential])]
    our_args, their_args = OPS[op]
    result = CliRunner().invoke(volume, [str(a) for a in our_args(ours, key, files)],  # type: ignore[operator]
                                input="")
    their_rc = cryptsetup(*their_args(theirs, key, files))  # type: ignore[operator]
    ours_changed, theirs_changed = digest(ours) != before, digest(theirs) != before
    if ours_changed:
        assert theirs_changed, f"{op} with {credential}: cryptoplane wrote, cryptsetup " \
                               f"would not ({result.output})"
    if op == "erase":  # luksErase asks for no passphrase: both erase whatever is given
        assert ours_changed and theirs_changed
    elif credential == "missing":
        assert not ours_changed and result.exit_code != 0  # nothing to authorise with
    else:
        # with a passphrase given, the two agree both ways
        assert ours_changed == theirs_changed, (op, credential, result.output, their_rc)
    if credential == "wrong" and op != "erase":
        assert (result.exit_code, their_rc) == (2, 2), result.output
    assert "Traceback" not in result.output
