"""Bulk streams round-trip: sizes around the chunk boundaries, any split of the input
either way, the header's layout, piece sizes, typed key errors and bounded memory."""

from __future__ import annotations

import hashlib
import os
import struct
import tracemalloc

import pytest
from bulkfakes import FakeKeys, decrypt_pieces, make_keys, pieces
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryptoplane.engines import ThreadsEngine
from cryptoplane.exceptions import AuthenticationFailed, InvalidRequest
from cryptoplane.fabric import bulk
from cryptoplane.fabric.bulk import (
    CHUNK_SIZE,
    StreamDecryptJob,
    StreamEncryptJob,
    decrypt_all,
    encrypt_all,
    header_size,
    sealed_size,
)
from cryptoplane.fabric.errors import KeyNotFound, KeyVersionRejected
from cryptoplane.plane import Plane
from cryptoplane.stream.payload import SEALED_SIZE, TAG_SIZE


@pytest.fixture
def keys() -> FakeKeys:
    return make_keys()

MiB = 1 << 20
WRAPPED = 65  # the fake's wrapped 256-bit key, as transit's: 33 + 32
SIZES = [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 2 * CHUNK_SIZE,
         3 * MiB + 17]


def encrypt_pieces(keys: FakeKeys, data: bytes, cuts: list[int], plane: Plane, *,
                   piece: int = MiB) -> bytes:
    job = StreamEncryptJob(keys, "acme", "files", plane=plane, piece=piece)
    out = [job.start()]
    for p in pieces(data, cuts):
        got = job.feed(p)
        assert all(len(g) <= sealed_size(piece) for g in got)
        out += map(bytes, got)
        assert job.buffered <= CHUNK_SIZE
    out += map(bytes, job.finish())
    assert job.buffered == 0
    return b"".join(out)


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_sizes(keys: FakeKeys, plane: Plane, size: int) -> None:
    data = os.urandom(size)
    ct = encrypt_all(keys, "acme", "files", data, plane)
    assert len(ct) == header_size(WRAPPED) + sealed_size(size)
    assert decrypt_all(keys, "acme", "files", ct, plane) == data


@pytest.mark.parametrize("size", [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1])
def test_byte_at_a_time_near_one_chunk(keys: FakeKeys, plane: Plane, size: int) -> None:
    data = os.urandom(size)
    ct = encrypt_pieces(keys, data, list(range(size)), plane)
    plain, error = decrypt_pieces(keys, ct, list(range(len(ct))), plane)
    assert error is None and plain == data


def test_ciphertext_layout(keys: FakeKeys, plane: Plane) -> None:
    data = os.urandom(CHUNK_SIZE + 5)
    ct = encrypt_all(keys, "acme", "files", data, plane)
    magic, alg, chunk, salt, wrapped_len = struct.unpack_from(">5sBI16sH", ct)
    assert (magic, alg, chunk, wrapped_len) == (b"CPFS1", 1, CHUNK_SIZE, WRAPPED)
    wrapped = ct[28:28 + wrapped_len]
    assert wrapped[0] == 0xC7 and wrapped[1:5] == b"\0\0\0\1"  # names key version 1
    assert len(keys.decrypt("acme", "files", wrapped)) == 32
    assert len(ct) - 28 - wrapped_len == SEALED_SIZE + 5 + TAG_SIZE
    # fresh data key and salt per stream: equal plaintexts share no ciphertext
    again = encrypt_all(keys, "acme", "files", data, plane)
    assert again[10:26] != salt and again[-100:] != ct[-100:]


def test_empty_stream_is_one_empty_final_chunk(keys: FakeKeys, plane: Plane) -> None:
    job = StreamEncryptJob(keys, "acme", "files", plane=plane)
    header = job.start()
    assert job.feed(b"") == []
    (last,) = job.finish()
    assert len(last) == TAG_SIZE
    assert decrypt_all(keys, "acme", "files", header + last, plane) == b""


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(0, 5 * CHUNK_SIZE + 300),
       enc_cuts=st.lists(st.integers(0, 6 * CHUNK_SIZE), max_size=12),
       dec_cuts=st.lists(st.integers(0, 6 * CHUNK_SIZE), max_size=12),
       piece_chunks=st.integers(1, 4))
