"""LUKS1/LUKS2 volumes on image files, block devices and detached headers.

The public operations: ``format``, ``unlock``, ``test_passphrase``, ``add_key``,
``remove_key``, ``change_key``, ``dump``, ``backup_header``, ``restore_header`` and
``erase``. This module checks their arguments and orders the steps of each change;
headers are decoded by ``luks1``/``luks2`` (sans-I/O), devices locked, read and written
by ``luks_io``, and keyslots tried by ``luks_unlock``.

Crash safety: every change is a sequence of writes, each followed by ``fsync``, ordered
so that a kill between or during any of them leaves a volume that opens with the old or
the new passphrase.

- LUKS2 has two header copies. New keyslot material goes to an area that no metadata
  refers to first; then the copies are rewritten with ``seqid + 1``, one at a time: the
  copy that is stale or invalid first, the one we read from last, so one valid copy
  exists at every moment and readers take the higher ``seqid``. Areas that metadata no
  longer refers to are wiped last (removal wipes first, as cryptsetup: a slot being
  removed may stop opening early, never a slot that stays).
- LUKS1 has one phdr whose 592 bytes span two sectors, so a write may tear. Each phdr
  write therefore changes one slot's record only: a change writes the new material to a
  free slot's sectors, then enables that slot (the old one still intact), then disables
  the old slot (only its 4-byte active marker changes), then wipes the old material.

A ``fcntl.flock`` on the header file serialises changes between processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import uuid as uuidlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptoplane.exceptions import InvalidRequest, KeyRejected
from cryptoplane.volume import af, keyslots, luks1, luks2, luks_io
from cryptoplane.volume import kdf as kdfs
from cryptoplane.volume.errors import CorruptHeader, KeyslotError, WrongPassphrase
from cryptoplane.volume.ivs import parse_spec, split_luks1
from cryptoplane.volume.layout import DataLayout
from cryptoplane.volume.luks_io import (
    Device,
    LuksHeader,
    PathLike,
    decode_header,
    read_header,
    seal_luks1_slot,
    seal_luks2_keyslot,
    wipe_luks1_slot,
    write_luks1_phdr,
    write_luks2_header,
)
from cryptoplane.volume.luks_unlock import data_layout, open_key

KdfArg = kdfs.KdfParams | Mapping[str, Any] | None
KEY_FILE_MAX = 8 * 1024 * 1024  # cryptsetup's default key file size limit
LUKS2_HDR_SIZE = 0x4000
LUKS2_KEYSLOTS_AT = 2 * LUKS2_HDR_SIZE
DEFAULT_DATA_OFFSET = 16 * 1024 * 1024

# Tests change these on this module, so they are read from here when used, not handed
# to luks_io once: how long to wait for another process's lock, and a hook called with
# (offset, data) before every write (fault injection).
LOCK_TIMEOUT_S = 10.0
write_hook: Callable[[int, bytes], None] | None = None


@dataclass(frozen=True)
class LuksInfo:
    """What ``format`` made."""

    version: int
    uuid: str
    cipher: str
    key_size: int  # bits
    sector_size: int
    data_offset: int  # bytes
    keyslot: int


# -- devices -------------------------------------------------------------------------

def _device(path: PathLike, write: bool, create: bool = False,
            ) -> contextlib.AbstractContextManager[Device]:
    """``path`` opened and flocked (exclusively to write), with this module's settings."""
    return luks_io.open_device(path, write, create, lock_timeout=LOCK_TIMEOUT_S,
                               before_write=_call_write_hook)


def _call_write_hook(offset: int, data: bytes) -> None:
    # read at each write, not at open: a test's hook may clear itself mid-operation
    if write_hook is not None:
        write_hook(offset, data)


def _meta_path(path: PathLike, header: PathLike | None) -> PathLike:
    """Where the header lives: the volume itself or its detached header file."""
    return path if header is None else header


# -- secrets -------------------------------------------------------------------------

def _read_key_file(key_file: PathLike) -> bytes:
    try:
        with open(key_file, "rb") as f:
            data = f.read(KEY_FILE_MAX + 1)
    except OSError as e:
        raise InvalidRequest(f"cannot read key file {os.fspath(key_file)!r}: "
                             f"{e.strerror}") from None
    if len(data) > KEY_FILE_MAX:
        raise InvalidRequest(f"key file is larger than {KEY_FILE_MAX} bytes")
    return data


