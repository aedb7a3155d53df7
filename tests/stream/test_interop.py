"""Interoperability, byte-verified, both ways: the ``age`` CLI (X25519, several
recipients, armor) and pyrage (X25519 and passphrases; age's CLI reads passphrases only
from a terminal)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import support

from cryptoplane.stream import X25519Identity, X25519Recipient, decrypt, encrypt

C = 65536
SIZES = [0, 1, C - 1, C, C + 1, 3 * C, 3 * 1024 * 1024 + 7]


def _age() -> str:
    path = shutil.which("age")
    if path is None:
        support.unavailable("the age CLI is not installed")
    return path


def _pyrage():  # type: ignore[no-untyped-def]
    try:
        import pyrage
    except ImportError:
        support.unavailable("pyrage is not installed")
    return pyrage


def _plain(size: int) -> bytes:
    # deterministic per size so a failure reproduces
    seed = hashlib.sha256(str(size).encode()).digest()
    return (seed * (size // 32 + 1))[:size] if size < 64 else os.urandom(size)


def _keys(tmp_path: Path, n: int) -> tuple[list[X25519Identity], Path]:
    idents = [X25519Identity.generate() for _ in range(n)]
    keyfile = tmp_path / "keys.txt"
    keyfile.write_text("".join(f"# public key: {i.recipient}\n{i.to_string()}\n"
                               for i in idents))
    return idents, keyfile


def _run(*args: str, data: bytes | None = None) -> bytes:
    proc = subprocess.run(args, input=data, capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("armor", [False, True])
def test_age_to_cryptoplane(tmp_path: Path, size: int, armor: bool) -> None:
    age = _age()
    idents, _ = _keys(tmp_path, 3)
    plain = _plain(size)
    (tmp_path / "p").write_bytes(plain)
    args = [age, "-e", *(a for i in idents for a in ("-r", str(i.recipient)))]
    ct = _run(*args, *(["-a"] if armor else []), "-o", str(tmp_path / "c"), str(tmp_path / "p"))
    assert ct == b""
    for ident in idents:
        decrypt(tmp_path / "c", tmp_path / "o", [ident])
        assert (tmp_path / "o").read_bytes() == plain


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("armor", [False, True])
def test_cryptoplane_to_age(tmp_path: Path, size: int, armor: bool) -> None:
    age = _age()
    idents, keyfile = _keys(tmp_path, 3)
    plain = _plain(size)
    (tmp_path / "p").write_bytes(plain)
    encrypt(tmp_path / "p", tmp_path / "c", [i.recipient for i in idents], armor=armor)
    out = _run(age, "-d", "-i", str(keyfile), str(tmp_path / "c"))
    assert out == plain
    # each recipient alone, too
    single = tmp_path / "one.txt"
    single.write_text(idents[2].to_string() + "\n")
    assert _run(age, "-d", "-i", str(single), str(tmp_path / "c")) == plain


def test_age_keygen_identity_parses(tmp_path: Path) -> None:
    _age()
    keygen = shutil.which("age-keygen")
    if keygen is None:
        support.unavailable("age-keygen is not installed")
    _run(keygen, "-o", str(tmp_path / "k"))
    text = (tmp_path / "k").read_text()
    public = next(ln.split(": ")[1] for ln in text.splitlines() if ln.startswith("# public key"))
    secret = next(ln for ln in text.splitlines() if ln.startswith("AGE-SECRET-KEY-1"))
    assert str(X25519Identity.parse(secret).recipient) == public
    assert _run(keygen, "-y", str(tmp_path / "k")).decode().strip() == public
    assert X25519Recipient.parse(public).public_bytes == X25519Identity.parse(
        secret).recipient.public_bytes


@pytest.mark.parametrize("size", [0, 1, C, C + 1, 3 * C])
def test_pyrage_both_ways_x25519(size: int) -> None:
    pyrage = _pyrage()
    plain = _plain(size)
    theirs = pyrage.x25519.Identity.generate()
    mine = X25519Identity.parse(str(theirs))
    ct = pyrage.encrypt(plain, [theirs.to_public(), pyrage.x25519.Identity.generate().to_public()])
    out = io.BytesIO()
    decrypt(io.BytesIO(ct), out, [mine])
    assert out.getvalue() == plain
    enc = io.BytesIO()
    encrypt(io.BytesIO(plain), enc, [mine.recipient, X25519Identity.generate().recipient])
    assert pyrage.decrypt(enc.getvalue(), [theirs]) == plain


def test_pyrage_passphrase_to_cryptoplane() -> None:
    """One file only: rage picks a work factor of about a second (19 here), twice."""
    pyrage = _pyrage()
    plain = _plain(C + 1)
    ct = pyrage.passphrase.encrypt(plain, "hunter2 hunter2")
    out = io.BytesIO()
    decrypt(io.BytesIO(ct), out, passphrase="hunter2 hunter2")
    assert out.getvalue() == plain


@pytest.mark.parametrize("size", [0, 1, C, C + 1, 3 * C])
@pytest.mark.parametrize("armor", [False, True])
def test_cryptoplane_passphrase_to_pyrage(size: int, armor: bool) -> None:
    pyrage = _pyrage()
    plain = _plain(size)
    enc = io.BytesIO()
    encrypt(io.BytesIO(plain), enc, passphrase="hunter2 hunter2", work_factor=10, armor=armor)
    assert pyrage.passphrase.decrypt(enc.getvalue(), "hunter2 hunter2") == plain
