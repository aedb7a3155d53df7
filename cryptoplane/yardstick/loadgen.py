"""A lean load generator for a fabric server: what ``cryptoplane remote-speed`` drives
the server with for its ops/s figures, so that the figure is the server's and not our
client library's (a Python client on the same two cores is itself a bottleneck).

Lean means: every request frame is encoded once, before timing (frame ``i`` has request
id ``i`` and is sent again, unchanged, as soon as its answer arrives, which frees the id);
``in_flight`` requests are kept outstanding per connection; everything one receive makes
sendable goes out in one ``writelines`` (over TLS one joined ``write``: TLS records of up
to 16 KiB rather than one per frame); the answers of a receive are parsed in one pass
over their headers (no ``Frame`` objects); uvloop where installed. A process runs one or
more connections; ``run`` starts several processes that start timing at the same wall
clock instant and adds their counts.

Modes: ``pipelined`` (REQUEST frames, counts answers), ``batch`` (BATCH frames of
``batch`` items, counts items; the first answer's item statuses are checked),
``latency`` (one request at a time, per-request times), ``stream`` (``run_streams``: one
ENCRYPT_STREAM per connection, a window of pieces ahead, answers counted unread). Every
answer's status is checked: a non-OK status is counted as an error and reported (the
first one's message kept), never as throughput. A process's timing window starts after
its first answer and a warm-up.

Run as ``python -m cryptoplane.yardstick.loadgen SPEC_JSON``: prints one JSON line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import ssl
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..fabric import codec
from ..fabric.codec import Field, FrameType, Op, Status

_HEAD = codec.HEADER
_OK_BATCH_ITEM = struct.Struct("!HI")


@dataclass
class Spec:
    """What one load process does. ``op``: a wire op's name (encrypt, sign, ...);
    ``mode``: pipelined, batch, latency or stream; ``size``: bytes of DATA per request
    (of plaintext per client, for streams); ``connections``: per process (streams: one
    client each)."""

    url: str
    token: str | None
    key: str
    op: str = "encrypt"
    size: int = 64
    mode: str = "pipelined"  # pipelined | batch | latency
    in_flight: int = 1024
    batch: int = 1000
    connections: int = 1
    duration: float = 1.0
    warmup: float = 0.2
    start_at: float = 0.0  # wall clock (time.time()) at which timing starts; 0: now
    ca: str | None = None
    cert: str | None = None
    cert_key: str | None = None
    padding: str | None = None


@dataclass
class Outcome:
    """What a load process measured: answers (items, for batches) in ``seconds``."""

    count: int = 0
    errors: int = 0
    seconds: float = 0.0
    first_error: str = ""
    latencies_us: list[float] = field(default_factory=list)
    processes: int = 1

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0

    def percentile_us(self, q: float) -> float:
        ordered = sorted(self.latencies_us)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _fields(spec: Spec) -> bytes:
    fields: dict[int, bytes] = {Field.DATA: os.urandom(spec.size)}
    if spec.padding:
        fields[Field.PADDING] = spec.padding.encode()
    return codec.encode_fields(fields)


def _op(name: str) -> int:
    return int(Op[name.upper()])


def request_frames(spec: Spec, count: int) -> list[bytes]:
    """Frame ``i`` (id ``i``, 0 unused) for i in 1..count, pre-encoded."""
    key = spec.key.encode()
    body = _fields(spec)
    op = _op(spec.op)
    if spec.mode == "batch":
        item = struct.pack("!I", len(body)) + body
        payload = struct.pack("!I", spec.batch) + item * spec.batch
        ftype = FrameType.BATCH
    else:
        payload = body
        ftype = FrameType.REQUEST
    return [b""] + [codec.encode_frame(ftype, i, op=op, key=key, payload=payload)
                    for i in range(1, count + 1)]


def ssl_context(spec: Spec) -> ssl.SSLContext | None:
    if not spec.url.startswith("tls://"):
        return None
    from ..fabric.auth import client_ssl_context

    return client_ssl_context(spec.ca, certfile=spec.cert, keyfile=spec.cert_key)


class _Load(asyncio.Protocol):
    """One connection: handshake, then keep ``in_flight`` frames outstanding."""

    def __init__(self, spec: Spec, frames: list[bytes], per_answer: int) -> None:
        self.spec = spec
        self.frames = frames
        self.per_answer = per_answer
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.welcome: asyncio.Future[dict[str, Any]] = (
            asyncio.get_running_loop().create_future())
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ready = False
        self.counting = False
        self.stopping = False
        self.count = 0
        self.errors = 0
        self.first_error = ""
        self.outstanding = 0
        self.sent_at: dict[int, float] = {}
        self.latencies: list[float] = []
        self.latency = spec.mode == "latency"
        self.tls = spec.url.startswith("tls://")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        hello = json.dumps({"versions": [1], "client": "cryptoplane loadgen",
                            **({"token": self.spec.token} if self.spec.token else {})})
        transport.write(codec.encode_frame(  # type: ignore[attr-defined]
            FrameType.HELLO, 0, payload=codec.encode_fields({Field.JSON: hello.encode()})))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.welcome.done():
            self.welcome.set_exception(ConnectionError(f"closed before WELCOME: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def start(self) -> None:
        """Send the first ``in_flight`` frames."""
        assert self.transport is not None
        n = len(self.frames) - 1
        self.outstanding = n
        if self.latency:
            self.sent_at[1] = time.perf_counter()
            self.transport.write(self.frames[1])
        else:
            self.transport.write(b"".join(self.frames[1:]))

    def _error(self, status: int, payload: bytes) -> None:
        self.errors += 1
        if not self.first_error:
            try:
                text = codec.decode_fields(payload).get(Field.MESSAGE, b"").decode()
            except Exception:
                text = ""
            self.first_error = f"{Status(status).name}: {text}"

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        end = len(buf)
        pos = 0
        resend: list[bytes] = []
        frames = self.frames
        unpack = _HEAD.unpack_from
        answered = 0
        while end - pos >= 24:
            length, _v, ftype, _fl, fid, _op, status, klen, _r = unpack(buf, pos)
            total = length + 4
            if end - pos < total:
                break
            if not self.ready:
                self._welcome(ftype, status, buf[pos + 24 + klen:pos + total])
            elif ftype == FrameType.RESPONSE or ftype == FrameType.BATCH_RESPONSE:
                if status != Status.OK:
                    self._error(status, buf[pos + 24 + klen:pos + total])
                elif ftype == FrameType.BATCH_RESPONSE and not self.count:
                    self._check_batch(buf[pos + 24 + klen:pos + total])
                answered += 1
                if self.latency and self.counting:
                    self.latencies.append((time.perf_counter() - self.sent_at[fid]) * 1e6)
                if self.stopping:
                    self.outstanding -= 1
                else:
                    resend.append(frames[fid])
                    if self.latency:
                        self.sent_at[fid] = time.perf_counter()
            pos += total
        self.buf = buf[pos:] if pos < end else b""
        if answered and not self.answered.done():
            self.answered.set_result(None)
        if self.counting:
            self.count += answered * self.per_answer
        if resend and self.transport is not None:
            if self.tls:  # one buffer: TLS records of up to 16 KiB, not one per frame
                self.transport.write(b"".join(resend))
            else:
                self.transport.writelines(resend)
        if self.stopping and self.outstanding <= 0 and not self.closed.done():
            self.closed.set_result(None)

    def _check_batch(self, payload: bytes) -> None:
        """The first batch answer's items: every one OK (else it counts as errors)."""
        (n,) = struct.unpack_from("!I", payload, 0)
        pos = 4
        for _ in range(n):
            status, length = _OK_BATCH_ITEM.unpack_from(payload, pos)
            if status != Status.OK:
                self._error(status, payload[pos + 6:pos + 6 + length])
            pos += 6 + length

    def _welcome(self, ftype: int, status: int, payload: bytes) -> None:
        if ftype != FrameType.WELCOME or status != Status.OK:
            try:
                text = codec.decode_fields(payload).get(Field.MESSAGE, b"").decode()
            except Exception:
                text = ""
            self.welcome.set_exception(ConnectionError(
                f"handshake refused: type {ftype} status {status}: {text}"))
            return
        self.ready = True
        info = json.loads(codec.decode_fields(payload).get(Field.JSON, b"{}"))
        self.welcome.set_result(info)


