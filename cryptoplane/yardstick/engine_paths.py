"""Engine paths for ``cryptoplane speed --engine``: each engine beside inline alone, and
what the balancer makes of them together (``auto``).

Each path has a plane of its own, started once per run (pool workers take a while to
start) and closed at the end, and is timed in the same interleaved rounds as the other
paths of the cell:

* ``inline``: ``Plane(engines=["inline"])`` and synchronous calls in one thread — "inline
  alone", the baseline of the scaling ratios. It is the same set-up as the ``plane``
  path, timed as a path of its own: the two side by side show the noise floor.
* ``threads`` and ``pool``: ``Plane(engines=["inline", X])``, the key's session bound to
  X, a window of ``plane.submit`` futures kept full: what that engine alone gives.
* ``auto``: ``Plane(engines=["inline", "threads", "pool"])``, no binding: the balancer
  decides. It is used the way a user gets the most from the plane: small symmetric
  requests (at most ``plane.fast_path_limit`` bytes) take the synchronous fast path, which
  the balancer never sees; everything else goes in ``plane.map`` batches of about
  ``BATCH_SECONDS`` of inline work (a batch's fixed cost, mostly waking idle cores here,
  is then a few per cent of it), during which the caller's thread runs queued work too.

Sector runs write into output buffers given with each request: every path of such a
cell rotates through the same ring of them, and ``auto`` is timed right after
``inline`` in every round (the targeted ratios' two paths back to back).

Why two ways of submitting: the caller's thread only ever takes queued work that inline
may run, so it has nothing to do for a session bound to threads or pool, and ``map``
would only add a barrier at the end of every batch (lanes idle while the last requests
finish). A window that is refilled as the oldest request completes keeps every lane of
the engine busy all the time. ``auto`` is how the plane is meant to be used for
throughput: ``map`` lends the caller's thread, and hands a run of GIL-free requests on
one key to the threads as one job per lane.

The balancer measures an engine before trusting it (it explores engines it has no
figure for first), so every engine path runs a warm-up phase per cell before timing, and
the ``auto`` row says which engines actually served the cell (from ``plane.stats()``).
"""

from __future__ import annotations

import collections
import itertools
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from cryptoplane import requests as rq
from cryptoplane.engines import REGISTRY
from cryptoplane.keys import Key
from cryptoplane.plane import Plane
from cryptoplane.yardstick.timing import (
    AEADS,
    HASHES,
    KIB,
    MACS,
    MIB,
    SIGNATURES,
    XTS,
    Cell,
    Loop,
    Ratio,
    Result,
    calibrate,
    loops_for,
    paired_ratio,
)

PATHS = ("inline", "threads", "pool", "auto")
TIMING_ORDER = ("inline", "auto", "threads", "pool")  # within a round (and reversed)
BOUND = ("threads", "pool")  # paths whose session is bound to the engine of that name
RATIOS = ("threads/inline", "pool/inline", "auto/inline", "auto/plane")

# The cells of an --engine run: where the engines differ (GIL-holding AEAD at three
# sizes, GIL-releasing sector runs and signatures), in well under three minutes.
ALGORITHMS = ("aes-256-gcm", "aes-256-xts", "rsa-pss-sha256", "ecdsa-p256-sha256")
SIZES = (64, 16 * KIB, MIB)
SECTOR_SIZES = (4096,)
# per engine path per cell: hundreds of requests even on the slowest path (~1 ms each),
# where the balancer's moving averages need ~10 to settle
WARMUP_S = 0.3

# Acceptance (issue 4, point 1), measured in one run on the 2-core machine.
TARGETS: dict[tuple[str, str, int, str], float] = {
    ("rsa-pss-sha256", "sign", 2048, "auto/inline"): 1.8,
    ("aes-256-xts", "encrypt_sectors", 4096, "auto/inline"): 1.7,
    ("aes-256-gcm", "encrypt", MIB, "auto/inline"): 0.95,
    ("aes-256-gcm", "encrypt", 64, "auto/plane"): 0.9,
}


def parse(text: str) -> tuple[str, ...]:
    """``"threads,pool,auto"`` -> the paths, once each, ``inline`` always among them:
    the ratios are the measure, and inline alone is what they divide by."""
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in PATHS]
    if unknown or not names:
        raise ValueError(f"unknown engine {', '.join(map(repr, unknown)) or 'none given'} "
                         f"(known: {', '.join(PATHS)})")
    return tuple(p for p in PATHS if p in names or p == "inline")


def pool_unavailable() -> str | None:
    """Why the pool engine cannot be measured, or None when it can."""
    if "pool" not in REGISTRY:
        return "the pool engine is not available in this build (engines/pool.py)"
    return None


