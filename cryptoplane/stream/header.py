"""The age v1 header as a sans-I/O codec: bytes in, a ``Header`` out, and back.

    age-encryption.org/v1
    -> X25519 <share>
    <body, base64 without padding, 64 columns, the last line shorter (maybe empty)>
    --- <base64 MAC>

Parsing is strict, as the spec and the test kit require: every base64 string must be the
canonical unpadded encoding, arguments are non-empty runs of visible ASCII, a CR anywhere
is an error. Because of that strictness ``encode(decode(b)) == b`` for every accepted
header, so the MAC can be computed over the re-encoded form, as age itself does.
Nothing here imports I/O: ``HeaderDecoder.feed`` takes whatever bytes arrive.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from .errors import HeaderError

VERSION_LINE = b"age-encryption.org/v1"
_STANZA_PREFIX = b"-> "
_MAC_PREFIX = b"--- "
_COLUMNS = 64
MAC_SIZE = 32
# a hybrid (ML-KEM) stanza's argument is ~1.5 KB; nothing legitimate comes near these
MAX_LINE = 64 * 1024
MAX_HEADER = 16 * 1024 * 1024

_ARG = re.compile(rb"[\x21-\x7e]+")
_B64_CHARS = re.compile(rb"[A-Za-z0-9+/]*")


def b64encode(data: bytes) -> bytes:
    """Standard base64 without padding, as age writes it."""
    return base64.b64encode(data).rstrip(b"=")


def b64decode(text: bytes) -> bytes:
    """Decode canonical unpadded base64; anything else (padding, stray bits, bad
    characters) is a ``HeaderError``."""
    if _B64_CHARS.fullmatch(text) is None or len(text) % 4 == 1:
        raise HeaderError("invalid base64 in the age header")
    try:
        data = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        raise HeaderError("invalid base64 in the age header") from None
    if b64encode(data) != text:  # non-zero unused bits: two encodings of one value
        raise HeaderError("non-canonical base64 in the age header")
    return data


@dataclass(frozen=True)
class Stanza:
    """One recipient stanza: a type, its arguments and an opaque body."""

    type: str
    args: tuple[str, ...]
    body: bytes

    def __post_init__(self) -> None:
        for word in (self.type, *self.args):
            if not word or any(not "\x21" <= c <= "\x7e" for c in word):
                raise HeaderError("a stanza type or argument is empty or not visible ASCII")

    def encode(self) -> bytes:
        words = b" ".join(w.encode("ascii") for w in (self.type, *self.args))
        body = b64encode(self.body)
        lines = [body[i : i + _COLUMNS] for i in range(0, len(body), _COLUMNS)]
        if not lines or len(lines[-1]) == _COLUMNS:
            lines.append(b"")  # the body always ends with a short line, even an empty one
        return _STANZA_PREFIX + words + b"\n" + b"".join(line + b"\n" for line in lines)

    def __repr__(self) -> str:  # bodies are wrapped keys: show their size only
        return f"Stanza(type={self.type!r}, args={self.args!r}, body=<{len(self.body)} bytes>)"


@dataclass(frozen=True)
class Header:
    """A parsed header: its stanzas and its MAC (``b""`` before the MAC is computed)."""

    stanzas: tuple[Stanza, ...]
    mac: bytes = b""

    def encode_for_mac(self) -> bytes:
        """The bytes the header MAC covers: everything up to and including ``---``."""
        return VERSION_LINE + b"\n" + b"".join(s.encode() for s in self.stanzas) + b"---"

    def encode(self) -> bytes:
        if len(self.mac) != MAC_SIZE:
            raise HeaderError("the header has no MAC yet")
        return self.encode_for_mac() + b" " + b64encode(self.mac) + b"\n"


class HeaderDecoder:
    """Incremental header parser: ``feed`` bytes until it returns a ``Header``; the
    bytes after the header (the payload's start) are then in ``rest``."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._seen = 0
        self._state = "version"
        self._stanzas: list[Stanza] = []
        self._words: list[str] = []
        self._body: list[bytes] = []
        self.header: Header | None = None
        self.rest = b""

    def feed(self, data: bytes) -> Header | None:
        """Consume ``data``; return the header once its MAC line has been read."""
        if self.header is not None:
            self.rest += bytes(data)
            return self.header
        self._buf += data
        while self.header is None:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > MAX_LINE:
                    raise HeaderError("a header line is too long")
                return None
            line = bytes(self._buf[:end])
            del self._buf[: end + 1]
            self._seen += end + 1
            if self._seen > MAX_HEADER:
                raise HeaderError("the age header is too large")
            self._line(line)
        self.rest = bytes(self._buf)
        self._buf.clear()
        return self.header

    def eof(self) -> None:
        """The input ended: an error unless the header was complete."""
        if self.header is None:
            raise HeaderError("the input ended inside the age header")

    def _line(self, line: bytes) -> None:
        if any(c < 0x20 or c > 0x7E for c in line):  # CR, tabs, NUL, non-ASCII
            raise HeaderError("a header line holds a control or non-ASCII character")
        if self._state == "version":
            if line != VERSION_LINE:
                raise HeaderError("not an age v1 file (bad or unsupported version line)")
            self._state = "stanza"
        elif self._state == "body":
            if len(line) > _COLUMNS:
                raise HeaderError("a stanza body line is longer than 64 columns")
            if _B64_CHARS.fullmatch(line) is None:
                raise HeaderError("a stanza body line is not base64")
            self._body.append(line)
            if len(line) < _COLUMNS:
                body = b64decode(b"".join(self._body))
                self._stanzas.append(Stanza(self._words[0], tuple(self._words[1:]), body))
                self._state = "stanza"
        elif line.startswith(_STANZA_PREFIX):
            words = line[len(_STANZA_PREFIX) :].split(b" ")
            if not all(_ARG.fullmatch(w) for w in words):
                raise HeaderError("a stanza has an empty or invalid argument")
            self._words = [w.decode("ascii") for w in words]
            self._body = []
            self._state = "body"
        elif line.startswith(_MAC_PREFIX):
            if not self._stanzas:
                raise HeaderError("the age header has no recipient stanza")
            mac = b64decode(line[len(_MAC_PREFIX) :])
            if len(mac) != MAC_SIZE:
                raise HeaderError("the header MAC is not 32 bytes")
            self.header = Header(tuple(self._stanzas), mac)
        else:
            raise HeaderError("a header line is neither a stanza nor the MAC line")


def decode_header(data: bytes) -> tuple[Header, bytes]:
    """Parse a header from ``data`` whole; return it and the bytes that follow it."""
    decoder = HeaderDecoder()
    header = decoder.feed(data)
    if header is None:
        decoder.eof()
        raise AssertionError("unreachable")
    return header, decoder.rest


__all__ = ["Header", "HeaderDecoder", "Stanza", "b64decode", "b64encode", "decode_header"]
