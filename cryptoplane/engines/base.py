"""The engine interface: a crypto device that declares what it can do and takes batches.

Device, queue, session and request are separate nouns (DPDK cryptodev): an engine is the
device; it declares ``Capability`` values (data, not ``isinstance`` checks) that the
scheduler matches requests against; it accepts a batch of jobs and completes each one
exactly once through its ``Completion``. What kind of device it is (runs in the caller's
thread, in this process, pulls its own work...) is one declared ``Traits`` value: the
scheduler decides from it, never from an engine's name or class.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..algorithms import CATALOGUE, Algorithm, Kind, Op
from ..kernels import Kernel
from ..requests import Request
from .meter import Meter
from .selftest import SelfTestResult, run_self_tests


class LaneJob:
    """Work that stands for several requests of one kind, run by one ``apply``: a lane of
    a run (``scheduler/lanes.py``). Engines whose traits say ``takes_lanes`` run it as
    they run a request; capabilities judge it by its largest request and meters learn
    from it per request (``count``), so neither needs to know what a lane is."""

    __slots__ = ()

    @property
    def op(self) -> Op:
        raise NotImplementedError

    @property
    def algorithm(self) -> Algorithm:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """The payload of the requests it stands for, together."""
        raise NotImplementedError

    @property
    def count(self) -> int:
        """How many requests it stands for (statistics count each)."""
        raise NotImplementedError

    @property
    def largest(self) -> int:
        """The payload of its largest request (what a capability's size limit is about)."""
        raise NotImplementedError

    @property
    def retry_safe(self) -> bool:
        raise NotImplementedError

    def kernel(self) -> Kernel:
        raise NotImplementedError

    def apply(self, kernel: Kernel) -> Any:
        raise NotImplementedError


Work = Request | LaneJob  # what an engine runs
# completion(result, error): exactly one of the two is meaningful
Completion = Callable[[Any, BaseException | None], None]
Job = tuple[Work, Completion]


def requests_in(work: Work) -> int:
    """How many requests ``work`` stands for."""
    return work.count if isinstance(work, LaneJob) else 1


class Health(enum.StrEnum):
    OK = "ok"
    DEGRADED = "degraded"
    BROKEN = "broken"


@dataclass(frozen=True, slots=True)
class Traits:
    """What kind of device an engine is (DPDK's feature flags), declared once per engine
    class; the scheduler's choices read these, never an engine's name."""

    # runs work at once in the thread that asks for it: the fast path's engine, and the
    # one a caller waiting on its results lends its thread to
    caller_thread: bool = False
    local: bool = True  # runs on this machine's cores (a remote engine brings its own)
    in_process: bool = False  # runs in this interpreter (and so under its GIL)
    # its workers take work from the scheduler's queues themselves (attach()); otherwise
    # the scheduler's dispatcher hands it batches through submit()
    pulls: bool = False
    # runs lane jobs (``LaneJob``); in-process engines can, a pool would need every
    # payload of the run in shared memory
    takes_lanes: bool = False


@dataclass(frozen=True, slots=True)
class Capability:
    algorithm: str
    ops: frozenset[Op]
    max_request: int  # bytes of payload in one request

    def allows(self, op: Op, nbytes: int) -> bool:
        """Whether it serves ``op`` on a request of ``nbytes`` of payload."""
        return op in self.ops and nbytes <= self.max_request


def releases_gil_op(alg: Algorithm, op: Op) -> bool:
    """Whether the work runs with the GIL released (measured with two threads: RSA and
    ECDSA, the native sector kernel; AEAD, hashes, Ed25519 and X25519 in
    ``cryptography`` 48 hold it and gain nothing: benchmarks/README.md, scaling). Asked
    per request on map's paths, so kept per algorithm and op (the rule's enum and
    property lookups were a visible share of a small batch's planning)."""
    k = (alg.name, op)
    free = _GIL_FREE.get(k)
    if free is None:
        free = _GIL_FREE[k] = (op in (Op.ENCRYPT_SECTORS, Op.DECRYPT_SECTORS,
                                      Op.SEAL_CHUNKS, Op.OPEN_CHUNKS) or (
            alg.kind is Kind.AKCIPHER and alg.name != "ed25519"))
    return free


_GIL_FREE: dict[tuple[str, str], bool] = {}


def releases_gil(request: Work) -> bool:
    return releases_gil_op(request.algorithm, request.op)


def run_request(request: Work) -> Any:
    """Run a request in this thread on its key's cached kernel."""
    return request.apply(request.kernel())


def record(meter: Meter, request: Work, work: float, caller: float) -> None:
    """Feed ``meter`` one request's cost; a lane's as that of each request it ran, so
    estimates stay per request whatever the share (a lane that found its run done
    teaches nothing)."""
    n = requests_in(request)
    if n == 0:
        return
    if n == 1:
        meter.record(request.algorithm.name, request.op.value, request.nbytes, work, caller)
    else:
        meter.record(request.algorithm.name, request.op.value, request.nbytes // n,
                     work / n, caller / n)


def run_measured(request: Work) -> tuple[Any, BaseException | None, float]:
    """Run a request in this thread: (result, error, CPU seconds it took). CPU time, not
    wall time: waits for the GIL or a core are the neighbours' doing, and wall time would
    teach the balancer that an engine is slow when it is merely busy."""
    t0 = time.thread_time()
    try:
        result = request.apply(request.kernel())
    except BaseException as e:  # every outcome reaches the caller, errors included
        return None, e, time.thread_time() - t0
    return result, None, time.thread_time() - t0


def complete(job: Job) -> None:
    """Run one job in this thread and deliver its outcome; never raises."""
    request, done = job
    try:
        result = request.apply(request.kernel())
    except BaseException as e:  # every outcome reaches the completion, errors included
        done(None, e)
    else:
        done(result, None)


class Engine:
    """Base of all engines. Subclasses set ``name``/``priority`` and implement ``submit``."""

    name: str = "engine"
    priority: int = 0  # like cra_priority: higher wins when several can serve
    max_request: int = 1 << 31
    parallelism: int = 1  # requests it works on at once
    capacity: int = 1 << 30  # requests it accepts in flight before submit() refuses
    traits = Traits()

    def __init__(self, algorithms: Iterable[Algorithm] | None = None) -> None:
        self._algorithms = list(algorithms if algorithms is not None else CATALOGUE.values())
        self.self_tests: dict[str, SelfTestResult] = {}
        self.health = Health.OK
        self._lock = threading.Lock()
        self._capabilities: dict[str, Capability] = {}
        self.meter = Meter()
        # set by the scheduler: receives the unfinished jobs of an engine that broke
        self.on_broken: Callable[[list[Job]], None] | None = None

    @property
    def inflight(self) -> int:
        """Requests accepted and not yet completed."""
        return 0

    def ops_for(self, algorithm: Algorithm) -> frozenset[Op]:
        """The operations of ``algorithm`` this engine declares (all, by default)."""
        return algorithm.ops

    def attach(self, take: Callable[[str, float], Job | None]) -> None:
        """For pulling engines: ``take(name, timeout)`` hands out the next job."""
        raise NotImplementedError

    def start(self, *, self_test: bool = True) -> None:
        """Run the known-answer tests and declare capabilities for what passed."""
        if self_test:
            self.self_tests = run_self_tests(self._algorithms, self.run_one)
        passed = {a.name for a in self._algorithms
                  if not self_test or self.self_tests[a.name].passed}
        self._capabilities = {
            a.name: Capability(a.name, self.ops_for(a), self.max_request)
            for a in self._algorithms if a.name in passed and self.ops_for(a)
        }
        if self_test and len(passed) < len(self._algorithms) and self.health is Health.OK:
            self.health = Health.DEGRADED

    @property
    def capabilities(self) -> dict[str, Capability]:
        return self._capabilities

    def can_serve(self, request: Work) -> bool:
        cap = self._capabilities.get(request.algorithm.name)
        if cap is None or self.health is Health.BROKEN:
            return False
        if isinstance(request, LaneJob):
            return self.traits.takes_lanes and cap.allows(request.op, request.largest)
        return cap.allows(request.op, request.nbytes)

    def run_one(self, request: Request) -> Any:
        """Run one request through this engine's own path and wait for it (self-tests)."""
        box: list[Any] = []
        event = threading.Event()

        def done(result: Any, error: BaseException | None) -> None:
            box.append((result, error))
            event.set()

        self._submit_waiting((request, done))
        event.wait()
        result, error = box[0]
        if error is not None:
            raise error
        return result

    def _submit_waiting(self, job: Job) -> None:
        """Hand over one job, waiting for room if the engine has none (run_one's way in;
        engines with backpressure override it)."""
        self.submit([job])

    def submit(self, jobs: Sequence[Job]) -> int:
        """Accept a batch; returns how many were accepted (the rest: caller keeps them)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "priority": self.priority,
            "health": self.health.value,
            "parallelism": self.parallelism,
            "capacity": self.capacity,
            "max_request": self.max_request,
            "traits": asdict(self.traits),
            "algorithms": sorted(self._capabilities),
            "self_tests": {
                n: {"passed": r.passed, "detail": r.detail} for n, r in self.self_tests.items()
            },
        }

    def close(self) -> None:
        pass
