"""LUKS header validation against cryptsetup's own images and cryptsetup's own verdicts.

For every image in tests/data/cryptsetup (see its README) the installed cryptsetup is
asked, on a scratch copy, whether the header loads, needs `cryptsetup repair`, and opens
with the passphrase cryptsetup's tests use; cryptoplane must answer the same. A header
cryptoplane refuses must stay untouched by every volume command, each failing with a
typed error that names the problem.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import io
import lzma
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import support
from click.testing import CliRunner

from cryptoplane.cli.volume import volume
from cryptoplane.exceptions import CryptoplaneError, NotSupported
from cryptoplane.volume import luks
from cryptoplane.volume.errors import CorruptHeader, RepairNeeded, WrongPassphrase

DATA = Path(__file__).resolve().parent.parent / "data" / "cryptsetup"
PW0, PW1, PW4, PWB = "compatkey", "93R4P4pIqAH8", "Qx3qn46vq0v", "blablabl"
# image -> the passphrase cryptsetup's tests open it with (None: none is known)
PASSPHRASES = {
    "compatimage.img": PW0, "compatimage2.img": PW0, "compatv10image.img": PW0,
    "luks2_keyslot_unassigned.img": PW0, "luks2_invalid_cipher.img": PW1,
    "luks2_header_requirements": PWB, "luks2_header_requirements_free": PWB,
    **{f"test_image_{n}": PW4 for n in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)},
}
_CHUNK = 1 << 20


# -- the images ----------------------------------------------------------------------

def _write_sparse(dst: Path, src: io.BufferedIOBase) -> None:
    # the images are mostly zeros: holes keep a 43 MB image from costing 43 MB of writes
    with open(dst, "wb") as out:
        while chunk := src.read(_CHUNK):
            if chunk.count(0) == len(chunk):
                out.seek(len(chunk), os.SEEK_CUR)
            else:
                out.write(chunk)
        out.truncate()


def sparse_copy(src: Path, dst: Path) -> Path:
    with open(src, "rb") as f:
        _write_sparse(dst, f)  # type: ignore[arg-type]
    return dst


def _catalogue() -> dict[str, tuple[Path, str | None]]:
    """Image name -> its .xz file and, for a tarball, its member."""
    out: dict[str, tuple[Path, str | None]] = {}
    for xz in sorted(DATA.rglob("*.xz")):
        if xz.name.endswith(".tar.xz"):
            with tarfile.open(xz, "r:xz") as tar:
                for m in tar.getmembers():
                    if m.isfile() and not m.name.endswith(("README", "keyfile1")):
                        out[Path(m.name).name] = (xz, m.name)
        else:
            out[xz.name.removesuffix(".xz")] = (xz, None)
    return out


CATALOGUE = _catalogue()
IMAGES = sorted(CATALOGUE)


@functools.cache
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="cryptsetup-images-"))
    atexit.register(shutil.rmtree, root, True)
    return root


@functools.cache
def extracted(name: str) -> Path:
    """Image ``name``, decompressed once per run (into a folder removed at exit)."""
    xz, member = CATALOGUE[name]
    dst = _root() / name
    if member is None:
        with lzma.open(xz) as f:
            _write_sparse(dst, f)  # type: ignore[arg-type]
    else:
        with tarfile.open(xz, "r:xz") as tar:
            f = tar.extractfile(member)
            assert f is not None
            _write_sparse(dst, f)  # type: ignore[arg-type]
    return dst


@pytest.fixture
def copy_of(tmp_path: Path) -> Iterator[object]:
    def make(name: str, as_name: str = "scratch.img") -> Path:
        return sparse_copy(extracted(name), tmp_path / as_name)
    yield make


def need_cryptsetup() -> None:
    if shutil.which("cryptsetup") is None:
        support.unavailable("cryptsetup is not installed")


def cryptsetup(*args: str | Path, input: str | None = None,
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["cryptsetup", *map(str, args)], capture_output=True, text=True,
                          input=input, timeout=60)


# -- verdicts ------------------------------------------------------------------------

def cryptsetup_verdict(img: Path, passphrase: str | None) -> str:
    """cryptsetup's answer on ``img`` (a scratch copy: it repairs headers it loads)."""
    dump = cryptsetup("luksDump", img)
    if dump.returncode != 0:
        return "repair" if "cryptsetup repair" in dump.stderr else "refuse"
    if passphrase is None:
        return "load"
    test = cryptsetup("open", "--test-passphrase", "--key-file", "-", img, input=passphrase)
    return "open" if test.returncode == 0 else "load"


def cryptoplane_verdict(img: Path, passphrase: str | None) -> str:
    try:
        luks.dump(img)
    except RepairNeeded:
        return "repair"
    except CryptoplaneError:
        return "refuse"
    if passphrase is None:
        return "load"
    try:
        luks.test_passphrase(img, passphrase=passphrase.encode())
    except WrongPassphrase:
        return "load"
    return "open"


@pytest.mark.parametrize("name", IMAGES)
def test_verdict_agrees_with_cryptsetup(name: str, copy_of: object) -> None:
    need_cryptsetup()
    passphrase = PASSPHRASES.get(name)
    mine = cryptoplane_verdict(copy_of(name, "mine.img"), passphrase)  # type: ignore[operator]
    theirs = cryptsetup_verdict(copy_of(name, "theirs.img"), passphrase)  # type: ignore[operator]
    assert mine == theirs, f"{name}: cryptsetup says {theirs}, cryptoplane {mine}"


