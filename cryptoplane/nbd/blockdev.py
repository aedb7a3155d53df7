"""What the NBD server exports: a block device, and the plain file that is the simplest one.

A ``BlockDevice`` is byte-addressed (the server checks ranges and alignment before it
calls), safe to call from several threads at once, and raises ``cp.CryptoplaneError``
subclasses (or ``OSError``) for what goes wrong. ``Volume`` (an opened LUKS volume) is the
encrypted one; ``FileDevice`` serves an image file as it is (the unencrypted baseline of
the volume benchmark).
"""

from __future__ import annotations

import os
from typing import Any, Protocol, runtime_checkable

from cryptoplane.exceptions import InvalidRequest


@runtime_checkable
class BlockDevice(Protocol):
    """The interface an NBD export serves."""

    @property
    def size(self) -> int:
        """Bytes the device exports."""
        ...

    @property
    def read_only(self) -> bool: ...

    @property
    def block_size(self) -> int:
        """The preferred (and minimum efficient) I/O size: the sector size for volumes."""
        ...

    def pread(self, offset: int, length: int) -> bytes | bytearray | memoryview: ...

    def preadinto(self, offset: int, buf: Any) -> None:
        """Fill the writable buffer ``buf`` (``len(buf)`` bytes) from ``offset``."""
        ...

    def pwrite(self, offset: int, data: Any, *, fua: bool = False) -> None:
        """Write ``data``; with ``fua`` it is durable before this returns."""
        ...

    def flush(self) -> None:
        """Every completed write is durable when this returns."""
        ...

    def trim(self, offset: int, length: int) -> None:
        """The range's contents may be discarded (a hint: reads may return anything)."""
        ...

    def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        """The range reads back as zeros afterwards."""
        ...

    def close(self) -> None: ...


def pread_full(fd: int, pos: int, view: memoryview) -> None:
    """Fill ``view`` from ``fd`` at ``pos``, however many reads that takes; a file that
    ends first is a typed error (it shrank under us), never a short buffer."""
    done, n = 0, len(view)
    while done < n:
        got = os.preadv(fd, [view[done:]], pos + done)
        if got == 0:
            raise InvalidRequest(f"short read at byte {pos + done}: the file or device "
                                 "shrank")
        done += got


def pwrite_full(fd: int, pos: int, view: memoryview) -> None:
    """Write all of ``view`` to ``fd`` at ``pos``, however many writes that takes."""
    done, n = 0, len(view)
    while done < n:
        done += os.pwrite(fd, view[done:], pos + done)


class BoundedDevice:
    """What every device here knows and checks before it touches data: its size and
    block size, whether it may be written, whether it was closed. ``noun`` names it in
    errors ("device", "volume")."""

    def __init__(self, size: int, block_size: int, read_only: bool, noun: str) -> None:
        self._size = size
        self._block_size = block_size
        self._read_only = read_only
        self._noun = noun
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def block_size(self) -> int:
        return self._block_size

    def _check(self, offset: int, length: int, *, write: bool = False) -> None:
        """Refuse a request on a closed device, a write to a read-only one, and a range
        outside it."""
        if self._closed:
            raise InvalidRequest(f"the {self._noun} is closed")
        if write and self._read_only:
            raise InvalidRequest(f"the {self._noun} is read-only")
        if offset < 0 or length < 0 or offset + length > self._size:
            raise InvalidRequest(f"range {offset}+{length} is outside the {self._noun} "
                                 f"({self._size} bytes)")


class FileDevice(BoundedDevice):
    """An image file (or block device) served as it is."""

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False,
                 block_size: int = 4096) -> None:
        self._fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        super().__init__(os.lseek(self._fd, 0, os.SEEK_END), block_size, read_only,
                         "device")

    def pread(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return os.pread(self._fd, length, offset)

    def preadinto(self, offset: int, buf: Any) -> None:
        view = memoryview(buf).cast("B")
        self._check(offset, len(view))
        pread_full(self._fd, offset, view)

    def pwrite(self, offset: int, data: Any, *, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        self._check(offset, len(view), write=True)
        pwrite_full(self._fd, offset, view)
        if fua:
            os.fdatasync(self._fd)

    def flush(self) -> None:
        if not self._read_only:
            os.fdatasync(self._fd)

    def trim(self, offset: int, length: int) -> None:
        self._check(offset, length)  # a hint: a plain file keeps its bytes

    def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        step = 1 << 20
        zeros = bytes(min(step, length))
        end = offset + length
        while offset < end:
            n = min(step, end - offset)
            self.pwrite(offset, memoryview(zeros)[:n])
            offset += n
        if fua:
            self.flush()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)

    def __enter__(self) -> FileDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
