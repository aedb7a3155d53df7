"""The LUKS2 header: binary header + JSON metadata, two copies, bytes in and bytes out.

Each copy is ``hdr_size`` bytes (16 KiB ... 4 MiB): a 4096-byte big-endian binary header
(magic ``LUKS\\xba\\xbe`` for the primary at offset 0, ``SKUL\\xba\\xbe`` for the secondary
at ``hdr_size``; version 2, ``hdr_size``, ``seqid``, label, checksum algorithm, a salt of
its own, UUID, subsystem, ``hdr_offset``, checksum) and the JSON area, NUL-padded. The
checksum is the hash of the whole copy with the checksum field zeroed. A reader takes
the valid copy with the higher ``seqid`` (the LUKS2 on-disk format specification,
section 2, and cryptsetup's ``lib/luks2``).

This module does the binary header, the checksums and the choice between the copies;
the JSON metadata's types, validation and serialisation are in ``luks2_json`` and
re-exported here. Sans-I/O: a caller hands in the first bytes of the device and gets
typed values back; nothing here touches a file.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes

from cryptoplane.exceptions import NotSupported
from cryptoplane.volume import kdf
from cryptoplane.volume.af import HASHES
from cryptoplane.volume.errors import CorruptHeader
from cryptoplane.volume.header_fields import read_text, write_text
from cryptoplane.volume.luks2_json import (
    BIN_SIZE,
    HDR_SIZES,
    Area,
    Config,
    Digest,
    Keyslot,
    Metadata,
    Segment,
    metadata_from_json,
    metadata_to_json,
    parse_json_area,
)

# also importable as luks2.SALT_SIZE etc. (keyslots, tests), but not part of __all__
from cryptoplane.volume.luks2_json import MAX_KEYSLOTS_SIZE as MAX_KEYSLOTS_SIZE
from cryptoplane.volume.luks2_json import MAX_OBJECTS as MAX_OBJECTS
from cryptoplane.volume.luks2_json import SALT_SIZE as SALT_SIZE

MAGIC_1ST = b"LUKS\xba\xbe"
MAGIC_2ND = b"SKUL\xba\xbe"
SECONDARY_OFFSETS = HDR_SIZES
READ_SIZE = 2 * HDR_SIZES[-1]  # enough to find a secondary copy at any offset

_BIN = struct.Struct(">6sHQQ48s32s64s40s48sQ184s64s")
_CSUM_OFFSET = 448
assert _BIN.size == 512


# -- the decoded header --------------------------------------------------------------

@dataclass(frozen=True)
class Header:
    """Both copies' shared fields, the metadata, and which copies were valid."""

    metadata: Metadata
    seqid: int
    uuid: str
    label: str = ""
    subsystem: str = ""
    csum_alg: str = "sha256"
    salts: tuple[bytes, bytes] = field(default=(bytes(64), bytes(64)), repr=False)
    primary_ok: bool = True
    secondary_ok: bool = True

    @property
    def hdr_size(self) -> int:
        return self.metadata.hdr_size

    @property
    def in_sync(self) -> bool:
        return self.primary_ok and self.secondary_ok

    def replace(self, **changes: Any) -> Header:
        return dataclasses.replace(self, **changes)


# -- binary header and copies --------------------------------------------------------

def _cstr(raw: bytes, what: str) -> str:
    return read_text(raw, f"LUKS2 {what}", "utf-8")


def _checksum(alg_name: str, copy: bytes) -> bytes:
    alg = HASHES.get(alg_name)
    if alg is None:
        raise NotSupported(f"LUKS2 checksum algorithm {alg_name!r} is not supported")
    h = hashes.Hash(alg())
    h.update(copy[:_CSUM_OFFSET])
    h.update(bytes(64))
    h.update(copy[_CSUM_OFFSET + 64:])
    return h.finalize()


@dataclass(frozen=True)
class Copy:
    """One decoded, checksum-verified copy."""

    seqid: int
    uuid: str
    label: str
    subsystem: str
    csum_alg: str
    salt: bytes
    metadata: Metadata


