"""Several NBD server processes on one listening socket: every core for multi-conn clients.

One Python process serves its connections on one core (the GIL); fio with ``--numjobs=4``
or nbdcopy's multi-conn open several connections, which ``serve_processes`` spreads over
``n`` worker processes, each running its own (uvloop) event loop and ``Server``. The
parent binds the Unix socket and/or the TCP port once, accepts, and hands each
connection (its descriptor, over a Unix SEQPACKET socket per worker) to the worker that
serves the fewest; workers say when one closes. Letting the workers accept from the
inherited listening socket themselves (or ``SO_REUSEPORT`` for TCP, which hashes) was
the first version: the kernel gave fio's four connections 2:2, 1:3, 3:1, 1:3 and 4:0 in
five tries here, one worker serving all four in the last. Accepting is rare; the parent
is on no request's path.

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
lock there; the sum of the shares never exceeds the limit given. As new connections go
to the worker with the fewest, one is refused only when every worker is at its share,
i.e. at the limit; a busy worker may make a client wait for memory while another has
some to spare (the cost of dividing). ``--processes
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


@dataclass
class _Worker:
    pid: int
    channel: socket.socket  # the parent's end: connections out, "closed" notes in
    connections: int = 0


class _Workers:
    """The parent's bookkeeping: the live workers, their connections, their restarts."""

    def __init__(self, start: Callable[[list[socket.socket]], _Worker]) -> None:
        self._start = start
        self.slots: list[_Worker] = []
        self.deaths: list[float] = []
        self._next = 0

    def spawn(self, n: int) -> None:
        for _ in range(n):
            self.slots.append(self._start(self.channels()))

    def channels(self) -> list[socket.socket]:
        return [w.channel for w in self.slots if w.pid > 0]

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self.slots if w.pid > 0]

    def give(self, conn: socket.socket) -> None:
        """Hand ``conn`` to the worker serving the fewest connections (the next one in
        turn among equals): the kernel, left to choose among workers that all wait in
        accept, gave all four of fio's connections to one worker in one try of five."""
        live = [w for w in self.slots if w.pid > 0]
        if not live:
            return
        self._next += 1
        turn = self._next
        least = min(live, key=lambda w: (w.connections,
                                         (self.slots.index(w) - turn) % len(self.slots)))
        try:
            socket.send_fds(least.channel, [b"f"], [conn.fileno()])
        except OSError as exc:  # it died: the client sees the connection close
            _say(f"could not hand a connection to worker {least.pid}: {exc}")
            return
        least.connections += 1

    def note(self, channel: socket.socket) -> None:
        """Read what a worker said: one byte per connection it closed."""
        worker = next((w for w in self.slots if w.channel is channel), None)
        while worker is not None:
            try:
                said = channel.recv(64, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                said = b""
            if not said:
                return  # it exited; reap says how
            worker.connections = max(0, worker.connections - said.count(b"c"))

    def reap(self, stopping: bool) -> None:
        """Collect every worker that exited; restart those that died unexpectedly."""
        while self.pids:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = next((w for w in self.slots if w.pid == pid), None)
            if worker is None:
                continue
            worker.pid = -1
            worker.channel.close()
            if stopping:
                if status != 0:
                    _say(f"worker {pid} {_why(status)} while stopping")
                continue
            now = time.monotonic()
            self.deaths = [t for t in self.deaths if now - t < RESTART_WINDOW] + [now]
            if len(self.deaths) > MAX_RESTARTS:
                raise InvalidRequest(f"worker {pid} {_why(status)}; workers died "
                                     f"{len(self.deaths)} times in {RESTART_WINDOW:.0f} s: "
                                     "giving up")
            _say(f"worker {pid} {_why(status)}: starting another")
            self.slots[self.slots.index(worker)] = self._start(self.channels())

    def signal(self, sig: int) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def _worker(exports: dict[str, BlockDevice], addresses: Listeners, channel: socket.socket,
            ready_fd: int, parent: int, kw: dict[str, Any]) -> None:
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

        serve(exports, listening=addresses, handoff=channel, ready=ready, **kw)
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
    addresses = Listeners(listeners.unix_path, listeners.tcp_address)  # no sockets
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    # a handler (not SIG_DFL, whose "ignore" may drop the signal) so that a blocked
    # SIGCHLD stays pending for sigtimedwait
    old_chld = signal.signal(signal.SIGCHLD, lambda *_: None)
    ready_r, ready_w = os.pipe()
    kw = dict(kw, limits=per)
    parent = os.getpid()

    def start(others: list[socket.socket]) -> _Worker:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sys.stdout.flush()  # or the worker would print what the parent has buffered
        sys.stderr.flush()
        try:
            pid = os.fork()
        except BaseException:
            mine.close()
            theirs.close()
            raise
        if pid == 0:
            os.close(ready_r)
            for sock in (mine, *others, *listeners.sockets()):
                sock.close()
            _worker(exports, addresses, theirs, ready_w, parent, kw)
        theirs.close()
        return _Worker(pid, mine)

    workers = _Workers(start)
    try:
        workers.spawn(processes)
        announced, told = 0, False
        while True:
            by_fd = {s.fileno(): s for s in (*listeners.sockets(), *workers.channels())}
            readable = select.select([*by_fd, ready_r], [], [], 0.1)[0]
            for fd in readable:
                if fd in by_fd and by_fd[fd].type == socket.SOCK_SEQPACKET:
                    workers.note(by_fd[fd])
                elif fd in by_fd:
                    _accept(by_fd[fd], workers)
            if ready_r in readable:  # drained, restarts' too
                announced += len(os.read(ready_r, 64))
                if announced >= processes and not told and ready is not None:
                    told = True
                    ready(urls(list(exports), unix=listeners.unix_path,
                               tcp=listeners.tcp_address, tls=kw.get("tls") is not None))
            if _asked_to_stop():
                break
            workers.reap(stopping=False)
    finally:
        listeners.close()  # no new connections; the workers finish theirs
        _stop(workers)
        for channel in workers.channels():
            channel.close()
        os.close(ready_r)
        os.close(ready_w)
        _asked_to_stop()  # a second Ctrl-C or SIGTERM: consumed, not raised on unblocking
        signal.signal(signal.SIGCHLD, old_chld)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _accept(sock: socket.socket, workers: _Workers) -> None:
    while True:
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # out of descriptors, say: the next round tries again
            _say(f"accept failed: {exc}")
            return
        with conn:
            workers.give(conn)


def _asked_to_stop() -> bool:
    """Whether SIGTERM or SIGINT arrived (pending SIGCHLDs are consumed too)."""
    stop = False
    while (info := signal.sigtimedwait(_SIGNALS, 0)) is not None:
        stop = stop or info.si_signo != signal.SIGCHLD
    return stop


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
