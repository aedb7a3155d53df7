"""SIGINT, SIGTERM and SIGHUP end a long-running command cleanly.

A command runs inside ``exit_on_signals()``. The first of these signals raises
``Interrupted`` in the main thread wherever it is (a read, a join, a prompt), so every
``with`` and ``finally`` on the way out runs: temporary files are removed, partial
outputs deleted, child processes killed. Later signals are ignored until the process
exits, so a second Ctrl-C cannot cut that cleanup short and leave half of it done.

The process then exits with status 128 + the signal's number (130, 143, 129), the status
a shell reports for a command the signal killed, through ``os._exit``: worker threads may
still be blocked reading a pipe that stays open, holding its buffer's lock, and a normal
interpreter shutdown would abort on that lock ("Fatal Python error:
_enter_buffered_busy"). Nothing is left that a normal shutdown would still do: output
files were closed or removed while unwinding, and standard output is not flushed (what
a stopped command had not yet written is not owed to anyone).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import NoReturn, ParamSpec, TypeVar

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

P = ParamSpec("P")
R = TypeVar("R")


class Interrupted(BaseException):
    """A signal asked the command to stop. A BaseException, as KeyboardInterrupt is, so
    that ``except Exception`` on the way out does not swallow it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def exit_status(signum: int) -> int:
    """The exit status of a command stopped by ``signum``, as shells report one."""
    return 128 + signum


def _exit(signum: int) -> NoReturn:
    with contextlib.suppress(Exception):  # stderr may be gone with the terminal (SIGHUP)
        sys.stderr.flush()
    with contextlib.suppress(OSError):
        os.write(2, f"cryptoplane: stopped by {signal.Signals(signum).name}\n".encode())
    os._exit(exit_status(signum))


@contextlib.contextmanager
def exit_on_signals() -> Iterator[None]:
    """Run the block; on SIGINT, SIGTERM or SIGHUP unwind it and exit 128 + signal.

    Outside the main thread (where Python cannot set handlers) the block just runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    done = False  # the block has ended: a signal now is noted, not raised

    def handler(signum: int, frame: FrameType | None) -> None:
        if caught:
            return  # already unwinding: let the cleanup finish
        caught.append(signum)
        if not done:
            raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    except BaseException:
        if not caught:
            raise
        # whatever the unwinding raised on top of Interrupted, the signal decides
    finally:
        done = True
        if not caught:
            for s, h in previous.items():
                signal.signal(s, h)
    if caught:
        _exit(caught[0])


def on_signals(command: Callable[P, R]) -> Callable[P, R]:
    """Decorate a command's function to run inside ``exit_on_signals()``."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        with exit_on_signals():
            return command(*args, **kwargs)
        raise AssertionError("unreachable")  # pragma: no cover - mypy wants a return

    return run


__all__ = ["SIGNALS", "Interrupted", "exit_on_signals", "exit_status", "on_signals"]