def decode_copy(blob: bytes, offset: int, secondary: bool) -> Copy:
    """Decode and verify the copy at ``offset`` of ``blob``."""
    which = "secondary" if secondary else "primary"
    if len(blob) < offset + BIN_SIZE:
        raise CorruptHeader(f"LUKS2 {which} header truncated at offset {offset}")
    (magic, version, hdr_size, seqid, label, csum_alg, salt, uuid, subsystem, hdr_offset,
     _pad, csum) = _BIN.unpack_from(blob, offset)
    if magic != (MAGIC_2ND if secondary else MAGIC_1ST):
        raise CorruptHeader(f"no LUKS2 {which} magic at offset {offset}")
    if version != 2:
        raise CorruptHeader(f"LUKS2 {which} header has version {version}")
    if hdr_size not in HDR_SIZES:
        raise CorruptHeader(f"LUKS2 {which} header has bogus size {hdr_size}")
    if hdr_offset != offset or (secondary and offset != hdr_size):
        raise CorruptHeader(f"LUKS2 {which} header at {offset} says it is at {hdr_offset} "
                            f"with size {hdr_size}")
    if len(blob) < offset + hdr_size:
        raise CorruptHeader(f"LUKS2 {which} header truncated: needs {hdr_size} bytes at "
                            f"offset {offset}, the device has {max(len(blob) - offset, 0)}")
    alg = _cstr(csum_alg, "checksum algorithm")
    copy = blob[offset:offset + hdr_size]
    want = _checksum(alg, copy)
    if csum[:len(want)] != want:
        raise CorruptHeader(f"LUKS2 {which} header checksum mismatch")
    meta = metadata_from_json(parse_json_area(copy[BIN_SIZE:]), hdr_size - BIN_SIZE)
    return Copy(seqid, _cstr(uuid, "UUID"), _cstr(label, "label"),
                _cstr(subsystem, "subsystem"), alg, salt, meta)


def decode(blob: bytes) -> Header:
    """The header in ``blob`` (the device's first bytes: ``READ_SIZE`` is always enough).

    The valid copy with the higher ``seqid`` wins; ``primary_ok``/``secondary_ok`` say
    which copies were valid and current, so a writer can repair the other.
    """
    primary: Copy | None = None
    secondary: Copy | None = None
    errors: list[str] = []
    try:
        primary = decode_copy(blob, 0, False)
    except CorruptHeader as e:
        errors.append(str(e))
    offsets = [primary.metadata.hdr_size] if primary else list(SECONDARY_OFFSETS)
    second_errors = []
    for off in offsets:
        try:
            secondary = decode_copy(blob, off, True)
            break
        except CorruptHeader as e:
            second_errors.append(str(e))
    if secondary is None:
        errors.append(second_errors[0] if len(second_errors) == 1
                      else "no valid LUKS2 secondary header at any known offset")
    if primary is None and secondary is None:
        raise CorruptHeader("; ".join(errors))
    if primary is not None and secondary is not None:
        if secondary.seqid > primary.seqid:
            best, p_ok, s_ok = secondary, False, True
        else:
            best, p_ok, s_ok = primary, True, secondary.seqid == primary.seqid
    elif primary is not None:
        best, p_ok, s_ok = primary, True, False
    else:
        assert secondary is not None
        best, p_ok, s_ok = secondary, False, True
    salts = (primary.salt if primary else best.salt, secondary.salt if secondary else best.salt)
    return Header(best.metadata, best.seqid, best.uuid, best.label, best.subsystem,
                  best.csum_alg, salts, p_ok, s_ok)


def _pad(text: str, size: int, what: str) -> bytes:
    return write_text(text, size, f"LUKS2 {what}", "utf-8")


def encode_copy(header: Header, secondary: bool) -> bytes:
    """One copy (``hdr_size`` bytes) of ``header`` with its own salt and checksum."""
    meta = header.metadata
    hdr_size = meta.hdr_size
    text = json.dumps(metadata_to_json(meta), separators=(",", ":")).encode("ascii")
    if len(text) > hdr_size - BIN_SIZE - 1:
        raise CorruptHeader(f"LUKS2 metadata ({len(text)} bytes) does not fit its "
                            f"{hdr_size - BIN_SIZE}-byte JSON area")
    binary = _BIN.pack(MAGIC_2ND if secondary else MAGIC_1ST, 2, hdr_size, header.seqid,
                       _pad(header.label, 48, "label"), _pad(header.csum_alg, 32, "csum"),
                       header.salts[1 if secondary else 0], _pad(header.uuid, 40, "UUID"),
                       _pad(header.subsystem, 48, "subsystem"),
                       hdr_size if secondary else 0, bytes(184), bytes(64))
    copy = bytearray(binary.ljust(BIN_SIZE, b"\0") + text.ljust(hdr_size - BIN_SIZE, b"\0"))
    csum = _checksum(header.csum_alg, bytes(copy))
    copy[_CSUM_OFFSET:_CSUM_OFFSET + len(csum)] = csum
    return bytes(copy)