async def _run_async(spec: Spec) -> Outcome:
    loop = asyncio.get_running_loop()
    endpoint = codec_endpoint(spec.url)
    ctx = ssl_context(spec)
    per_answer = spec.batch if spec.mode == "batch" else 1
    in_flight = 1 if spec.mode == "latency" else spec.in_flight
    conns: list[_Load] = []
    for _ in range(spec.connections):
        frames = request_frames(spec, in_flight)

        def make(f: list[bytes] = frames) -> _Load:
            return _Load(spec, f, per_answer)

        if endpoint[0] == "unix":
            _, proto = await loop.create_unix_connection(make, endpoint[1])
        else:
            _, proto = await loop.create_connection(
                make, endpoint[1], int(endpoint[2]), ssl=ctx,
                server_hostname=endpoint[1] if ctx else None)
        conns.append(proto)
    for c in conns:
        info = await asyncio.wait_for(c.welcome, 30)
        cap = int(info.get("limits", {}).get("max_in_flight", in_flight))
        if cap < len(c.frames) - 1:
            c.frames = c.frames[:cap + 1]
    if spec.start_at:
        await asyncio.sleep(max(0.0, spec.start_at - time.time() - spec.warmup))
    for c in conns:
        c.start()
    # the warm-up starts with the first answer (a server's first use of a key reads it
    # from the keystore); a window with no answer at all is made longer until one comes
    await asyncio.wait_for(asyncio.gather(*(c.answered for c in conns)), 60)
    await asyncio.sleep(spec.warmup)
    for c in conns:
        c.counting = True
    t0 = time.perf_counter()
    await asyncio.sleep(spec.duration)
    deadline = t0 + spec.duration + 30
    while not any(c.count for c in conns) and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    for c in conns:
        c.counting = False
    seconds = time.perf_counter() - t0
    for c in conns:
        c.stopping = True
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(c.closed for c in conns)), 30)
    out = Outcome(seconds=seconds)
    for c in conns:
        out.count += c.count
        out.errors += c.errors
        out.first_error = out.first_error or c.first_error
        out.latencies_us.extend(c.latencies)
        if c.transport is not None:
            c.transport.close()
    return out


