"""``cryptoplane remote-speed``: what a fabric server serves, measured in one run on this
machine, server and clients on loopback, with the ratios issue 16 asks for.

The command starts its own servers (``cryptoplane server`` subprocesses over a SQLite
keystore in a temporary folder, a bearer token made in that keystore, certificates made
for mutual TLS) unless ``--server`` names one, and measures:

* ``pipelined``: 64-byte AES-256-GCM encrypts through one server, without TLS and with
  mutual TLS, and batches of 1,000 items; RSA-2048 signs through the server beside the
  machine's local sign rate (``cryptography`` in one thread per core: what the server's
  workers could do at most). The load comes from ``loadgen.py`` (pre-encoded frames,
  many in flight, uvloop), in as many processes as the table says: the figure is then
  the server's, not our Python client's.
* ``latency``: one request at a time (64-byte encrypt, RSA-2048 sign): p50 and p99.
* ``remote engine``: a plane on core 0 with and without ``cp.Remote`` to a server pinned to
  core 1 (``taskset``): RSA-2048 signs (work that pays remotely) and 64-byte AEAD (work
  that does not: the remote engine must cost it little).
* ``stream``: ``encrypt_stream`` from many concurrent clients (100 of 64 MiB each by
  default): aggregate MB/s (10**6 bytes/s) of plaintext.
* ``kmip``: PyKMIP's server on the same operations (``kmip_peer.py``), and our ratios.

Absolute numbers move 2-3x between machines; the ratios, measured side by side in one
run, are what the targets are about.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import kmip_peer
from . import loadgen as lg

TENANT = "bench"
AES_KEY = "bench-aes"
RSA_KEY = "bench-rsa"
READY_TIMEOUT_S = 60.0

Progress = Callable[[str], None]


@dataclass
class Figure:
    """One measured figure: ``value`` in ``unit``, how it was loaded, its target."""

    section: str
    name: str
    value: float
    unit: str
    load: str = ""
    target: float | None = None  # the value must be >= target
    errors: int = 0

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.value >= self.target


@dataclass
class Ratio:
    """A ratio of two figures (or a cost, ``below``: met when under its target)."""

    name: str
    value: float
    target: float | None = None
    below: bool = False  # the target is an upper bound (value < target)
    what: str = ""

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.value < self.target if self.below else self.value >= self.target


@dataclass
class Config:
    """What a run measures and how long: seconds per figure after a warm-up, the
    sections (``kmip``, ``tls``, ``plain``), an existing ``server`` instead of our own,
    the streams, and the load generator's shape."""

    duration: float = 3.0
    warmup: float = 0.5
    quick: bool = False
    kmip: bool = True
    tls: bool = True
    plain: bool = True
    server: str | None = None
    token: str | None = None
    ca: str | None = None
    cert: str | None = None
    cert_key: str | None = None
    stream_clients: int = 100
    stream_size: int = 64 << 20
    in_flight: int = 1024
    load_processes: int = 1
    batch: int = 1000
    # "remote-engine": only the plane-with-a-remote-engine figures (one pinned server;
    # issue 16's acceptance 4 in a fraction of the run's time); "stream": only the
    # encrypt_stream figure (one plain TCP server)
    only: str | None = None

    @classmethod
    def quick_config(cls, **kw: Any) -> Config:
        base: dict[str, Any] = {"duration": 0.25, "warmup": 0.1, "quick": True,
                                "stream_clients": 4, "stream_size": 4 << 20}
        base.update(kw)
        return cls(**base)


@dataclass
class Report:
    """Every figure and ratio of a run, notes, and what the run was (``meta``)."""

    figures: list[Figure] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def figure(self, section: str, name: str) -> Figure | None:
        for f in self.figures:
            if f.section == section and f.name == name:
                return f
        return None

    def targets_missed(self) -> list[str]:
        out = [f"{f.section} {f.name}" for f in self.figures if f.met is False]
        out += [r.name for r in self.ratios if r.met is False]
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "figures": [{**asdict(f), "met": f.met} for f in self.figures],
            "ratios": [{**asdict(r), "met": r.met} for r in self.ratios],
            "notes": self.notes, "meta": self.meta,
        }


