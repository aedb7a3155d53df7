"""The sans-I/O codecs alone: header and armor, fuzzed with hypothesis (only their own
error may escape, whole or byte by byte) and round-tripped; Bech32 known answers."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cryptoplane.exceptions import KeyRejected
from cryptoplane.stream import bech32
from cryptoplane.stream.armor import BEGIN, END, ArmorDecoder, ArmorEncoder
from cryptoplane.stream.errors import ArmorError, HeaderError
from cryptoplane.stream.header import Header, HeaderDecoder, Stanza, decode_header

FAST = settings(max_examples=150, deadline=None)

words = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1,
                max_size=12)
stanzas = st.builds(Stanza, words, st.lists(words, max_size=3).map(tuple),
                    st.binary(max_size=200))
headers = st.builds(Header, st.lists(stanzas, min_size=1, max_size=4).map(tuple),
                    st.binary(min_size=32, max_size=32))


@FAST
@given(headers, st.binary(max_size=40))
def test_header_round_trip(header: Header, payload: bytes) -> None:
    encoded = header.encode()
    parsed, rest = decode_header(encoded + payload)
    assert parsed == header and rest == payload
    decoder = HeaderDecoder()
    got = None
    for i in range(len(encoded)):
        assert got is None
        got = decoder.feed(encoded[i : i + 1])
    assert got == header and decoder.rest == b""


def _parse_all(data: bytes) -> None:
    with contextlib.suppress(HeaderError):
        decode_header(data)
    decoder = HeaderDecoder()
    try:
        for i in range(len(data)):
            if decoder.feed(data[i : i + 1]) is not None:
                break
        else:
            decoder.eof()
    except HeaderError:
        pass


@FAST
@given(st.binary(max_size=300))
def test_header_arbitrary_bytes(data: bytes) -> None:
    _parse_all(data)
    _parse_all(b"age-encryption.org/v1\n" + data)


@FAST
@given(headers, st.integers(0, 10_000), st.integers(0, 255))
def test_header_mutations(header: Header, pos: int, value: int) -> None:
    blob = bytearray(header.encode())
    blob[pos % len(blob)] = value
    _parse_all(bytes(blob))


@pytest.mark.parametrize("bad", [
    b"age-encryption.org/v1\n-> X25519 abc\n" + b"A" * 64 + b"\n--- " + b"A" * 43 + b"\n",
    b"age-encryption.org/v1\n-> X\n\n---  " + b"A" * 43 + b"\n",  # two spaces
    b"age-encryption.org/v1\n-> X\n\n--- " + b"A" * 42 + b"B\n",  # non-canonical MAC
    b"age-encryption.org/v1\n-> X\nAA==\n--- " + b"A" * 43 + b"\n",  # padding
    b"age-encryption.org/v1\r\n-> X\n\n--- " + b"A" * 43 + b"\n",  # CRLF
    b"age-encryption.org/v1\n--- " + b"A" * 43 + b"\n",  # no stanza
    b"age-encryption.org/v1\n->  X\n\n--- " + b"A" * 43 + b"\n",  # empty argument
])
def test_header_rejects(bad: bytes) -> None:
    with pytest.raises(HeaderError):
        decode_header(bad)


def test_header_canonical_form() -> None:
    header = Header((Stanza("X25519", ("abc",), bytes(48)),), bytes(32))
    body = b"A" * 64
    assert header.encode() == (b"age-encryption.org/v1\n-> X25519 abc\n" + body + b"\n\n--- "
                               + b"A" * 43 + b"\n")
    assert "bytes" in repr(header.stanzas[0]) and "AAAA" not in repr(header.stanzas[0])


def _armor(data: bytes, piece: int) -> bytes:
    enc = ArmorEncoder()
    out = b"".join(enc.update(data[i : i + piece]) for i in range(0, len(data), piece))
    return out + enc.update(b"") + enc.finish()


def _dearmor(text: bytes, piece: int) -> bytes:
    dec = ArmorDecoder()
    out = b"".join(dec.feed(text[i : i + piece]) for i in range(0, len(text), piece))
    return out + dec.finish()


@FAST
@given(st.binary(max_size=500), st.integers(1, 200), st.booleans(),
       st.sampled_from([b"", b" \n", b"\r\n\t "]))
def test_armor_round_trip(data: bytes, piece: int, crlf: bool, space: bytes) -> None:
    text = _armor(data, piece)
    lines = text.split(b"\n")
    assert lines[0] == BEGIN and lines[-2] == END
    assert (all(len(ln) == 64 for ln in lines[1:-3]) and 0 < len(lines[-3]) <= 64) or not data
    if crlf:
        text = text.replace(b"\n", b"\r\n")
    text = space + text + space
    assert _dearmor(text, piece) == data
    assert _dearmor(text, 1) == data


def _dearmor_or_error(text: bytes, piece: int) -> None:
    with contextlib.suppress(ArmorError):
        _dearmor(text, piece)


@FAST
@given(st.binary(max_size=300), st.integers(1, 50))
def test_armor_arbitrary_bytes(data: bytes, piece: int) -> None:
    _dearmor_or_error(data, piece)
    _dearmor_or_error(BEGIN + b"\n" + data, piece)


@FAST
@given(st.binary(min_size=1, max_size=300), st.integers(0, 10_000), st.integers(0, 255),
       st.integers(1, 50))
def test_armor_mutations(data: bytes, pos: int, value: int, piece: int) -> None:
    text = bytearray(_armor(data, 64))
    text[pos % len(text)] = value
    _dearmor_or_error(bytes(text), piece)


def test_armor_large_is_streamed() -> None:
    data = bytes(range(256)) * 4096  # 1 MiB: goes through the fast path
    text = _armor(data, 65536)
    dec = ArmorDecoder()
    out = bytearray()
    for i in range(0, len(text), 4096):
        part = dec.feed(text[i : i + 4096])
        assert len(part) <= 4096
        out += part
    out += dec.finish()
    assert bytes(out) == data


def test_bech32_known_answers() -> None:
    # BIP 173's valid test strings; mixed case is invalid
    assert bech32.decode("A12UEL5L") == ("a", b"")
    assert bech32.decode("a12uel5l") == ("a", b"")
    assert bech32.encode("a", b"") == "a12uel5l"
    for bad in ("A12uEL5L", "a12uel5m", "1qzzfhee", "a1"):
        with pytest.raises(KeyRejected):
            bech32.decode(bad)


@FAST
@given(st.sampled_from(["age", "age-secret-key-"]), st.binary(max_size=64))
def test_bech32_round_trip(hrp: str, data: bytes) -> None:
    text = bech32.encode(hrp, data)
    assert bech32.decode(text) == (hrp, data)
    assert bech32.decode(text.upper()) == (hrp, data)
    with pytest.raises(KeyRejected):
        bech32.decode(text[:-1] + ("q" if text[-1] != "q" else "p"))
