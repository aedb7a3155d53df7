"""The pool engine: worker processes fed through shared memory.

AEAD calls hold the GIL, so only processes spread them over cores. Each worker owns a
shared-memory arena of fixed slots (``shm.Arena``); the parent copies a payload into a
free slot, sends a small header down the worker's pipe, and a reader thread per worker
completes the job when the reply comes (copying the output out of the slot). Keys are
exported to a worker once, the first time it needs them, and dropped when the parent's
``Key`` dies. Workers run the same kernels as the inline engine.

Backpressure is DPDK's: ``submit`` accepts what fits in free slots and returns the count.

Failover: a worker that dies (EOF on its pipe) is replaced by a new one with a new
arena, and its in-flight jobs run again elsewhere. That is safe because kernels are pure
functions of their inputs and the caller's buffers are not touched before completion
(the payload lives in our slot). A job is tried at most ``max_attempts`` times, then
completes with ``EngineFailed``; workers dying faster than ``storm`` allows turn the
engine ``BROKEN``. Every job completes exactly once: a job is completed only by whoever
removes it from the engine's books under the lock.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import multiprocessing
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any

from ..algorithms import Algorithm, Op
from ..exceptions import EngineFailed
from ..keys import Key
from ..requests import Request
from . import pool_worker as pw
from .base import Engine, Health, Job, Work, complete
from .shm import Arena, as_bytes_view

DEFAULT_SLOTS = 8
DEFAULT_SLOT_SIZE = 4 << 20  # the largest request the pool takes (max_request)
# two pipe hops and a reader's wake-up: latency neither side's clock sees, half of it
# the parent's CPU (measured: benchmarks/README.md, plane_speed)
HOP_SECONDS = 25e-6
STOP_GRACE = 2.0  # seconds a worker gets to exit on STOP before terminate, then kill


def _context() -> BaseContext:
    """forkserver: safe when the parent has threads (plain fork is not), and each worker
    forks from a server that has already imported cryptography and cryptoplane, far
    quicker than spawn's fresh interpreter (benchmarks/README.md, plane_speed)."""
    try:
        ctx = multiprocessing.get_context("forkserver")
    except ValueError:  # a platform without forkserver
        return multiprocessing.get_context("spawn")
    # Only takes effect if the forkserver is not running yet; harmless otherwise.
    ctx.set_forkserver_preload(["cryptoplane.engines.pool_worker"])
    return ctx


class _Pending:
    """An accepted job on the engine's books: in a worker's slot, or in the backlog."""

    __slots__ = ("attempts", "caller", "done", "header", "mid", "request", "slot")

    def __init__(self, request: Request, done: Callable[[Any, BaseException | None], None]
                 ) -> None:
        self.request = request
        self.done = done
        self.attempts = 0
        self.slot = -1
        self.mid = -1
        self.header: tuple[str, tuple[Any, ...]] | None = None
        self.caller = 0.0  # seconds this process spent on it (copies, pickling, sends)


@dataclass(eq=False)
class _Worker:
    index: int
    process: BaseProcess
    conn: Connection
    arena: Arena
    free: list[int]
    inflight: dict[int, _Pending] = field(default_factory=dict)
    keys: set[int] = field(default_factory=set)  # key ids this worker has prepared
    dead: bool = False
    # Held while writing into the arena and the pipe, and while closing them, so the
    # death handler never unmaps memory a submitter is copying into.
    io_lock: threading.Lock = field(default_factory=threading.Lock)
    reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        try:
            return self.process.pid or -1
        except ValueError:  # closed (reaped and its descriptors released)
            return -1


def _forget(ids: dict[int, int], addr: int, dropped: collections.deque[int], kid: int) -> None:
    """A Key died (weakref.finalize): this may run in any thread, in the middle of any
    code, even one holding our locks, so it only does atomic container operations; the
    next submit tells the workers."""
    ids.pop(addr, None)
    dropped.append(kid)


