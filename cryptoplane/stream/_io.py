"""The small file-object adapters the stream API stands on: a reader that replays bytes
already read, armor as a reader and a writer, and atomic output files."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
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


def _refuse(target: Path) -> FileExistsError:
    return FileExistsError(errno.EEXIST, "exists; not replacing it", str(target))


def refuse_existing(path: PathLike) -> None:
    """FileExistsError if ``path`` names a file that an output without overwrite would
    refuse (a FIFO or device is written as a stream, so it is not refused)."""
    if os.path.lexists(path) and not _is_special(path):
        raise _refuse(Path(path))


def _mode_to_keep(target: Path, overwrite: bool) -> int | None:
    """The permission bits of the file that ``target`` names, to give its replacement;
    None if there is none. Refuses an existing ``target`` unless ``overwrite``."""
    if not os.path.lexists(target):
        return None
    if not overwrite:
        raise _refuse(target)
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:  # a dangling link: replaced, with the default mode
        return None


def _put_in_place(tmp: Path, target: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)  # unlike a rename, refuses a target made since we looked
    except FileExistsError:
        raise _refuse(target) from None
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        if os.path.lexists(target):  # without hard links, as close as it gets
            raise _refuse(target) from None
        os.replace(tmp, target)
        return
    os.unlink(tmp)


_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK}


@contextlib.contextmanager
def atomic_output(path: PathLike, *, overwrite: bool = True) -> Iterator[IO[bytes]]:
    """A temporary file beside ``path``, put in place as ``path`` only when the block
    succeeds (after an fsync); on any error or interruption (KeyboardInterrupt, a signal
    handler's exception) it is removed and ``path`` is left as it was.

    A new file has mode 0600; a replaced one's permission bits carry over (a rename: hard
    links to the old file keep the old contents). Without ``overwrite`` an existing
    ``path`` is a ``FileExistsError``, before the block runs and again, atomically, when
    the file would be put in place."""
    target = Path(path)
    mode = _mode_to_keep(target, overwrite)
    # our pid and fresh randomness in the name: a file by that name can only be ours,
    # so it is removed even if the interruption came between its creation and this frame
    # learning of it
    tmp = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            if mode is not None:
                os.fchmod(out.fileno(), mode)
            yield out
            out.flush()
            os.fsync(out.fileno())
        _put_in_place(tmp, target, overwrite)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _is_special(path: PathLike) -> bool:
    """Whether ``path`` names something written in place, as a stream: a FIFO, a
    terminal, /dev/null, a socket (never renamed over: that would replace the node)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode)


@contextlib.contextmanager
def opened(obj: Any, mode: str, *, overwrite: bool = True) -> Iterator[Any]:
    """``obj`` itself if it is a file object; the opened file if it is a path (reading)
    or an atomic output (writing; a FIFO or device path is written as a stream)."""
    if not is_path(obj):
        yield obj
    elif mode == "rb":
        with open(obj, "rb") as f:
            yield f
    elif _is_special(obj):
        with open(obj, "wb") as f:
            yield f
    else:
        with atomic_output(obj, overwrite=overwrite) as f:
            yield f