@dataclass
class CellPaths:
    """The engine paths of one cell, ready to time."""

    loops: dict[str, Loop]
    skipped: list[Result]
    auto_mode: str = ""  # how the auto path submits its work, for its note
    before: dict[str, int] = field(default_factory=dict)  # auto plane's requests/engine


class EnginePaths:
    """The planes of the engine paths of one run. Use as a context manager."""

    def __init__(self, names: Sequence[str], warmup_s: float) -> None:
        self.names = tuple(names)
        self.warmup_s = warmup_s
        self.planes: dict[str, Plane] = {}
        self.unavailable: dict[str, str] = {}  # path -> why it is not measured
        self.usage: list[dict[str, Any]] = []  # what auto used, per cell (for the JSON)

    def __enter__(self) -> EnginePaths:
        why_not_pool = pool_unavailable()
        specs: dict[str, list[str]] = {"inline": ["inline"], "threads": ["inline", "threads"],
                                       "pool": ["inline", "pool"],
                                       "auto": ["inline", "threads", "pool"]}
        if why_not_pool is not None:
            specs["auto"].remove("pool")
        try:
            for name in self.names:
                if name == "pool" and why_not_pool is not None:
                    self.unavailable[name] = f"skipped: {why_not_pool}"
                    continue
                try:
                    self.planes[name] = Plane(engines=specs[name])
                except Exception as e:  # a pool that cannot start: say so, measure the rest
                    if "pool" not in specs[name]:
                        raise
                    reason = f"the pool engine failed to start: {type(e).__name__}: {e}"
                    if name == "pool":
                        self.unavailable[name] = f"skipped: {reason}"
                        continue
                    specs[name].remove("pool")
                    self.planes[name] = Plane(engines=specs[name])
                    self.unavailable.setdefault("pool", f"skipped: {reason}")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for plane in self.planes.values():
            plane.close()
        self.planes.clear()

    def describe(self) -> dict[str, Any]:
        """For the report's meta: each path's engines and how it submits."""
        out: dict[str, Any] = {}
        for name in self.names:
            plane = self.planes.get(name)
            if plane is None:
                out[name] = {"note": self.unavailable.get(name)}
                continue
            out[name] = {"engines": list(plane.engines), "submission": (
                "synchronous calls" if name == "inline" else
                f"window of {window(plane, name)} plane.submit futures, session bound to "
                f"{name!r}" if name in BOUND else
                f"fast path up to {plane.fast_path_limit} bytes (symmetric); else "
                f"plane.map batches of {batch(plane)} or more (about "
                f"{BATCH_SECONDS * 1e3:.0f} ms of inline work; at most "
                f"{BATCH_BYTES >> 20} MiB of results, {RING_BYTES >> 20} MiB of sector "
                f"buffers)")}
        return out

    # -- one cell -----------------------------------------------------------------------

    def prepare(self, cell: Cell) -> CellPaths:
        """Loops for ``cell`` on every engine path, warmed up."""
        out = CellPaths({}, [])
        size = self._auto_batch(cell)
        # sector runs write into buffers given with the request: every path rotates
        # through the same ring, one buffer per request a path may have in flight (auto:
        # a batch), so that no path is timed writing into cache-hot memory where another
        # writes into cold (one reused 1 MiB output ran 5% faster than a ring of 100)
        outs = [bytearray(cell.nbytes) for _ in range(self._ring(size))] \
            if cell.algorithm in XTS else []
        for name in self.names:
            plane = self.planes.get(name)
            if plane is None:
                out.skipped.append(Result(cell, name, note=self.unavailable.get(name)))
                continue
            if name == "inline":
                out.loops[name] = (ring_loop(plane, cell, outs) if cell.algorithm in XTS
                                   else loops_for(plane, cell)["plane"])
            elif name in BOUND:
                if cell.algorithm in HASHES:
                    out.skipped.append(Result(cell, name, note=(
                        "not measured: a digest has no key, so no session to bind")))
                    continue
                key = _key(cell)
                plane.session(key, engine=name)
                depth = window(plane, name)
                out.loops[name] = window_loop(plane, requests(plane, cell, key, outs), depth)
            elif takes_fast_path(plane, cell):
                out.loops[name] = loops_for(plane, cell)["plane"]
                out.auto_mode = "fast path"
            else:
                free = None if cell.algorithm in HASHES else _key(cell)
                if free is not None:
                    plane.session(free)  # unbound: the balancer chooses
                out.loops[name] = batch_loop(plane, requests(plane, cell, free, outs), size)
                out.auto_mode = f"map x{size}"
        # auto right after inline: the targeted ratios' two paths back to back in every
        # round (the rounds alternate their order), where this machine's drift between
        # them is smallest
        out.loops = {n: out.loops[n] for n in TIMING_ORDER if n in out.loops}
        for loop in out.loops.values():
            warm_up(loop, self.warmup_s)
        if "auto" in out.loops:
            out.before = engine_requests(self.planes["auto"])
        return out

    def _auto_batch(self, cell: Cell) -> int:
        """Requests per ``map`` batch on the auto path (``batch``, sized by what a
        request of ``cell`` takes inline), or 0 where auto does not batch the cell."""
        plane = self.planes.get("auto")
        inline = self.planes.get("inline")
        if plane is None or takes_fast_path(plane, cell):
            return 0
        per_call_s = 0.0
        if inline is not None:
            _, per_call_ns = calibrate(loops_for(inline, cell)["plane"],
                                       int(BATCH_SECONDS * 1e9))
            per_call_s = per_call_ns / 1e9
        budget = RING_BYTES if cell.algorithm in XTS else BATCH_BYTES
        return batch(plane, cell.nbytes, per_call_s, budget)

    def _ring(self, auto_batch: int) -> int:
        """Output buffers for a sector cell: as many as any path has requests in flight."""
        windows = [window(p, n) for n, p in self.planes.items() if n in BOUND]
        return max([*windows, auto_batch, 1])

    def finish(self, cell: Cell, prepared: CellPaths, results: list[Result]) -> list[Ratio]:
        """Note what ``auto`` used for the cell; the engine ratios."""
        results += prepared.skipped
        auto = next((r for r in results if r.path == "auto"), None)
        if auto is not None and "auto" in prepared.loops:
            after = engine_requests(self.planes["auto"])
            delta = {n: after.get(n, 0) - prepared.before.get(n, 0) for n in after}
            total = sum(delta.values()) or 1
            used = ", ".join(f"{n} {100 * v / total:.0f}%" for n, v in delta.items() if v)
            auto.note = f"{prepared.auto_mode}: used {used or 'nothing'}"
            self.usage.append({"algorithm": cell.algorithm, "op": cell.op, "size": cell.size,
                               "mode": prepared.auto_mode, "requests": delta})
        return ratios(cell, results, prepared.auto_mode == "fast path")