class PoolEngine(Engine):
    name = "pool"
    priority = 10

    def __init__(self, workers: int | None = None, *, slots: int = DEFAULT_SLOTS,
                 slot_size: int = DEFAULT_SLOT_SIZE, max_attempts: int = 3,
                 storm: tuple[int, float] = (5, 10.0), **kw: Any) -> None:
        super().__init__(**kw)
        self.nworkers = workers or os.cpu_count() or 1
        self.slots = slots
        self.max_request = slot_size  # declared in every Capability: never sent bigger
        self.max_attempts = max_attempts
        self.storm = storm  # (deaths, seconds): this many deaths in the window: BROKEN
        self.parallelism = self.nworkers
        self.capacity = self.nworkers * slots  # slots in all (fewer while one respawns)
        # Takes the accepted jobs still open when the engine breaks (a scheduler
        # reroutes them) instead of their failing with EngineFailed.
        self.on_broken = None
        self._ctx = _context()
        self._workers: list[_Worker] = []
        self._backlog: collections.deque[_Pending] = collections.deque()  # to re-run
        self._space = threading.Condition(self._lock)  # notified when a slot frees
        self._mids = itertools.count()
        self._kids = itertools.count()
        self._key_ids: dict[int, int] = {}  # id(Key) -> key id; entries die with the Key
        self._dropped: collections.deque[int] = collections.deque()
        self._deaths: collections.deque[float] = collections.deque()
        self._counters = collections.Counter[str]()
        self._started = False
        self._closed = False
        self._broken = False  # final: health may be rewritten by start(), this may not

    def ops_for(self, algorithm: Algorithm) -> frozenset[Op]:
        return algorithm.ops & pw.CARRIED_OPS

    # -- lifetime -----------------------------------------------------------------------

    def start(self, *, self_test: bool = True) -> None:
        self._ensure_started()
        super().start(self_test=self_test)  # known answers run in the workers
        if self._broken:  # workers died during the self-tests: stays broken
            self.health = Health.BROKEN

    def _break(self) -> None:
        self._broken = True
        self.health = Health.BROKEN

    def _ensure_started(self) -> None:
        with self._lock:
            if self._started or self._closed:
                return
            self._started = True
        for i in range(self.nworkers):
            w = self._spawn(i)
            with self._lock:
                self._workers.append(w)

    def _spawn(self, index: int) -> _Worker:
        arena = Arena(self.slots, self.max_request)
        try:
            parent, child = self._ctx.Pipe(duplex=True)
            process = self._ctx.Process(  # type: ignore[attr-defined]
                target=pw.serve, args=(child, arena.name, self.slots, self.max_request),
                name=f"cryptoplane-pool-{index}", daemon=True)
            process.start()
        except BaseException:
            arena.close(unlink=True)
            raise
        child.close()  # ours must go, or the worker's death would never read as EOF
        w = _Worker(index, process, parent, arena, list(range(self.slots)))
        w.reader = threading.Thread(target=self._read, args=(w,), daemon=True,
                                    name=f"cryptoplane-pool-reader-{index}")
        w.reader.start()
        return w

    def close(self) -> None:
        """Stop the workers, fail what is still in flight (EngineFailed, exactly once),
        then remove every shared-memory segment. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            orphans = self._take_all()
            workers = list(self._workers)
        self._fail(orphans, "the pool engine was closed")
        for w in workers:
            self._send_quietly(w, (pw.STOP,))
        deadline = time.monotonic() + STOP_GRACE
        for w in workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
        for w in workers:
            if w.process.is_alive():
                w.process.terminate()
                w.process.join(1.0)
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
        me = threading.current_thread()
        for w in workers:  # they exit on EOF; a respawn in progress sees _closed
            if w.reader is not None and w.reader is not me:
                w.reader.join()
        for w in workers:
            self._release(w)
            _close_process(w.process)

    def _take_all(self) -> list[_Pending]:
        """Every accepted job off the books (call with the lock held)."""
        out = list(self._backlog)
        self._backlog.clear()
        for w in self._workers:
            # their slots stay taken: a live worker may still be writing into them, and
            # a closed or broken engine places nothing new anyway
            out.extend(w.inflight.values())
            w.inflight.clear()
        self._space.notify_all()
        return out

    def _release(self, w: _Worker) -> None:
        with w.io_lock:
            with contextlib.suppress(OSError):
                w.conn.close()
            w.arena.close(unlink=True)

    # -- introspection ------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        with self._lock:
            return len(self._backlog) + sum(len(w.inflight) for w in self._workers)

    @property
    def workers(self) -> list[int]:
        """Pids of the live workers, by index (for tests and diagnostics)."""
        with self._lock:
            return [w.pid for w in self._workers if not w.dead]

    def inflight_by_worker(self) -> dict[int, int]:
        """Jobs in flight per live worker pid (diagnostics, fault tests)."""
        with self._lock:
            return {w.pid: len(w.inflight) for w in self._workers if not w.dead}

    def counters(self) -> dict[str, int]:
        """deaths, failovers (deaths that had jobs in flight), retries, respawns, failed
        (jobs completed with EngineFailed), handed_off (to ``on_broken``), callback_errors."""
        with self._lock:
            keys = ("deaths", "failovers", "retries", "respawns", "failed", "handed_off",
                    "callback_errors")
            return {k: self._counters[k] for k in keys}

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(workers=self.nworkers, slots=self.slots, max_request=self.max_request,
                    counters=self.counters())
        return info

    def can_serve(self, request: Work) -> bool:
        return (type(request).__name__ in pw.REQUEST_TYPES and not self._closed
                and super().can_serve(request))

    def wait_for_space(self, timeout: float) -> bool:
        """Block until a slot is free (True) or ``timeout`` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        with self._space:
            while not self._closed and not self._broken:
                if not self._backlog and any(w.free for w in self._workers if not w.dead):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._space.wait(left)
        return False

    def _submit_waiting(self, job: Job) -> None:
        """One job through the workers, waiting for a slot (self-tests come this way)."""
        while not self.submit([job]):
            if not self.wait_for_space(1.0) and (self._closed or self._broken):
                raise EngineFailed("the pool engine is not accepting work")

    # -- submit -------------------------------------------------------------------------

    def submit(self, jobs: Sequence[Job]) -> int:
        """Accept as many jobs as there are free slots; returns how many (in order). The
        caller keeps the rest. Jobs waiting to be re-run after a failover go first."""
        self._ensure_started()
        self._flush_drops()
        self._pump()
        placed: list[tuple[_Pending, _Worker]] = []
        with self._lock:
            if self._closed or self._broken or self._backlog:
                return 0
            for request, done in jobs:
                w = self._pick()
                if w is None:
                    break
                assert isinstance(request, Request)  # no traits.takes_lanes: no lanes
                p = _Pending(request, done)
                p.attempts = 1
                self._place(p, w)
                placed.append((p, w))
        for p, w in placed:
            self._send(p, w, p.slot, p.mid)
        return len(placed)

    def _pick(self) -> _Worker | None:
        """The live worker with a free slot and the fewest jobs in flight (lock held)."""
        best: _Worker | None = None
        for w in self._workers:
            if not w.dead and w.free and (best is None or len(w.inflight) < len(best.inflight)):
                best = w
        return best

    def _place(self, p: _Pending, w: _Worker) -> None:
        p.slot = w.free.pop()  # LIFO: the slot most recently used is warm in cache
        p.mid = next(self._mids)
        w.inflight[p.mid] = p

    def _pump(self) -> None:
        """Move backlog jobs (failover re-runs) into free slots."""
        if not self._backlog:
            return
        placed: list[tuple[_Pending, _Worker, int, int]] = []
        with self._lock:
            while self._backlog and not self._closed and not self._broken:
                w = self._pick()
                if w is None:
                    break
                p = self._backlog.popleft()
                p.attempts += 1
                self._counters["retries"] += 1
                self._place(p, w)
                placed.append((p, w, p.slot, p.mid))
        for p, w, slot, mid in placed:
            self._send(p, w, slot, mid)

    def _send(self, p: _Pending, w: _Worker, slot: int, mid: int) -> None:
        """Copy the payload into the job's slot and send its header. ``slot`` and ``mid``
        are as placed (a failover may re-place ``p`` meanwhile). A worker that dies
        meanwhile is not our business here: its reader re-runs the job."""
        request = p.request
        t0 = time.perf_counter()
        try:
            if p.header is None:
                p.header = self._encode(request)
            kid = self._key_id(request.key) if request.key is not None else -1
            with w.io_lock:
                if w.dead or w.arena.closed or w.inflight.get(mid) is not p:
                    return  # failed over or closed before we got here
                if kid >= 0 and kid not in w.keys:
                    assert request.key is not None
                    form, material = pw.export_key(request.key)
                    w.conn.send((pw.KEY, kid, request.key.algorithm.name, form, material))
                    del material
                    w.keys.add(kid)
                data = getattr(request, "data", None)
                n = w.arena.put(slot, data) if data is not None else 0
                w.conn.send((pw.RUN, mid, kid, slot, n, *p.header))
            p.caller = time.perf_counter() - t0
        except (OSError, EOFError):
            return  # the worker is dying: EOF reaches its reader, which fails over
        except _RunInline:
            self._finish(w, mid, inline=True)
        except Exception as e:  # cannot be carried (payload too big...): fail this job
            self._finish(w, mid, error=e)

    def _encode(self, request: Request) -> tuple[str, tuple[Any, ...]]:
        type_name = type(request).__name__
        if type_name in pw.SECTOR_TYPES:
            out = request.out  # type: ignore[attr-defined]
            if out is not None and not _valid_out(out, request.data):  # type: ignore[attr-defined]
                # let the kernel itself refuse it, with exactly the inline engine's error
                raise _RunInline
        alg = request.algorithm
        values = tuple(pw.encode_value(f, getattr(request, f), alg)
                       for f in pw.FIELDS[type_name])
        return type_name, values

    def _key_id(self, key: Key) -> int:
        addr = id(key)
        kid = self._key_ids.get(addr)
        if kid is None:
            with self._lock:
                kid = self._key_ids.get(addr)
                if kid is None:
                    kid = self._key_ids[addr] = next(self._kids)
                    fin = weakref.finalize(key, _forget, self._key_ids, addr, self._dropped,
                                           kid)
                    fin.atexit = False
        return kid

    def _flush_drops(self) -> None:
        """Tell the workers about Keys that died since the last submit."""
        while self._dropped:
            try:
                kid = self._dropped.popleft()
            except IndexError:
                return
            with self._lock:
                holders = [w for w in self._workers if kid in w.keys and not w.dead]
            for w in holders:
                with w.io_lock, contextlib.suppress(OSError, EOFError, ValueError):
                    w.keys.discard(kid)
                    if not w.arena.closed:
                        w.conn.send((pw.DROP, kid))

    def _send_quietly(self, w: _Worker, msg: tuple[Any, ...]) -> None:
        with w.io_lock, contextlib.suppress(OSError, EOFError, ValueError):
            if not w.arena.closed:
                w.conn.send(msg)

    # -- completion ---------------------------------------------------------------------

    def _read(self, w: _Worker) -> None:
        """The reader thread of one worker: complete its jobs until its pipe ends."""
        try:
            while True:
                try:
                    mid, status, n, payload, work = w.conn.recv()
                except (EOFError, OSError, ValueError):
                    break
                if status == pw.R_SHM:
                    self._finish(w, mid, nbytes=n, work=work)
                elif status == pw.R_ERR:
                    self._finish(w, mid, error=payload, work=work)
                else:
                    self._finish(w, mid, value=payload, work=work)
        finally:  # even after a bug above: its jobs must not be stranded
            self._on_death(w)

    def _finish(self, w: _Worker, mid: int, *, nbytes: int = -1, value: Any = None,
                error: BaseException | None = None, inline: bool = False,
                work: float = -1.0) -> None:
        """Complete the job ``mid`` of ``w`` once: whoever pops it from the books owns it."""
        with self._lock:
            p = w.inflight.pop(mid, None)
        if p is None:
            return  # closed or failed over meanwhile: completed by whoever took it
        # Ours now: its slot is neither free nor on the books until freed below, and the
        # arena outlives this (only this reader, or close() after joining it, frees it).
        t0 = time.perf_counter()
        result = value
        if inline:
            outcome: list[tuple[Any, BaseException | None]] = []
            complete((p.request, lambda r, e: outcome.append((r, e))))
            result, error = outcome[0]
        elif error is None and nbytes >= 0:
            out = getattr(p.request, "out", None)
            try:
                if out is not None:
                    w.arena.copy_out(p.slot, nbytes, out)
                    result = out
                else:
                    result = w.arena.take(p.slot, nbytes)
            except Exception as e:  # e.g. the caller resized its out buffer meanwhile
                error = e
        if work >= 0:
            caller = p.caller + time.perf_counter() - t0 + HOP_SECONDS / 2
            request = p.request
            self.meter.record(request.algorithm.name, request.op.value, request.nbytes,
                              work + caller + HOP_SECONDS, caller)
        with self._lock:
            if not w.dead:
                w.free.append(p.slot)
            self._space.notify_all()
        self._deliver(p, result, error)
        if self._backlog:
            self._pump()

    def _deliver(self, p: _Pending, result: Any, error: BaseException | None) -> None:
        try:
            p.done(result, error)
        except Exception:  # a caller's callback must not kill a reader thread
            with self._lock:
                self._counters["callback_errors"] += 1

    def _fail(self, jobs: list[_Pending], why: str) -> None:
        if jobs:
            with self._lock:
                self._counters["failed"] += len(jobs)
        for p in jobs:
            self._deliver(p, None, EngineFailed(f"{why} ({p.request!r})"))

    # -- failover -----------------------------------------------------------------------

    def _on_death(self, w: _Worker) -> None:
        """``w``'s pipe ended: re-run its jobs elsewhere and put a new worker in its place
        (or, in a death storm, break the engine)."""
        now = time.monotonic()
        with self._lock:
            w.dead = True
            closing = self._closed
            orphans = sorted(w.inflight.values(), key=lambda p: p.mid)
            w.inflight.clear()
            broken_now = False
            if not closing:
                self._counters["deaths"] += 1
                if orphans:
                    self._counters["failovers"] += 1
                self._deaths.append(now)
                limit, window = self.storm
                while self._deaths and self._deaths[0] < now - window:
                    self._deaths.popleft()
                if len(self._deaths) >= limit and not self._broken:
                    self._break()
                    broken_now = True
            broken = self._broken
            spent = [p for p in orphans if p.attempts >= self.max_attempts]
            retry = [p for p in orphans if p.attempts < self.max_attempts]
            handoff: list[_Pending] = []
            if closing:
                spent, retry = orphans, []
            elif broken:
                handoff = retry + (self._take_all() if broken_now else [])
                retry = []
            self._backlog.extend(retry)
            self._space.notify_all()
        self._pump()  # the other workers take the re-runs at once, if they have room
        self._release(w)  # waits for a submitter still copying into its arena
        w.process.join(STOP_GRACE)  # reap it: no zombie, no stale entry in active_children
        if w.process.is_alive():  # its pipe ended but it lingers: make sure
            w.process.kill()
            w.process.join()
        self._fail(spent, f"worker {w.index} died {self.max_attempts} times running it"
                   if not closing else "the pool engine was closed")
        if handoff:
            self._hand_off(handoff)
        if closing or broken:
            return
        try:
            fresh = self._spawn(w.index)
        except Exception:  # cannot start a worker: what is queued fails over elsewhere
            with self._lock:
                self._break()
                queued = self._take_all()
            self._hand_off(queued)
            return
        with self._lock:
            adopted = not self._closed
            if adopted:
                self._workers[self._workers.index(w)] = fresh
                self._counters["respawns"] += 1
                self._space.notify_all()
        if adopted:  # out of the list, so close() never joins it: ours alone to close
            _close_process(w.process)
        if not adopted:  # close() began while it started: it missed this one
            self._send_quietly(fresh, (pw.STOP,))
            fresh.process.join(STOP_GRACE)
            if fresh.process.is_alive():
                fresh.process.kill()
                fresh.process.join()
            if fresh.reader is not None:
                fresh.reader.join()
            self._release(fresh)
            _close_process(fresh.process)
            return
        self._pump()

    def _hand_off(self, jobs: list[_Pending]) -> None:
        hook = self.on_broken
        if hook is None or not jobs:
            self._fail(jobs, "the pool engine broke (workers kept dying)")
            return
        with self._lock:
            self._counters["handed_off"] += len(jobs)
        hook([(p.request, p.done) for p in jobs])


def _close_process(process: BaseProcess) -> None:
    """Release a reaped worker's sentinel pipes now, not when the garbage collector
    finds the Process object (two descriptors a worker, per open/close of a plane)."""
    with contextlib.suppress(ValueError):  # still running: its reaper closes it later
        process.close()


class _RunInline(Exception):
    """A request the pool does not carry as given (a malformed ``out``): run it here."""


def _valid_out(out: Any, data: Any) -> bool:
    """``out`` as the native sector kernel accepts it: writable, C-contiguous, the size
    of the data. Anything else runs inline so the caller gets the kernel's own error."""
    try:
        view = memoryview(out)
        size = as_bytes_view(data).nbytes
    except TypeError:
        return False
    with view:
        return not view.readonly and view.c_contiguous and view.nbytes == size


__all__ = ["DEFAULT_SLOTS", "DEFAULT_SLOT_SIZE", "PoolEngine"]