def test_any_split_both_ways(keys: FakeKeys, plane: Plane, size: int, enc_cuts: list[int],
                             dec_cuts: list[int], piece_chunks: int) -> None:
    data = os.urandom(size)
    piece = piece_chunks * CHUNK_SIZE
    ct = encrypt_pieces(keys, data, enc_cuts, plane, piece=piece)
    assert len(ct) == header_size(WRAPPED) + sealed_size(size)
    plain, error = decrypt_pieces(keys, ct, dec_cuts, plane, piece=piece)
    assert error is None and plain == data


def test_pieces_follow_piece_size(keys: FakeKeys, plane: Plane) -> None:
    data = os.urandom(5 * CHUNK_SIZE + 1)
    job = StreamEncryptJob(keys, "acme", "files", plane=plane, piece=2 * CHUNK_SIZE)
    job.start()
    # all but the last chunk are sealed at once, in pieces of two chunks
    assert [len(p) for p in job.feed(data)] == [2 * SEALED_SIZE, 2 * SEALED_SIZE,
                                                SEALED_SIZE]
    assert job.buffered == 1
    dec = StreamDecryptJob(keys, "acme", "files", plane=plane, piece=3 * CHUNK_SIZE)
    ct = encrypt_all(keys, "acme", "files", data, plane)
    assert [len(p) for p in dec.feed(ct)] == [3 * CHUNK_SIZE, 2 * CHUNK_SIZE]
    assert [len(p) for p in dec.finish()] == [1]


def test_context_is_bound(keys: FakeKeys, plane: Plane) -> None:
    ct = encrypt_all(keys, "acme", "files", b"secret", plane, context=b"user-7")
    assert decrypt_all(keys, "acme", "files", ct, plane, context=b"user-7") == b"secret"
    with pytest.raises(AuthenticationFailed):
        decrypt_all(keys, "acme", "files", ct, plane, context=b"user-8")


def test_key_errors_propagate(keys: FakeKeys, plane: Plane) -> None:
    with pytest.raises(KeyNotFound):
        StreamEncryptJob(keys, "acme", "nope", plane=plane).start()
    ct = encrypt_all(keys, "acme", "files", b"x" * 1000, plane)
    for tenant, name in [("globex", "nope"), ("initech", "files"), ("acme", "nope")]:
        with pytest.raises(KeyNotFound):
            decrypt_all(keys, tenant, name, ct, plane)
    # another tenant's key of the same name, another key of the tenant: tags fail
    for tenant, name in [("globex", "files"), ("acme", "other")]:
        with pytest.raises(AuthenticationFailed):
            decrypt_all(keys, tenant, name, ct, plane)
    keys.rotate("acme", "files")
    keys.min_version["acme", "files"] = 2
    with pytest.raises(KeyVersionRejected):
        decrypt_all(keys, "acme", "files", ct, plane)


def test_unwrap_error_sticks(keys: FakeKeys, plane: Plane) -> None:
    ct = encrypt_all(keys, "acme", "files", b"x", plane)
    job = StreamDecryptJob(keys, "acme", "other", plane=plane)
    with pytest.raises(AuthenticationFailed) as first:
        job.feed(ct)
    with pytest.raises(AuthenticationFailed) as again:
        job.finish()
    assert again.value is first.value


def test_misuse(keys: FakeKeys, plane: Plane) -> None:
    job = StreamEncryptJob(keys, "acme", "files", plane=plane)
    with pytest.raises(InvalidRequest):
        job.feed(b"early")
    job.start()
    with pytest.raises(InvalidRequest):
        job.start()
    with pytest.raises(InvalidRequest):
        job.feed("text")  # type: ignore[arg-type]
    job.finish()
    with pytest.raises(InvalidRequest):
        job.feed(b"late")
    with pytest.raises(InvalidRequest):
        job.finish()
    with pytest.raises(InvalidRequest):
        StreamEncryptJob(keys, "acme", "files", plane=plane, piece=1000)
    dec = StreamDecryptJob(keys, "acme", "files", plane=plane)
    dec.feed(encrypt_all(keys, "acme", "files", b"", plane))
    dec.finish()
    with pytest.raises(InvalidRequest):
        dec.feed(b"")
    assert "files" in repr(job) and "finished" in repr(dec)


