"""Several NBD server processes on one listening socket: every core for multi-conn clients.

One Python process serves its connections on one core (the GIL); fio with ``--numjobs=4``
or nbdcopy's multi-conn open several connections, which ``serve_processes`` spreads over
``n`` worker processes. The parent binds the Unix socket and/or the TCP port once, then
forks the workers; each runs its own (uvloop) event loop and ``Server`` and accepts from
the inherited listening socket, so the kernel hands each new connection to one of them
(for TCP, ``SO_REUSEPORT`` would be the alternative; one shared socket works for both).

The exports are opened in the parent, before the fork, and inherited: the passphrase is
asked for and the key derived once (an Argon2 slot costs a second and a gigabyte per
open), and the volume's one writer lock (an OFD lock, see ``volume.datalock``) belongs to
the open file that every worker shares — a second open in each worker would be refused
as a second writer. The image mapping is ``MAP_SHARED``: every worker reads the same page
cache that every worker's ``pwrite`` fills.

NBD semantics across processes. Requests are sector-aligned (the codec refuses others),
so no two workers ever read-modify-write one sector. A write completes (its reply is
sent) once ``pwrite`` returned, i.e. once its bytes are in the file's page cache, which
all workers share. FLUSH is ``fdatasync`` on the image, which writes back every dirty page
of the file whoever dirtied it: a flush on any connection makes every completed write of
every worker durable (multi-conn's promise), and FUA (``fdatasync`` after the write)
likewise. What one process cannot give another is ordering of *concurrent* overlapping
requests, which NBD leaves undefined anyway.

Bounds (the hardening issue's): the memory budget and the connection limit are divided
among the workers, each enforcing its share exactly as one server does. Divided, not a
shared counter: the budget is charged on every request, from the event loop and from
buffer finalizers on any thread, and a counter in shared memory would add a cross-process
lock there; the sum of the shares never exceeds the limit given. The cost: a worker may
refuse a connection (or make one wait for memory) while another has room. ``--processes
auto`` is one worker per core, as many as the budget allows (each needs ``MIN_BUDGET``)
and no more than the connection limit.

The parent forwards SIGTERM and SIGINT to the workers (each finishes its requests,
flushes and exits), reaps them, and restarts a worker that dies unexpectedly (killed, or
exits non-zero) — its clients lose their connections, as with any server crash, and
reconnect to a live one — unless workers die more than ``MAX_RESTARTS`` times in
``RESTART_WINDOW`` seconds, when it stops them all and fails. It removes the Unix socket
on exit.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Final

from cryptoplane.exceptions import InvalidRequest
from cryptoplane.nbd.blockdev import BlockDevice
from cryptoplane.nbd.limits import MIN_BUDGET, Limits
from cryptoplane.nbd.runner import SOCKET_MODE, Ready, bind_unix, remove_stale_socket, urls

BACKLOG: Final = 1024
MAX_RESTARTS: Final = 5
RESTART_WINDOW: Final = 30.0  # seconds
STOP_GRACE: Final = 60.0  # seconds a worker has to finish and flush after SIGTERM
_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
_PR_SET_PDEATHSIG: Final = 1


@dataclass
class Listeners:
    """The listening sockets, bound once in the parent and shared by the workers."""

    unix_path: str | None = None
    tcp_address: tuple[str, int] | None = None
    _socks: list[socket.socket] = field(default_factory=list)

    def sockets(self) -> list[socket.socket]:
        return list(self._socks)

    def close(self) -> None:
        for sock in self._socks:
            sock.close()
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_path)


def listen(*, unix: str | None = None, tcp: tuple[str, int] | None = None,
           socket_mode: int = SOCKET_MODE) -> Listeners:
    """Bind and listen on ``unix`` and/or ``tcp`` (port 0: any free one)."""
    if unix is None and tcp is None:
        raise InvalidRequest("serve needs a Unix socket path or a TCP address")
    out = Listeners()
    try:
        if unix is not None:
            remove_stale_socket(unix)
            sock = bind_unix(unix, socket_mode)
            out.unix_path = unix
            out._socks.append(sock)
            sock.listen(BACKLOG)
        if tcp is not None:
            family, kind, proto, _, addr = socket.getaddrinfo(
                tcp[0] or None, tcp[1], type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            sock = socket.socket(family, kind, proto)
            out._socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(BACKLOG)
            out.tcp_address = (tcp[0], sock.getsockname()[1])
        for sock in out._socks:
            sock.setblocking(False)
    except BaseException:
        out.close()
        raise
    return out


def auto_processes(limits: Limits) -> int:
    """What ``--processes auto`` means: one worker per core, as many as the memory
    budget (``MIN_BUDGET`` each) and the connection limit allow."""
    return max(1, min(os.cpu_count() or 1, limits.memory_budget // MIN_BUDGET,
                      limits.max_connections))


def share(limits: Limits, n: int) -> Limits:
    """One worker's share of ``limits`` among ``n``: the budget and the connection
    limit divided, the timeouts as they are."""
    if n < 1:
        raise InvalidRequest("the number of server processes must be at least 1")
    if limits.memory_budget // n < MIN_BUDGET:
        raise InvalidRequest(
            f"a memory budget of {limits.memory_budget} bytes cannot be divided among {n} "
            f"processes (each needs {MIN_BUDGET}): raise it to at least "
            f"{n * MIN_BUDGET} or use fewer processes")
    if limits.max_connections < n:
        raise InvalidRequest(f"{limits.max_connections} connections cannot be divided "
                             f"among {n} processes: use fewer processes")
    return replace(limits, memory_budget=limits.memory_budget // n,
                   max_connections=limits.max_connections // n)


def _say(text: str) -> None:
    print(f"cryptoplane serve: {text}", file=sys.stderr, flush=True)


def _why(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


class _Workers:
    """The parent's bookkeeping: which worker pids live, and their restarts."""

    def __init__(self, start: Callable[[int], int]) -> None:
        self._start = start
        self.pids: dict[int, int] = {}  # pid -> slot
        self.deaths: list[float] = []

    def spawn(self, n: int) -> None:
        for slot in range(n):
            self.pids[self._start(slot)] = slot

    def reap(self, stopping: bool) -> None:
        """Collect every worker that exited; restart those that died unexpectedly."""
        while self.pids:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.pids.clear()
                return
            if pid == 0:
                return
            slot = self.pids.pop(pid, None)
            if slot is None or stopping:
                if slot is not None and status != 0:
                    _say(f"worker {pid} {_why(status)} while stopping")
                continue
            now = time.monotonic()
            self.deaths = [t for t in self.deaths if now - t < RESTART_WINDOW] + [now]
            if len(self.deaths) > MAX_RESTARTS:
                raise InvalidRequest(f"worker {pid} {_why(status)}; workers died "
                                     f"{len(self.deaths)} times in {RESTART_WINDOW:.0f} s: "
                                     "giving up")
            _say(f"worker {pid} {_why(status)}: starting another")
            self.pids[self._start(slot)] = slot

    def signal(self, sig: int) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def _worker(exports: dict[str, BlockDevice], listeners: Listeners, ready_fd: int,
            parent: int, kw: dict[str, Any]) -> None:
    """A worker's life after the fork; never returns (``os._exit``)."""
    from cryptoplane.nbd.runner import serve

    code = 1
    try:
        with contextlib.suppress(OSError, AttributeError):  # die with the parent
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # it died before prctl took effect
            return
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)

        def ready(_: list[str]) -> None:
            os.write(ready_fd, b"r")

        serve(exports, listening=listeners, ready=ready, **kw)
        code = 0
    except BaseException:  # a worker reports everything, then exits
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(code)