def test_the_catalogue_is_complete() -> None:
    # every kind of verdict is represented, so a checker that always says one thing fails
    assert len(IMAGES) > 100 and "blkid-luks2-pv.img" in IMAGES
    assert sum(n.startswith("luks2-") and n.endswith(".img") for n in IMAGES) == 85
    assert all(n in IMAGES for n in PASSPHRASES)


# -- refused headers are never written -----------------------------------------------

REFUSED = sorted(
    {*(n for n in IMAGES if n.startswith("evil_hdr-")), "blkid-luks2-pv.img",
     "luks2-keyslot-missing-digest.img", "luks2-keyslot-too-many-digests.img",
     "luks2-overlapping-areas-c0-json0.img", "luks2-overlapping-areas-c2-json0.img",
     "luks2-area-in-json-hdr-space-json0.img", "luks2-metadata-size-64k-inv-area-c1.img",
     "luks2-invalid-keyslots-size-c0.img", "luks2-missing-keyslot-referenced-in-digest.img",
     "luks2-segment-crypt-wrong-sectorsize-0.img", "luks2-invalid-checksum-both-hdrs.img"})


def sha(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@pytest.mark.parametrize("name", REFUSED)
def test_no_command_writes_to_a_refused_header(name: str, copy_of: object,
                                               tmp_path: Path) -> None:
    img = copy_of(name)  # type: ignore[operator]
    before = sha(img)
    pw = tmp_path / "pw"
    pw.write_text(PW0)
    new = tmp_path / "new"
    new.write_text("another one")
    fast = {"kdf": "pbkdf2", "kdf_params": {"iterations": 1000}}
    calls = {
        "dump": lambda: luks.dump(img),
        "open": lambda: luks.unlock(img, passphrase=PW0.encode()),
        "test": lambda: luks.test_passphrase(img, passphrase=PW0.encode()),
        "add": lambda: luks.add_key(img, passphrase=PW0.encode(),
                                    new_passphrase=b"another", **fast),  # type: ignore[arg-type]
        "add-by-key": lambda: luks.add_key(img, volume_key=bytes(64),
                                           new_passphrase=b"another", **fast),  # type: ignore[arg-type]
        "remove": lambda: luks.remove_key(img, slot=0, passphrase=PW0.encode()),
        "change": lambda: luks.change_key(img, PW0.encode(), b"another",
                                          **fast),  # type: ignore[arg-type]
        "erase": lambda: luks.erase(img),
        "backup": lambda: luks.backup_header(img, tmp_path / "backup"),
    }
    for what, call in calls.items():
        with pytest.raises((CorruptHeader, NotSupported)) as e:
            call()
        assert str(e.value), what
        assert sha(img) == before, f"{what} wrote to {name}"
    runner = CliRunner()
    commands = [
        ["dump", str(img)], ["open-test", str(img), "--key-file", str(pw)],
        ["add-key", str(img), "--key-file", str(pw), "--new-key-file", str(new),
         "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"],
        ["remove-key", str(img), "--key-slot", "0", "--key-file", str(pw), "--yes"],
        ["remove-key", str(img), "--key-file", str(pw), "--yes"],
        ["change-key", str(img), "--key-file", str(pw), "--new-key-file", str(new),
         "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"],
        ["erase", str(img), "--yes"],
        ["backup-header", str(img), str(tmp_path / "backup2")],
    ]
    for args in commands:
        r = runner.invoke(volume, args)
        assert r.exit_code == 1, (args, r.output)
        assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
        assert "Traceback" not in r.output
        assert "CorruptHeader" in r.output or "RepairNeeded" in r.output, r.output
        assert sha(img) == before, f"{args[0]} wrote to {name}"
    assert not (tmp_path / "backup").exists() and not (tmp_path / "backup2").exists()


def test_a_refused_backup_is_never_restored(copy_of: object, tmp_path: Path) -> None:
    good = copy_of("compatimage.img", "good.img")  # type: ignore[operator]
    evil = copy_of("evil_hdr-payload_overwrite", "evil")  # type: ignore[operator]
    before = sha(good)
    with pytest.raises(CorruptHeader, match="slot 3"):
        luks.restore_header(good, evil)
    assert sha(good) == before


def test_refusals_name_the_problem(copy_of: object) -> None:
    expect = {
        "evil_hdr-keyslot_overlap": "slot 1 is invalid.*overlaps",
        "evil_hdr-luks_hdr_damage": "slot 2 is invalid.*header",
        "evil_hdr-payload_overwrite": "slot 3 is invalid.*payload",
        "evil_hdr-stripes_payload_dmg": "slot 5 is invalid.*stripes",
        "evil_hdr-small_luks_device": "too small",
        "luks2-keyslot-missing-digest.img": "keyslot 0 is bound to 0 digests",
        "luks2-keyslot-too-many-digests.img": "keyslot 1 is bound to 2 digests",
        "luks2-overlapping-areas-c1-json0.img": "keyslot areas 6 and 7 overlap",
        "blkid-luks2-pv.img": "LVM2_member.*cryptsetup repair",
    }
    for name, pattern in expect.items():
        with pytest.raises(CorruptHeader, match=pattern):
            luks.dump(copy_of(name))  # type: ignore[operator]
