"""The LUKS2 JSON metadata: its typed values, strict parsing and validation, and
serialisation back to JSON.

The metadata (keyslots, tokens, segments, digests, config) is the JSON text in each
header copy's JSON area. It is validated as strictly as cryptsetup does: u64 values are
decimal strings, object keys are small decimal numbers, every reference resolves,
keyslot areas lie in the keyslots area without overlapping, segments do not overlap.
Sans-I/O. The binary header around the JSON area, its checksum and the choice between
the two copies are in ``luks2``, which re-exports this module's names.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptoplane.exceptions import NotSupported
from cryptoplane.volume import kdf
from cryptoplane.volume.af import HASHES
from cryptoplane.volume.errors import CorruptHeader

# A header copy is a 4096-byte binary header then the JSON area, so the config's
# ``json_size`` fixes the copy's size, which must be one of HDR_SIZES.
BIN_SIZE = 4096
HDR_SIZES = (0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000,
             0x400000)
MAX_KEYSLOTS_SIZE = 0x8000000  # 128 MiB
MAX_OBJECTS = 32
SALT_SIZE = 32
_NUMBER = re.compile(r"[0-9]{1,20}")
_SUPPORTED_REQUIREMENTS: frozenset[str] = frozenset()


# -- typed values --------------------------------------------------------------------

@dataclass(frozen=True)
class Area:
    """Where a keyslot's encrypted split key lies (bytes from the header start)."""

    offset: int
    size: int
    encryption: str = "aes-xts-plain64"
    key_size: int = 64


@dataclass(frozen=True)
class Keyslot:
    """A keyslot. One that cryptoplane cannot open (an unknown type or KDF, odd AF
    parameters: what cryptsetup loads but may not open either) has ``unusable`` saying
    why, ``kdf`` None if its KDF is unknown, and ``raw``, its JSON object, which is
    written back unchanged: it is shown, skipped when unlocking, and never overwritten."""

    key_size: int
    area: Area
    kdf: kdf.KdfParams | None
    salt: bytes = field(repr=False)
    af_hash: str = "sha256"
    af_stripes: int = 4000
    priority: int | None = None
    unusable: str | None = None
    raw: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def type(self) -> str:
        return str(self.raw.get("type")) if self.raw is not None else "luks2"

    @property
    def kdf_type(self) -> str:
        if self.kdf is not None:
            return self.kdf.type
        jkdf = self.raw.get("kdf") if self.raw is not None else None
        return str(jkdf.get("type")) if isinstance(jkdf, dict) else "unknown"


@dataclass(frozen=True)
class Digest:
    """A PBKDF2 digest of the volume key, binding keyslots to segments."""

    keyslots: tuple[int, ...]
    segments: tuple[int, ...]
    hash: str
    iterations: int
    salt: bytes = field(repr=False)
    digest: bytes = field(repr=False)
    type: str = "pbkdf2"


@dataclass(frozen=True)
class Segment:
    """A data segment. ``size`` None means ``dynamic`` (to the end of the device);
    ``iv_tweak`` counts 512-byte sectors, as dm-crypt's ``iv_offset``."""

    offset: int
    size: int | None
    iv_tweak: int
    encryption: str
    sector_size: int
    type: str = "crypt"
    flags: tuple[str, ...] = ()
    integrity: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Config:
    json_size: int
    keyslots_size: int
    flags: tuple[str, ...] = ()
    mandatory: tuple[str, ...] = ()