# -- streams ----------------------------------------------------------------------------

STREAM_WINDOW = 4  # pieces sent ahead of the ciphertext received (as the client's window)


class _StreamLoad(asyncio.BufferedProtocol):
    """One client's ENCRYPT_STREAM of ``size`` bytes: the REQUEST, then DATA pieces of the
    server's ``stream_piece`` (the same piece of bytes each time, its header made once),
    at most ``STREAM_WINDOW`` pieces ahead of the answers; the answers are counted, not
    kept: read into ``scratch`` (one buffer for every client of the process, consumed
    before the next read) and skipped by a header parser, never copied into bytes."""

    def __init__(self, spec: Spec, piece_data: bytes, scratch: memoryview) -> None:
        loop = asyncio.get_running_loop()
        self.spec = spec
        self.piece_data = piece_data
        self.scratch = scratch
        self.transport: asyncio.Transport | None = None
        self.welcome: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.ready = False
        self.head = b""  # a header not yet whole
        self.skip = 0  # payload bytes of the current answer frame still to come
        self.sent = 0
        self.received = 0
        self.left = spec.size
        self.piece = len(piece_data)
        self.error = ""
        self.ending = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        hello = json.dumps({"versions": [1], "client": "cryptoplane loadgen streams",
                            **({"token": self.spec.token} if self.spec.token else {})})
        transport.write(codec.encode_frame(  # type: ignore[attr-defined]
            FrameType.HELLO, 0, payload=codec.encode_fields({Field.JSON: hello.encode()})))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.welcome.done():
            self.welcome.set_exception(ConnectionError(f"closed before WELCOME: {exc}"))
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"stream cut: {exc or self.error}"))

    def start(self) -> None:
        assert self.transport is not None
        self.transport.write(codec.encode_frame(FrameType.REQUEST, 1, op=Op.ENCRYPT_STREAM,
                                                key=self.spec.key.encode()))
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        window = STREAM_WINDOW * self.piece
        out: list[bytes] = []
        while self.left > 0 and self.sent - self.received < window:
            n = min(self.piece, self.left)
            self.left -= n
            flags = codec.Flag.END if self.left == 0 else 0
            out.append(codec.header_bytes(FrameType.DATA, 1, Op.ENCRYPT_STREAM, 0, 0, n,
                                          flags))
            out.append(self.piece_data if n == self.piece else self.piece_data[:n])
            self.sent += n
        if out:
            self.transport.writelines(out)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.scratch

    def buffer_updated(self, nbytes: int) -> None:
        self._received(self.scratch[:nbytes])

    def data_received(self, data: bytes) -> None:
        self._received(memoryview(data))

    def _received(self, view: memoryview) -> None:
        if not self.ready:  # the WELCOME (small): kept until whole
            self.head += view
            if len(self.head) < 24:
                return
            length, _v, ftype, _fl, _fid, _op, status, klen, _r = _HEAD.unpack_from(self.head)
            if len(self.head) < length + 4:
                return
            frame, view = self.head[:length + 4], memoryview(self.head[length + 4:])
            self.head = b""
            if ftype != FrameType.WELCOME or status != Status.OK:
                self.welcome.set_exception(ConnectionError(f"handshake refused: {status}"))
                return
            self.ready = True
            self.welcome.set_result(json.loads(codec.decode_fields(frame[24 + klen:]).get(
                Field.JSON, b"{}")))
        pos, end = 0, len(view)
        while pos < end:
            if self.skip:
                n = min(self.skip, end - pos)
                self.skip -= n
                pos += n
                self.received += n
                if not self.skip and self.ending and not self.done.done():
                    self.done.set_result(None)
                continue
            need = 24 - len(self.head)
            self.head += bytes(view[pos:pos + need])
            pos += min(need, end - pos)
            if len(self.head) < 24:
                break
            length, _v, ftype, flags, _fid, _op, status, klen, _r = _HEAD.unpack(self.head)
            self.head = b""
            body = length + 4 - 24
            if ftype == FrameType.DATA:
                self.skip = body
                self.received -= klen  # the key reference is not ciphertext
                if flags & codec.Flag.END:
                    self.ending = True  # done once its payload is in
                    if not body and not self.done.done():
                        self.done.set_result(None)
            elif ftype == FrameType.RESPONSE:
                self.error = f"status {status}"
                if not self.done.done():
                    if status == Status.OK:
                        self.done.set_result(None)
                    else:
                        self.done.set_exception(RuntimeError(
                            f"stream refused: {Status(status).name}"))
                self.skip = body
            else:
                self.skip = body
        if self.sent:
            self._send()


