"""The fixed-size text fields of LUKS binary headers (LUKS1's cipher name, mode, hash
and UUID; LUKS2's label, subsystem, checksum algorithm and UUID): NUL-terminated, padded
with NULs, in ASCII (LUKS1) or UTF-8 (LUKS2). Sans-I/O, shared by both codecs."""

from __future__ import annotations

from cryptoplane.volume.errors import CorruptHeader


def read_text(raw: bytes, what: str, encoding: str) -> str:
    """The text before the first NUL of a field; ``what`` names it in errors ("LUKS2
    label")."""
    try:
        return raw.split(b"\0", 1)[0].decode(encoding)
    except UnicodeDecodeError:
        raise CorruptHeader(f"{what} is not {encoding.upper()}") from None


def write_text(text: str, size: int, what: str, encoding: str) -> bytes:
    """``text`` in a ``size``-byte field: at most ``size - 1`` bytes, so that a NUL ends
    it, as cryptsetup reads it."""
    try:
        raw = text.encode(encoding)
    except UnicodeEncodeError:
        raise CorruptHeader(f"{what} {text!r} is not {encoding.upper()}") from None
    if len(raw) >= size:
        raise CorruptHeader(f"{what} {text!r} is longer than {size - 1} bytes")
    return raw.ljust(size, b"\0")