class BenchError(RuntimeError):
    """A server did not start, a load process failed: the run cannot give its figures."""


# -- servers --------------------------------------------------------------------------------

@dataclass
class Server:
    """A server to measure: its URL, a token, and what a TLS client needs."""

    url: str
    token: str | None
    ca: str | None = None
    cert: str | None = None
    cert_key: str | None = None
    pid: int | None = None

    def spec(self, **kw: Any) -> lg.Spec:
        return lg.Spec(url=self.url, token=self.token, key=kw.pop("key", AES_KEY),
                       ca=self.ca, cert=self.cert, cert_key=self.cert_key, **kw)

    def ssl(self) -> Any:
        return lg.ssl_context(self.spec())


def _python() -> list[str]:
    return [sys.executable, "-m", "cryptoplane"]


@dataclass(frozen=True)
class ServerKind:
    """A server a run starts: its name, mutual TLS or not, the CPU it is pinned to."""

    name: str
    tls: bool = False
    cpu: int | None = None


def _keystore(folder: Path) -> tuple[str, Path, str]:
    """The run's SQLite keystore in ``folder`` (made, migrated and given a token for
    tenant ``bench`` on first use; shared by the run's servers): URL, master key file,
    token."""
    from ..fabric.keystore import MasterKey, open_keystore

    master = folder / "master.key"
    store = f"sqlite:///{folder / 'keystore.db'}"
    token_file = folder / "token"
    if not master.exists():
        master.write_text(os.urandom(32).hex() + "\n")
        master.chmod(0o600)
        ks = open_keystore(store, MasterKey.from_file(master))
        try:
            token_file.write_text(ks.create_token(TENANT, label="remote-speed"))
        finally:
            ks.close()
    return store, master, token_file.read_text().strip()


def _certificates(folder: Path) -> dict[str, Path]:
    cert_dir = folder / "certs"
    if not cert_dir.exists():
        cert_dir.mkdir()
        kmip_peer.make_certificates(cert_dir, client_cn=TENANT)
    return {k: cert_dir / v for k, v in (
        ("ca", "ca.pem"), ("server_cert", "server.pem"), ("server_key", "server.key"),
        ("client_cert", "client.pem"), ("client_key", "client.key"))}


@contextlib.contextmanager
def local_servers(folder: Path, kinds: list[ServerKind]) -> Iterator[dict[str, Server]]:
    """``cryptoplane server`` processes on loopback, one per kind, all started at once
    (each takes seconds to import and open the keystore), over the keystore of
    ``_keystore``; with ``tls``, mutual TLS (client certificates required, the client's
    common name is the tenant). Pinned with ``taskset`` where a CPU is given. Stopped
    (SIGTERM, then SIGKILL) on exit, whatever happened."""
    store, master, token = _keystore(folder)
    started: list[tuple[ServerKind, subprocess.Popen[bytes], Path, Path]] = []
    try:
        for kind in kinds:
            certs = _certificates(folder) if kind.tls else {}
            ready = folder / f"{kind.name}.ready"
            ready.unlink(missing_ok=True)
            argv = [*_python(), "server", "--listen", "tcp://127.0.0.1:0", "--store", store,
                    "--master-key-file", str(master), "--ready-file", str(ready),
                    "--log-level", "warning"]
            if certs:
                argv += ["--tls-cert", str(certs["server_cert"]), "--tls-key",
                         str(certs["server_key"]), "--tls-client-ca", str(certs["ca"]),
                         "--require-client-cert"]
            if kind.cpu is not None and shutil.which("taskset"):
                argv = ["taskset", "-c", str(kind.cpu), *argv]
            log = folder / f"{kind.name}.log"
            with log.open("wb") as out:
                started.append((kind, subprocess.Popen(
                    argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True), ready, log))
        servers: dict[str, Server] = {}
        for kind, proc, ready, log in started:
            url = _wait_ready(proc, ready, log, kind.tls)
            certs = _certificates(folder) if kind.tls else {}
            servers[kind.name] = Server(
                url=url, token=token, pid=proc.pid,
                ca=str(certs["ca"]) if certs else None,
                cert=str(certs["client_cert"]) if certs else None,
                cert_key=str(certs["client_key"]) if certs else None)
        yield servers
    finally:
        for _kind, proc, _ready, _log in started:
            kmip_peer.stop_process(proc)