async def _run_streams_async(spec: Spec) -> dict[str, Any]:
    """``spec.connections`` clients, one ENCRYPT_STREAM of ``spec.size`` bytes each,
    started together at ``spec.start_at`` (after every handshake)."""
    loop = asyncio.get_running_loop()
    endpoint = codec_endpoint(spec.url)
    ctx = ssl_context(spec)
    piece_data = os.urandom(1 << 20)
    scratch = memoryview(bytearray(256 * 1024))
    conns: list[_StreamLoad] = []
    for _ in range(spec.connections):
        _, proto = await loop.create_connection(
            lambda: _StreamLoad(spec, piece_data, scratch), endpoint[1], int(endpoint[2]), ssl=ctx,
            server_hostname=endpoint[1] if ctx else None)
        conns.append(proto)
    for c in conns:
        info = await asyncio.wait_for(c.welcome, 30)
        piece = int(info.get("limits", {}).get("stream_piece", len(piece_data)))
        if piece < len(piece_data):
            c.piece_data = piece_data[:piece]
            c.piece = piece
    await asyncio.sleep(max(0.0, spec.start_at - time.time()))
    began = time.time()
    for c in conns:
        c.start()
    await asyncio.wait_for(asyncio.gather(*(c.done for c in conns)), 3600)
    ended = time.time()
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    return {"began": began, "ended": ended, "plaintext": spec.size * len(conns),
            "ciphertext": sum(c.received for c in conns)}