def test_feeds_any_buffer(keys: FakeKeys, plane: Plane) -> None:
    data = os.urandom(3 * CHUNK_SIZE + 7)
    job = StreamEncryptJob(keys, "acme", "files", plane=plane)
    out: list[bytes | bytearray] = [job.start()]
    out += job.feed(bytearray(data[:CHUNK_SIZE + 3]))
    out += job.feed(memoryview(data)[CHUNK_SIZE + 3:])
    out += job.finish()
    ct = b"".join(out)
    assert decrypt_all(keys, "acme", "files", memoryview(ct), plane) == data


def test_256_mib_in_bounded_memory(keys: FakeKeys, plane: Plane) -> None:
    """Encrypt 256 MiB in 1 MiB pieces straight into a decrypt job: neither holds more
    than a chunk between calls, and no more than a few pieces are alive at once."""
    block = bytearray(os.urandom(MiB))
    enc = StreamEncryptJob(keys, "acme", "files", plane=plane)
    dec = StreamDecryptJob(keys, "acme", "files", plane=plane)
    want, got = hashlib.sha256(), hashlib.sha256()
    tracemalloc.start()
    try:
        dec.feed(enc.start())
        for i in range(256):
            block[:8] = i.to_bytes(8, "big")  # every piece differs
            want.update(block)
            for piece in enc.feed(block):
                for plain in dec.feed(piece):
                    got.update(plain)
                assert dec.buffered <= SEALED_SIZE
            assert enc.buffered <= CHUNK_SIZE
        for piece in enc.finish():
            for plain in dec.feed(piece):
                got.update(plain)
        for plain in dec.finish():
            got.update(plain)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got.digest() == want.digest()
    assert peak < 8 * MiB, peak


def test_format_constants() -> None:
    assert bulk.FIXED_SIZE == 28 and bulk.MAGIC == b"CPFS1"
    assert sealed_size(0) == TAG_SIZE and sealed_size(CHUNK_SIZE) == SEALED_SIZE
    assert sealed_size(CHUNK_SIZE + 1) == SEALED_SIZE + 1 + TAG_SIZE


def test_plane_without_inline_engine(keys: FakeKeys) -> None:
    """Off the fast path each run is a queued request: slower, the same bytes, and a bad
    chunk still fails typed."""
    data = os.urandom(2 * CHUNK_SIZE + 3)
    with Plane(engines=[ThreadsEngine(workers=1)]) as queued:
        ct = encrypt_all(keys, "acme", "files", data, queued)
        assert decrypt_all(keys, "acme", "files", ct, queued) == data
        bad = bytearray(ct)
        bad[-40] ^= 1
        plain, err = decrypt_pieces(keys, bytes(bad), [], queued)
        assert isinstance(err, AuthenticationFailed) and data.startswith(plain)


def test_format_as_documented(keys: FakeKeys, plane: Plane) -> None:
    """Decrypt a stream from the module docstring's description alone, with
    ``cryptography`` (not the plane's kernel): HKDF for the chunk key, then age's STREAM."""
    data = os.urandom(2 * CHUNK_SIZE + 99)
    ct = encrypt_all(keys, "acme", "files", data, plane)
    wrapped_len = int.from_bytes(ct[26:28], "big")
    header = ct[:28 + wrapped_len]
    data_key = keys.decrypt("acme", "files", header[28:])
    chunk_key = HKDF(hashes.SHA256(), 32, header[10:26],
                     b"cryptoplane bulk v1 chunk key\x00" + header).derive(data_key)
    aead = ChaCha20Poly1305(chunk_key)
    body = ct[len(header):]
    sealed = [body[i:i + SEALED_SIZE] for i in range(0, len(body), SEALED_SIZE)]
    plain = b"".join(aead.decrypt(i.to_bytes(11, "big") + bytes([i == len(sealed) - 1]),
                                  chunk, None) for i, chunk in enumerate(sealed))
    assert plain == data
