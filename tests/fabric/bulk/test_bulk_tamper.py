"""Bulk streams refuse every change: a changed header (``InvalidRequest`` where it does
not parse, ``AuthenticationFailed`` where it does), changed, reordered, dropped or
repeated chunks, a stream cut anywhere, bytes after the final chunk, a wrong final flag.
Whatever plaintext is released before the error is the stream's own, in whole chunks."""

from __future__ import annotations

import os

import pytest
from bulkfakes import FakeKeys, chunk_runs, decrypt_pieces, make_keys
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryptoplane.exceptions import AuthenticationFailed, InvalidRequest, KeyRejected
from cryptoplane.fabric.bulk import CHUNK_SIZE, FIXED_SIZE, StreamDecryptJob, encrypt_all
from cryptoplane.fabric.errors import KeyVersionRejected
from cryptoplane.plane import Plane
from cryptoplane.stream.payload import SEALED_SIZE, TAG_SIZE


@pytest.fixture
def keys() -> FakeKeys:
    return make_keys()

HEADER = FIXED_SIZE + 65  # with the fake's 65-byte wrapped key
PLAIN = os.urandom(5 * CHUNK_SIZE + 1000)  # five full chunks and a short final one
CHUNKS = 6


@pytest.fixture
def ct(keys: FakeKeys, plane: Plane) -> bytes:
    return encrypt_all(keys, "acme", "files", PLAIN, plane)


def chunk_at(i: int) -> int:
    return HEADER + i * SEALED_SIZE


def flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x01
    return bytes(b)