def run_streams_here(spec: Spec) -> dict[str, Any]:
    try:
        import uvloop

        return uvloop.run(_run_streams_async(spec))
    except ImportError:
        return asyncio.run(_run_streams_async(spec))


def run_streams(spec: Spec, clients: int, processes: int) -> dict[str, Any]:
    """``clients`` streams of ``spec.size`` bytes from ``processes`` load processes,
    started at one wall-clock instant: plaintext bytes, the span from the first start to
    the last end, and how late the last process started."""
    processes = max(1, min(processes, clients))
    shares = [clients // processes + (i < clients % processes) for i in range(processes)]
    spec.start_at = time.time() + 1.0 + 0.01 * clients
    procs = []
    for n in shares:
        one = Spec(**{**asdict(spec), "connections": n, "mode": "stream"})
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "cryptoplane.yardstick.loadgen", json.dumps(asdict(one))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    failures = []
    for p in procs:
        out, err = p.communicate(timeout=3600)
        if p.returncode != 0:
            failures.append(err[-1500:])
        else:
            results.append(json.loads(out.strip().splitlines()[-1]))
    if failures:
        raise RuntimeError("stream load failed: " + failures[0])
    return {"plaintext": sum(r["plaintext"] for r in results),
            "ciphertext": sum(r["ciphertext"] for r in results),
            "seconds": max(r["ended"] for r in results) - min(r["began"] for r in results),
            "late": max(r["began"] for r in results) - spec.start_at,
            "processes": processes}


def codec_endpoint(url: str) -> tuple[str, str, str]:
    from ..fabric.connection_client import Endpoint

    e = Endpoint(url)
    if e.scheme == "unix":
        return ("unix", e.path, "")
    return (e.scheme, e.host, str(e.port))


def run_here(spec: Spec) -> Outcome:
    """One load process's work, in this process."""
    try:
        import uvloop

        return uvloop.run(_run_async(spec))
    except ImportError:
        return asyncio.run(_run_async(spec))


def run(spec: Spec, processes: int = 1, cpus: list[int] | None = None,
        python: str | None = None) -> Outcome:
    """``spec`` in ``processes`` subprocesses timed over the same wall-clock window (each
    pinned to a CPU of ``cpus`` in turn, if given); counts added, latencies joined."""
    if processes == 1 and not cpus and python is None:
        spec.start_at = 0.0  # one process: this one, timing as soon as it is connected
        return run_here(spec)
    setup = 0.5 + 0.2 * processes + (0.5 if spec.url.startswith("tls") else 0.0)
    spec.start_at = time.time() + setup + spec.warmup
    procs = []
    for i in range(processes):
        argv = [python or sys.executable, "-m", "cryptoplane.yardstick.loadgen",
                json.dumps(asdict(spec))]
        if cpus:
            argv = ["taskset", "-c", str(cpus[i % len(cpus)]), *argv]
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    total = Outcome(processes=processes)
    failures = []
    rates = 0.0
    for p in procs:
        out, err = p.communicate(timeout=spec.duration + setup + spec.warmup + 60)
        if p.returncode != 0:
            failures.append(err[-1500:])
            continue
        got = json.loads(out.strip().splitlines()[-1])
        total.count += got["count"]
        total.errors += got["errors"]
        total.first_error = total.first_error or got["first_error"]
        total.latencies_us.extend(got["latencies_us"])
        total.seconds = max(total.seconds, got["seconds"])
        rates += got["count"] / got["seconds"] if got["seconds"] else 0.0
    if failures:
        raise RuntimeError("load generator failed: " + failures[0])
    # the processes timed the same window: the sum of their rates is the aggregate
    if rates and total.seconds:
        total.count = round(rates * total.seconds)
    return total


def _main() -> None:
    spec = Spec(**json.loads(sys.argv[1]))
    if spec.mode == "stream":
        print(json.dumps(run_streams_here(spec)))
        return
    out = run_here(spec)
    print(json.dumps({"count": out.count, "errors": out.errors, "seconds": out.seconds,
                      "first_error": out.first_error, "latencies_us": out.latencies_us}))


if __name__ == "__main__":
    multiprocessing.freeze_support()
    _main()