@contextlib.contextmanager
def local_server(folder: Path, *, tls: bool = False, cpu: int | None = None,
                 name: str = "server") -> Iterator[Server]:
    """One server of ``local_servers``."""
    with local_servers(folder, [ServerKind(name, tls, cpu)]) as servers:
        yield servers[name]


def _wait_ready(proc: subprocess.Popen[bytes], ready: Path, log: Path, tls: bool) -> str:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        text = ready.read_text().strip() if ready.exists() else ""
        if text:
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError("cryptoplane server did not start: "
                             + log.read_text(errors="replace")[-2000:])
        time.sleep(0.05)
    return ready_url(text, tls)


def ready_url(text: str, tls: bool) -> str:
    """The URL a ready file names: a URL, JSON with ``url``/``urls``/``listen``, or a
    port."""
    with contextlib.suppress(ValueError):
        obj = json.loads(text)
        if isinstance(obj, dict):
            for k in ("url", "urls", "listen", "listening"):
                v = obj.get(k)
                if isinstance(v, list) and v:
                    v = v[0]
                if isinstance(v, str):
                    return v
            if "port" in obj:
                return f"{'tls' if tls else 'tcp'}://127.0.0.1:{int(obj['port'])}"
        elif isinstance(obj, int):
            return f"{'tls' if tls else 'tcp'}://127.0.0.1:{obj}"
    m = re.search(r"(tcp|tls)://[^\s\"',]+", text)
    if m:
        return m.group(0)
    raise BenchError(f"cannot read the server's address from its ready file: {text[:200]!r}")


async def _prepare_keys(server: Server) -> None:
    from ..fabric.client import AsyncClient
    from ..fabric.errors import KeyExists

    client = await AsyncClient.connect(server.url, token=server.token, ssl=server.ssl(),
                                       connections=1)
    try:
        for name, kind in ((AES_KEY, "aes256-gcm96"), (RSA_KEY, "rsa-2048")):
            with contextlib.suppress(KeyExists):
                await client.create_key(name, kind)
    finally:
        await client.close()


def prepare_keys(server: Server) -> None:
    asyncio.run(_prepare_keys(server))


# -- measurements ---------------------------------------------------------------------------

def _load(server: Server, cfg: Config, processes: int = 1, cpus: list[int] | None = None,
          **kw: Any) -> lg.Outcome:
    spec = server.spec(duration=cfg.duration, warmup=cfg.warmup, **kw)
    out = lg.run(spec, processes=processes, cpus=cpus)
    if out.count == 0:
        raise BenchError(f"no answers for {kw}: {out.first_error or 'none counted'}")
    return out


def _load_text(processes: int, in_flight: int, connections: int = 1, what: str = "") -> str:
    return (f"load: {processes} process{'es' if processes > 1 else ''} x {connections} "
            f"connection{'s' if connections > 1 else ''}, {in_flight:,} in flight each"
            + (f", {what}" if what else ""))