# -- building the loops --------------------------------------------------------------------

def takes_fast_path(plane: Plane, cell: Cell) -> bool:
    """Small symmetric requests: the synchronous calls serve them at once, inline."""
    return 0 < cell.nbytes <= plane.fast_path_limit and cell.algorithm not in SIGNATURES


def window(plane: Plane, engine: str) -> int:
    """Requests kept in flight for a bound engine: enough to fill it (its capacity) and
    as many again queued, so the dispatcher has the next one ready when a slot frees."""
    return 2 * plane.engines[engine].capacity


# What one batch's results may take. A batch's results stay alive together until map
# returns, where a loop of synchronous calls drops each before making the next (which
# then reuses the same, cached memory): with 1 MiB AES-GCM results, a plain list of 8
# ran at 0.81-0.92x that loop, and `cryptoplane speed` measured auto at 0.84-0.86x
# inline with batches of 8 MiB, 0.89-0.92x with batches of 2 MiB (two of this machine's
# 1 MiB L2 per core; benchmarks/map_footprint.py). Batches of 48 ran at 0.75x those of 8.
BATCH_BYTES = 2 << 20


# What one batch's requests may take, inline: a batch's fixed cost (building it, waking
# the lanes from idle, the last request's tail, the gap before the next call) stays a
# few per cent of it. On this VM that cost is larger than the ~0.5 ms the timeline of
# one batch shows (idle cores wake slowly): ``benchmarks/map_batch.py``, interleaved
# against synchronous calls, gave RSA-2048 signing 1.61x in batches of 82 (~20 ms
# inline), 1.73x of 205 and 1.83x of 410, two bare threads 1.86x; 1 MiB XTS runs 1.67x,
# 1.86x and 1.89x, two bare threads 1.92x.
BATCH_SECONDS = 0.1
# Sector runs write into output buffers of their own, one per request of a batch.
RING_BYTES = 256 << 20
# An --engine run's default --seconds: rounds of 0.2 s hold two or more of auto's batches.
ENGINE_SECONDS = 2.0