def serve_processes(exports: dict[str, BlockDevice], processes: int, *,
                    unix: str | None = None, tcp: tuple[str, int] | None = None,
                    ready: Ready | None = None, limits: Limits | None = None,
                    socket_mode: int = SOCKET_MODE, **kw: Any) -> None:
    """Serve ``exports`` from ``processes`` worker processes until SIGTERM or SIGINT.
    ``kw``: the rest of ``runner.serve``'s arguments (tls, read_only, inline_limit)."""
    per = share(limits or Limits(), processes)
    listeners = listen(unix=unix, tcp=tcp, socket_mode=socket_mode)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    # a handler (not SIG_DFL, whose "ignore" may drop the signal) so that a blocked
    # SIGCHLD stays pending for sigtimedwait
    old_chld = signal.signal(signal.SIGCHLD, lambda *_: None)
    ready_r, ready_w = os.pipe()
    kw = dict(kw, limits=per)

    parent = os.getpid()

    def start(_: int) -> int:
        sys.stdout.flush()  # or the worker would print what the parent has buffered
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            _worker(exports, listeners, ready_w, parent, kw)
        return pid

    workers = _Workers(start)
    try:
        workers.spawn(processes)
        announced, told = 0, False
        while True:
            info = signal.sigtimedwait(_SIGNALS, 0.2)
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                break
            workers.reap(stopping=False)
            if select.select([ready_r], [], [], 0)[0]:  # drained, restarts' too
                announced += len(os.read(ready_r, 64))
                if announced >= processes and not told and ready is not None:
                    told = True
                    ready(urls(list(exports), unix=listeners.unix_path,
                               tcp=listeners.tcp_address, tls=kw.get("tls") is not None))
    finally:
        _stop(workers)
        listeners.close()
        # a second Ctrl-C or SIGTERM while stopping: consumed, not raised on unblocking
        while signal.sigtimedwait(_SIGNALS, 0) is not None:
            pass
        os.close(ready_r)
        os.close(ready_w)
        signal.signal(signal.SIGCHLD, old_chld)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _stop(workers: _Workers) -> None:
    """SIGTERM every worker and wait for them to finish; SIGKILL the late ones."""
    workers.signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    while workers.pids and time.monotonic() < deadline:
        signal.sigtimedwait([signal.SIGCHLD], 0.1)
        workers.reap(stopping=True)
    if workers.pids:
        _say(f"workers {sorted(workers.pids)} did not stop within {STOP_GRACE:.0f} s: "
             "killing them")
        workers.signal(signal.SIGKILL)
        while workers.pids:
            signal.sigtimedwait([signal.SIGCHLD], 0.1)
            workers.reap(stopping=True)
