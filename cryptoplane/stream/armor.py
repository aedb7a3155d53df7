"""age's ASCII armor as a streaming sans-I/O codec.

    -----BEGIN AGE ENCRYPTED FILE-----
    <strict, padded base64 in lines of exactly 64 columns; the last line 1..64>
    -----END AGE ENCRYPTED FILE-----

Decoding is as strict as the spec and the test kit: canonical base64, no headers, no
blank or whitespace-padded lines, no short line but the last; LF or CRLF line ends;
whitespace (only) before the BEGIN line and after the END line. Neither side holds the
file: each ``feed``/``update`` returns what it can and keeps at most one line.
"""

from __future__ import annotations

import base64
import binascii
import re

from .errors import ArmorError

BEGIN = b"-----BEGIN AGE ENCRYPTED FILE-----"
END = b"-----END AGE ENCRYPTED FILE-----"
_COLUMNS = 64
_LINE_BYTES = 48
_WHITESPACE = b" \t\r\n"
_LAST_LINE = re.compile(rb"[A-Za-z0-9+/]*={0,2}")


def looks_armored(prefix: bytes) -> bool | None:
    """Whether an input starting with ``prefix`` is armored; None while ``prefix`` is
    only whitespace (more bytes are needed to tell)."""
    stripped = prefix.lstrip(_WHITESPACE)
    if not stripped:
        return None
    return stripped.startswith(b"-")


class ArmorEncoder:
    """``update(data) -> text`` then ``finish() -> text``: the armored form."""

    def __init__(self) -> None:
        self._pending = bytearray()
        self._started = False

    def update(self, data: bytes) -> bytes:
        out = b""
        if not self._started:
            self._started = True
            out = BEGIN + b"\n"
        self._pending += data
        whole = len(self._pending) // _LINE_BYTES * _LINE_BYTES
        if whole == len(self._pending) and whole:
            whole -= _LINE_BYTES  # keep the last full line: it may be the file's last
        if whole <= 0:
            return out
        encoded = base64.b64encode(bytes(self._pending[:whole]))
        del self._pending[:whole]
        lines = [encoded[i : i + _COLUMNS] for i in range(0, len(encoded), _COLUMNS)]
        return out + b"\n".join(lines) + b"\n"

    def finish(self) -> bytes:
        out = self.update(b"")
        if self._pending:
            out += base64.b64encode(bytes(self._pending)) + b"\n"
            self._pending.clear()
        return out + END + b"\n"


class ArmorDecoder:
    """``feed(text) -> data`` as lines complete, then ``finish()`` at end of input."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._state = "lead"  # lead -> begin -> body -> trail
        self._short_seen = False  # a line shorter than 64: only END may follow

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        out = bytearray()
        if self._state == "lead":
            stripped = bytes(self._buf).lstrip(_WHITESPACE)
            if not stripped:
                self._buf.clear()
                return b""
            self._buf = bytearray(stripped)
            self._state = "begin"
        if self._state == "begin":
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > len(BEGIN) + 1:
                    raise ArmorError("the armor does not start with the BEGIN line")
                return b""
            if _chomp(bytes(self._buf[:end])) != BEGIN:
                raise ArmorError("the armor does not start with the BEGIN line")
            del self._buf[: end + 1]
            self._state = "body"
        if self._state == "body":
            out += self._body()
        if self._state == "trail" and self._buf.strip(_WHITESPACE):
            raise ArmorError("there is data after the armor's END line")
        if self._state == "trail":
            self._buf.clear()
        return bytes(out)

    def finish(self) -> bytes:
        out = b""
        if self._state == "body" and _chomp(bytes(self._buf)) == END:
            self._buf.clear()  # END with no end of line, at the very end
            self._state = "trail"
        if self._state != "trail":
            raise ArmorError("the armor ends without its END line")
        return out

    def _body(self) -> bytes:
        last = self._buf.rfind(b"\n")
        if last < 0:
            if len(self._buf) > _COLUMNS + 1:
                raise ArmorError("an armor line is longer than 64 columns")
            return b""
        block = bytes(self._buf[: last + 1]).replace(b"\r\n", b"\n")
        lines = len(block) // (_COLUMNS + 1)
        # fast path: a run of full lines, checked and decoded with C-speed operations
        if (
            not self._short_seen
            and len(block) == lines * (_COLUMNS + 1)
            and block.count(b"\n") == lines
            and block[_COLUMNS :: _COLUMNS + 1] == b"\n" * lines
            and b"=" not in block
        ):
            try:
                data = base64.b64decode(block.replace(b"\n", b""), validate=True)
            except binascii.Error:
                raise ArmorError("an armor line holds a character outside base64") from None
            del self._buf[: last + 1]
            return data
        out = bytearray()
        for raw in bytes(self._buf[: last + 1]).split(b"\n")[:-1]:
            line = _chomp(raw)
            del self._buf[: len(raw) + 1]
            if self._state == "trail":
                if line.strip(_WHITESPACE):
                    raise ArmorError("there is data after the armor's END line")
                continue
            if line == END:
                self._state = "trail"
                continue
            out += self._line(line)
        return bytes(out)

    def _line(self, line: bytes) -> bytes:
        if self._short_seen:
            raise ArmorError("an armor line follows the short last line")
        if not line:
            raise ArmorError("the armor has an empty line")
        if len(line) > _COLUMNS:
            raise ArmorError("an armor line is longer than 64 columns")
        if len(line) < _COLUMNS or line.endswith(b"="):
            self._short_seen = True
        if _LAST_LINE.fullmatch(line) is None or len(line) % 4:
            raise ArmorError("an armor line is not canonical padded base64")
        try:
            data = base64.b64decode(line, validate=True)
        except binascii.Error:
            raise ArmorError("an armor line is not canonical padded base64") from None
        if base64.b64encode(data) != line:
            raise ArmorError("an armor line is not canonical base64")
        return data


def _chomp(line: bytes) -> bytes:
    return line[:-1] if line.endswith(b"\r") else line


__all__ = ["BEGIN", "END", "ArmorDecoder", "ArmorEncoder", "looks_armored"]