@dataclass(frozen=True)
class Metadata:
    keyslots: Mapping[int, Keyslot]
    tokens: Mapping[int, Mapping[str, Any]]
    segments: Mapping[int, Segment]
    digests: Mapping[int, Digest]
    config: Config

    def check_supported(self) -> None:
        """Refuse, by name, what this implementation cannot open or change safely."""
        unknown = [r for r in self.config.mandatory if r not in _SUPPORTED_REQUIREMENTS]
        if unknown:
            # convert_ivs.REQUIREMENT (not imported: that module builds on this one)
            hint = (": a `cryptoplane volume convert-ivs` was interrupted; run it again "
                    "to finish" if "cryptoplane-convert-ivs" in unknown else "")
            raise NotSupported(f"LUKS2 mandatory requirement(s) not supported: "
                               f"{', '.join(unknown)}{hint}")
        if len(self.segments) != 1:
            raise NotSupported(f"{len(self.segments)} data segments (reencryption in "
                               f"progress?) are not supported; one is")
        seg = self.segments[0]
        if seg.type != "crypt":
            raise NotSupported(f"segment type {seg.type!r} is not supported")
        if seg.integrity is not None:
            raise NotSupported(f"integrity segments ({seg.integrity.get('type')!r}) "
                               f"are not supported")
        if seg.encryption.startswith("capi:") or "-random" in seg.encryption:
            raise NotSupported(f"AEAD/crypto API segment encryption {seg.encryption!r} "
                               f"is not supported")

    def keyslot_digest(self, keyslot: int) -> tuple[int, Digest]:
        """The digest that checks what ``keyslot`` opens (validation makes it unique)."""
        for i, d in sorted(self.digests.items()):
            if keyslot in d.keyslots:
                return i, d
        raise CorruptHeader(f"keyslot {keyslot} has no digest")

    def segment_digest(self, segment: int = 0) -> tuple[int, Digest]:
        for i, d in sorted(self.digests.items()):
            if segment in d.segments:
                return i, d
        raise CorruptHeader(f"segment {segment} has no digest")  # validation forbids this

    @property
    def hdr_size(self) -> int:
        return self.config.json_size + BIN_SIZE

    @property
    def areas_end(self) -> int:
        """End of the metadata and keyslots areas: what a header backup holds."""
        return 2 * self.hdr_size + self.config.keyslots_size


# -- JSON text -----------------------------------------------------------------------

def _fail(msg: str) -> CorruptHeader:
    return CorruptHeader(f"LUKS2 metadata: {msg}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _fail(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise _fail(f"non-standard JSON constant {name}")


def parse_json_area(area: bytes) -> Any:
    """The JSON value of a JSON area: text from the first byte, then only NULs."""
    end = area.find(b"\0")
    if end < 0:
        raise _fail("JSON area has no terminating NUL")
    if area[end:].count(0) != len(area) - end:
        raise _fail("bytes other than NUL follow the JSON text")
    text = area[:end]
    if not text.startswith(b"{") or not text.endswith(b"}"):
        raise _fail("JSON text must be one object with nothing around it")
    try:
        return json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates,
                          parse_constant=_no_constant)
    except CorruptHeader:
        raise
    except (ValueError, RecursionError) as e:
        raise _fail(f"JSON does not parse ({type(e).__name__})") from None


# -- JSON validation -----------------------------------------------------------------

