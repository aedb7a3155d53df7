"""The LUKS1 partition header (phdr): 592 big-endian bytes, bytes in and bytes out.

Layout (LUKS1 on-disk format, version 1.2.3): magic ``LUKS\\xba\\xbe``, version 1,
cipher name, cipher mode and hash spec (32-byte NUL-padded strings), payload offset and
key bytes, the volume key digest (20 bytes of PBKDF2), its salt and iterations, the
UUID, then eight 48-byte key slots: active marker, PBKDF2 iterations, salt, key material
offset (512-byte sectors) and AF stripes. Sans-I/O: no file is touched here.
"""

from __future__ import annotations

import dataclasses
import itertools
import struct
from dataclasses import dataclass
from typing import Any

from cryptoplane.exceptions import NotSupported
from cryptoplane.volume.af import STRIPES
from cryptoplane.volume.errors import CorruptHeader
from cryptoplane.volume.header_fields import read_text, write_text

MAGIC = b"LUKS\xba\xbe"
PHDR_SIZE = 592
SECTOR = 512
SLOTS = 8
ACTIVE = 0x00AC71F3
INACTIVE = 0x0000DEAD
DIGEST_SIZE = 20
SALT_SIZE = 32
KEY_SIZES = (16, 24, 32, 48, 64)
_SHORT_HASHES = frozenset({"md4", "md5"})  # shorter than the 20-byte digest

_HEAD = struct.Struct(">6sH32s32s32sII20s32sI40s")
_SLOT = struct.Struct(">II32sII")
assert _HEAD.size + SLOTS * _SLOT.size == PHDR_SIZE


@dataclass(frozen=True)
class Slot:
    """One key slot. ``offset`` is where its material starts, in 512-byte sectors."""

    active: bool
    iterations: int
    salt: bytes = dataclasses.field(repr=False)
    offset: int
    stripes: int = STRIPES
    # a state word other than active/inactive, kept as read: cryptsetup loads such a
    # header, never opens the slot and never reuses it until it is killed
    marker: int | None = None

    @property
    def in_use(self) -> bool:
        """Active, or in a state that forbids reusing it."""
        return self.active or self.marker is not None


