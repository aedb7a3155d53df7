"""Attacks on age files: each ends in a typed error, and decrypting to a path leaves no
file behind; to a stream, only an authenticated prefix of the plaintext comes out."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryptoplane.stream import (
    ChunkTampered,
    EmptyFinalChunk,
    HeaderError,
    HeaderMacMismatch,
    NoIdentityMatched,
    PayloadError,
    TrailingData,
    Truncated,
    X25519Identity,
    decrypt,
    encrypt,
)
from cryptoplane.stream.header import Header, Stanza, decode_header
from cryptoplane.stream.recipients import build_header, payload_key

C = 65536
S = C + 16
ANY = (HeaderError, NoIdentityMatched, HeaderMacMismatch, PayloadError)
IDENT = X25519Identity.generate()
PLAIN = os.urandom(3 * C + 100)


def _sealed(plain: bytes = PLAIN) -> bytes:
    out = io.BytesIO()
    encrypt(io.BytesIO(plain), out, [IDENT.recipient], workers=1)
    return out.getvalue()


FILE = _sealed()
HEADER, _REST = decode_header(FILE)
START = len(HEADER.encode()) + 16  # the first chunk
CHUNKS = [FILE[START + i * S : START + (i + 1) * S] for i in range(4)]


def attempt(tmp_path: Path, blob: bytes, error: type[Exception] | tuple[type[Exception], ...],
            identities: list[X25519Identity] | None = None) -> bytes:
    """Decrypt ``blob`` to a path (nothing may remain) and to a stream (returned)."""
    keys = identities or [IDENT]
    (tmp_path / "in").write_bytes(blob)
    with pytest.raises(error):
        decrypt(tmp_path / "in", tmp_path / "out", keys, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    out = io.BytesIO()
    with pytest.raises(error):
        decrypt(io.BytesIO(blob), out, keys, workers=1)
    assert PLAIN.startswith(out.getvalue())
    return out.getvalue()


@pytest.mark.parametrize("cut", [
    0, 1, START - 16, START - 1, START, START + 1, START + S - 1, START + S, START + S + 1,
    START + 2 * S, START + 3 * S, START + 3 * S + 15, len(FILE) - 1,
])
def test_truncation(tmp_path: Path, cut: int) -> None:
    attempt(tmp_path, FILE[:cut], (HeaderError, PayloadError))


@pytest.mark.parametrize("k", range(3))
def test_truncation_at_a_chunk_boundary_is_truncated(tmp_path: Path, k: int) -> None:
    got = attempt(tmp_path, FILE[: START + (k + 1) * S], Truncated)
    assert got == PLAIN[: (k + 1) * C]


def _with_chunks(chunks: list[bytes]) -> bytes:
    return FILE[:START] + b"".join(chunks)


@pytest.mark.parametrize("name,chunks", [
    ("drop first", CHUNKS[1:]),
    ("drop second", [CHUNKS[0], *CHUNKS[2:]]),
    ("duplicate", [CHUNKS[0], CHUNKS[0], *CHUNKS[1:]]),
    ("swap", [CHUNKS[1], CHUNKS[0], *CHUNKS[2:]]),
    ("swap last two full", [CHUNKS[0], CHUNKS[2], CHUNKS[1], CHUNKS[3]]),
    ("final moved first", [CHUNKS[3], *CHUNKS[:3]]),
])
def test_chunk_surgery(tmp_path: Path, name: str, chunks: list[bytes]) -> None:
    attempt(tmp_path, _with_chunks(chunks), ChunkTampered)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_flipped_bit(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    small = SMALL
    pos = data.draw(st.integers(0, len(small) - 1))
    bit = data.draw(st.integers(0, 7))
    blob = bytearray(small)
    blob[pos] ^= 1 << bit
    tmp = tmp_path_factory.mktemp("flip")
    with pytest.raises(ANY):
        decrypt(io.BytesIO(bytes(blob)), io.BytesIO(), [IDENT], workers=1)
    (tmp / "in").write_bytes(bytes(blob))
    with pytest.raises(ANY):
        decrypt(tmp / "in", tmp / "out", [IDENT], workers=1)
    assert not (tmp / "out").exists() and len(list(tmp.iterdir())) == 1


SMALL = _sealed(PLAIN[: C + 50])


def test_wrong_key_and_passphrase(tmp_path: Path) -> None:
    attempt(tmp_path, FILE, NoIdentityMatched, [X25519Identity.generate()])
    enc = io.BytesIO()
    encrypt(io.BytesIO(b"secret"), enc, passphrase="right", work_factor=4)
    with pytest.raises(NoIdentityMatched):
        decrypt(io.BytesIO(enc.getvalue()), io.BytesIO(), passphrase="wrong")
    with pytest.raises(NoIdentityMatched):  # a key for a passphrase file
        decrypt(io.BytesIO(enc.getvalue()), io.BytesIO(), [IDENT])


def _reheadered(header: Header) -> bytes:
    return header.encode() + FILE[len(HEADER.encode()) :]


def test_header_mac_mismatch(tmp_path: Path) -> None:
    flipped = bytes([HEADER.mac[0] ^ 1]) + HEADER.mac[1:]
    attempt(tmp_path, _reheadered(Header(HEADER.stanzas, flipped)), HeaderMacMismatch)
    greased = Header((*HEADER.stanzas, Stanza("grease", ("x",), b"y")), HEADER.mac)
    attempt(tmp_path, _reheadered(greased), HeaderMacMismatch)


def _stream(chunks: list[tuple[bytes, bool]]) -> bytes:
    """A file whose STREAM is built by hand: (plaintext, final) per chunk."""
    file_key = os.urandom(16)
    nonce = os.urandom(16)
    aead = ChaCha20Poly1305(payload_key(file_key, nonce))
    body = b"".join(
        aead.encrypt(i.to_bytes(11, "big") + bytes([final]), plain, None)
        for i, (plain, final) in enumerate(chunks)
    )
    return build_header([IDENT.recipient], file_key).encode() + nonce + body


def test_hand_built_stream_is_accepted(tmp_path: Path) -> None:
    out = io.BytesIO()
    decrypt(io.BytesIO(_stream([(PLAIN[:C], False), (PLAIN[C : C + 9], True)])), out, [IDENT])
    assert out.getvalue() == PLAIN[: C + 9]


def test_empty_final_chunk(tmp_path: Path) -> None:
    got = attempt(tmp_path, _stream([(PLAIN[:C], False), (b"", True)]), EmptyFinalChunk)
    assert got in (b"", PLAIN[:C])
    out = io.BytesIO()  # only an empty payload may end with an empty chunk
    decrypt(io.BytesIO(_stream([(b"", True)])), out, [IDENT])
    assert out.getvalue() == b""


def test_final_chunk_not_last(tmp_path: Path) -> None:
    attempt(tmp_path, _stream([(PLAIN[:C], True), (PLAIN[C : C + 5], True)]), PayloadError)


def test_trailing_data(tmp_path: Path) -> None:
    full = _stream([(PLAIN[:C], False), (PLAIN[C : 2 * C], True)])
    attempt(tmp_path, full + b"x", TrailingData)
    attempt(tmp_path, FILE + b"garbage", PayloadError)
