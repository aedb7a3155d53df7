"""One NBD export (a device and what negotiation says about it), and how device errors
become NBD errors: what the server's connections share, apart from their transport."""

from __future__ import annotations

import errno
import logging
from typing import Any

from cryptoplane.exceptions import CryptoplaneError, InvalidRequest
from cryptoplane.nbd import codec as C
from cryptoplane.nbd import protocol as P
from cryptoplane.nbd.blockdev import BlockDevice, FileDevice

log = logging.getLogger("cryptoplane.nbd")

INLINE_LIMIT = 64 * 1024  # requests up to this size run on the loop thread


def errno_of(exc: BaseException) -> int:
    """The NBD error a device error is answered with (EIO for what has no better one)."""
    if isinstance(exc, InvalidRequest):
        return P.EINVAL
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return P.ENOSPC
        if exc.errno in (errno.EPERM, errno.EROFS, errno.EACCES):
            return P.EPERM
        if exc.errno == errno.ENOMEM:
            return P.ENOMEM
    if not isinstance(exc, OSError | CryptoplaneError):
        log.error("unexpected error from the device", exc_info=exc)
    return P.EIO


def trim(dev: BlockDevice, offset: int, length: int, fua: bool) -> None:
    """A TRIM request: the hint, then the flush that FUA asks for."""
    dev.trim(offset, length)
    if fua:
        dev.flush()


def run_batch(dev: BlockDevice, codec: C.ServerConnection,
              reads: list[tuple[int, int, memoryview, int]],
              writes: list[tuple[C.Write, int]], out: list[Any]) -> None:
    """The small requests of one receive, in one device call each: ``reads`` (cookie,
    offset, the reply's data part, the reply's place in ``out``) or ``writes`` (the
    WRITE, its reply's place); a connection batches one kind at a time (a read after a
    write ends the write batch, and the other way round), so order is kept. The places of
    requests that failed get their error replies; the rest keep the replies put there.
    ``dev`` has ``preadinto_many`` and ``pwrite_many`` (a ``Volume``)."""
    many: Any = dev
    if reads:
        errors = many.preadinto_many([(offset, view) for _, offset, view, _ in reads])
        for (cookie, _, _, at), exc in zip(reads, errors, strict=True):
            if exc is not None:
                out[at] = codec.error_reply(cookie, errno_of(exc), "read failed")
    if writes:
        fua = writes[-1][0].fua  # only the last can carry it: FUA ends a batch
        errors = many.pwrite_many([(w.offset, w.data) for w, _ in writes], fua=fua)
        for (w, at), exc in zip(writes, errors, strict=True):
            if exc is not None:
                out[at] = codec.error_reply(w.cookie, errno_of(exc), "write failed")
            codec.recycle(w.data)


class Export:
    """One named export: a device and what negotiation says about it.

    ``inline_limit``: requests up to this many bytes run on the event loop, bigger ones in
    the thread pool. ``None`` picks: everything inline for a plain ``FileDevice`` (its
    work is a memcpy from the page cache, cheaper than two thread hand-offs), else
    ``INLINE_LIMIT`` (a volume's big requests decrypt without the GIL while the loop
    goes on receiving).
    """

    def __init__(self, name: str, device: BlockDevice, *, read_only: bool = False,
                 description: str = "", inline_limit: int | None = None) -> None:
        if len(name.encode("utf-8")) > P.MAX_NAME:
            raise InvalidRequest("export names are at most 4096 bytes")
        self.name = name
        self.device = device
        if inline_limit is None:
            inline_limit = P.MAX_PAYLOAD if type(device) is FileDevice else INLINE_LIMIT
        self.inline_limit = inline_limit
        block = max(1, device.block_size)
        self.info = C.ExportInfo(
            name=name, size=device.size, read_only=read_only or device.read_only,
            min_block=block, preferred_block=max(block, 4096),
            max_payload=P.MAX_PAYLOAD - P.MAX_PAYLOAD % block, description=description)
