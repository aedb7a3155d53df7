"""The small file-object adapters the stream API stands on: a reader that replays bytes
already read, armor as a reader and a writer, and atomic output files."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .armor import ArmorDecoder, ArmorEncoder

BLOCK = 1 << 20
PathLike = str | os.PathLike[str]


def is_path(obj: object) -> bool:
    return isinstance(obj, str | os.PathLike)


def read_some(src: Any, size: int) -> bytes:
    """One ``read`` of at most ``size`` bytes (``b""`` at EOF)."""
    data = src.read(size)
    return b"" if data is None else bytes(data)


class Prefixed:
    """A reader that yields ``prefix`` first, then what ``src`` yields."""

    def __init__(self, prefix: bytes, src: Any) -> None:
        self._prefix = memoryview(prefix)
        self._src = src

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        if self._prefix:
            n = min(len(view), len(self._prefix))
            view[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        readinto = getattr(self._src, "readinto", None)
        if readinto is not None:
            got = readinto(view)
            return 0 if got is None else int(got)
        data = read_some(self._src, len(view))
        view[: len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            parts = []
            while chunk := self.read(BLOCK):
                parts.append(chunk)
            return b"".join(parts)
        buf = bytearray(size)
        n = self.readinto(buf)
        return bytes(buf[:n])


class ArmorReader:
    """Decodes armored text from ``src`` as it is read; holds one block at most."""

    def __init__(self, src: Any, block: int = BLOCK) -> None:
        self._src = src
        self._decoder = ArmorDecoder()
        self._out = b""
        self._eof = False
        self._block = block

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = 1 << 62
        while not self._out and not self._eof:
            text = read_some(self._src, self._block)
            if text:
                self._out = self._decoder.feed(text)
            else:
                self._eof = True
                self._out = self._decoder.finish()
        out, self._out = self._out[:size], self._out[size:]
        return out

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)


class ArmorWriter:
    """Armors what is written to it into ``dst``; ``close`` writes the END line (and
    does not close ``dst``)."""

    def __init__(self, dst: Any) -> None:
        self._dst = dst
        self._encoder = ArmorEncoder()

    def write(self, data: Any) -> int:
        self._dst.write(self._encoder.update(bytes(data)))
        return len(data)

    def close(self) -> None:
        self._dst.write(self._encoder.finish())


@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[IO[bytes]]:
    """A temporary file beside ``path``, renamed onto it only when the block succeeds
    (after an fsync); on any error it is removed and ``path`` is left as it was."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp",
                               dir=target.parent or ".")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def opened(obj: Any, mode: str) -> Iterator[Any]:
    """``obj`` itself if it is a file object; the opened file if it is a path (reading)
    or an atomic output (writing)."""
    if not is_path(obj):
        yield obj
    elif mode == "rb":
        with open(obj, "rb") as f:
            yield f
    else:
        with atomic_output(obj) as f:
            yield f
