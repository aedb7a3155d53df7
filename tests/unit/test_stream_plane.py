"""Stream work goes through the plane: runs of age chunks are requests (``SealChunks``,
``OpenChunks``) that engines declare and serve, counted under their algorithm."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import pytest

import cryptoplane as cp
from cryptoplane._native import chunks_fallback
from cryptoplane.algorithms import Op, lookup
from cryptoplane.engines import PoolEngine
from cryptoplane.exceptions import ChunkAuthenticationFailed, InvalidRequest
from cryptoplane.requests import OpenChunks, SealChunks
from cryptoplane.stream import payload as pl
from cryptoplane.stream.errors import ChunkTampered

KEY = bytes(range(32))
CHUNK = 65536
SEALED = CHUNK + 16


def reference(data: bytes) -> bytes:
    count = max(1, -(-len(data) // CHUNK))
    out = bytearray(len(data) + 16 * count)
    chunks_fallback.seal_chunks(KEY, data, out, counter=0, final=True)
    return bytes(out)


@pytest.fixture()
def plane() -> Iterator[cp.Plane]:
    with cp.Plane() as p:
        yield p


def test_chunk_requests_run_on_the_plane(plane: cp.Plane) -> None:
    key = cp.Key("chacha20-poly1305", KEY)
    data = os.urandom(3 * CHUNK + 5)
    sealed = bytearray(len(data) + 4 * 16)
    assert plane.run(SealChunks(key, data, sealed, counter=0, final=True)) == len(sealed)
    assert bytes(sealed) == reference(data)
    back = bytearray(len(data))
    assert plane.run(OpenChunks(key, sealed, back, counter=0, final=True)) == len(data)
    assert bytes(back) == data
    sealed[SEALED + 7] ^= 1
    with pytest.raises(ChunkAuthenticationFailed) as info:
        plane.run(OpenChunks(key, sealed, back, counter=0, final=True))
    assert info.value.index == 1
    assert isinstance(info.value, cp.AuthenticationFailed)


def test_chunk_requests_are_checked_when_made() -> None:
    with pytest.raises(InvalidRequest, match="does not offer seal_chunks"):
        SealChunks(cp.Key.generate("aes-256-gcm"), b"", bytearray(16), counter=0, final=True)
    key = cp.Key("chacha20-poly1305", KEY)
    with pytest.raises(InvalidRequest, match="counter"):
        SealChunks(key, b"", bytearray(16), counter=-1, final=True)
    with pytest.raises(InvalidRequest, match="bytes-like"):
        OpenChunks(key, "text", bytearray(16), counter=0, final=True)  # type: ignore[arg-type]


def test_engines_declare_chunk_runs() -> None:
    chacha = lookup("chacha20-poly1305")
    assert {Op.SEAL_CHUNKS, Op.OPEN_CHUNKS} <= chacha.ops
    with cp.Plane(["inline", "threads"], self_test=False) as p:
        for engine in p.engines.values():
            assert Op.SEAL_CHUNKS in engine.capabilities[chacha.name].ops, engine.name
    # a pool worker's slot cannot hand a run's output back in the caller's buffer
    pool = PoolEngine(workers=1)
    try:
        assert Op.SEAL_CHUNKS not in pool.ops_for(chacha)
        assert Op.ENCRYPT in pool.ops_for(chacha)
    finally:
        pool.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_stream_work_shows_in_the_plane_statistics(plane: cp.Plane, workers: int) -> None:
    data = os.urandom(5 * pl.BATCH_CHUNKS * CHUNK // 2)  # two whole batches and a half
    sealed = io.BytesIO()
    pl.seal_payload(KEY, io.BytesIO(data), sealed, workers=workers, plane=plane)
    assert sealed.getvalue() == reference(data)
    back = io.BytesIO()
    pl.open_payload(KEY, io.BytesIO(sealed.getvalue()), back, workers=workers, plane=plane)
    assert back.getvalue() == data
    stats = plane.stats()
    chacha = stats["algorithms"]["chacha20-poly1305"]
    assert chacha["seal_chunks"]["requests"] == 3
    assert chacha["seal_chunks"]["bytes"] == len(data)
    assert chacha["open_chunks"]["requests"] == 3
    assert chacha["open_chunks"]["bytes"] == len(sealed.getvalue())
    # served in the thread that read each batch: the inline engine, whatever the workers
    assert stats["engines"]["inline"]["bytes"] == len(data) + len(sealed.getvalue())


def test_a_tampered_stream_is_counted_as_an_error(plane: cp.Plane) -> None:
    ct = bytearray(reference(os.urandom(2 * CHUNK + 1)))
    ct[SEALED + 3] ^= 1
    with pytest.raises(ChunkTampered):
        pl.open_payload(KEY, io.BytesIO(bytes(ct)), io.BytesIO(), workers=1, plane=plane)
    errors = plane.stats()["algorithms"]["chacha20-poly1305"]["open_chunks"]["errors"]
    assert errors.get("ChunkAuthenticationFailed", 0) >= 1, errors
