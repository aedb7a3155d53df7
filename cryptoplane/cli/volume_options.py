"""What the ``cryptoplane volume`` commands share: passphrases (prompted, from
``--key-file`` or ``--passphrase-fd``, never argv), the ``--header`` option, and errors
turned into cryptsetup's exit statuses (``run``)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..exceptions import CryptoplaneError
from ..volume import luks
from ..volume.errors import WrongPassphrase

F = TypeVar("F", bound=Callable[..., Any])
EXIT_WRONG_PASSPHRASE = 2  # as cryptsetup


class Failed(click.ClickException):
    """A command failed: exit status 1."""

    exit_code = 1


class WrongPassphraseFailed(Failed):
    """No keyslot opened with the passphrase: cryptsetup's exit status."""

    exit_code = EXIT_WRONG_PASSPHRASE


def run(fn: Callable[[], Any]) -> Any:
    """``fn()``, with the library's errors reported as the command's failure."""
    try:
        return fn()
    except WrongPassphrase as e:
        raise WrongPassphraseFailed(str(e)) from None
    except CryptoplaneError as e:
        raise Failed(f"{type(e).__name__}: {e}") from None


# -- secrets -------------------------------------------------------------------------

def _read_fd(fd: int) -> bytes:
    if fd == 0:
        data = sys.stdin.buffer.read(luks.KEY_FILE_MAX + 1)
    else:
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(luks.KEY_FILE_MAX + 1)
    line = data.split(b"\n", 1)[0]
    return line


def _read_key_file(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read(luks.KEY_FILE_MAX + 1)
    try:
        with open(path, "rb") as f:
            return f.read(luks.KEY_FILE_MAX + 1)
    except OSError as e:
        raise Failed(f"cannot read key file {path}: {e.strerror}") from None


def read_secret(key_file: str | None, fd: int | None, prompt: str, new: bool = False) -> bytes:
    """The passphrase from ``key_file``, ``fd`` or a prompt (twice when ``new``)."""
    if key_file is not None and fd is not None:
        raise Failed("give --key-file or --passphrase-fd, not both")
    if key_file is not None:
        data = _read_key_file(key_file)
    elif fd is not None:
        data = _read_fd(fd)
    else:
        text = click.prompt(prompt, hide_input=True, confirmation_prompt=new,
                            err=True, show_default=False)
        data = text.encode("utf-8")
    if len(data) > luks.KEY_FILE_MAX:
        raise Failed(f"passphrase is longer than {luks.KEY_FILE_MAX} bytes")
    if new and not data:
        raise Failed("refusing an empty passphrase")
    return data


def secret_options(fn: F) -> F:
    """``--key-file`` and ``--passphrase-fd``, for ``read_secret``."""
    fn = click.option("--passphrase-fd", type=int, metavar="N",
                      help="Read the passphrase (one line) from file descriptor N.")(fn)
    fn = click.option("--key-file", "-d", metavar="FILE",
                      help="Use the whole contents of FILE ('-': stdin) as passphrase.")(fn)
    return fn


def new_secret_options(fn: F) -> F:
    """``--new-key-file`` and ``--new-passphrase-fd``: a second passphrase."""
    fn = click.option("--new-passphrase-fd", type=int, metavar="N",
                      help="New passphrase: one line from file descriptor N.")(fn)
    fn = click.option("--new-key-file", metavar="FILE",
                      help="New passphrase: this file's contents.")(fn)
    return fn


def header_option(fn: F) -> F:
    """``--header FILE``: a detached LUKS header."""
    return click.option("--header", metavar="FILE", type=click.Path(dir_okay=False),
                        help="Detached LUKS header file (like cryptsetup --header).")(fn)
