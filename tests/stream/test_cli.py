"""``cryptoplane stream encrypt/decrypt/keygen``: CliRunner for the options, subprocesses
for the file behaviour (atomic output, exit status, passphrase descriptors)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import support
from click.testing import CliRunner

from cryptoplane.cli.stream import stream
from cryptoplane.stream import X25519Identity, parse_identities

C = 65536


def invoke(*args: str, data: bytes | None = None) -> tuple[int, bytes, str]:
    result = CliRunner().invoke(stream, list(args), input=data)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout_bytes, result.stderr


def cli(*args: str, data: bytes | None = None, **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "cryptoplane.cli.stream", *args], input=data,
                          capture_output=True, timeout=60, check=False, **kw)  # type: ignore[call-overload]


def test_help_explains() -> None:
    for command in ("encrypt", "decrypt", "keygen"):
        code, out, _ = invoke(command, "--help")
        assert code == 0 and b"Usage:" in out
    code, out, _ = invoke("encrypt", "--help")
    assert b"--passphrase-file" in out and b"--recipients-file" in out and b"-a, --armor" in out


def test_keygen(tmp_path: Path) -> None:
    code, out, _ = invoke("keygen", "-o", str(tmp_path / "key.txt"))
    assert code == 0
    text = (tmp_path / "key.txt").read_text()
    assert stat.S_IMODE(os.stat(tmp_path / "key.txt").st_mode) == 0o600
    lines = text.splitlines()
    assert lines[0].startswith("# created: ") and lines[1].startswith("# public key: age1")
    (ident,) = parse_identities(text)
    assert out.decode().strip() == f"Public key: {ident.recipient}"
    assert lines[1] == f"# public key: {ident.recipient}"
    code, _, err = invoke("keygen", "-o", str(tmp_path / "key.txt"))  # never overwrites
    assert code == 1 and "Error" in err
    code, out, _ = invoke("keygen", "-y", str(tmp_path / "key.txt"))
    assert out.decode().strip() == str(ident.recipient)


def _identity_file(tmp_path: Path, name: str = "id.txt") -> tuple[X25519Identity, Path]:
    ident = X25519Identity.generate()
    path = tmp_path / name
    path.write_text(f"# public key: {ident.recipient}\n{ident.to_string()}\n")
    return ident, path


@pytest.mark.parametrize("armor", [False, True])
def test_round_trip_stdin_stdout(tmp_path: Path, armor: bool) -> None:
    a, a_file = _identity_file(tmp_path, "a")
    b, b_file = _identity_file(tmp_path, "b")
    (tmp_path / "recips").write_text(f"# b\n{b.recipient}\n")
    plain = os.urandom(C + 3)
    code, ct, _ = invoke("encrypt", "-r", str(a.recipient), "-R", str(tmp_path / "recips"),
                         *(["-a"] if armor else []), data=plain)
    assert code == 0
    assert ct.startswith(b"-----BEGIN AGE") == armor
    for keyfile in (a_file, b_file):
        code, out, _ = invoke("decrypt", "-i", str(keyfile), data=ct)
        assert code == 0 and out == plain


def test_passphrase_file_and_prompt(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("open sesame\n")
    (tmp_path / "p").write_bytes(b"hello")
    code, _, _ = invoke("encrypt", "--passphrase-file", str(tmp_path / "pw"), "--work-factor",
                        "4", "-o", str(tmp_path / "c"), str(tmp_path / "p"))
    assert code == 0
    code, out, _ = invoke("decrypt", "--passphrase-file", str(tmp_path / "pw"),
                          str(tmp_path / "c"))
    assert code == 0 and out == b"hello"
    code, out, _ = invoke("decrypt", "-p", str(tmp_path / "c"), data=b"open sesame\n")
    assert code == 0 and out.endswith(b"hello")
    code, _, _ = invoke("encrypt", "-p", "--work-factor", "4", "-o", str(tmp_path / "c2"),
                        str(tmp_path / "p"), data=b"pw\npw\n")
    assert code == 0
    code, out, _ = invoke("decrypt", "-p", str(tmp_path / "c2"), data=b"pw\n")
    assert code == 0 and out.endswith(b"hello")
    (tmp_path / "bad").write_text("wrong\n")
    code, _, err = invoke("decrypt", "--passphrase-file", str(tmp_path / "bad"),
                          str(tmp_path / "c"))
    assert code == 1 and "NoIdentityMatched" in err and "open sesame" not in err


def test_usage_errors(tmp_path: Path) -> None:
    code, _, err = invoke("encrypt", data=b"x")
    assert code == 1 and "recipient" in err
    code, _, err = invoke("encrypt", "-r", "age1bogus", data=b"x")
    assert code == 1 and err.count("\n") == 1
    code, _, err = invoke("decrypt", data=b"x")
    assert code == 1 and "identity" in err


def test_atomic_decrypt_subprocess(tmp_path: Path) -> None:
    ident, keyfile = _identity_file(tmp_path)
    plain = os.urandom(3 * C + 10)
    (tmp_path / "p").write_bytes(plain)
    proc = cli("encrypt", "-r", str(ident.recipient), "-o", str(tmp_path / "c"),
               str(tmp_path / "p"))
    assert proc.returncode == 0, proc.stderr
    proc = cli("decrypt", "-i", str(keyfile), "-o", str(tmp_path / "out"), str(tmp_path / "c"))
    assert proc.returncode == 0 and (tmp_path / "out").read_bytes() == plain
    before = sorted(os.listdir(tmp_path))
    blob = bytearray((tmp_path / "c").read_bytes())
    blob[-100] ^= 1  # the final chunk: every chunk before it authenticates
    (tmp_path / "bad").write_bytes(bytes(blob))
    proc = cli("decrypt", "-i", str(keyfile), "-o", str(tmp_path / "new"), str(tmp_path / "bad"))
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and "ChunkTampered" in err
    assert sorted(os.listdir(tmp_path)) == sorted([*before, "bad"])  # no file, no temp file
    (tmp_path / "new").write_bytes(b"old")  # an existing target survives a failure
    proc = cli("decrypt", "--force", "-i", str(keyfile), "-o", str(tmp_path / "new"),
               str(tmp_path / "bad"))
    assert proc.returncode == 1 and b"ChunkTampered" in proc.stderr
    assert (tmp_path / "new").read_bytes() == b"old"


def test_passphrase_fd_subprocess(tmp_path: Path) -> None:
    (tmp_path / "p").write_bytes(b"via fd")
    for argv in (["encrypt", "--work-factor", "4", "-o", str(tmp_path / "c")],
                 ["decrypt", "-o", str(tmp_path / "o")]):
        r, w = os.pipe()
        os.write(w, b"fd secret\n")
        os.close(w)
        try:
            src = str(tmp_path / ("p" if argv[0] == "encrypt" else "c"))
            proc = cli(*argv, "--passphrase-fd", str(r), src, pass_fds=(r,))
        finally:
            os.close(r)
        assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o").read_bytes() == b"via fd"


def test_cli_output_opens_with_age(tmp_path: Path) -> None:
    age = shutil.which("age")
    if age is None:
        support.unavailable("the age CLI is not installed")
    ident, keyfile = _identity_file(tmp_path)
    plain = os.urandom(C + 1)
    (tmp_path / "p").write_bytes(plain)
    code, _, _ = invoke("encrypt", "-a", "-r", str(ident.recipient), "-o", str(tmp_path / "c"),
                        str(tmp_path / "p"))
    assert code == 0
    proc = subprocess.run([age, "-d", "-i", str(keyfile), str(tmp_path / "c")],
                          capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0 and proc.stdout == plain