@dataclass(frozen=True)
class Header:
    """A decoded LUKS1 phdr. ``payload_offset`` is in 512-byte sectors."""

    cipher_name: str
    cipher_mode: str
    hash_spec: str
    payload_offset: int
    key_bytes: int
    mk_digest: bytes = dataclasses.field(repr=False)
    mk_digest_salt: bytes = dataclasses.field(repr=False)
    mk_digest_iterations: int
    uuid: str
    slots: tuple[Slot, ...]

    @property
    def cipher(self) -> str:
        return f"{self.cipher_name}-{self.cipher_mode}"

    def material_sectors(self) -> int:
        """Sectors of split key material per slot (unaligned)."""
        return -(-(self.key_bytes * STRIPES) // SECTOR)

    def with_slot(self, index: int, slot: Slot) -> Header:
        slots = list(self.slots)
        slots[index] = slot
        return dataclasses.replace(self, slots=tuple(slots))

    def encode(self) -> bytes:
        return encode(self)


def _text(raw: bytes, what: str) -> str:
    text = read_text(raw, f"LUKS1 {what}", "ascii")
    if not text.isprintable():
        raise CorruptHeader(f"LUKS1 {what} holds control characters")
    return text


def _pad(text: str, size: int, what: str) -> bytes:
    return write_text(text, size, f"LUKS1 {what}", "ascii")


def decode(data: bytes) -> Header:
    """Decode and validate a phdr from the first 592 (or more) bytes of a device."""
    if len(data) < PHDR_SIZE:
        raise CorruptHeader(f"LUKS1 header truncated: {len(data)} of {PHDR_SIZE} bytes")
    (magic, version, name, mode, hash_spec, payload, key_bytes, digest, dsalt, diter,
     uuid) = _HEAD.unpack_from(data, 0)
    if magic != MAGIC:
        raise CorruptHeader("no LUKS magic at offset 0")
    if version != 1:
        raise CorruptHeader(f"LUKS version {version} is not LUKS1")
    if key_bytes not in KEY_SIZES:
        raise CorruptHeader(f"LUKS1 key size {key_bytes} bytes is invalid")
    if diter < 1:
        raise CorruptHeader("LUKS1 volume key digest has zero iterations")
    slots = []
    for i in range(SLOTS):
        state, iters, salt, offset, stripes = _SLOT.unpack_from(data, _HEAD.size + i * 48)
        # an active slot with absurd costs is refused when tried, as cryptsetup does,
        # so that it cannot lock out the other slots
        slots.append(Slot(state == ACTIVE, iters, salt, offset, stripes,
                          None if state in (ACTIVE, INACTIVE) else state))
    header = Header(_text(name, "cipher name"), _text(mode, "cipher mode"),
                    _text(hash_spec, "hash spec"), payload, key_bytes, digest, dsalt, diter,
                    _text(uuid, "UUID"), tuple(slots))
    # cryptsetup refuses a hash its crypto backend lacks or whose output is shorter than
    # the 20-byte digest; which hashes a backend has varies (whirlpool), so only what no
    # backend can use is refused here, and other hashes when a slot is opened
    if not header.hash_spec or header.hash_spec in _SHORT_HASHES:
        raise NotSupported(f"LUKS1 hash {header.hash_spec!r} is not supported")
    validate(header)
    return header


def validate(header: Header) -> None:
    """Every key slot's material, used or not, must lie after the phdr, before the
    payload and apart from the others' (cryptsetup refuses such a header, since a slot
    added later would overwrite the phdr, another slot or the user's data)."""
    size = header.material_sectors()
    payload = header.payload_offset
    for i, s in enumerate(header.slots):
        if s.stripes != STRIPES:
            raise CorruptHeader(f"LUKS1 key slot {i} is invalid: {s.stripes} AF stripes, "
                                f"not {STRIPES}")
        if s.offset * SECTOR < PHDR_SIZE:
            raise CorruptHeader(f"LUKS1 key slot {i} is invalid: its material at sector "
                                f"{s.offset} overlaps the header")
        # a detached header (payload 0) has no payload to run into
        if payload and s.offset + size > payload:
            raise CorruptHeader(f"LUKS1 key slot {i} is invalid: its material (sectors "
                                f"{s.offset}..{s.offset + size}) runs into the payload at "
                                f"sector {payload}")
    spans = sorted((s.offset, i) for i, s in enumerate(header.slots))
    for (start_a, a), (start_b, b) in itertools.pairwise(spans):
        if start_b < start_a + size:
            raise CorruptHeader(f"LUKS1 key slot {a} is invalid: its material overlaps "
                                f"key slot {b}'s")


def header_sectors(header: Header) -> int:
    """Sectors the phdr and all key material take: what the device must hold."""
    return max(s.offset for s in header.slots) + header.material_sectors()


def check_device_size(header: Header, device_size: int) -> None:
    """Refuse a header whose key material runs past the end of its device."""
    need = header_sectors(header) * SECTOR
    if device_size // SECTOR * SECTOR < need:
        raise CorruptHeader(f"the device is too small (truncated?): {device_size} bytes, "
                            f"the LUKS1 header and key material need at least {need}")


def encode(header: Header) -> bytes:
    """The 592-byte phdr for ``header``."""
    if len(header.slots) != SLOTS:
        raise CorruptHeader(f"LUKS1 has exactly {SLOTS} key slots")
    out = bytearray(_HEAD.pack(
        MAGIC, 1, _pad(header.cipher_name, 32, "cipher name"),
        _pad(header.cipher_mode, 32, "cipher mode"), _pad(header.hash_spec, 32, "hash spec"),
        header.payload_offset, header.key_bytes, header.mk_digest, header.mk_digest_salt,
        header.mk_digest_iterations, _pad(header.uuid, 40, "UUID")))
    for s in header.slots:
        state = s.marker if s.marker is not None else ACTIVE if s.active else INACTIVE
        out += _SLOT.pack(state, s.iterations, s.salt, s.offset, s.stripes)
    return bytes(out)


def slot_offsets(key_bytes: int) -> tuple[list[int], int]:
    """cryptsetup's layout: slot material from sector 8, each slot's area rounded up to
    4 KiB; returns the slot offsets and the first sector after the last area."""
    sectors = -(-(key_bytes * STRIPES) // SECTOR)
    step = -(-sectors // 8) * 8
    offsets = [8 + i * step for i in range(SLOTS)]
    return offsets, offsets[-1] + step


def disabled(h: Header, index: int) -> Header:
    """``h`` with slot ``index`` inactive, its salt and iterations cleared."""
    s = h.slots[index]
    return h.with_slot(index, Slot(False, 0, bytes(32), s.offset, s.stripes))


def describe(h: Header) -> dict[str, Any]:
    """The header as a JSON-able dict, without salts or digests."""
    return {
        "version": 1, "uuid": h.uuid, "cipher": h.cipher, "hash": h.hash_spec,
        "key_size": 8 * h.key_bytes, "data_offset": h.payload_offset * SECTOR,
        "sector_size": 512, "digest_iterations": h.mk_digest_iterations,
        "keyslots": {str(i): {"kdf": {"type": "pbkdf2", "hash": h.hash_spec,
                                      "iterations": s.iterations},
                              "area_offset": s.offset * SECTOR,
                              "area_size": h.material_sectors() * SECTOR,
                              "stripes": s.stripes}
                     for i, s in enumerate(h.slots) if s.active},
        "invalid_keyslots": {str(i): f"state 0x{s.marker:08x}"
                             for i, s in enumerate(h.slots) if s.marker is not None}}


__all__ = ["MAGIC", "PHDR_SIZE", "SLOTS", "Header", "Slot", "check_device_size", "decode",
           "describe", "disabled", "encode", "header_sectors", "slot_offsets", "validate"]