def probe_version(first: bytes) -> int:
    """1 or 2 from a device's first bytes, else ``CorruptHeader`` naming what is there.
    A LUKS2 device whose primary magic was destroyed is recognised by its secondary."""
    if len(first) >= 8 and first[:6] == MAGIC_1ST:
        version = int.from_bytes(first[6:8], "big")
        if version in (1, 2):
            return version
        raise CorruptHeader(f"unknown LUKS version {version}")
    for off in SECONDARY_OFFSETS:
        if first[off:off + 6] == MAGIC_2ND:
            return 2
    if len(first) < 592:
        raise CorruptHeader(f"device too small for a LUKS header ({len(first)} bytes)")
    raise CorruptHeader("not a LUKS device: no LUKS magic at offset 0 and no LUKS2 "
                        "secondary header")


def check_device_size(meta: Metadata, device_size: int) -> None:
    """Refuse metadata whose header copies and keyslots area run past the device's end
    (a keyslot written there would be lost, or grow a header file)."""
    if meta.areas_end > device_size:
        raise CorruptHeader(f"the device is too small (truncated?): {device_size} bytes, "
                            f"the LUKS2 header and keyslots area need at least "
                            f"{meta.areas_end}")


def _describe_keyslot(meta: Metadata, i: int, k: Keyslot) -> dict[str, Any]:
    bound = [d for d, digest in sorted(meta.digests.items()) if i in digest.keyslots]
    out: dict[str, Any] = {
        "type": k.type, "key_size": 8 * k.key_size, "priority": k.priority,
        "kdf": kdf.describe(k.kdf) if k.kdf is not None else {"type": k.kdf_type},
        "cipher": k.area.encryption, "cipher_key_size": 8 * k.area.key_size,
        "af": {"stripes": k.af_stripes, "hash": k.af_hash},
        "area_offset": k.area.offset, "area_size": k.area.size,
        "digest": bound[0] if bound else None,
        # cryptsetup's "(unbound)": its key opens no data segment
        "bound": any(meta.digests[d].segments for d in bound)}
    if k.unusable is not None:
        out["unusable"] = k.unusable
    return out


def describe(h2: Header) -> dict[str, Any]:
    """The header as a JSON-able dict, without salts or digests."""
    meta = h2.metadata
    return {
        "version": 2, "uuid": h2.uuid, "label": h2.label, "subsystem": h2.subsystem,
        "epoch": h2.seqid, "metadata_size": meta.hdr_size,
        "keyslots_size": meta.config.keyslots_size,
        "header_copies": {"primary": h2.primary_ok, "secondary": h2.secondary_ok},
        "flags": list(meta.config.flags), "requirements": list(meta.config.mandatory),
        "segments": {str(i): {"type": s.type, "offset": s.offset,
                              "size": "dynamic" if s.size is None else s.size,
                              "iv_tweak": s.iv_tweak, "cipher": s.encryption,
                              "sector_size": s.sector_size,
                              "integrity": None if s.integrity is None else
                              s.integrity.get("type")}
                     for i, s in sorted(meta.segments.items())},
        "keyslots": {str(i): _describe_keyslot(meta, i, k)
                     for i, k in sorted(meta.keyslots.items())},
        "digests": {str(i): {"type": d.type, "hash": d.hash, "iterations": d.iterations,
                             "keyslots": list(d.keyslots), "segments": list(d.segments)}
                    for i, d in sorted(meta.digests.items())},
        "tokens": {str(i): {"type": t.get("type"), "keyslots": t.get("keyslots")}
                   for i, t in sorted(meta.tokens.items())},
    }


__all__ = ["BIN_SIZE", "HDR_SIZES", "READ_SIZE", "Area", "Config", "Copy", "Digest", "Header",
           "Keyslot", "Metadata", "Segment", "check_device_size", "decode", "decode_copy",
           "describe", "encode_copy", "metadata_from_json", "metadata_to_json",
           "parse_json_area", "probe_version"]
