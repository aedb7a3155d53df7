"""LUKS headers on a file or block device: opening and locking it, reading the header,
and the crash-safe writes that every header change is built from.

``open_device`` opens a path and takes an ``fcntl.flock`` on it, shared for reading and
exclusive for changing, so changes are serialised between processes. ``read_header``
decodes the LUKS1 or LUKS2 header found there (the codecs in ``luks1``/``luks2`` are
sans-I/O; this is where the bytes come from).

Every write here is followed by ``fsync``, and each helper orders its own writes so
that a kill between or during them leaves a header that still opens:

- ``write_luks2_header`` rewrites the two LUKS2 copies with ``seqid + 1`` one at a time,
  the stale or invalid copy first and the one we read from last, so one valid copy
  exists at every moment (readers take the higher ``seqid``).
- ``seal_luks2_keyslot`` writes new material to an area no metadata refers to yet; only
  the header write that follows makes it reachable.
- ``seal_luks1_slot`` writes the material to the slot's sectors before the phdr that
  enables the slot. The LUKS1 phdr's 592 bytes span two sectors, so a phdr write may
  tear: each one must change a single slot's record only.

How operations combine these steps (new material first, wipes last) is in ``luks``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cryptoplane.exceptions import Busy, InvalidRequest
from cryptoplane.volume import af, keyslots, luks1, luks2, signatures
from cryptoplane.volume import kdf as kdfs
from cryptoplane.volume.errors import CorruptHeader, RepairNeeded

PathLike = str | os.PathLike[str]
WriteHook = Callable[[int, bytes], None]
_CHUNK = 1024 * 1024  # wipes are written in pieces of this size, not all in memory


# -- device access -------------------------------------------------------------------

class Device:
    """An open file or block device: whole reads and writes at byte offsets, ``fsync``
    and ``flock``. ``before_write`` (fault injection in tests) sees every write first."""

    __slots__ = ("before_write", "fd", "path")

    def __init__(self, path: PathLike, write: bool, create: bool = False,
                 before_write: WriteHook | None = None) -> None:
        self.path = os.fspath(path)
        self.before_write = before_write
        flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC
        if create:
            flags |= os.O_CREAT
        try:
            self.fd = os.open(self.path, flags, 0o600)
        except FileNotFoundError:
            raise InvalidRequest(f"{self.path}: no such file or device") from None
        except IsADirectoryError:
            raise InvalidRequest(f"{self.path} is a directory") from None
        except PermissionError:
            raise InvalidRequest(f"{self.path}: permission denied") from None

    def lock(self, exclusive: bool, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        while True:
            try:
                fcntl.flock(self.fd, op)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise Busy(f"{self.path} is locked by another process") from None
                time.sleep(0.01)

    def size(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_END)

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray()
        while len(out) < length:
            chunk = os.pread(self.fd, length - len(out), offset + len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def read_exact(self, offset: int, length: int, what: str) -> bytes:
        data = self.read(offset, length)
        if len(data) != length:
            raise CorruptHeader(f"{self.path} is truncated: {what} needs bytes "
                                f"{offset}..{offset + length}, the device has {self.size()}")
        return data

    def write(self, offset: int, data: bytes) -> None:
        if self.before_write is not None:
            self.before_write(offset, data)
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)

    def fill(self, offset: int, length: int, random: bool = False) -> None:
        """Overwrite a range (wipes), in bounded chunks."""
        end = offset + length
        while offset < end:
            n = min(_CHUNK, end - offset)
            self.write(offset, os.urandom(n) if random else bytes(n))
            offset += n

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


@contextlib.contextmanager
def open_device(path: PathLike, write: bool, create: bool = False, *,
                lock_timeout: float, before_write: WriteHook | None = None,
                ) -> Iterator[Device]:
    """``path`` opened and flocked (exclusively if ``write``; ``Busy`` after waiting
    ``lock_timeout`` seconds for another process), closed on exit."""
    dev = Device(path, write, create, before_write)
    try:
        dev.lock(write, lock_timeout)
        yield dev
    finally:
        dev.close()


# -- reading -------------------------------------------------------------------------

@dataclass(frozen=True)
class LuksHeader:
    """A decoded header of either version: ``h1`` or ``h2`` as ``version`` says."""

    version: int
    v1: luks1.Header | None = None
    v2: luks2.Header | None = None

    @property
    def h1(self) -> luks1.Header:
        assert self.v1 is not None
        return self.v1

    @property
    def h2(self) -> luks2.Header:
        assert self.v2 is not None
        return self.v2


def decode_header(blob: bytes, device_size: int | None = None) -> LuksHeader:
    """The header in a device's first bytes (``luks2.READ_SIZE`` is always enough),
    checked as cryptsetup checks it before anything is read or written: with
    ``device_size``, the device must hold all the header's areas; a LUKS2 header that
    only one copy gives is refused (``RepairNeeded``) if another signature is there."""
    version = luks2.probe_version(blob)
    if version == 1:
        h1 = luks1.decode(blob)
        if device_size is not None:
            luks1.check_device_size(h1, device_size)
        return LuksHeader(1, v1=h1)
    h2 = luks2.decode(blob)
    if device_size is not None:
        luks2.check_device_size(h2.metadata, device_size)
    if not h2.in_sync:
        other = signatures.foreign(blob)
        if other is not None:
            which = "secondary" if h2.primary_ok else "primary"
            raise RepairNeeded(f"the LUKS2 {which} header copy is invalid or stale and the "
                               f"device also carries a {other} signature: refusing to "
                               f"recover the header; run 'cryptsetup repair' (or restore a "
                               f"header backup)")
    return LuksHeader(2, v2=h2)


def read_header(dev: Device) -> LuksHeader:
    return decode_header(dev.read(0, luks2.READ_SIZE), dev.size())


# -- writing LUKS2 -------------------------------------------------------------------

def write_luks2_header(dev: Device, old: luks2.Header, meta: luks2.Metadata,
                       ) -> luks2.Header:
    """Both copies of ``old`` with ``meta`` and the next ``seqid``, the only valid copy
    overwritten last; returns the header now on the device."""
    new = old.replace(metadata=meta, seqid=old.seqid + 1, primary_ok=True,
                      secondary_ok=True)
    copies = [(0, luks2.encode_copy(new, False)),
              (meta.hdr_size, luks2.encode_copy(new, True))]
    if old.primary_ok and not old.secondary_ok:
        copies.reverse()  # never overwrite the only valid copy first
    for offset, data in copies:
        dev.write(offset, data)
        dev.sync()
    return new


def seal_luks2_keyslot(dev: Device, meta: luks2.Metadata, volume_key: bytes, secret: bytes,
                       params: kdfs.KdfParams) -> luks2.Keyslot:
    """Write a new keyslot's material to a free area (fsynced); return its keyslot, which
    the caller puts in the metadata with ``write_luks2_header``."""
    encryption, area_key = keyslots.area_cipher(meta, len(volume_key))
    size = af.material_size(len(volume_key))
    offset = keyslots.free_area(meta, size)
    sealed = keyslots.seal(volume_key, secret, params, encryption, area_key)
    dev.write(offset, sealed.material)
    dev.sync()
    area = luks2.Area(offset, -(-size // 4096) * 4096, encryption, area_key)
    return luks2.Keyslot(len(volume_key), area, params, sealed.salt)


# -- writing LUKS1 -------------------------------------------------------------------

def write_luks1_phdr(dev: Device, h: luks1.Header) -> None:
    dev.write(0, h.encode())
    dev.sync()


def seal_luks1_slot(dev: Device, h: luks1.Header, index: int, volume_key: bytes,
                    secret: bytes, params: kdfs.KdfParams) -> luks1.Header:
    """Material to slot ``index``'s sectors (fsynced), then the phdr enabling it."""
    assert isinstance(params, kdfs.Pbkdf2)
    sealed = keyslots.seal(volume_key, secret, params, h.cipher, h.key_bytes, h.hash_spec)
    dev.write(h.slots[index].offset * luks1.SECTOR, sealed.material)
    dev.sync()
    new = h.with_slot(index, luks1.Slot(True, params.iterations, sealed.salt,
                                        h.slots[index].offset))
    write_luks1_phdr(dev, new)
    return new


def wipe_luks1_slot(dev: Device, h: luks1.Header, index: int) -> None:
    """Overwrite slot ``index``'s material with random bytes (the phdr is not touched)."""
    dev.fill(h.slots[index].offset * luks1.SECTOR, keyslots.luks1_material_size(h),
             random=True)
    dev.sync()


__all__ = ["Device", "LuksHeader", "PathLike", "WriteHook", "decode_header", "open_device",
           "read_header", "seal_luks1_slot", "seal_luks2_keyslot", "wipe_luks1_slot",
           "write_luks1_phdr", "write_luks2_header"]