def local_sign_rate(duration: float, threads: int | None = None) -> tuple[float, int]:
    """RSA-2048 PSS-SHA256 signs per second with ``cryptography`` in one thread per core
    (OpenSSL releases the GIL): the most any server's workers could do here."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    threads = threads or len(os.sched_getaffinity(0)) or 1
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
    message = os.urandom(64)
    counts = [0] * threads
    stop = threading.Event()
    go = threading.Barrier(threads + 1)

    def work(i: int) -> None:
        sign, h = key.sign, hashes.SHA256()
        go.wait()
        n = 0
        while not stop.is_set():
            for _ in range(8):
                sign(message, pss, h)
            n += 8
        counts[i] = n

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    time.sleep(duration)
    stop.set()
    for t in pool:
        t.join()
    return sum(counts) / (time.perf_counter() - t0), threads


def measure_server(server: Server, cfg: Config, report: Report, section: str,
                   progress: Progress, *, full: bool) -> None:
    """The pipelined, batch, sign and latency figures of one server."""
    procs, inflight = cfg.load_processes, cfg.in_flight
    progress(f"{section}: pipelined encrypts")
    out = _load(server, cfg, procs, op="encrypt", size=64, mode="pipelined",
                in_flight=inflight)
    target = 100_000.0 if section == "tcp" else 70_000.0
    report.figures.append(Figure(section, "encrypt 64 B, pipelined", out.rate, "ops/s",
                                 _load_text(procs, inflight), target, out.errors))
    if not full:
        return
    progress(f"{section}: batches")
    out = _load(server, cfg, procs, op="encrypt", size=64, mode="batch", batch=cfg.batch,
                in_flight=4)
    report.figures.append(Figure(section, f"encrypt 64 B, batches of {cfg.batch:,}",
                                 out.rate, "items/s",
                                 _load_text(procs, 4, what=f"{cfg.batch:,} items a batch"),
                                 150_000.0, out.errors))
    # local and through-the-server rates alternate in pairs of shorter slices, and the
    # ratio is the median of the pairs' ratios: on a machine shared with other work, what
    # the others take drifts over seconds, and then weighs on both sides of each pair
    pairs = 3
    slice_cfg = Config(**{**asdict(cfg), "duration": max(cfg.duration / 2, 0.1)})
    locals_: list[float] = []
    remotes: list[float] = []
    ratios: list[float] = []
    threads = 0
    errors = 0
    for i in range(pairs):
        progress(f"{section}: RSA-2048 signs, local and through the server ({i + 1}/{pairs})")
        local, threads = local_sign_rate(slice_cfg.duration)
        out = _load(server, slice_cfg, 1, op="sign", key=RSA_KEY, size=32,
                    mode="pipelined", in_flight=256)
        errors += out.errors
        locals_.append(local)
        remotes.append(out.rate)
        ratios.append(out.rate / local)
    through, local = statistics.median(remotes), statistics.median(locals_)
    report.figures.append(Figure(section, "RSA-2048 sign (PSS), pipelined", through, "ops/s",
                                 _load_text(1, 256, what=f"median of {pairs} slices"),
                                 None, errors))
    report.figures.append(Figure(section, "RSA-2048 sign (PSS), local", local, "ops/s",
                                 f"cryptography in {threads} threads (the server's worker "
                                 f"count) in the command's process; median of {pairs} "
                                 "slices"))
    report.ratios.append(Ratio(f"RSA sign: through the server ({section}) / local",
                               statistics.median(ratios), 0.85,
                               what=f"median of {pairs} paired slices; "
                                    f"{through:,.0f} / {local:,.0f} ops/s"))
    for name, op, key, size in (("encrypt 64 B", "encrypt", AES_KEY, 64),
                                ("RSA-2048 sign", "sign", RSA_KEY, 32)):
        progress(f"{section}: latency of {name}")
        out = _load(server, cfg, 1, op=op, key=key, size=size, mode="latency")
        report.figures.append(Figure(section, f"{name}, 1 in flight: p50", out.percentile_us(0.5),
                                     "µs", f"{len(out.latencies_us):,} requests, one at a time"))
        report.figures.append(Figure(section, f"{name}, 1 in flight: p99",
                                     out.percentile_us(0.99), "µs",
                                     f"{len(out.latencies_us):,} requests, one at a time"))


# -- streams ------------------------------------------------------------------------------

async def _streams(server: Server, clients: int, size: int, piece: int,
                   start_at: float = 0.0) -> dict[str, Any]:
    from ..fabric.client import AsyncClient

    data = os.urandom(piece)
    pieces = size // piece

    def source() -> Iterator[bytes]:
        for _ in range(pieces):
            yield data

    conns = [await AsyncClient.connect(server.url, token=server.token, ssl=server.ssl(),
                                       connections=1) for _ in range(clients)]
    out_bytes = [0] * clients

    async def one(i: int) -> None:
        n = 0
        async for chunk in conns[i].encrypt_stream(AES_KEY, source()):
            n += len(chunk)
        out_bytes[i] = n

    try:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        began = time.time()
        await asyncio.gather(*(one(i) for i in range(clients)))
        ended = time.time()
    finally:
        for c in conns:
            await c.close()
    return {"began": began, "ended": ended, "plaintext": clients * pieces * piece,
            "ciphertext": sum(out_bytes)}


def measure_streams(server: Server, cfg: Config, report: Report, progress: Progress,
                    processes: int = 2) -> None:
    """ENCRYPT_STREAM from ``cfg.stream_clients`` clients (one connection each) in
    ``processes`` lean load processes started together: plaintext MB/s over the span from
    the first start to the last end. ``AsyncClient.encrypt_stream`` costs about as much
    CPU per MB as the server here (it copies each piece a few times), so it is checked
    once for a round trip but the aggregate comes from the lean generator."""
    progress(f"stream: {cfg.stream_clients} clients x {cfg.stream_size >> 20} MiB")
    check = asyncio.run(_streams(server, 1, 2 << 20, 1 << 20))
    if check["ciphertext"] <= check["plaintext"]:
        raise BenchError("encrypt_stream's ciphertext is not longer than its plaintext")
    got = lg.run_streams(server.spec(key=AES_KEY, size=cfg.stream_size),
                         cfg.stream_clients, processes)
    if got["ciphertext"] <= got["plaintext"]:
        raise BenchError(f"the streams answered {got['ciphertext']:,} bytes for "
                         f"{got['plaintext']:,} of plaintext")
    report.figures.append(Figure(
        "stream", f"encrypt_stream, {cfg.stream_clients} clients x "
        f"{cfg.stream_size >> 20} MiB", got["plaintext"] / got["seconds"] / 1e6, "MB/s",
        f"load: {got['processes']} processes started together, one connection per client, "
        f"{lg.STREAM_WINDOW} pieces of 1 MiB ahead; {got['plaintext'] / 1e9:.2f} GB in "
        f"{got['seconds']:.2f} s (first start to last end)", 1_000.0))


# -- the remote engine --------------------------------------------------------------------

def measure_remote_engine(server: Server, cfg: Config, report: Report,
                          progress: Progress) -> None:
    """A plane on core 0, alone and with a remote engine to ``server`` (pinned to core 1),
    in a subprocess pinned to core 0."""
    if remote_engine_class() is None:
        report.notes.append("remote engine: left out, this cryptoplane has no Remote engine")
        return
    progress("remote engine: plane on core 0, server on core 1")
    argv = [sys.executable, "-m", "cryptoplane.yardstick.remote_speed", "plane",
            json.dumps({"server": asdict(server), "duration": cfg.duration,
                        "warmup": cfg.warmup, "rounds": 1 if cfg.quick else 3})]
    if shutil.which("taskset"):
        argv = ["taskset", "-c", "0", *argv]
    done = subprocess.run(argv, capture_output=True, text=True, check=False,
                          timeout=120 + 16 * (cfg.duration + cfg.warmup))
    if done.returncode != 0:
        raise BenchError(f"the remote-engine measurement failed: {done.stderr[-2000:]}")
    got = json.loads(done.stdout.strip().splitlines()[-1])
    for work, unit in (("rsa", "RSA-2048 sign"), ("aead", "AES-256-GCM encrypt 64 B")):
        alone, both = got[f"{work}_alone"], got[f"{work}_remote"]
        report.figures.append(Figure("remote engine", f"{unit}: plane alone", alone, "ops/s",
                                     got["how"][work]))
        report.figures.append(Figure("remote engine", f"{unit}: plane + remote", both,
                                     "ops/s", got["how"][work]))
    for path in ("map", "window", "split"):
        report.figures.append(Figure("remote engine", f"RSA-2048 sign: plane + remote, {path}",
                                     got[f"rsa_remote_{path}"], "ops/s", got["how"]["rsa"]))
    report.ratios.append(Ratio("remote engine: RSA sign, plane+remote / plane alone",
                               got["rsa_remote"] / got["rsa_alone"], 1.7,
                               what=f"{got['rsa_remote']:,.0f} / {got['rsa_alone']:,.0f} "
                                    "ops/s"))
    cost = 1.0 - got["aead_ratio"]
    report.ratios.append(Ratio("remote engine: 64 B AEAD cost of adding it (1 - ratio)",
                               cost, 0.05, below=True,
                               what="1 - the median of paired ratios (+ remote / alone)"))
    if got.get("served"):
        report.notes.append(f"remote engine served: {got['served']}")


def _plane_child(spec: dict[str, Any]) -> dict[str, Any]:
    """In the child pinned to core 0: the plane alone (``inline``) and with ``cp.Remote``
    to the server on core 1, in interleaved rounds (medians): RSA-2048 signs, each plane
    driven its best way (alone: ``plane.map`` batches, the caller's thread signing; with
    the remote engine also a window of ``plane.submit`` futures, which keeps the remote
    pipeline full: the better of the two counts), and 64-byte AES-GCM encrypts the way
    users make them (``plane.encrypt``, the fast path)."""
    import collections
    import statistics

    import cryptoplane as cp
    from cryptoplane import requests as rq

    server = Server(**spec["server"])
    duration, warmup = float(spec["duration"]), float(spec["warmup"])
    rounds = int(spec.get("rounds", 3))
    rsa_key = cp.Key.generate("rsa-pss-sha256")
    aes_key = cp.Key.generate("aes-256-gcm")
    message = os.urandom(32)
    data = os.urandom(64)
    nonce = os.urandom(12)
    batch, depth = 64, 256

    def timed(step: Callable[[], int], seconds: float, warm: float = warmup) -> float:
        clock = time.perf_counter
        end = clock() + warm
        while clock() < end:
            step()
        n = 0
        t0 = clock()
        end = t0 + seconds
        while clock() < end:
            n += step()
        return n / max(clock() - t0, 1e-9)

    def mapped(plane: Any) -> Callable[[], int]:
        reqs = [rq.Sign(rsa_key, message) for _ in range(batch)]

        def step() -> int:
            plane.map(reqs)
            return batch
        return step

    def window(plane: Any) -> Callable[[], int]:
        queue: collections.deque[Any] = collections.deque()

        def step() -> int:
            while len(queue) < depth:
                queue.append(plane.submit(rq.Sign(rsa_key, message)))
            for _ in range(depth // 4):
                queue.popleft().result()
            return depth // 4
        return step

    def split(plane: Any, bound: Any) -> Callable[[], int]:
        """A window of signs with a key bound to the remote engine kept full while this
        thread signs with another key inline: both engines busy, no balancer."""
        queue: collections.deque[Any] = collections.deque()
        sign = plane.sign

        def step() -> int:
            while len(queue) < depth:
                queue.append(plane.submit(rq.Sign(bound, message)))
            sign(rsa_key, message)
            n = 1
            while queue and queue[0].done():
                queue.popleft().result()
                n += 1
            return n
        return step

    def aead(plane: Any) -> Callable[[], int]:
        enc = plane.encrypt

        def step() -> int:
            for _ in range(1000):
                enc(aes_key, data, nonce)
            return 1000
        return step

    remote_class = remote_engine_class()
    if remote_class is None:
        raise BenchError("cryptoplane has no Remote engine")
    remote = remote_class(server.url, token=server.token, ssl=server.ssl())
    alone = cp.Plane(["inline"])
    both = cp.Plane(["inline", remote])
    bound = cp.Key.generate("rsa-pss-sha256")
    both.session(bound, engine=remote.name)
    try:
        runs: dict[str, list[float]] = collections.defaultdict(list)
        steps = {"rsa_alone": mapped(alone), "rsa_remote_map": mapped(both),
                 "rsa_remote_window": window(both), "rsa_remote_split": split(both, bound)}
        for i in range(rounds):  # interleaved, and the order reversed every other round
            for name in (steps if i % 2 == 0 else reversed(steps)):
                runs[name].append(timed(steps[name], duration))
        out: dict[str, Any] = {k: statistics.median(v) for k, v in runs.items()}
        best = max(("map", "window", "split"), key=lambda m: out[f"rsa_remote_{m}"])
        out["rsa_remote"] = out[f"rsa_remote_{best}"]
        # AEAD: the fast path's rate moves with every other process on this core, so the
        # two planes alternate in short slices and each pair gives a ratio (a drift
        # then weighs on both sides of it); the cost is 1 - the median of those ratios
        slice_s = 0.25
        timed(aead(alone), 0.0, warmup)
        timed(aead(both), 0.0, warmup)
        pairs = max(4, round(rounds * duration / slice_s / 2))
        ratios: list[float] = []
        for i in range(pairs):
            a, b = ((alone, both) if i % 2 == 0 else (both, alone))
            ra, rb = timed(aead(a), slice_s, 0.02), timed(aead(b), slice_s, 0.02)
            r_alone, r_both = (ra, rb) if a is alone else (rb, ra)
            runs["aead_alone"].append(r_alone)
            runs["aead_remote"].append(r_both)
            ratios.append(r_both / r_alone)
        out["aead_alone"] = statistics.median(runs["aead_alone"])
        out["aead_remote"] = statistics.median(runs["aead_remote"])
        out["aead_ratio"] = statistics.median(ratios)
        out["served"] = {k: v for k, v in _engine_counts(both).items() if v}
        out["how"] = {
            "rsa": f"alone: plane.map of {batch}; + remote: the best ({best}) of "
                   f"plane.map of {batch} (map), a window of {depth} plane.submit "
                   f"(window), and a window of {depth} on a key bound to the remote engine "
                   f"while this thread signs inline (split); median of {rounds} "
                   "interleaved rounds",
            "aead": f"plane.encrypt (the fast path); {pairs} pairs of {slice_s:g} s slices, "
                    "the planes alternating; medians"}
        return out
    finally:
        both.close()
        alone.close()


def remote_engine_class() -> Any:
    """``cp.Remote`` (or ``cryptoplane.fabric.Remote``), None where there is none."""
    import importlib

    import cryptoplane as cp

    # looked up by name: the remote engine was written beside this command
    found = getattr(cp, "Remote", None)
    if found is None:
        found = getattr(importlib.import_module("cryptoplane.fabric"), "Remote", None)
    return found


def _engine_counts(plane: Any) -> dict[str, int]:
    from .engine_paths import engine_requests

    try:
        return engine_requests(plane)
    except Exception:
        return {}


# -- the run ----------------------------------------------------------------------------

def _busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (``/proc/stat``), 0 where unknown."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    """CPU seconds of this process and its waited-for children (servers, load)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run(cfg: Config, progress: Progress | None = None) -> Report:
    """Every figure of the command, in one run."""
    say = progress or (lambda _text: None)
    report = Report()
    t0 = time.perf_counter()
    busy0, own0 = _busy_seconds(), _own_seconds()
    report.meta = {"cpus": len(os.sched_getaffinity(0)), "duration_s": cfg.duration,
                   "warmup_s": cfg.warmup, "python": sys.version.split()[0],
                   "load_average_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="cryptoplane-remote-speed-") as tmp:
        folder = Path(tmp)
        if cfg.server:
            server = Server(cfg.server, cfg.token, cfg.ca, cfg.cert, cfg.cert_key)
            prepare_keys(server)
            section = "tls" if cfg.server.startswith("tls") else "tcp"
            measure_server(server, cfg, report, section, say, full=True)
            measure_streams(server, cfg, report, say)
            report.notes.append(f"measured {cfg.server}; the remote-engine section needs "
                                "servers of the command's own (pinned), and was left out")
        elif cfg.only == "stream":
            say("starting a server")
            with local_server(folder) as srv:
                report.meta["server_pids"] = [srv.pid]
                prepare_keys(srv)
                measure_streams(srv, cfg, report, say)
        elif cfg.only == "remote-engine":
            say("starting a server pinned to core 1")
            with local_server(folder, cpu=1, name="pinned") as pinned:
                report.meta["server_pids"] = [pinned.pid]
                prepare_keys(pinned)
                measure_remote_engine(pinned, cfg, report, say)
        else:
            kinds = [ServerKind("tcp")] if cfg.plain else []
            kinds += [ServerKind("tls", tls=True)] if cfg.tls else []
            kinds.append(ServerKind("pinned", cpu=1))
            say("starting servers")
            with local_servers(folder, kinds) as servers:
                report.meta["server_pids"] = [srv.pid for srv in servers.values()]
                prepare_keys(servers["pinned"])  # one keystore: the keys serve every server
                if cfg.plain:
                    measure_server(servers["tcp"], cfg, report, "tcp", say, full=True)
                    measure_streams(servers["tcp"], cfg, report, say)
                if cfg.tls:
                    measure_server(servers["tls"], cfg, report, "tls", say,
                                   full=not cfg.quick or not cfg.plain)
                    if not cfg.plain:
                        measure_streams(servers["tls"], cfg, report, say)
                measure_remote_engine(servers["pinned"], cfg, report, say)
        if cfg.kmip and cfg.only is None:
            say("PyKMIP")
            measure_kmip(cfg, report)
    elapsed = report.meta["elapsed_s"] = time.perf_counter() - t0
    if busy0:  # what the rest of the machine took meanwhile: the figures' noise
        report.meta["other_processes_cores"] = max(
            0.0, (_busy_seconds() - busy0) - (_own_seconds() - own0)) / elapsed
    report.meta["load_average_after"] = os.getloadavg()[0]
    return report


def measure_kmip(cfg: Config, report: Report) -> None:
    got = kmip_peer.measure(duration=max(cfg.duration, 2.0))
    how = (f"PyKMIP {got.pykmip} (cryptography {got.cryptography}), TLS 1.2 + client "
           "certificate, ProxyKmipClient, one request at a time")
    report.figures.append(Figure("kmip", "PyKMIP: AES-256-GCM encrypt 64 B", got.encrypt_ops_s,
                                 "ops/s", how))
    report.figures.append(Figure("kmip", "PyKMIP: RSA-2048 sign (PSS)", got.sign_ops_s,
                                 "ops/s", how))
    report.figures.append(Figure("kmip", "PyKMIP: encrypt, 1 in flight: p50",
                                 got.encrypt_p50_ms * 1e3, "µs", how))
    report.figures.append(Figure("kmip", "PyKMIP: RSA sign, 1 in flight: p50",
                                 got.sign_p50_ms * 1e3, "µs", how))
    for section in ("tls", "tcp"):
        enc = report.figure(section, "encrypt 64 B, pipelined")
        if enc is None:
            continue
        report.ratios.append(Ratio(f"small encrypts: ours ({section}, pipelined) / PyKMIP",
                                   enc.value / got.encrypt_ops_s, 100.0,
                                   what=f"{enc.value:,.0f} / {got.encrypt_ops_s:,.1f} ops/s"))
        lat = report.figure(section, "encrypt 64 B, 1 in flight: p50")
        if lat is not None and lat.value > 0:
            report.ratios.append(Ratio(
                f"small encrypts, one at a time: PyKMIP p50 / ours ({section})",
                got.encrypt_p50_ms * 1e3 / lat.value, None,
                what=f"{got.encrypt_p50_ms * 1e3:,.0f} / {lat.value:,.0f} µs"))
        break
    for section in ("tls", "tcp"):
        sign = report.figure(section, "RSA-2048 sign (PSS), pipelined")
        if sign is None:
            continue
        report.ratios.append(Ratio(f"RSA-2048 signs: ours ({section}, pipelined) / PyKMIP",
                                   sign.value / got.sign_ops_s, 100.0,
                                   what=f"{sign.value:,.0f} / {got.sign_ops_s:,.1f} ops/s"))
        break


def _main() -> None:
    what, spec = sys.argv[1], json.loads(sys.argv[2])
    if what == "streams":
        got = asyncio.run(_streams(Server(**spec["server"]), int(spec["clients"]),
                                   int(spec["size"]), 1 << 20, float(spec["start_at"])))
        print(json.dumps(got))
    elif what == "plane":
        print(json.dumps(_plane_child(spec)))
    else:
        sys.exit(f"unknown child {what!r}")


if __name__ == "__main__":
    _main()