def _secret(passphrase: bytes | None, key_file: PathLike | None, what: str = "passphrase",
            ) -> bytes | None:
    if passphrase is not None and key_file is not None:
        raise InvalidRequest(f"give a {what} or a key file, not both")
    if key_file is not None:
        return _read_key_file(key_file)
    if passphrase is not None and not isinstance(passphrase, bytes | bytearray):
        raise InvalidRequest(f"the {what} must be bytes")
    return None if passphrase is None else bytes(passphrase)


# -- unlocking -----------------------------------------------------------------------

def data_device_size(path: PathLike, header: PathLike | None, meta_dev: Device) -> int:
    """Bytes on the data device: the header's own device, or ``path`` when the
    header is detached."""
    if header is None:
        return meta_dev.size()
    with _device(path, False) as data:
        return data.size()


def unlock(path: PathLike, *, passphrase: bytes | None = None,
           key_file: PathLike | None = None, volume_key: bytes | None = None,
           header: PathLike | None = None, slot: int | None = None) -> DataLayout:
    """Open the volume's key and data layout: ``WrongPassphrase`` if nothing opens,
    ``CorruptHeader`` for a damaged header, ``NotSupported`` for unimplemented features."""
    secret = _secret(passphrase, key_file)
    with _device(_meta_path(path, header), False) as dev:
        loaded = read_header(dev)
        _, key = open_key(dev, loaded, secret, volume_key, slot)
        size = data_device_size(path, header, dev)
    return data_layout(loaded, key, size)


def test_passphrase(path: PathLike, *, passphrase: bytes | None = None,
                    key_file: PathLike | None = None, header: PathLike | None = None,
                    slot: int | None = None) -> int:
    """The keyslot the passphrase opens (``cryptsetup open --test-passphrase``)."""
    secret = _secret(passphrase, key_file)
    if secret is None:
        raise InvalidRequest("give a passphrase or a key file")
    with _device(_meta_path(path, header), False) as dev:
        found, _ = open_key(dev, read_header(dev), secret, None, slot, for_data=False)
    assert found is not None
    return found


# -- formatting ----------------------------------------------------------------------

