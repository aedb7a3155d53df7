"""age payloads (the STREAM): round trips, every attack with its typed error and only
authenticated plaintext released, the age test kit's STREAM vectors, and age itself."""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import shutil
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import support
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryptoplane import _native
from cryptoplane._native import chunks_fallback
from cryptoplane.exceptions import InvalidRequest
from cryptoplane.stream import payload as pl
from cryptoplane.stream.errors import (
    ChunkTampered,
    EmptyFinalChunk,
    PayloadError,
    TrailingData,
    Truncated,
)

KEY = bytes(range(1, 33))
CHUNK = pl.CHUNK_SIZE
SEALED = CHUNK + 16
KIT = Path(__file__).resolve().parents[3] / "shared" / "vectors" / "age-testkit"


@pytest.fixture(autouse=True)
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    # three chunks a batch: small payloads then cross batch boundaries and keep several
    # batches in flight, which is where ordering and hold-back bugs would show
    monkeypatch.setattr(pl, "BATCH_CHUNKS", 3)


def reference(data: bytes, key: bytes = KEY) -> bytes:
    """The STREAM by the pure-Python kernel in one call."""
    count = max(1, -(-len(data) // CHUNK))
    out = bytearray(len(data) + 16 * count)
    chunks_fallback.seal_chunks(key, data, out, counter=0, final=True)
    return bytes(out)


def seal(data: bytes, workers: int = 1) -> bytes:
    out = io.BytesIO()
    assert pl.seal_payload(KEY, io.BytesIO(data), out, workers=workers) == len(data)
    return out.getvalue()


def open_all(ct: bytes, workers: int = 1) -> tuple[bytes, BaseException | None]:
    """(plaintext written, error raised) of open_payload."""
    out = io.BytesIO()
    try:
        n = pl.open_payload(KEY, io.BytesIO(ct), out, workers=workers)
    except PayloadError as exc:
        return out.getvalue(), exc
    assert n == len(out.getvalue())
    return out.getvalue(), None


def open_incremental(ct: bytes, step: int) -> tuple[bytes, BaseException | None]:
    opener = pl.PayloadOpener(KEY)
    got = b""
    try:
        for i in range(0, len(ct), step):
            got += opener.update(ct[i:i + step])
        got += opener.finish()
    except PayloadError as exc:
        return got, exc
    return got, None


def chunks_of(ct: bytes) -> list[bytes]:
    return [ct[i:i + SEALED] for i in range(0, len(ct), SEALED)]


SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 1, 6 * CHUNK,
         10 * CHUNK + 12345]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("workers", [1, 2])
def test_round_trip_matches_reference(size: int, workers: int) -> None:
    data = os.urandom(size)
    ct = seal(data, workers)
    assert ct == reference(data)
    assert open_all(ct, workers) == (data, None)


@pytest.mark.parametrize("size", [0, CHUNK, 4 * CHUNK + 7])
def test_default_batches_and_workers(size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pl, "BATCH_CHUNKS", 16)
    data = os.urandom(size)
    ct = seal(data, workers=None)  # type: ignore[arg-type]
    assert ct == reference(data)
    assert open_all(ct, None)[0] == data  # type: ignore[arg-type]


@given(data=st.binary(max_size=3 * CHUNK + 40), cuts=st.lists(st.integers(0, 4 * CHUNK)))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_incremental_equals_one_shot(data: bytes, cuts: list[int]) -> None:
    ct = reference(data)
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    sealer = pl.PayloadSealer(KEY)
    got = b"".join(sealer.update(data[a:b]) for a, b in itertools.pairwise(bounds))
    assert got + sealer.finish() == ct
    cbounds = sorted({0, len(ct), *(c for c in cuts if c < len(ct))})
    opener = pl.PayloadOpener(KEY)
    plain = b"".join(opener.update(ct[a:b]) for a, b in itertools.pairwise(cbounds))
    assert plain + opener.finish() == data


def test_incremental_holds_back_a_full_chunk() -> None:
    sealer = pl.PayloadSealer(KEY)
    assert sealer.update(b"x" * CHUNK) == b""  # it may be the final chunk
    assert len(sealer.update(b"y")) == SEALED
    ct = reference(b"x" * CHUNK)
    opener = pl.PayloadOpener(KEY)
    assert opener.update(ct) == b""
    assert opener.finish() == b"x" * CHUNK
    with pytest.raises(InvalidRequest):
        opener.update(b"")
    with pytest.raises(InvalidRequest):
        sealer.finish() and sealer.finish()


class Trickle(io.RawIOBase):
    """A pipe-like source: short reads of at most ``step`` bytes."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = memoryview(data)
        self._step = step

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = min(len(buf), self._step, len(self._data))
        buf[:n] = self._data[:n]
        self._data = self._data[n:]
        return n


class ReadOnly:
    """A source with ``read`` only."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def read(self, n: int) -> bytes:
        return self._f.read(min(n, 1000))


class Dribble:
    """A sink that takes at most 5000 bytes a write, as a raw pipe may."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, b: Any) -> int:
        take = bytes(b[:5000])
        self.data += take
        return len(take)


@pytest.mark.parametrize("workers", [1, 2])
def test_short_reads_and_partial_writes(workers: int) -> None:
    data = os.urandom(5 * CHUNK + 3)
    for src in (Trickle(data, 7777), ReadOnly(data)):
        sink = Dribble()
        pl.seal_payload(KEY, src, sink, workers=workers)
        assert bytes(sink.data) == reference(data)
    sink = Dribble()
    pl.open_payload(KEY, Trickle(reference(data), 9999), sink, workers=workers)
    assert bytes(sink.data) == data


def test_progress_counts_plaintext() -> None:
    data = os.urandom(7 * CHUNK + 5)
    seen: list[int] = []
    pl.seal_payload(KEY, io.BytesIO(data), io.BytesIO(), workers=1, progress=seen.append)
    assert seen == [3 * CHUNK, 6 * CHUNK, len(data)]
    seen.clear()
    pl.open_payload(KEY, io.BytesIO(reference(data)), io.BytesIO(), workers=2,
                    progress=seen.append)
    assert seen == [3 * CHUNK, 6 * CHUNK, len(data)]


def test_bad_arguments() -> None:
    with pytest.raises(InvalidRequest):
        pl.seal_payload(KEY[:16], io.BytesIO(b""), io.BytesIO())
    with pytest.raises(InvalidRequest):
        pl.seal_payload(KEY, io.BytesIO(b""), io.BytesIO(), workers=0)
    with pytest.raises(InvalidRequest):
        pl.PayloadOpener(b"short")


def test_source_errors_propagate_after_earlier_batches() -> None:
    class Failing(io.RawIOBase):
        def __init__(self) -> None:
            self.calls = 0

        def readinto(self, buf: Any) -> int:
            self.calls += 1
            if self.calls > 3:
                raise OSError("disk on fire")
            buf[:CHUNK] = bytes(CHUNK)
            return CHUNK

    for workers in (1, 2):
        with pytest.raises(OSError, match="disk on fire"):
            pl.seal_payload(KEY, Failing(), io.BytesIO(), workers=workers)


# -- attacks: each gives its typed error, and only authenticated plaintext ---------------


def attack_cases() -> Iterator[tuple[str, bytes, bytes, type[PayloadError]]]:
    """(name, ciphertext, plaintext that may be released, error)."""
    data = os.urandom(7 * CHUNK + 1000)
    ct = reference(data)
    c = chunks_of(ct)
    n = len(c)
    yield "no chunk at all", b"", b"", Truncated
    for k in range(1, n):
        # cut after k whole chunks: the last of them opens as non-final and is released
        yield f"cut after chunk {k}", b"".join(c[:k]), data[:k * CHUNK], Truncated
    for k in range(n):
        base = b"".join(c[:k])
        yield f"cut 10 bytes into chunk {k}", base + c[k][:10], data[:k * CHUNK], Truncated
        if len(c[k]) > 100:
            yield (f"cut 100 bytes into chunk {k}", base + c[k][:100], data[:k * CHUNK],
                   ChunkTampered)
    for k in range(n - 1):
        yield (f"drop chunk {k}", b"".join(c[:k] + c[k + 1:]), data[:k * CHUNK],
               ChunkTampered)
        yield (f"duplicate chunk {k}", b"".join(c[:k + 1] + c[k:]), data[:(k + 1) * CHUNK],
               ChunkTampered)
        swapped = [*c[:k], c[k + 1], c[k], *c[k + 2:]]
        yield f"swap chunks {k} and {k + 1}", b"".join(swapped), data[:k * CHUNK], ChunkTampered
    yield "trailing bytes after a short final", ct + b"x", data[:7 * CHUNK], ChunkTampered

    full = os.urandom(4 * CHUNK)
    fct = reference(full)
    for extra in (b"x", b"y" * 15, b"z" * 16, os.urandom(SEALED), os.urandom(SEALED + 3)):
        yield f"{len(extra)} bytes after a full final", fct + extra, full, TrailingData

    body = bytearray(3 * SEALED)
    chunks_fallback.seal_chunks(KEY, full[:3 * CHUNK], body, counter=0, final=False)
    empty = bytearray(16)
    chunks_fallback.seal_chunks(KEY, b"", empty, counter=3, final=True)
    yield "empty final after chunks", bytes(body + empty), full[:3 * CHUNK], EmptyFinalChunk


ATTACKS = list(attack_cases())


@pytest.mark.parametrize("workers", [1, 2])
def test_attacks(workers: int) -> None:
    for name, ct, allowed, error in ATTACKS:
        got, exc = open_all(ct, workers)
        assert type(exc) is error, name
        assert got == allowed, name


def test_attacks_incremental() -> None:
    for name, ct, allowed, error in ATTACKS:
        for step in (SEALED, 10000, 1 << 20):
            got, exc = open_incremental(ct, step)
            assert type(exc) is error, (name, step)
            assert allowed.startswith(got), (name, step)


def test_wrong_key_releases_nothing() -> None:
    ct = reference(os.urandom(5 * CHUNK), key=bytes(32))
    for workers in (1, 2):
        assert (open_all(ct, workers)[0], type(open_all(ct, workers)[1])) == (b"", ChunkTampered)


@given(data=st.data())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_flipped_bit_is_caught(data: st.DataObject) -> None:
    plain = b"p" * (4 * CHUNK + 300)
    ct = bytearray(reference(plain))
    bit = data.draw(st.integers(0, 8 * len(ct) - 1))
    ct[bit // 8] ^= 1 << (bit % 8)
    workers = data.draw(st.sampled_from([1, 2]))
    got, exc = open_all(bytes(ct), workers)
    assert isinstance(exc, ChunkTampered)
    assert got == plain[:(bit // 8 // SEALED) * CHUNK]


def test_open_chunk() -> None:
    data = os.urandom(2 * CHUNK + 9)
    c = chunks_of(reference(data))
    assert pl.open_chunk(KEY, c[1], 1, final=False) == data[CHUNK:2 * CHUNK]
    assert pl.open_chunk(KEY, c[2], 2, final=True) == data[2 * CHUNK:]
    with pytest.raises(ChunkTampered):
        pl.open_chunk(KEY, c[1], 2, final=False)
    with pytest.raises(ChunkTampered):
        pl.open_chunk(KEY, c[2], 2, final=False) if len(c[2]) == SEALED else \
            pl.open_chunk(KEY, c[2], 1, final=True)
    with pytest.raises(Truncated):
        pl.open_chunk(KEY, c[2][:5], 2, final=True)
    with pytest.raises(InvalidRequest):
        pl.open_chunk(KEY, c[2], 2, final=False)


def test_python_kernel_gives_the_same_results(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_native, "CHUNKS_BACKEND", "python")
    monkeypatch.setattr(_native, "seal_chunks", chunks_fallback.seal_chunks)
    monkeypatch.setattr(_native, "open_chunks", chunks_fallback.open_chunks)
    data = os.urandom(4 * CHUNK + 1)
    assert seal(data, workers=2) == reference(data)
    for name, ct, allowed, error in ATTACKS[::7]:
        got, exc = open_all(ct, 2)
        assert (got, type(exc)) == (allowed, error), name


# -- known answers: the age test kit's STREAM vectors, and age itself -------------------


def kit_vectors() -> list[Path]:
    return sorted(KIT.glob("stream_*")) if KIT.is_dir() else []


def load_vector(path: Path) -> tuple[dict[str, str], bytes]:
    head, body = path.read_bytes().split(b"\n\n", 1)
    meta: dict[str, str] = {}
    for line in head.decode().splitlines():
        k, v = line.split(": ", 1)
        meta.setdefault(k, v)
    if meta.get("compressed") == "zlib":
        body = zlib.decompress(body)
    return meta, body


def split_file(body: bytes) -> tuple[bytes, bytes]:
    """(payload nonce, STREAM) of an age file: the header ends with its MAC line."""
    end = body.index(b"\n", body.index(b"\n--- ") + 1) + 1
    return body[end:end + 16], body[end + 16:]


def payload_key(file_key: bytes, nonce: bytes) -> bytes:
    return HKDF(SHA256(), 32, nonce, b"payload").derive(file_key)


def test_age_test_kit_stream_vectors() -> None:
    vectors = kit_vectors()
    if not vectors:
        support.unavailable(f"the age test kit is not at {KIT}")
    checked = 0
    for path in vectors:
        meta, body = load_vector(path)
        if meta["expect"] not in ("success", "payload failure"):
            continue  # header failures belong to the header codec
        nonce, stream = split_file(body)
        key = payload_key(bytes.fromhex(meta["file key"]), nonce)
        for workers in (1, 2):
            out = io.BytesIO()
            error = None
            try:
                pl.open_payload(key, io.BytesIO(stream), out, workers=workers)
            except PayloadError as exc:
                error = exc
            assert (error is None) == (meta["expect"] == "success"), path.name
            assert hashlib.sha256(out.getvalue()).hexdigest() == meta["payload"], path.name
        checked += 1
    assert checked >= 20


@pytest.fixture(scope="module")
def age_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    if shutil.which("age") is None or shutil.which("age-keygen") is None:
        support.unavailable("age and age-keygen are not installed (apt-get install age)")
    key = tmp_path_factory.mktemp("age") / "key.txt"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True,
                   timeout=30)
    recipient = subprocess.run(["age-keygen", "-y", str(key)], check=True, text=True,
                               capture_output=True, timeout=30).stdout.strip()
    return key, recipient


def file_key_of(body: bytes, key_file: Path) -> bytes:
    from cryptoplane.stream import header, recipients

    hdr, _ = header.decode_header(body)
    file_key = recipients.unwrap_file_key(hdr, recipients.parse_identities(
        key_file.read_text()))
    assert file_key is not None
    return file_key


@pytest.mark.parametrize("size", [0, CHUNK, 5 * CHUNK + 77])
def test_age_files_open_and_ours_open_in_age(size: int, age_key: tuple[Path, str],
                                             tmp_path: Path) -> None:
    from cryptoplane.stream import recipients

    key_file, recipient = age_key
    data = os.urandom(size)
    plain = tmp_path / "plain"
    plain.write_bytes(data)
    # age encrypts; the payload opens here
    subprocess.run(["age", "-r", recipient, "-o", str(tmp_path / "a.age"), str(plain)],
                   check=True, capture_output=True, timeout=60)
    body = (tmp_path / "a.age").read_bytes()
    nonce, stream = split_file(body)
    got = io.BytesIO()
    pl.open_payload(payload_key(file_key_of(body, key_file), nonce), io.BytesIO(stream), got,
                    workers=2)
    assert got.getvalue() == data
    # the payload is sealed here behind a header for age's recipient; age decrypts it
    file_key, nonce = os.urandom(16), os.urandom(16)
    hdr = recipients.build_header([recipients.X25519Recipient.parse(recipient)], file_key)
    with (tmp_path / "b.age").open("wb") as f:
        f.write(hdr.encode() + nonce)
        pl.seal_payload(payload_key(file_key, nonce), io.BytesIO(data), f, workers=2)
    done = subprocess.run(["age", "-d", "-i", str(key_file), str(tmp_path / "b.age")],
                          check=True, capture_output=True, timeout=60)
    assert done.stdout == data


def test_bench_runs_small(tmp_path: Path) -> None:
    from rich.console import Console

    from cryptoplane.cli.stream_bench import render
    from cryptoplane.yardstick import stream_bench as bench

    for tool in ("age", "age-keygen", "openssl"):
        if shutil.which(tool) is None:
            support.unavailable(f"{tool} is not installed (the bench compares with it)")
    console = Console(file=io.StringIO(), width=200)
    report = bench.run_bench(1 << 20, workdir=str(tmp_path), rounds=1)
    render(report, console)
    rows = report.rows
    assert {(r.op, r.tool.split()[0]) for r in rows} >= {
        ("encrypt", "cryptoplane"), ("decrypt", "cryptoplane"), ("encrypt", "age"),
        ("decrypt", "openssl")}
    assert all(r.mb_s > 0 for r in rows)
    assert [r.vs_age for r in rows if r.tool == "age"] == [1.0, 1.0]
    assert "age -d -i" in console.file.getvalue()  # type: ignore[attr-defined]
    assert list(tmp_path.iterdir()) == []


def test_bench_command_json(tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from cryptoplane.cli.stream_bench import bench

    for tool in ("age", "age-keygen", "openssl"):
        if shutil.which(tool) is None:
            support.unavailable(f"{tool} is not installed (the bench compares with it)")
    result = CliRunner().invoke(bench, ["--size", "1M", "--rounds", "1", "--json", "--dir",
                                        str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout[result.stdout.index("["):])
    assert {r["tool"] for r in rows} >= {"age", "openssl aes-256-ctr"}
    assert len(rows) == 8 or len(rows) == 6  # 6 where one core: one cryptoplane row each
    bad = CliRunner().invoke(bench, ["--size", "lots"])
    assert bad.exit_code != 0 and "not a size" in bad.output


class Zeros(io.RawIOBase):
    """``size`` zero bytes, produced as they are read (a pipe that never fits in memory)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = min(len(buf), self.left)
        buf[:n] = bytes(n)
        self.left -= n
        return n


class Discard:
    def __init__(self) -> None:
        self.size = 0

    def write(self, b: Any) -> int:
        self.size += len(b)
        return len(b)


@pytest.mark.parametrize("workers", [1, 2])
def test_memory_stays_bounded(workers: int) -> None:
    import tracemalloc

    size = 40 << 20
    tracemalloc.start()
    try:
        sink = Discard()
        pl.seal_payload(KEY, Zeros(size), sink, workers=workers)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sink.size == size + 16 * (size // CHUNK)
    # workers x (one input and one output batch of 3 chunks) and small change
    assert peak < workers * 2 * 3 * SEALED + (2 << 20)