def batch(plane: Plane, nbytes: int = 0, per_request_s: float = 0.0,
          budget: int = BATCH_BYTES) -> int:
    """Requests per ``map`` batch for auto: every engine but inline filled, and as many
    again for the caller to run while it waits, or more where requests are quick
    enough for BATCH_SECONDS of work (``per_request_s``, inline); for big requests
    whose outputs the batch holds (``nbytes`` given), no more than ``budget`` bytes of
    them (results map allocates: BATCH_BYTES; sector runs' own buffers: RING_BYTES)."""
    fill = 2 * sum(e.capacity for n, e in plane.engines.items() if n != "inline")
    if per_request_s > 0:
        fill = max(fill, round(BATCH_SECONDS / per_request_s))
    return max(2, min(fill, budget // nbytes)) if nbytes else fill


def _key(cell: Cell) -> Key:
    # a key per path: a key's session belongs to one plane (and, bound, to one engine)
    rsa = cell.algorithm in SIGNATURES and cell.size >= 1024  # cell.size is its bits
    return Key.generate(cell.algorithm, size=cell.size if rsa else None)


def requests(plane: Plane, cell: Cell, key: Key | None,
             outs: Sequence[bytearray]) -> Callable[[int], rq.Request]:
    """``make(i)``: the ``i``-th request of a run; sector runs write into ``outs[i %
    len(outs)]``, so requests at most ``len(outs)`` apart may be in flight together."""
    data = os.urandom(cell.nbytes or 64)
    if cell.algorithm in HASHES:
        name = cell.algorithm
        return lambda i: rq.Digest(name, data)
    assert key is not None
    if cell.algorithm in AEADS:
        nonce = bytes(12)  # reuse is harmless here, as in the other paths
        return lambda i: rq.Encrypt(key, data, nonce=nonce)
    if cell.algorithm in XTS:
        size, ring = cell.size, len(outs)
        return lambda i: rq.EncryptSectors(key, data, sector=0, sector_size=size,
                                           out=outs[i % ring])
    if cell.algorithm in MACS:
        return lambda i: rq.Mac(key, data)
    if cell.op == "sign":
        return lambda i: rq.Sign(key, data)
    signature = plane.run(rq.Sign(key, data))
    return lambda i: rq.Verify(key, data, signature)


def ring_loop(plane: Plane, cell: Cell, outs: Sequence[bytearray]) -> Loop:
    """Synchronous sector runs, each into the next buffer of ``outs``."""
    key, data, size = Key.generate(cell.algorithm), os.urandom(cell.nbytes), cell.size
    ring = itertools.cycle(outs)  # on from call to call: every buffer in turn

    def loop(n: int) -> None:
        enc, nxt = plane.encrypt_sectors, next
        for _ in range(n):
            enc(key, data, sector=0, sector_size=size, out=nxt(ring))
    return loop


def window_loop(plane: Plane, make: Callable[[int], rq.Request], depth: int) -> Loop:
    def loop(n: int) -> None:
        submit, pending = plane.submit, collections.deque[Future[Any]]()
        for i in range(n):
            if len(pending) >= depth:
                pending.popleft().result()
            pending.append(submit(make(i)))
        for fut in pending:
            fut.result()
    return loop


def batch_loop(plane: Plane, make: Callable[[int], rq.Request], size: int) -> Loop:
    """``n`` requests in ``map`` batches of at most ``size``, as even as can be: a timed
    chunk's 2,060 XTS runs are 9 batches of ~229, not 8 of 256 and one of 12, whose
    fixed cost would be paid for a twentieth of the work."""
    def loop(n: int) -> None:
        run = plane.map
        batches = -(-n // size)
        for j in range(batches):
            k = n // batches + (j < n % batches)
            run([make(i) for i in range(k)])
    return loop


def warm_up(loop: Loop, seconds: float) -> None:
    """Run ``loop`` for about ``seconds``: the balancer's estimates, the workers' copies
    of the key, caches and page mappings, before anything is timed."""
    deadline = time.perf_counter() + seconds
    n = 1
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        loop(n)
        if time.perf_counter() - t0 < seconds / 10:
            n *= 2


def engine_requests(plane: Plane) -> dict[str, int]:
    return {n: int(e["requests"]) for n, e in plane.stats()["engines"].items()}


def ratios(cell: Cell, results: Sequence[Result], auto_fast: bool) -> list[Ratio]:
    """Each engine path over inline alone, and auto over the ``plane`` fast path where
    auto took the fast path too."""
    by = {r.path: r for r in results if r.samples}
    pairs = [(p, "inline") for p in ("threads", "pool", "auto")]
    if auto_fast:
        pairs.append(("auto", "plane"))
    out = []
    for num, den in pairs:
        if num in by and den in by:
            name = f"{num}/{den}"
            out.append(Ratio(cell, name, paired_ratio(by[num], by[den]),
                             TARGETS.get((cell.algorithm, cell.op, cell.size, name))))
    return out
