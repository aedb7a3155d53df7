"""Converting LUKS2 data that cryptoplane wrote with the wrong IVs, in place, crash-safe.

Before it learnt dm-crypt's rule, cryptoplane counted the IVs of LUKS2 data in
sector-size units (dm-crypt's ``iv_large_sectors``); dm-crypt counts 512-byte units at
every sector size. Volumes with 512-byte sectors (and every LUKS1 volume) are the same
under both rules; with larger sectors, all but the first sector of such a volume read as
garbage to dm-crypt. ``convert`` re-encrypts the data from the old IVs to dm-crypt's,
one hotzone at a time, so that a crash at any point loses nothing:

- first the header gets a mandatory requirement, so that neither cryptsetup nor
  cryptoplane opens the half-converted volume, and a token that records the progress;
- before a hotzone is rewritten, its ciphertext is copied to the journal (free space at
  the end of the keyslots area, two slots used in turn) and synced, and then the token
  names the hotzone, its journal slot and the journal's SHA-256;
- resuming puts the named hotzone back from the journal (after checking the hash) and
  converts it again. Everything before the hotzone has the new IVs, everything after
  it the old ones. A torn header write leaves the other copy, which names the previous
  hotzone, whose journal slot the current step did not touch.

``inspect`` tells which rule a volume's data follows, by decrypting sampled sectors both
ways and looking for structure (zeros, text, file systems) that random-looking garbage
does not have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from cryptoplane.exceptions import InvalidRequest, NotSupported
from cryptoplane.nbd.blockdev import pread_full, pwrite_full
from cryptoplane.plane import Plane
from cryptoplane.volume import luks2
from cryptoplane.volume.ciphers import SectorCipher, sector_cipher
from cryptoplane.volume.datalock import lock_data
from cryptoplane.volume.errors import CorruptHeader
from cryptoplane.volume.layout import DataLayout
from cryptoplane.volume.luks import data_device_size
from cryptoplane.volume.luks_io import (
    Device,
    LuksHeader,
    open_device,
    read_header,
    write_luks2_header,
)
from cryptoplane.volume.luks_unlock import data_layout, open_key

REQUIREMENT = "cryptoplane-convert-ivs"
TOKEN_TYPE = "cryptoplane-convert-ivs"
DEFAULT_HOTZONE = 4 << 20
LOCK_TIMEOUT_S = 10.0
_MAX_TOKENS = 32

Progress = Callable[[int, int], None]  # (bytes converted, bytes in all)


@dataclass(frozen=True)
class Conversion:
    """A conversion's state as its token records it: ``offset`` bytes of the data segment
    are converted; the ``length`` bytes after them (the hotzone) may be torn, and their
    old ciphertext is at ``journal`` + ``slot`` * ``hotzone`` with SHA-256 ``sha256``."""

    token: int
    offset: int
    length: int
    slot: int
    hotzone: int
    journal: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"type": TOKEN_TYPE, "keyslots": [], "offset": str(self.offset),
                "length": str(self.length), "slot": self.slot,
                "hotzone": str(self.hotzone), "journal": str(self.journal),
                "sha256": self.sha256}

    @classmethod
    def from_json(cls, token: int, j: Any) -> Conversion:
        try:
            return cls(token, int(j["offset"]), int(j["length"]), int(j["slot"]),
                       int(j["hotzone"]), int(j["journal"]), str(j["sha256"]))
        except (KeyError, TypeError, ValueError):
            raise CorruptHeader(f"token {token} ({TOKEN_TYPE}) is malformed: the "
                                f"conversion's progress is unknown") from None


@dataclass(frozen=True)
class Inspection:
    """What ``inspect`` found. ``verdict``: ``"legacy"`` (the data follows the old IVs:
    convert it), ``"dm-crypt"`` (it reads right: leave it), ``"converting"`` (a
    conversion was interrupted: run it again), ``"unaffected"`` (512-byte sectors or
    LUKS1: both rules agree), or ``"unknown"`` (no sampled sector looks like data under
    either rule: never written, or full of compressed or encrypted files)."""

    verdict: str
    sector_size: int
    sampled: int = 0
    structured_old: int = 0
    structured_new: int = 0
    converted: int = 0
    size: int = 0


class OpenedVolume:
    """A volume opened for ``inspect`` and ``convert``: the header read and the key
    derived once (an Argon2 keyslot costs a second and a gigabyte each time), so a
    command that inspects and then converts pays for one KDF. From ``opened``."""

    def __init__(self, dev: Device, loaded: LuksHeader, key: bytes | None,
                 path: str | os.PathLike[str], header: str | os.PathLike[str] | None,
                 size: int) -> None:
        self._dev, self._loaded, self._key = dev, loaded, key
        self._path, self._header, self._size = path, header, size

    def inspect(self, *, samples: int = 256, plane: Plane | None = None) -> Inspection:
        """Which IV rule the volume's data follows (reads only)."""
        loaded, key, path = self._loaded, self._key, self._path
        if loaded.version == 1 or key is None:
            return Inspection("unaffected", 512)
        state = _conversion(loaded.h2.metadata)
        bare = _without_requirement(loaded)
        new = data_layout(bare, key, self._size)
        if state is not None:
            return Inspection("converting", new.sector_size, converted=state.offset,
                              size=new.size)
        if new.sector_size == 512:
            return Inspection("unaffected", 512, size=new.size)
        old = data_layout(bare, key, self._size, legacy_ivs=True)
        with _ciphers(new, old, plane) as (enc_new, enc_old):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                lock_data(fd, write=False, path=path)
                return _sample(fd, new, old, enc_new, enc_old, samples)
            finally:
                os.close(fd)

    def convert(self, *, hotzone: int = DEFAULT_HOTZONE, progress: Progress | None = None,
                plane: Plane | None = None) -> int:
        """Re-encrypt the data from the old IVs to dm-crypt's, or finish a conversion
        that was interrupted. Returns the data segment's size in bytes. Needs the volume
        opened with ``write=True``."""
        dev, loaded, key, path = self._dev, self._loaded, self._key, self._path
        if loaded.version == 1 or key is None:
            raise InvalidRequest("LUKS1 data has 512-byte sectors, whose IVs are the same "
                                 "under both rules: nothing to convert")
        bare = _without_requirement(loaded)
        new = data_layout(bare, key, self._size)
        old = data_layout(bare, key, self._size, legacy_ivs=True)
        h2 = loaded.h2
        state = _conversion(h2.metadata)
        if state is None:
            if new.sector_size == 512:
                raise InvalidRequest("the volume has 512-byte sectors, whose IVs are the "
                                     "same under both rules: nothing to convert")
            state = _plan(h2.metadata, new, hotzone)
            h2 = _record(dev, h2, state, start=True)
        with _ciphers(new, old, plane) as ciphers:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                lock_data(fd, write=True, path=path)  # no `serve` writes meanwhile
                h2 = _run(dev, h2, fd, state, new, old, ciphers, progress)
            finally:
                os.close(fd)
        _finish(dev, h2, state)
        self._loaded = read_header(dev)
        return new.size