def _obj(parent: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    v = parent.get(key)
    if not isinstance(v, dict):
        raise _fail(f"{where} lacks object {key!r}")
    return v


def _str(parent: Mapping[str, Any], key: str, where: str) -> str:
    v = parent.get(key)
    if not isinstance(v, str) or not v:
        raise _fail(f"{where} lacks string {key!r}")
    return v


def _int(parent: Mapping[str, Any], key: str, where: str, hi: int = 0xFFFFFFFF) -> int:
    v = parent.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= hi:
        raise _fail(f"{where} field {key!r} is not an integer in 0..{hi}")
    return v


def _u64(parent: Mapping[str, Any], key: str, where: str) -> int:
    v = parent.get(key)
    if not isinstance(v, str) or not _NUMBER.fullmatch(v) or int(v) > 0xFFFFFFFFFFFFFFFF:
        raise _fail(f"{where} field {key!r} is not a u64 decimal string")
    return int(v)


def _strings(parent: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    v = parent.get(key)
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise _fail(f"{where} field {key!r} is not an array of strings")
    return tuple(v)


def _refs(parent: Mapping[str, Any], key: str, where: str, known: Mapping[int, Any],
          ) -> tuple[int, ...]:
    out = []
    for s in _strings(parent, key, where):
        if not _NUMBER.fullmatch(s) or int(s) not in known:
            raise _fail(f"{where} refers to missing {key[:-1]} {s!r}")
        out.append(int(s))
    return tuple(out)


def _b64(parent: Mapping[str, Any], key: str, where: str) -> bytes:
    text = _str(parent, key, where)
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise _fail(f"{where} field {key!r} is not base64") from None


def _numbered(section: Mapping[str, Any], name: str) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for key, value in section.items():
        if not _NUMBER.fullmatch(key) or str(int(key)) != key or int(key) >= MAX_OBJECTS:
            raise _fail(f"{name} id {key!r} is not a number below {MAX_OBJECTS}")
        if not isinstance(value, dict):
            raise _fail(f"{name} {key} is not an object")
        out[int(key)] = value
    return out


def _kdf(where: str, jkdf: Mapping[str, Any]) -> kdf.KdfParams | None:
    """A keyslot's KDF costs, None for a KDF this reader does not know. Fields the KDF
    does not use are ignored (older cryptsetup left argon2 fields in pbkdf2 keyslots and
    back; cryptsetup drops them on load, as the next write here does)."""
    kind = _str(jkdf, "type", f"{where} kdf")
    if kind == "pbkdf2":
        return kdf.Pbkdf2(_str(jkdf, "hash", f"{where} kdf"),
                          _int(jkdf, "iterations", f"{where} kdf"))
    if kind in ("argon2i", "argon2id"):
        return kdf.Argon2(kind, _int(jkdf, "time", f"{where} kdf"),
                          _int(jkdf, "memory", f"{where} kdf"),
                          _int(jkdf, "cpus", f"{where} kdf"))
    return None


def _keyslot(i: int, j: Mapping[str, Any]) -> Keyslot:
    """Validate a keyslot as cryptsetup does: what every keyslot needs (type, key size,
    an area), then what a ``luks2`` keyslot needs (kdf, af and raw area objects with
    their fields). What passes but cannot be opened here is an unusable keyslot, not a
    broken header."""
    where = f"keyslot {i}"
    ktype = _str(j, "type", where)
    key_size = _int(j, "key_size", where)
    jarea = _obj(j, "area", where)
    atype = _str(jarea, "type", f"{where} area")
    offset = _u64(jarea, "offset", f"{where} area")
    size = _u64(jarea, "size", f"{where} area")
    priority = _int(j, "priority", where, 2) if "priority" in j else None
    if ktype != "luks2":
        return Keyslot(key_size, Area(offset, size, "", 0), None, b"", priority=priority,
                       unusable=f"keyslot type {ktype!r} is not supported", raw=dict(j))
    jkdf, jaf = _obj(j, "kdf", where), _obj(j, "af", where)
    params = _kdf(where, jkdf)
    salt_text = _str(jkdf, "salt", f"{where} kdf")
    if _str(jaf, "type", f"{where} af") != "luks1":
        raise _fail(f"{where} AF type {jaf.get('type')!r} is not luks1")
    af_hash = _str(jaf, "hash", f"{where} af")
    stripes = _int(jaf, "stripes", f"{where} af")
    if atype != "raw":
        raise _fail(f"{where} area type {atype!r} is not raw")
    area = Area(offset, size, _str(jarea, "encryption", f"{where} area"),
                _int(jarea, "key_size", f"{where} area"))
    try:
        salt = base64.b64decode(salt_text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        salt = b""
    unusable = None
    if params is None:
        unusable = f"KDF {jkdf['type']!r} is not supported"
    elif len(salt) != SALT_SIZE:
        unusable = f"its kdf salt is not {SALT_SIZE} bytes of base64"
    elif stripes != 4000:
        unusable = f"it has {stripes} AF stripes; LUKS uses 4000"
    elif af_hash not in HASHES:
        unusable = f"AF hash {af_hash!r} is not supported"
    return Keyslot(key_size, area, params, salt, af_hash, stripes, priority, unusable,
                   dict(j) if unusable else None)


def _segment(i: int, j: Mapping[str, Any]) -> Segment:
    where = f"segment {i}"
    stype = _str(j, "type", where)
    offset = _u64(j, "offset", where)
    size_text = _str(j, "size", where)
    size = None if size_text == "dynamic" else _u64(j, "size", where)
    if size == 0:
        raise _fail(f"{where} has size 0")
    if offset % 512 or (size or 0) % 512:
        raise _fail(f"{where} offset and size must be multiples of 512")
    flags = _strings(j, "flags", where) if "flags" in j else ()
    if stype != "crypt":
        return Segment(offset, size, 0, "", 512, stype, flags)
    iv_tweak = _u64(j, "iv_tweak", where)
    encryption = _str(j, "encryption", where)
    sector_size = _int(j, "sector_size", where)
    if sector_size not in (512, 1024, 2048, 4096):
        raise _fail(f"{where} sector size {sector_size} is not 512, 1024, 2048 or 4096")
    if size is not None and size % sector_size:
        raise _fail(f"{where} size is not a multiple of its sector size")
    integrity = None
    if "integrity" in j:
        integrity = _obj(j, "integrity", where)
        _str(integrity, "type", f"{where} integrity")
    return Segment(offset, size, iv_tweak, encryption, sector_size, stype, flags, integrity)


def _digest(i: int, j: Mapping[str, Any], keyslots: Mapping[int, Any],
            segments: Mapping[int, Any]) -> Digest:
    where = f"digest {i}"
    dtype = _str(j, "type", where)
    ks = _refs(j, "keyslots", where, keyslots)
    segs = _refs(j, "segments", where, segments)
    if dtype != "pbkdf2":
        raise NotSupported(f"LUKS2 digest {i} type {dtype!r} is not supported")
    hash_name = _str(j, "hash", where)
    if hash_name not in HASHES:
        raise NotSupported(f"LUKS2 digest {i} hash {hash_name!r} is not supported")
    salt, digest = _b64(j, "salt", where), _b64(j, "digest", where)
    iterations = _int(j, "iterations", where)
    if iterations < 1 or len(salt) != SALT_SIZE:
        raise _fail(f"{where} needs iterations >= 1 and a {SALT_SIZE}-byte salt")
    if len(digest) not in (20, HASHES[hash_name].digest_size):
        raise _fail(f"{where} value has a bad length ({len(digest)} bytes)")
    return Digest(ks, segs, hash_name, iterations, salt, digest)


def _config(j: Mapping[str, Any]) -> Config:
    jc = _obj(j, "config", "metadata")
    json_size = _u64(jc, "json_size", "config")
    keyslots_size = _u64(jc, "keyslots_size", "config")
    flags = _strings(jc, "flags", "config") if "flags" in jc else ()
    mandatory: tuple[str, ...] = ()
    if "requirements" in jc:
        req = _obj(jc, "requirements", "config")
        if "mandatory" in req:
            mandatory = _strings(req, "mandatory", "config requirements")
    if json_size + BIN_SIZE not in HDR_SIZES:
        raise _fail(f"json_size {json_size} does not make a valid header size")
    if keyslots_size % 4096 or keyslots_size > MAX_KEYSLOTS_SIZE:
        raise _fail(f"keyslots_size {keyslots_size} is not 4 KiB aligned up to 128 MiB")
    return Config(json_size, keyslots_size, flags, mandatory)


def metadata_from_json(j: Any, json_area_size: int) -> Metadata:
    """Validate a parsed JSON object as LUKS2 metadata."""
    if not isinstance(j, dict):
        raise _fail("top level is not an object")
    config = _config(j)
    if config.json_size != json_area_size:
        raise _fail(f"json_size {config.json_size} differs from the binary header's "
                    f"JSON area of {json_area_size} bytes")
    raw_keyslots = _numbered(_obj(j, "keyslots", "metadata"), "keyslot")
    keyslots = {i: _keyslot(i, v) for i, v in raw_keyslots.items()}
    raw_segments = _numbered(_obj(j, "segments", "metadata"), "segment")
    if not raw_segments:
        raise _fail("no segments")
    if sorted(raw_segments) != list(range(len(raw_segments))):
        raise _fail("segment ids are not 0..n-1")
    segments = {i: _segment(i, v) for i, v in raw_segments.items()}
    digests = {i: _digest(i, v, keyslots, segments)
               for i, v in _numbered(_obj(j, "digests", "metadata"), "digest").items()}
    tokens = _numbered(_obj(j, "tokens", "metadata"), "token")
    for i, t in tokens.items():
        _str(t, "type", f"token {i}")
        _refs(t, "keyslots", f"token {i}", keyslots)
    meta = Metadata(keyslots, tokens, segments, digests, config)
    _validate_bindings(meta)
    _validate_layout(meta)
    return meta


def _validate_bindings(meta: Metadata) -> None:
    """Each luks2 keyslot is checked by exactly one digest: with none, what it opens
    cannot be verified; with two, which key it holds is ambiguous."""
    for i, k in sorted(meta.keyslots.items()):
        if k.type != "luks2":
            continue
        owners = [d for d, digest in sorted(meta.digests.items()) if i in digest.keyslots]
        if len(owners) != 1:
            raise _fail(f"keyslot {i} is bound to {len(owners)} digests "
                        f"({', '.join(map(str, owners)) or 'none'}); exactly one is required")


def _validate_layout(meta: Metadata) -> None:
    for i, s in meta.segments.items():
        if s.type == "crypt" and not any(i in d.segments for d in meta.digests.values()):
            raise _fail(f"crypt segment {i} has no digest")
    spans = sorted((s.offset, s.size, i) for i, s in meta.segments.items())
    for (off_a, size_a, sa), (off_b, _, sb) in itertools.pairwise(spans):
        if size_a is None or off_b < off_a + size_a:
            raise _fail(f"segments {sa} and {sb} overlap")
    metadata_end = 2 * meta.hdr_size
    first = min(s.offset for s in meta.segments.values())
    if first and (first < meta.config.keyslots_size
                  or first - meta.config.keyslots_size < metadata_end):
        raise _fail(f"keyslots_size {meta.config.keyslots_size} does not fit before the "
                    f"data offset {first}")
    areas = []
    for i, k in meta.keyslots.items():
        a = k.area
        if a.offset < metadata_end or a.size == 0 or a.offset + a.size > meta.areas_end:
            raise _fail(f"keyslot {i} area [{a.offset}, +{a.size}] lies outside the "
                        f"keyslots area [{metadata_end}, {meta.areas_end})")
        areas.append((a.offset, a.offset + a.size, i))
    areas.sort()
    for (_, end_a, ka), (start_b, _, kb) in itertools.pairwise(areas):
        if start_b < end_a:
            raise _fail(f"keyslot areas {ka} and {kb} overlap")


# -- serialisation -------------------------------------------------------------------

def metadata_to_json(meta: Metadata) -> dict[str, Any]:
    """The JSON object for ``meta``, in cryptsetup's key order."""
    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode("ascii")

    keyslots: dict[str, Any] = {}
    for i, k in sorted(meta.keyslots.items()):
        if k.raw is not None or k.kdf is None:
            keyslots[str(i)] = dict(k.raw or {})
            continue
        ks: dict[str, Any] = {
            "type": "luks2", "key_size": k.key_size,
            "af": {"type": "luks1", "stripes": k.af_stripes, "hash": k.af_hash},
            "area": {"type": "raw", "offset": str(k.area.offset), "size": str(k.area.size),
                     "encryption": k.area.encryption, "key_size": k.area.key_size},
            "kdf": kdf.to_json(k.kdf, b64(k.salt))}
        if k.priority is not None:
            ks["priority"] = k.priority
        keyslots[str(i)] = ks
    segments: dict[str, Any] = {}
    for i, s in sorted(meta.segments.items()):
        seg: dict[str, Any] = {"type": s.type, "offset": str(s.offset),
                               "size": "dynamic" if s.size is None else str(s.size)}
        if s.type == "crypt":
            seg.update({"iv_tweak": str(s.iv_tweak), "encryption": s.encryption,
                        "sector_size": s.sector_size})
            if s.integrity is not None:
                seg["integrity"] = dict(s.integrity)
        if s.flags:
            seg["flags"] = list(s.flags)
        segments[str(i)] = seg
    digests = {str(i): {"type": d.type, "keyslots": [str(x) for x in d.keyslots],
                        "segments": [str(x) for x in d.segments], "hash": d.hash,
                        "iterations": d.iterations, "salt": b64(d.salt),
                        "digest": b64(d.digest)}
               for i, d in sorted(meta.digests.items())}
    config: dict[str, Any] = {"json_size": str(meta.config.json_size),
                              "keyslots_size": str(meta.config.keyslots_size)}
    if meta.config.flags:
        config["flags"] = list(meta.config.flags)
    if meta.config.mandatory:
        config["requirements"] = {"mandatory": list(meta.config.mandatory)}
    return {"keyslots": keyslots, "tokens": {str(i): dict(t) for i, t in
                                             sorted(meta.tokens.items())},
            "segments": segments, "digests": digests, "config": config}


__all__ = ["BIN_SIZE", "HDR_SIZES", "MAX_KEYSLOTS_SIZE", "MAX_OBJECTS", "SALT_SIZE", "Area",
           "Config", "Digest", "Keyslot", "Metadata", "Segment", "metadata_from_json",
           "metadata_to_json", "parse_json_area"]
