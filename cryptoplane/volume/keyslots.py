"""Keyslots: sealing a volume key under a passphrase and opening it again. Sans-I/O.

A keyslot stores the volume key split by the anti-forensic splitter (4000 stripes) and
encrypted, 512-byte sector by sector from IV 0, with a key derived from the passphrase
(PBKDF2 or Argon2). LUKS2 names the area cipher per keyslot (usually aes-xts-plain64);
LUKS1 uses the volume's own cipher. A candidate key is accepted only if its PBKDF2
digest matches the header's, compared in constant time.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass

from cryptoplane.exceptions import InvalidRequest, KeyRejected, NotSupported
from cryptoplane.volume import af, kdf, luks1, luks2
from cryptoplane.volume.errors import CorruptHeader, KeyslotError
from cryptoplane.volume.ivs import SectorCipher, parse_spec

Random = Callable[[int], bytes]


def digest_of(volume_key: bytes, hash_name: str, iterations: int, salt: bytes,
              length: int) -> bytes:
    """The PBKDF2 digest LUKS keeps of a volume key."""
    return kdf.derive(kdf.Pbkdf2(hash_name, iterations), volume_key, salt, length)


def digest_matches(volume_key: bytes, hash_name: str, iterations: int, salt: bytes,
                   expected: bytes) -> bool:
    got = digest_of(volume_key, hash_name, iterations, salt, len(expected))
    return hmac.compare_digest(got, expected)


def _area_cipher(spec: str, key: bytes) -> SectorCipher:
    try:
        return SectorCipher(spec, key, 512)
    except KeyRejected:
        raise CorruptHeader(f"keyslot cipher {spec!r} cannot take a {len(key)}-byte key"
                            ) from None


# -- LUKS2 ---------------------------------------------------------------------------

def luks2_material_size(slot: luks2.Keyslot) -> int:
    size = af.material_size(slot.key_size, slot.af_stripes)
    if size > slot.area.size:
        raise CorruptHeader(f"keyslot area of {slot.area.size} bytes cannot hold "
                            f"{size} bytes of split key")
    return size


def open_luks2(slot: luks2.Keyslot, digest: luks2.Digest, passphrase: bytes,
               area: bytes, limits: kdf.Limits | None = None) -> bytes | None:
    """The volume key if ``passphrase`` opens ``slot`` (whose area bytes are ``area``),
    else None."""
    if slot.kdf is None or slot.unusable is not None:
        raise NotSupported(f"keyslot cannot be opened: {slot.unusable or 'unknown KDF'}")
    size = luks2_material_size(slot)
    if len(area) < size:
        raise CorruptHeader(f"keyslot area truncated: {len(area)} of {size} bytes")
    if not 1 <= slot.key_size <= 512:
        raise CorruptHeader(f"keyslot key size {slot.key_size} is out of range")
    key = kdf.derive(slot.kdf, passphrase, slot.salt, slot.area.key_size, limits)
    material = _area_cipher(slot.area.encryption, key).decrypt(bytes(area[:size]), 0)
    candidate = af.merge(material, slot.key_size, slot.af_hash, slot.af_stripes)
    return candidate if check_luks2_key(digest, candidate) else None


def check_luks2_key(digest: luks2.Digest, volume_key: bytes) -> bool:
    return digest_matches(volume_key, digest.hash, digest.iterations, digest.salt,
                          digest.digest)


@dataclass(frozen=True)
class Sealed:
    """A new keyslot's salt and the encrypted material to write to its area."""

    salt: bytes
    material: bytes


def seal(volume_key: bytes, passphrase: bytes, params: kdf.KdfParams, encryption: str,
         area_key_size: int, af_hash: str = "sha256", random: Random = os.urandom) -> Sealed:
    """Split, then encrypt ``volume_key`` under ``passphrase``: the material for a
    keyslot area (LUKS2) or key material sectors (LUKS1)."""
    salt = random(luks2.SALT_SIZE)
    key = kdf.derive(params, passphrase, salt, area_key_size)
    cipher = SectorCipher(encryption, key, 512)
    material = af.split(volume_key, af_hash, af.STRIPES, random)
    return Sealed(salt, cipher.encrypt(material, 0))


def make_digest(volume_key: bytes, iterations: int, hash_name: str = "sha256",
                random: Random = os.urandom, length: int | None = None) -> tuple[bytes, bytes]:
    """A fresh (salt, digest) for ``volume_key``."""
    salt = random(luks2.SALT_SIZE)
    size = length or af.hash_algorithm(hash_name).digest_size
    return salt, digest_of(volume_key, hash_name, iterations, salt, size)