@contextlib.contextmanager
def opened(path: str | os.PathLike[str], secret: bytes, *,
           header: str | os.PathLike[str] | None = None,
           write: bool = False) -> Iterator[OpenedVolume]:
    """The volume at ``path`` (its header at ``header`` when detached), unlocked with
    ``secret``; ``write`` to convert (the header is then held for writing throughout)."""
    with open_device(header or path, write, lock_timeout=LOCK_TIMEOUT_S) as dev:
        loaded = read_header(dev)
        key = None
        size = 0
        if loaded.version == 2:
            _, key = open_key(dev, _without_requirement(loaded), secret, None)
            size = data_device_size(path, header, dev)
        yield OpenedVolume(dev, loaded, key, path, header, size)


def inspect(path: str | os.PathLike[str], secret: bytes, *,
            header: str | os.PathLike[str] | None = None, samples: int = 256,
            plane: Plane | None = None) -> Inspection:
    """Which IV rule the volume's data follows (reads only)."""
    with opened(path, secret, header=header) as vol:
        return vol.inspect(samples=samples, plane=plane)


def convert(path: str | os.PathLike[str], secret: bytes, *,
            header: str | os.PathLike[str] | None = None,
            hotzone: int = DEFAULT_HOTZONE, progress: Progress | None = None,
            plane: Plane | None = None) -> int:
    """Re-encrypt the data from the old IVs to dm-crypt's, or finish a conversion that
    was interrupted. Returns the data segment's size in bytes."""
    with opened(path, secret, header=header, write=True) as vol:
        return vol.convert(hotzone=hotzone, progress=progress, plane=plane)