def _new_volume_key(spec_text: str, key_size: int, volume_key: bytes | None) -> bytes:
    spec = parse_spec(spec_text)
    if key_size % 8 or key_size // 8 not in spec.key_sizes():
        raise InvalidRequest(f"{spec_text} takes keys of "
                             f"{', '.join(str(8 * k) for k in spec.key_sizes())} bits, "
                             f"not {key_size}")
    key = os.urandom(key_size // 8) if volume_key is None else bytes(volume_key)
    if len(key) != key_size // 8:
        raise KeyRejected(f"the volume key is {len(key)} bytes, key_size says "
                          f"{key_size // 8}")
    if spec.mode == "xts" and key[:len(key) // 2] == key[len(key) // 2:]:
        raise KeyRejected("XTS volume key halves must differ")
    return key


def _digest_iterations(explicit: bool) -> int:
    if explicit:
        return kdfs.MIN_PBKDF2_ITERATIONS
    p = kdfs.benchmark("pbkdf2", iter_time_ms=kdfs.DIGEST_ITER_TIME_MS)
    assert isinstance(p, kdfs.Pbkdf2)
    return p.iterations


def format(path: PathLike, passphrase: bytes, *, version: int = 2,
           cipher: str = "aes-xts-plain64", key_size: int = 512, sector_size: int = 4096,
           kdf: str | None = None, kdf_params: KdfArg = None,
           iter_time_ms: int | None = None, label: str | None = None,
           uuid: str | None = None, header: PathLike | None = None,
           data_offset: int | None = None, volume_key: bytes | None = None,
           kdf_name: str | None = None) -> LuksInfo:
    """Make a new LUKS volume with ``passphrase`` in keyslot 0.

    ``kdf`` is argon2id/argon2i/pbkdf2 for LUKS2 (default argon2id)
    and pbkdf2 for LUKS1; costs come from ``kdf_params`` or a benchmark of
    ``iter_time_ms`` (default 2000). ``data_offset`` is in bytes (default 16 MiB for
    LUKS2, 1 MiB-aligned after the key material for LUKS1; 0 with a detached ``header``).
    LUKS1 always uses 512-byte sectors. ``kdf_name`` is an alias of ``kdf``.
    """
    kdf = kdf or kdf_name
    secret = _secret(passphrase, None)
    if secret is None:
        raise InvalidRequest("a passphrase is required")
    if version not in (1, 2):
        raise InvalidRequest(f"LUKS version must be 1 or 2, not {version}")
    key = _new_volume_key(cipher, key_size, volume_key)
    try:
        the_uuid = str(uuidlib.UUID(uuid)) if uuid else str(uuidlib.uuid4())
    except ValueError:
        raise InvalidRequest(f"{uuid!r} is not a UUID") from None
    if label is not None and (len(label.encode("utf-8")) > 47 or "\0" in label):
        raise InvalidRequest("a LUKS2 label is at most 47 bytes of UTF-8, without NUL")
    if data_offset is not None and (data_offset < 0 or data_offset % 512):
        raise InvalidRequest("data_offset must be a non-negative multiple of 512 bytes")
    explicit = kdf_params is not None
    if version == 1:
        return _format_luks1(path, secret, cipher, key, kdf, kdf_params, iter_time_ms,
                             the_uuid, header, data_offset, explicit)
    if sector_size not in (512, 1024, 2048, 4096):
        raise InvalidRequest(f"sector size {sector_size} is not 512, 1024, 2048 or 4096")
    offset = data_offset if data_offset is not None else (
        0 if header is not None else DEFAULT_DATA_OFFSET)
    if offset % sector_size:
        raise InvalidRequest(f"data offset {offset} is not a multiple of the sector size")
    keyslots_size = (min(offset, DEFAULT_DATA_OFFSET) if offset else DEFAULT_DATA_OFFSET
                     ) - LUKS2_KEYSLOTS_AT
    keyslots_size = keyslots_size // 4096 * 4096
    area = -(-af.material_size(len(key)) // 4096) * 4096
    if keyslots_size < area:
        raise InvalidRequest(f"data offset {offset} leaves no room for a keyslot "
                             f"(needs at least {LUKS2_KEYSLOTS_AT + area})")
    params = kdfs.resolve(kdf or "argon2id", kdf_params, iter_time_ms, key_size=len(key))
    iterations = _digest_iterations(explicit)
    d_salt, d_value = keyslots.make_digest(key, iterations)
    seg = luks2.Segment(offset, None, 0, cipher, sector_size)
    meta = luks2.Metadata({}, {}, {0: seg},
                          {0: luks2.Digest((), (0,), "sha256", iterations, d_salt, d_value)},
                          luks2.Config(LUKS2_HDR_SIZE - luks2.BIN_SIZE, keyslots_size))
    hdr = luks2.Header(meta, 0, the_uuid, label or "", "", "sha256",
                       (os.urandom(64), os.urandom(64)), False, False)
    with _device(_meta_path(path, header), True, create=header is not None) as dev:
        if header is None and dev.size() <= offset:
            raise InvalidRequest(f"{dev.path} ({dev.size()} bytes) is too small for a LUKS2 "
                                 f"volume with data at {offset}")
        if header is not None:
            with _device(path, False):
                pass  # the data device must exist
        dev.fill(0, meta.areas_end)
        ks = seal_luks2_keyslot(dev, meta, key, secret, params)
        write_luks2_header(dev, hdr, keyslots.with_keyslot(meta, 0, ks))
    return LuksInfo(2, the_uuid, cipher, 8 * len(key), sector_size, offset, 0)


def _format_luks1(path: PathLike, secret: bytes, cipher: str, key: bytes,
                  kdf_name: str | None, kdf_params: KdfArg, iter_time_ms: int | None,
                  the_uuid: str, header: PathLike | None, data_offset: int | None,
                  explicit: bool) -> LuksInfo:
    if kdf_name not in (None, "pbkdf2"):
        raise InvalidRequest("LUKS1 keyslots use pbkdf2 only")
    params = kdfs.resolve("pbkdf2", kdf_params, iter_time_ms, key_size=len(key))
    assert isinstance(params, kdfs.Pbkdf2)
    offsets, end = luks1.slot_offsets(len(key))
    if data_offset is not None:
        payload = data_offset // luks1.SECTOR
    else:
        payload = 0 if header is not None else -(-end // 2048) * 2048
    if payload and payload < end:
        raise InvalidRequest(f"data offset {payload * 512} overlaps the key material "
                             f"(needs at least {end * 512})")
    name, mode = split_luks1(cipher)
    iterations = _digest_iterations(explicit)
    d_salt, d_value = keyslots.make_digest(key, iterations, params.hash,
                                           length=luks1.DIGEST_SIZE)
    slots = tuple(luks1.Slot(False, 0, bytes(32), off) for off in offsets)
    h = luks1.Header(name, mode, params.hash, payload, len(key), d_value, d_salt,
                     iterations, the_uuid, slots)
    with _device(_meta_path(path, header), True, create=header is not None) as dev:
        if header is None and dev.size() <= payload * luks1.SECTOR:
            raise InvalidRequest(f"{dev.path} ({dev.size()} bytes) is too small for a LUKS1 "
                                 f"volume with data at {payload * 512}")
        if header is not None:
            with _device(path, False):
                pass
        dev.fill(0, end * luks1.SECTOR)
        write_luks1_phdr(dev, h)
        seal_luks1_slot(dev, h, 0, key, secret, params)
    return LuksInfo(1, the_uuid, cipher, 8 * len(key), 512, payload * luks1.SECTOR, 0)


# -- changing keyslots ---------------------------------------------------------------

def _check_writable(loaded: LuksHeader) -> None:
    if loaded.version == 2:
        loaded.h2.metadata.check_supported()
    else:
        parse_spec(loaded.h1.cipher)


def _params_for(loaded: LuksHeader, kdf_name: str | None, kdf_params: KdfArg,
                iter_time_ms: int | None, key_size: int) -> kdfs.KdfParams:
    if loaded.version == 1:
        if kdf_name not in (None, "pbkdf2"):
            raise InvalidRequest("LUKS1 keyslots use pbkdf2 only")
        params = kdfs.resolve("pbkdf2", kdf_params, iter_time_ms,
                             hash_name=loaded.h1.hash_spec, key_size=key_size)
        if not isinstance(params, kdfs.Pbkdf2) or params.hash != loaded.h1.hash_spec:
            raise InvalidRequest(f"LUKS1 keyslots use pbkdf2 with the header's hash "
                                 f"{loaded.h1.hash_spec}")
        return params
    return kdfs.resolve(kdf_name or "argon2id", kdf_params, iter_time_ms, key_size=key_size)


def add_key(path: PathLike, *, passphrase: bytes | None = None,
            key_file: PathLike | None = None, volume_key: bytes | None = None,
            new_passphrase: bytes | None = None, new_key_file: PathLike | None = None,
            slot: int | None = None, kdf: str | None = None, kdf_params: KdfArg = None,
            iter_time_ms: int | None = None, header: PathLike | None = None,
            kdf_name: str | None = None) -> int:
    """Add a keyslot for the new passphrase, authorised by an existing passphrase, key
    file or the volume key; returns the new slot's number. ``kdf_name``: alias of ``kdf``.
    """
    kdf = kdf or kdf_name
    secret = _secret(passphrase, key_file)
    new = _secret(new_passphrase, new_key_file, "new passphrase")
    if new is None:
        raise InvalidRequest("give the new passphrase or key file")
    with _device(_meta_path(path, header), True) as dev:
        loaded = read_header(dev)
        _check_writable(loaded)
        _, key = open_key(dev, loaded, secret, volume_key)
        params = _params_for(loaded, kdf, kdf_params, iter_time_ms, len(key))
        if loaded.version == 2:
            meta = loaded.h2.metadata
            index = keyslots.free_slot(meta.keyslots, luks2.MAX_OBJECTS, slot)
            ks = seal_luks2_keyslot(dev, meta, key, new, params)
            write_luks2_header(dev, loaded.h2, keyslots.with_keyslot(meta, index, ks))
        else:
            h = loaded.h1
            index = keyslots.free_slot({i for i, s in enumerate(h.slots) if s.in_use},
                                       luks1.SLOTS, slot)
            seal_luks1_slot(dev, h, index, key, new, params)
    return index


def remove_key(path: PathLike, *, slot: int | None = None, passphrase: bytes | None = None,
               key_file: PathLike | None = None, header: PathLike | None = None,
               allow_last: bool = True) -> int:
    """Destroy one keyslot: the one ``slot`` names (``luksKillSlot``) or the one the
    passphrase opens (``luksRemoveKey``). Its area is wiped. Returns the slot number.

    Killing a named slot is authorised as cryptsetup's luksKillSlot does: the passphrase
    must open another active keyslot, or this one if it is the last (``WrongPassphrase``
    otherwise, with nothing written)."""
    secret = _secret(passphrase, key_file)
    if secret is None:
        raise InvalidRequest("give the passphrase to remove, or with a slot number a "
                             "passphrase of a remaining keyslot")
    with _device(_meta_path(path, header), True) as dev:
        loaded = read_header(dev)
        _check_writable(loaded)
        if slot is None:
            found, _ = open_key(dev, loaded, secret, None)
            assert found is not None
            slot = found
        else:
            _authorise_kill(dev, loaded, slot, secret)
        if loaded.version == 2:
            meta = loaded.h2.metadata
            if slot not in meta.keyslots:
                raise KeyslotError(f"keyslot {slot} is not active")
            if len(meta.keyslots) == 1 and not allow_last:
                raise KeyslotError("refusing to remove the last keyslot")
            area = meta.keyslots[slot].area
            dev.fill(area.offset, area.size, random=True)
            dev.sync()
            write_luks2_header(dev, loaded.h2, keyslots.with_keyslot(meta, slot, None))
        else:
            h = loaded.h1
            if not 0 <= slot < luks1.SLOTS or not h.slots[slot].active:
                raise KeyslotError(f"key slot {slot} is not active")
            if sum(s.active for s in h.slots) == 1 and not allow_last:
                raise KeyslotError("refusing to remove the last key slot")
            wipe_luks1_slot(dev, h, slot)
            write_luks1_phdr(dev, luks1.disabled(h, slot))
    return slot


def _authorise_kill(dev: Device, loaded: LuksHeader, slot: int, secret: bytes) -> None:
    if loaded.version == 2:
        active = set(loaded.h2.metadata.keyslots)
    else:
        active = {i for i, s in enumerate(loaded.h1.slots) if s.active}
    if slot not in active:
        raise KeyslotError(f"keyslot {slot} is not active")
    try:
        if active == {slot}:  # the last one: its own passphrase, as cryptsetup asks
            open_key(dev, loaded, secret, None, slot, for_data=False)
        else:
            open_key(dev, loaded, secret, None, for_data=False, skip=slot)
    except WrongPassphrase:
        raise WrongPassphrase(f"the passphrase opens no remaining keyslot: keyslot "
                              f"{slot} was not removed") from None


def change_key(path: PathLike, old: bytes | None = None, new: bytes | None = None, *,
               key_file: PathLike | None = None, new_key_file: PathLike | None = None,
               slot: int | None = None, kdf: str | None = None,
               kdf_params: KdfArg = None, iter_time_ms: int | None = None,
               header: PathLike | None = None, kdf_name: str | None = None) -> int:
    """Replace the passphrase of the keyslot ``old`` opens with ``new``; returns the slot
    now holding ``new`` (the same number for LUKS2; a free slot for LUKS1).
    ``kdf_name``: alias of ``kdf``."""
    kdf = kdf or kdf_name
    secret = _secret(old, key_file)
    fresh = _secret(new, new_key_file, "new passphrase")
    if secret is None or fresh is None:
        raise InvalidRequest("give the old and the new passphrase")
    with _device(_meta_path(path, header), True) as dev:
        loaded = read_header(dev)
        _check_writable(loaded)
        found, key = open_key(dev, loaded, secret, None, slot)
        assert found is not None
        params = _params_for(loaded, kdf, kdf_params, iter_time_ms, len(key))
        if loaded.version == 2:
            meta = loaded.h2.metadata
            old_ks = meta.keyslots[found]
            ks = dataclasses.replace(seal_luks2_keyslot(dev, meta, key, fresh, params),
                                     priority=old_ks.priority)
            write_luks2_header(dev, loaded.h2, keyslots.with_keyslot(meta, found, ks))
            dev.fill(old_ks.area.offset, old_ks.area.size, random=True)
            dev.sync()
            return found
        h = loaded.h1
        in_use = {i for i, s in enumerate(h.slots) if s.in_use}
        target = keyslots.free_slot(in_use, luks1.SLOTS, None)
        h = seal_luks1_slot(dev, h, target, key, fresh, params)
        write_luks1_phdr(dev, luks1.disabled(h, found))
        wipe_luks1_slot(dev, h, found)
    return target


# -- dump, header backup and restore, erase ------------------------------------------

def dump(path: PathLike, header: PathLike | None = None) -> dict[str, Any]:
    """The header as a JSON-able dict, without salts, digests or any secret."""
    with _device(_meta_path(path, header), False) as dev:
        loaded = read_header(dev)
    return luks1.describe(loaded.h1) if loaded.version == 1 else luks2.describe(loaded.h2)


def _header_extent(loaded: LuksHeader) -> int:
    if loaded.version == 2:
        return loaded.h2.metadata.areas_end
    h = loaded.h1
    # as cryptsetup: the phdr and key material, not the padding up to the payload
    end = max(s.offset + h.material_sectors() for s in h.slots) * luks1.SECTOR
    return -(-end // 4096) * 4096


def backup_header(path: PathLike, out_file: PathLike, header: PathLike | None = None) -> int:
    """Copy the header and keyslot areas to a new file (``luksHeaderBackup``);
    returns its size."""
    with _device(_meta_path(path, header), False) as dev:
        extent = _header_extent(read_header(dev))
        data = dev.read_exact(0, extent, "the header backup")
    try:
        # read-only for its owner, as cryptsetup makes it (the fd itself can write)
        fd = os.open(out_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o400)
    except FileExistsError:
        raise InvalidRequest(f"{os.fspath(out_file)} exists; not overwriting it") from None
    try:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(data)


def restore_header(path: PathLike, backup_file: PathLike,
                   header: PathLike | None = None) -> None:
    """Write a header backup back (``luksHeaderRestore``), after validating it fully and
    checking that its data offset agrees with the header now on the device."""
    with _device(backup_file, False) as src:
        backup = decode_header(src.read(0, luks2.READ_SIZE), src.size())
        extent = _header_extent(backup)
        blob = src.read(0, extent)
    if len(blob) < extent:
        raise CorruptHeader(f"header backup is truncated: {len(blob)} of {extent} bytes")
    with _device(_meta_path(path, header), True, create=header is not None) as dev:
        try:
            current: LuksHeader | None = read_header(dev)
        except CorruptHeader:
            current = None
        if current is not None and _data_offset(current) != _data_offset(backup):
            raise InvalidRequest(f"the backup's data offset {_data_offset(backup)} differs "
                                 f"from the device's {_data_offset(current)}; not restoring")
        if header is None and dev.size() < extent:
            raise InvalidRequest(f"{dev.path} is smaller than the header backup")
        dev.write(0, blob[:extent])
        dev.sync()


def _data_offset(loaded: LuksHeader) -> int:
    if loaded.version == 1:
        return loaded.h1.payload_offset * luks1.SECTOR
    return min(s.offset for s in loaded.h2.metadata.segments.values())


def erase(path: PathLike, header: PathLike | None = None) -> None:
    """Crypto-erase: wipe all keyslot material and remove every keyslot from the header
    (both LUKS2 copies), so no passphrase opens the volume again. Only the header region
    is written, whatever the volume's size."""
    with _device(_meta_path(path, header), True) as dev:
        loaded = read_header(dev)
        if loaded.version == 2:
            h = loaded.h2
            meta = h.metadata
            dev.fill(2 * meta.hdr_size, meta.config.keyslots_size)
            dev.sync()
            for slot in list(meta.keyslots):
                meta = keyslots.with_keyslot(meta, slot, None)
            write_luks2_header(dev, h, meta)
        else:
            h1 = loaded.h1
            for i in range(luks1.SLOTS):
                wipe_luks1_slot(dev, h1, i)
                h1 = luks1.disabled(h1, i)
            write_luks1_phdr(dev, h1)


__all__ = ["CorruptHeader", "LuksInfo", "WrongPassphrase", "add_key", "backup_header",
           "change_key", "data_device_size", "dump", "erase", "format", "remove_key",
           "restore_header", "test_passphrase", "unlock"]