# -- LUKS1 ---------------------------------------------------------------------------

def luks1_material_size(header: luks1.Header) -> int:
    return header.material_sectors() * luks1.SECTOR


def open_luks1(header: luks1.Header, index: int, passphrase: bytes, material: bytes,
               limits: kdf.Limits | None = None) -> bytes | None:
    """The volume key if ``passphrase`` opens slot ``index``, else None."""
    slot = header.slots[index]
    if not slot.active:
        return None
    size = luks1_material_size(header)
    if len(material) < size:
        raise CorruptHeader(f"LUKS1 key slot {index} material truncated: "
                            f"{len(material)} of {size} bytes")
    params = kdf.Pbkdf2(header.hash_spec, slot.iterations)
    key = kdf.derive(params, passphrase, slot.salt, header.key_bytes, limits)
    cipher = _area_cipher(header.cipher, key)
    plain = cipher.decrypt(bytes(material[:size]), 0)
    candidate = af.merge(plain, header.key_bytes, header.hash_spec, slot.stripes)
    return candidate if check_luks1_key(header, candidate) else None


def check_luks1_key(header: luks1.Header, volume_key: bytes) -> bool:
    return digest_matches(volume_key, header.hash_spec, header.mk_digest_iterations,
                          header.mk_digest_salt, header.mk_digest)


# -- allocation (LUKS2 metadata) ----------------------------------------------------

def free_area(meta: luks2.Metadata, size: int) -> int:
    """The lowest 4 KiB-aligned offset where ``size`` bytes fit in the keyslots area
    without touching any keyslot's area (first fit, as cryptsetup)."""
    size = -(-size // 4096) * 4096
    taken = sorted((k.area.offset, k.area.offset + k.area.size)
                   for k in meta.keyslots.values())
    at = 2 * meta.hdr_size
    for start, end in taken:
        if at + size <= start:
            break
        at = max(at, -(-end // 4096) * 4096)
    if at + size > meta.areas_end:
        raise KeyslotError("no free space left in the keyslots area")
    return at


def free_slot(used: Collection[int], limit: int, wanted: int | None) -> int:
    """``wanted`` if it is free, else the lowest free slot number below ``limit``."""
    if wanted is not None:
        if not 0 <= wanted < limit:
            raise KeyslotError(f"keyslot {wanted} does not exist (0..{limit - 1})")
        if wanted in used:
            raise KeyslotError(f"keyslot {wanted} is in use")
        return wanted
    for i in range(limit):
        if i not in used:
            return i
    raise KeyslotError("all keyslots are in use")


def area_cipher(meta: luks2.Metadata, key_size: int) -> tuple[str, int]:
    """cryptsetup's choice: the segment's cipher for the keyslot area when it can take
    the volume key's size, else aes-xts-plain64 with a 512-bit key."""
    try:
        spec = parse_spec(meta.segments[0].encryption)
        if key_size in spec.key_sizes():
            return str(spec), key_size
    except (NotSupported, InvalidRequest):
        pass
    return "aes-xts-plain64", 64


def with_keyslot(meta: luks2.Metadata, slot: int, ks: luks2.Keyslot | None,
                 ) -> luks2.Metadata:
    """``meta`` with ``slot`` set to ``ks`` (and bound to segment 0's digest), or removed
    from the keyslots, digests and tokens when ``ks`` is None."""
    ks_map = dict(meta.keyslots)
    digests = dict(meta.digests)
    tokens = dict(meta.tokens)
    if ks is None:
        ks_map.pop(slot, None)
        for i, d in digests.items():
            digests[i] = dataclasses.replace(
                d, keyslots=tuple(x for x in d.keyslots if x != slot))
        for i, t in tokens.items():
            refs = t.get("keyslots", [])
            tokens[i] = {**t, "keyslots": [x for x in refs if x != str(slot)]}
    else:
        ks_map[slot] = ks
        i, d = meta.segment_digest(0)
        if slot not in d.keyslots:
            digests[i] = dataclasses.replace(d, keyslots=(*d.keyslots, slot))
    return dataclasses.replace(meta, keyslots=ks_map, digests=digests, tokens=tokens)


__all__ = [
    "Sealed",
    "area_cipher",
    "check_luks1_key",
    "check_luks2_key",
    "digest_matches",
    "digest_of",
    "free_area",
    "free_slot",
    "luks1_material_size",
    "luks2_material_size",
    "make_digest",
    "open_luks1",
    "open_luks2",
    "seal",
    "with_keyslot",
]