def _sample(fd: int, new: DataLayout, old: DataLayout, enc_new: SectorCipher,
            enc_old: SectorCipher, samples: int) -> Inspection:
    ss = new.sector_size
    count = new.size // ss
    # sector 0 is skipped: with iv_tweak 0 both rules give it the same IV
    picks = sorted({1 + i * (count - 1) // samples for i in range(samples)} - {count})
    struct_old = struct_new = 0
    buf, out = bytearray(ss), bytearray(ss)
    for i in picks:
        pread_full(fd, new.offset + i * ss, memoryview(buf))
        enc_new.decrypt(buf, new.iv_offset + i * new.iv_step, out)
        struct_new += _structured(out)
        enc_old.decrypt(buf, old.iv_offset + i * old.iv_step, out)
        struct_old += _structured(out)
    if struct_new > struct_old and struct_old == 0:
        verdict = "dm-crypt"
    elif struct_old > struct_new and struct_new == 0:
        verdict = "legacy"
    else:
        verdict = "unknown"
    return Inspection(verdict, ss, len(picks), struct_old, struct_new, size=new.size)


def _structured(plain: bytearray) -> bool:
    """Whether a decrypted sector looks like data rather than a wrong key's noise: AES
    with a wrong IV gives bytes that no compressor shrinks."""
    return len(zlib.compress(bytes(plain), 1)) < len(plain) * 9 // 10


def _run(dev: Device, h2: luks2.Header, fd: int, state: Conversion, new: DataLayout,
         old: DataLayout, ciphers: tuple[SectorCipher, SectorCipher],
         progress: Progress | None) -> luks2.Header:
    enc_new, enc_old = ciphers
    ss = new.sector_size
    if state.length:  # interrupted inside a hotzone: put its old ciphertext back
        saved = dev.read_exact(state.journal + state.slot * state.hotzone, state.length,
                               "the conversion journal")
        if hashlib.sha256(saved).hexdigest() != state.sha256:
            raise CorruptHeader(f"the conversion journal does not match its checksum: "
                                f"bytes {state.offset}..{state.offset + state.length} of "
                                f"the data may be half converted; restore a backup")
        pwrite_full(fd, new.offset + state.offset, memoryview(saved))
        os.fsync(fd)
    pos, slot = state.offset, state.slot
    buf = bytearray(state.hotzone)
    while pos < new.size:
        n = min(state.hotzone, new.size - pos)
        view = memoryview(buf)[:n]
        pread_full(fd, new.offset + pos, view)
        slot = 1 - slot  # never the slot the token names until the token moves
        dev.write(state.journal + slot * state.hotzone, bytes(view))
        dev.sync()
        step = dataclasses.replace(state, offset=pos, length=n, slot=slot,
                                   sha256=hashlib.sha256(view).hexdigest())
        h2 = _record(dev, h2, step)
        enc_old.decrypt(view, old.iv_offset + pos // ss * old.iv_step, view)
        enc_new.encrypt(view, new.iv_offset + pos // ss * new.iv_step, view)
        pwrite_full(fd, new.offset + pos, view)
        os.fsync(fd)
        pos += n
        if progress is not None:
            progress(pos, new.size)
    done = dataclasses.replace(state, offset=new.size, length=0, slot=slot, sha256="")
    return _record(dev, h2, done)


def _finish(dev: Device, h2: luks2.Header, state: Conversion) -> None:
    """Wipe the journal (old ciphertext, and the keyslots area is free space again),
    then drop the token and the requirement."""
    dev.fill(state.journal, 2 * state.hotzone)
    dev.sync()
    meta = h2.metadata
    tokens = {i: t for i, t in meta.tokens.items() if i != state.token}
    mandatory = tuple(r for r in meta.config.mandatory if r != REQUIREMENT)
    write_luks2_header(dev, h2, dataclasses.replace(
        meta, tokens=tokens, config=dataclasses.replace(meta.config, mandatory=mandatory)))


def _plan(meta: luks2.Metadata, new: DataLayout, hotzone: int) -> Conversion:
    """A new conversion: a free token and a journal of two hotzones in the keyslots area
    after the last keyslot."""
    if hotzone < new.sector_size or hotzone % new.sector_size:
        raise InvalidRequest(f"the hotzone must be a multiple of the sector size "
                             f"{new.sector_size}, got {hotzone}")
    start = 2 * meta.hdr_size
    end = start + meta.config.keyslots_size
    used = max([start] + [ks.area.offset + ks.area.size for ks in meta.keyslots.values()])
    journal = -(-used // 4096) * 4096
    fits = (end - journal) // 2 // new.sector_size * new.sector_size
    if fits < new.sector_size:
        raise NotSupported(f"no room for the conversion journal: the keyslots area has "
                           f"{max(0, end - journal)} bytes free after its keyslots, and "
                           f"two {new.sector_size}-byte sectors are needed")
    free = [i for i in range(_MAX_TOKENS) if i not in meta.tokens]
    if not free:
        raise NotSupported("no free LUKS2 token for the conversion's progress")
    return Conversion(free[0], 0, 0, 1, min(hotzone, fits), journal, "")


def _record(dev: Device, h2: luks2.Header, state: Conversion,
            start: bool = False) -> luks2.Header:
    meta = h2.metadata
    tokens = {**meta.tokens, state.token: state.to_json()}
    config = meta.config
    if start:
        config = dataclasses.replace(config, mandatory=(*config.mandatory, REQUIREMENT))
    return write_luks2_header(dev, h2, dataclasses.replace(meta, tokens=tokens,
                                                           config=config))


def _conversion(meta: luks2.Metadata) -> Conversion | None:
    found = [(i, t) for i, t in meta.tokens.items() if t.get("type") == TOKEN_TYPE]
    pending = REQUIREMENT in meta.config.mandatory
    if not found and not pending:
        return None
    if len(found) != 1 or not pending:
        raise CorruptHeader(f"the header's {REQUIREMENT} requirement and token do not "
                            f"match: the conversion's progress is unknown")
    return Conversion.from_json(*found[0])


def _without_requirement(loaded: LuksHeader) -> LuksHeader:
    """The header as the conversion reads it: its own requirement is no obstacle."""
    meta = loaded.h2.metadata
    if REQUIREMENT not in meta.config.mandatory:
        return loaded
    config = dataclasses.replace(
        meta.config, mandatory=tuple(r for r in meta.config.mandatory if r != REQUIREMENT))
    h2 = loaded.h2.replace(metadata=dataclasses.replace(meta, config=config))
    return LuksHeader(2, v2=h2)


@contextlib.contextmanager
def _ciphers(new: DataLayout, old: DataLayout, plane: Plane | None,
             ) -> Iterator[tuple[SectorCipher, SectorCipher]]:
    """The new and the old transform, over a plane of their own unless one is given."""
    with contextlib.ExitStack() as stack:
        if plane is None:
            plane = stack.enter_context(Plane())
        yield (sector_cipher(new.cipher, new.volume_key, new.sector_size, plane),
               sector_cipher(old.cipher, old.volume_key, old.sector_size, plane,
                             iv_large_sectors=True))


__all__ = ["DEFAULT_HOTZONE", "REQUIREMENT", "Conversion", "Inspection", "OpenedVolume",
           "convert", "inspect", "opened"]
