"""``cryptoplane stream``: age-compatible ``encrypt``, ``decrypt`` and ``keygen``.

Thin over ``cryptoplane.stream``: option parsing, key files, passphrase sources, a
progress bar on a terminal. Output files are written beside the target and renamed into
place only when everything authenticated, so a failed decrypt leaves no plaintext file.
An existing output file is refused unless --force (age's tools and cp differ here; a
refusal cannot lose data, and a replacement is atomic, never a half-written file).
SIGINT, SIGTERM and SIGHUP stop a command cleanly (``signals.py``): the temporary file
is removed and the exit status is 130, 143 or 129.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import click

from ..exceptions import CryptoplaneError
from ..stream import (
    X25519Identity,
    decrypt,
    encrypt,
    parse_identities,
    parse_recipients,
)
from ..stream._io import atomic_output, refuse_existing
from ..stream.recipients import DEFAULT_WORK_FACTOR, MAX_WORK_FACTOR, Identity, Recipient
from .signals import on_signals

_PROGRESS_MIN = 32 << 20  # below this a bar only flickers
_F = TypeVar("_F", bound=Callable[..., Any])


def _fail(message: str) -> click.ClickException:
    return click.ClickException(message)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """One clear line and exit status 1 for every expected failure."""
    try:
        yield
    except (CryptoplaneError, OSError) as exc:
        text = str(exc) or type(exc).__name__
        raise _fail(f"{type(exc).__name__}: {text}") from None


def _read_passphrase_fd(fd: int) -> str:
    with os.fdopen(os.dup(fd), "rb") as f:
        return _first_line(f.read(64 * 1024))


def _first_line(data: bytes) -> str:
    line = data.split(b"\n", 1)[0].removesuffix(b"\r")
    if not line:
        raise _fail("the passphrase is empty")
    return line.decode("utf-8")


def _passphrase(prompt: bool, file: str | None, fd: int | None, confirm: bool) -> str | None:
    sources = sum([prompt, file is not None, fd is not None])
    if sources > 1:
        raise _fail("use only one of -p, --passphrase-file and --passphrase-fd")
    if file is not None:
        with _errors():
            return _first_line(Path(file).read_bytes()[: 64 * 1024])
    if fd is not None:
        with _errors():
            return _read_passphrase_fd(fd)
    if prompt:
        text: str = click.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm,
                                 err=True)
        if not text:
            raise _fail("the passphrase is empty")
        return text
    return None


def _passphrase_options(verb: str, asked: str = "") -> Callable[[_F], _F]:
    """-p, --passphrase-file and --passphrase-fd (``ask``, ``passphrase_file``,
    ``passphrase_fd``: ``_passphrase``'s sources), each helped as ``verb`` uses it."""
    def add(fn: _F) -> _F:
        for option in reversed([
            click.option("-p", "--passphrase", "ask", is_flag=True,
                         help=f"{verb} with a passphrase, asked on the terminal{asked}."),
            click.option("--passphrase-file", type=click.Path(dir_okay=False),
                         metavar="FILE",
                         help=f"{verb} with the passphrase on FILE's first line."),
            click.option("--passphrase-fd", type=int, metavar="FD",
                         help=f"{verb} with the passphrase read from file descriptor FD."),
        ]):
            fn = option(fn)
        return fn
    return add


def _force_workers_input(fn: _F) -> _F:
    """-f, -j and [INPUT], as encrypt and decrypt both take them."""
    for option in reversed([
        click.option("-f", "--force", is_flag=True, help=_FORCE_HELP),
        click.option("-j", "--workers", type=click.IntRange(1), metavar="N",
                     help="Threads for the payload (default: every core)."),
        click.argument("input_path", metavar="[INPUT]", required=False,
                       type=click.Path(dir_okay=False, allow_dash=True)),
    ]):
        fn = option(fn)
    return fn


@contextlib.contextmanager
def _progress(size: int | None, label: str) -> Iterator[Callable[[int], None] | None]:
    """A rich bar on stderr when it is a terminal and the input is large."""
    if size is None or size < _PROGRESS_MIN or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(label, total=size)
        yield lambda done: bar.update(task, completed=done)


def _input(path: str | None) -> tuple[Any, int | None]:
    if path is None or path == "-":
        return sys.stdin.buffer, None
    return path, os.stat(path).st_size


def _output(path: str | None, binary: bool, force: bool) -> Any:
    if path is not None and path != "-":
        if not force:
            try:
                refuse_existing(path)
            except FileExistsError:
                raise _fail(f"{path} exists: give --force to replace it") from None
        return path
    out: BinaryIO = sys.stdout.buffer
    if binary and out.isatty():
        raise _fail("refusing to write binary output to a terminal: use -o FILE or -a")
    return out


_CONTEXT: dict[str, Any] = {"help_option_names": ["-h", "--help"]}
_FORCE_HELP = ("Replace OUTPUT if it exists. It is swapped for the finished file in one "
               "rename, keeping its permission bits; hard links to it keep the old "
               "contents. Without --force an existing OUTPUT is refused.")


@click.command("encrypt", context_settings=_CONTEXT)
@click.option("-r", "--recipient", "recipients", multiple=True, metavar="RECIPIENT",
              help="Encrypt to this age1... public key (repeatable).")
@click.option("-R", "--recipients-file", "recipient_files", multiple=True,
              type=click.Path(dir_okay=False), metavar="FILE",
              help="Encrypt to every age1... key in FILE (one a line, # comments).")
@_passphrase_options("Encrypt", " (twice)")
@click.option("--work-factor", type=click.IntRange(1, 30), default=DEFAULT_WORK_FACTOR,
              show_default=True, help="scrypt work factor (log2 N) for a passphrase.")
@click.option("-a", "--armor", is_flag=True, help="Write PEM-like ASCII armor.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), metavar="OUTPUT",
              help="Write to OUTPUT (atomically; a new file is mode 0600) instead of "
                   "standard output.")
@_force_workers_input
@on_signals
def encrypt_cmd(recipients: tuple[str, ...], recipient_files: tuple[str, ...], ask: bool,
                passphrase_file: str | None, passphrase_fd: int | None, work_factor: int,
                armor: bool, output: str | None, force: bool, workers: int | None,
                input_path: str | None) -> None:
    """Encrypt INPUT (or standard input) in the age v1 format.

    To public keys (-r, -R: X25519 age1... keys) or to a passphrase (-p,
    --passphrase-file, --passphrase-fd; scrypt), never both. The output reads with age,
    rage and pyrage.

    \b
    SIGINT, SIGTERM and SIGHUP stop it: OUTPUT is left as it was, the
    temporary file removed, and the exit status is 130, 143 or 129.
    """
    sink = _output(output, binary=not armor, force=force)
    passphrase = _passphrase(ask, passphrase_file, passphrase_fd, confirm=True)
    with _errors():
        targets: list[Recipient | str] = list(recipients)
        for name in recipient_files:
            targets += parse_recipients(Path(name).read_text())
        if passphrase is None and not targets:
            raise _fail("give a recipient (-r, -R) or a passphrase (-p)")
        if passphrase is not None and targets:
            raise _fail("a passphrase cannot be combined with recipients")
        source, size = _input(input_path)
        with _progress(size, "encrypting") as progress:
            encrypt(source, sink, targets, passphrase=passphrase, armor=armor,
                    work_factor=work_factor, workers=workers, progress=progress,
                    overwrite=force)


@click.command("decrypt", context_settings=_CONTEXT)
@click.option("-i", "--identity", "identity_files", multiple=True,
              type=click.Path(dir_okay=False), metavar="FILE",
              help="Identity file (AGE-SECRET-KEY-1... lines, # comments; repeatable).")
@_passphrase_options("Decrypt")
@click.option("--max-work-factor", type=click.IntRange(1, 30), default=MAX_WORK_FACTOR,
              show_default=True, help="Refuse scrypt work factors above this.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), metavar="OUTPUT",
              help="Write to OUTPUT, created (mode 0600) only once everything "
                   "authenticated.")
@_force_workers_input
@on_signals
def decrypt_cmd(identity_files: tuple[str, ...], ask: bool, passphrase_file: str | None,
                passphrase_fd: int | None, max_work_factor: int, output: str | None,
                force: bool, workers: int | None, input_path: str | None) -> None:
    """Decrypt an age file INPUT (or standard input); armor is detected.

    With -o the output file appears only when the whole file authenticated; an existing
    OUTPUT is refused unless --force, and on any failure it is left as it was. To
    standard output, plaintext is written as each chunk authenticates: on an error the
    exit status is 1 and what was written is an authenticated prefix.

    \b
    SIGINT, SIGTERM and SIGHUP stop it: OUTPUT is left as it was, the
    temporary file removed, and the exit status is 130, 143 or 129.
    """
    sink = _output(output, binary=False, force=force)
    passphrase = _passphrase(ask, passphrase_file, passphrase_fd, confirm=False)
    with _errors():
        keys: list[Identity] = []
        for name in identity_files:
            keys += parse_identities(Path(name).read_text())
        if passphrase is None and not keys:
            raise _fail("give an identity file (-i) or a passphrase (-p)")
        source, size = _input(input_path)
        with _progress(size, "decrypting") as progress:
            decrypt(source, sink, keys, passphrase=passphrase,
                    max_work_factor=max_work_factor, workers=workers, progress=progress,
                    overwrite=force)


@click.command("keygen", context_settings=_CONTEXT)
@click.option("-o", "--output", type=click.Path(dir_okay=False), metavar="OUTPUT",
              help="Write the identity to OUTPUT (mode 0600; never overwritten).")
@click.option("-y", "to_public", is_flag=True,
              help="Read identity files (INPUT) and print their public keys instead.")
@click.argument("inputs", nargs=-1, type=click.Path(dir_okay=False, exists=True))
@on_signals
def keygen_cmd(output: str | None, to_public: bool, inputs: tuple[str, ...]) -> None:
    """Generate an X25519 identity, as age-keygen does.

    The identity file holds comment lines with the creation date and the public key,
    then the AGE-SECRET-KEY-1... line. The public key (age1...) is printed.
    """
    with _errors():
        if to_public:
            for name in inputs:
                for key in parse_identities(Path(name).read_text()):
                    click.echo(str(key.recipient))
            return
        identity = X25519Identity.generate()
        created = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        text = (f"# created: {created.isoformat().replace('+00:00', 'Z')}\n"
                f"# public key: {identity.recipient}\n{identity.to_string()}\n")
        if output is None:
            click.echo(text, nl=False)
            click.echo(f"Public key: {identity.recipient}", err=True)
            return
        with atomic_output(output, overwrite=False) as f:  # never a half-written key file
            f.write(text.encode())
        click.echo(f"Public key: {identity.recipient}")


@click.group("stream", context_settings=_CONTEXT)
def stream() -> None:
    """age-format file encryption: encrypt, decrypt, keygen.

    Files interoperate with age, rage and pyrage (X25519 keys, passphrases, ASCII
    armor); large files are sealed and opened on every core.
    """


stream.add_command(encrypt_cmd)
stream.add_command(decrypt_cmd)
stream.add_command(keygen_cmd)

__all__ = ["decrypt_cmd", "encrypt_cmd", "keygen_cmd", "stream"]


if __name__ == "__main__":  # python -m cryptoplane.cli.stream, until main.py registers it
    stream()