def check_refused(keys: FakeKeys, plane: Plane, ct: bytes, cuts: list[int] | None = None,
                  error: type[BaseException] | tuple[type[BaseException], ...]
                  = AuthenticationFailed) -> bytes:
    """``ct`` fails with ``error`` however it is cut (whole, in pieces of a third of a
    chunk, and at ``cuts``), releasing only whole chunks of ``PLAIN`` from its start;
    returns the most plaintext released."""
    released = b""
    for split in ([], list(range(0, len(ct), SEALED_SIZE // 3)), cuts or []):
        plain, err = decrypt_pieces(keys, ct, split, plane, piece=2 * CHUNK_SIZE)
        assert isinstance(err, error), repr(err)
        assert len(plain) % CHUNK_SIZE == 0 and PLAIN.startswith(plain)
        released = max(released, plain, key=len)
    return released


def test_intact_stream_opens(keys: FakeKeys, plane: Plane, ct: bytes) -> None:
    assert len(ct) == HEADER + 5 * SEALED_SIZE + 1000 + TAG_SIZE
    assert decrypt_pieces(keys, ct, [], plane) == (PLAIN, None)


@pytest.mark.parametrize("at", range(0, 5))
def test_bad_magic_is_refused_at_once(keys: FakeKeys, plane: Plane, ct: bytes,
                                      at: int) -> None:
    assert check_refused(keys, plane, flip(ct, at), error=InvalidRequest) == b""
    # garbage is refused from its first wrong byte, without waiting for a header
    _, err = decrypt_pieces(keys, flip(ct, at)[:at + 1], [], plane)
    assert isinstance(err, InvalidRequest)


@pytest.mark.parametrize("at", [5, 6, 7, 8, 9])  # algorithm, chunk size
def test_unknown_parameters_are_invalid(keys: FakeKeys, plane: Plane, ct: bytes,
                                        at: int) -> None:
    assert check_refused(keys, plane, flip(ct, at), error=InvalidRequest) == b""


@pytest.mark.parametrize("at", [10, 17, 25])  # the salt: only the chunk key changes
def test_changed_salt_fails_the_first_chunk(keys: FakeKeys, plane: Plane, ct: bytes,
                                            at: int) -> None:
    assert check_refused(keys, plane, flip(ct, at)) == b""


@pytest.mark.parametrize("at", [26, 27])
def test_changed_wrapped_length(keys: FakeKeys, plane: Plane, ct: bytes, at: int) -> None:
    # a shorter or longer blob: transit refuses or fails it; never plaintext
    assert check_refused(keys, plane, flip(ct, at),
                         error=(InvalidRequest, AuthenticationFailed)) == b""


@pytest.mark.parametrize("at", [FIXED_SIZE + 5, FIXED_SIZE + 20, HEADER - 1])
def test_changed_wrapped_key_fails(keys: FakeKeys, plane: Plane, ct: bytes, at: int) -> None:
    assert check_refused(keys, plane, flip(ct, at)) == b""


def test_changed_key_version_is_rejected(keys: FakeKeys, plane: Plane, ct: bytes) -> None:
    # the blob names version 1; a blob naming another is refused by transit, typed
    assert check_refused(keys, plane, flip(ct, FIXED_SIZE + 1),
                         error=KeyVersionRejected) == b""


def test_oversized_wrapped_length_is_invalid(keys: FakeKeys, plane: Plane, ct: bytes) -> None:
    bad = ct[:26] + (5000).to_bytes(2, "big") + ct[28:]
    assert check_refused(keys, plane, bad, error=InvalidRequest) == b""
    bad = ct[:26] + bytes(2) + ct[28:]
    assert check_refused(keys, plane, bad, error=InvalidRequest) == b""


def test_header_swap_fails(keys: FakeKeys, plane: Plane, ct: bytes) -> None:
    other = encrypt_all(keys, "acme", "files", PLAIN, plane)
    assert check_refused(keys, plane, other[:HEADER] + ct[HEADER:]) == b""


@pytest.mark.parametrize("chunk", range(CHUNKS))
@pytest.mark.parametrize("where", ["first", "middle", "tag"])
def test_changed_chunk_fails(keys: FakeKeys, plane: Plane, ct: bytes, chunk: int,
                             where: str) -> None:
    end = len(ct) if chunk == CHUNKS - 1 else chunk_at(chunk + 1)
    at = {"first": chunk_at(chunk), "middle": (chunk_at(chunk) + end) // 2,
          "tag": end - 3}[where]
    released = check_refused(keys, plane, flip(ct, at))
    assert len(released) <= chunk * CHUNK_SIZE


@pytest.mark.parametrize("a,b", [(0, 1), (1, 3), (3, 4)])
def test_reordered_chunks_fail(keys: FakeKeys, plane: Plane, ct: bytes, a: int,
                               b: int) -> None:
    chunks = [ct[chunk_at(i):chunk_at(i + 1)] for i in range(CHUNKS - 1)]
    chunks[a], chunks[b] = chunks[b], chunks[a]
    bad = ct[:HEADER] + b"".join(chunks) + ct[chunk_at(CHUNKS - 1):]
    assert len(check_refused(keys, plane, bad)) <= a * CHUNK_SIZE


def test_dropped_and_repeated_chunks_fail(keys: FakeKeys, plane: Plane, ct: bytes) -> None:
    dropped = ct[:chunk_at(2)] + ct[chunk_at(3):]
    assert len(check_refused(keys, plane, dropped)) <= 2 * CHUNK_SIZE
    repeated = ct[:chunk_at(3)] + ct[chunk_at(2):]
    assert len(check_refused(keys, plane, repeated)) <= 3 * CHUNK_SIZE


@pytest.mark.parametrize("chunks", range(CHUNKS))
def test_truncated_at_chunk_boundaries(keys: FakeKeys, plane: Plane, ct: bytes,
                                       chunks: int) -> None:
    # no final chunk: whole chunks before the cut may be released, then the error
    released = check_refused(keys, plane, ct[:chunk_at(chunks)])
    assert len(released) <= chunks * CHUNK_SIZE


@pytest.mark.parametrize("cut", [1, TAG_SIZE - 1, TAG_SIZE, TAG_SIZE + 1,
                                 CHUNK_SIZE, SEALED_SIZE - 1])
@pytest.mark.parametrize("chunk", [0, 2, CHUNKS - 1])
def test_truncated_mid_chunk(keys: FakeKeys, plane: Plane, ct: bytes, cut: int,
                             chunk: int) -> None:
    end = min(chunk_at(chunk) + cut, len(ct) - 1)
    assert len(check_refused(keys, plane, ct[:end])) <= chunk * CHUNK_SIZE


@pytest.mark.parametrize("cut", [0, 1, 5, FIXED_SIZE - 1, FIXED_SIZE, HEADER - 1])
def test_truncated_in_header_is_invalid(keys: FakeKeys, plane: Plane, ct: bytes,
                                        cut: int) -> None:
    assert check_refused(keys, plane, ct[:cut], error=InvalidRequest) == b""


@pytest.mark.parametrize("extra", [b"\0", bytes(TAG_SIZE), os.urandom(SEALED_SIZE),
                                   os.urandom(3 * SEALED_SIZE + 5)])
def test_bytes_after_the_final_chunk_fail(keys: FakeKeys, plane: Plane, ct: bytes,
                                          extra: bytes) -> None:
    assert len(check_refused(keys, plane, ct + extra)) <= 5 * CHUNK_SIZE


def test_garbage_after_a_full_final_chunk(keys: FakeKeys, plane: Plane) -> None:
    ct = encrypt_all(keys, "acme", "files", PLAIN[:2 * CHUNK_SIZE], plane)
    _, err = decrypt_pieces(keys, ct + b"x", [], plane)
    assert isinstance(err, AuthenticationFailed)
    _, err = decrypt_pieces(keys, ct + ct[-SEALED_SIZE:], [], plane)  # the final, again
    assert isinstance(err, AuthenticationFailed)


def test_wrong_final_flags_fail(keys: FakeKeys, plane: Plane, ct: bytes) -> None:
    """Chunks a key holder could seal, with the final flag wrong: the last chunk not
    final (a cut the tags cannot see otherwise), or an early chunk final."""
    runs = chunk_runs(keys, ct[:HEADER], plane)
    body = PLAIN[:3 * CHUNK_SIZE]
    unfinished = bytearray(3 * SEALED_SIZE)
    runs.seal_now(body, unfinished, 0, False)
    assert len(check_refused(keys, plane, ct[:HEADER] + bytes(unfinished))) \
        <= 2 * CHUNK_SIZE
    early = bytearray(2 * SEALED_SIZE)
    runs.seal_now(body[:2 * CHUNK_SIZE], early, 0, True)  # chunk 1 final, then more
    assert len(check_refused(keys, plane, ct[:HEADER] + bytes(early)
                             + ct[chunk_at(2):])) <= CHUNK_SIZE
    # an empty final chunk after others: only an empty stream ends with one
    empty = bytearray(TAG_SIZE)
    runs.seal_now(b"", empty, 1, True)
    assert check_refused(keys, plane, ct[:chunk_at(1)] + bytes(empty)) \
        in (b"", PLAIN[:CHUNK_SIZE])


def test_error_sticks(keys: FakeKeys, plane: Plane, ct: bytes) -> None:
    job = StreamDecryptJob(keys, "acme", "files", plane=plane)
    with pytest.raises(AuthenticationFailed) as first:
        job.feed(flip(ct, HEADER + 5))
    with pytest.raises(AuthenticationFailed) as again:
        job.feed(b"more")
    assert again.value is first.value
    with pytest.raises(AuthenticationFailed) as again:
        job.finish()
    assert again.value is first.value
    assert job.buffered == 0


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(at=st.integers(0, 6 * SEALED_SIZE), bit=st.integers(0, 7),
       cuts=st.lists(st.integers(0, 6 * SEALED_SIZE), max_size=8))
def test_any_change_anywhere(keys: FakeKeys, plane: Plane, ct: bytes, at: int, bit: int,
                             cuts: list[int]) -> None:
    at %= len(ct)
    bad = bytearray(ct)
    bad[at] ^= 1 << bit
    plain, err = decrypt_pieces(keys, bytes(bad), cuts, plane, piece=2 * CHUNK_SIZE)
    # a changed header byte may be refused by transit too (a key version it rejects)
    assert isinstance(err, AuthenticationFailed | InvalidRequest | KeyRejected), repr(err)
    assert len(plain) % CHUNK_SIZE == 0 and PLAIN.startswith(plain)
    assert len(plain) <= max(0, at - HEADER) // SEALED_SIZE * CHUNK_SIZE


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(end=st.integers(0, 6 * SEALED_SIZE),
       cuts=st.lists(st.integers(0, 6 * SEALED_SIZE), max_size=8))
def test_any_truncation(keys: FakeKeys, plane: Plane, ct: bytes, end: int,
                        cuts: list[int]) -> None:
    end %= len(ct)
    plain, err = decrypt_pieces(keys, ct[:end], cuts, plane)
    assert isinstance(err, InvalidRequest if end < HEADER else AuthenticationFailed)
    assert len(plain) % CHUNK_SIZE == 0 and PLAIN.startswith(plain)
