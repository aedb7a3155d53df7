"""Random access into an age file: a read-only, seekable file object that decrypts only
the chunks a read touches.

The file's length fixes where every chunk starts and which one is final; the final
chunk is opened (with the final flag) when the reader opens, so a truncated or extended
file fails at once, before any plaintext is returned, even though later reads open
single chunks. Armored files cannot be read this way (their offsets do not map).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from typing import Any

from cryptoplane.exceptions import InvalidRequest

from . import payload as _payload
from ._io import is_path, read_some
from .api import as_identities, open_file_key, read_header
from .armor import looks_armored
from .errors import EmptyFinalChunk, HeaderError, Truncated
from .recipients import MAX_WORK_FACTOR, NONCE_SIZE, Identity, payload_key

_TAG = 16
_SEALED = _payload.CHUNK_SIZE + _TAG


class SeekableReader(io.RawIOBase):
    """``SeekableReader(src, identities, passphrase=...)``: ``src`` is a path or a
    seekable binary file; ``read``/``readinto``/``seek``/``tell`` give the plaintext."""

    def __init__(self, src: Any, identities: Iterable[Identity | str] = (), *,
                 passphrase: str | bytes | None = None,
                 max_work_factor: int = MAX_WORK_FACTOR) -> None:
        super().__init__()
        keys = as_identities(identities, passphrase, max_work_factor)
        self._owned = is_path(src)
        self._f: Any = open(src, "rb") if self._owned else src  # noqa: SIM115
        self._pos = 0
        self._size = 0
        self._cached: tuple[int, bytes] | None = None
        try:
            self._open(keys)
        except BaseException:
            if self._owned:
                self._f.close()
            raise

    def _open(self, keys: list[Identity]) -> None:
        f = self._f
        if not f.seekable():
            raise InvalidRequest("a SeekableReader needs a seekable file")
        start = f.tell()
        if looks_armored(read_some(f, 64)):
            raise InvalidRequest("an armored file cannot be read by offset: use decrypt()")
        f.seek(start)
        header, _ = read_header(f)
        file_key = open_file_key(header, keys)
        nonce_at = start + len(header.encode())
        f.seek(nonce_at)
        nonce = read_some(f, NONCE_SIZE)
        if len(nonce) < NONCE_SIZE:
            raise HeaderError("the file ends before the 16-byte payload nonce")
        self._runs = _payload.chunk_opener(payload_key(file_key, nonce))
        self._base = nonce_at + NONCE_SIZE
        length = f.seek(0, os.SEEK_END) - self._base
        if length <= 0:
            raise Truncated("the payload has no chunk")
        self._chunks = -(-length // _SEALED)
        last = length - (self._chunks - 1) * _SEALED
        if last < _TAG:
            raise Truncated(f"the payload's last chunk is {last} bytes, shorter than its tag")
        if last == _TAG and self._chunks > 1:
            raise EmptyFinalChunk("the payload's final chunk is empty")
        self._size = length - _TAG * self._chunks
        self._chunk(self._chunks - 1)  # authenticates the end: truncation shows here

    @property
    def size(self) -> int:
        """The plaintext's length."""
        return self._size

    def _chunk(self, index: int) -> bytes:
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        self._f.seek(self._base + index * _SEALED)
        final = index == self._chunks - 1
        sealed = read_some(self._f, _SEALED)
        plain = _payload.open_chunk(self._runs, sealed, index, final=final)
        self._cached = (index, plain)
        return plain

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base: int = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self._pos < self._size:
            index, within = divmod(self._pos, _payload.CHUNK_SIZE)
            plain = self._chunk(index)
            n = min(len(view) - done, len(plain) - within)
            view[done : done + n] = plain[within : within + n]
            done += n
            self._pos += n
        return done

    def close(self) -> None:
        if self._owned and not self.closed:
            self._f.close()
        self._cached = None
        super().close()

    def __repr__(self) -> str:
        return f"<SeekableReader size={self._size} pos={self._pos}>"


__all__ = ["SeekableReader"]
