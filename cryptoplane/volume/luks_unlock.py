"""Opening a LUKS volume's key: which keyslots to try, in which order, within which KDF
limits; and the data layout that the header and the opened key describe.

The caller (``luks``) opens and locks the device and reads its header (``luks_io``);
this module only reads keyslot material from it, never writes.
"""

from __future__ import annotations

from cryptoplane.exceptions import CryptoplaneError, InvalidRequest, NotSupported
from cryptoplane.volume import kdf as kdfs
from cryptoplane.volume import keyslots, luks1
from cryptoplane.volume.errors import (
    CorruptHeader,
    KdfLimitExceeded,
    KeyslotError,
    WrongPassphrase,
)
from cryptoplane.volume.layout import DataLayout
from cryptoplane.volume.luks_io import Device, LuksHeader


def _candidates(loaded: LuksHeader, slot: int | None, for_data: bool) -> list[int]:
    """The slots to try, in cryptsetup's order: LUKS2 high priority first, never those
    marked ignore (priority 0) unless named. Without ``slot``, only keyslots whose key
    opens the data segment; a named slot is tried whatever its binding, unless
    ``for_data`` (a key that opens no data must not be taken for the volume key)."""
    if loaded.version == 1:
        if slot is not None and not 0 <= slot < luks1.SLOTS:
            raise KeyslotError(f"LUKS1 key slot {slot} does not exist (0..7)")
        return [i for i in range(luks1.SLOTS)
                if loaded.h1.slots[i].in_use and slot in (None, i)]
    meta = loaded.h2.metadata
    _, digest = meta.segment_digest(0)
    if slot is not None:
        if slot not in meta.keyslots:
            raise KeyslotError(f"keyslot {slot} is not active")
        if for_data and slot not in digest.keyslots:
            raise KeyslotError(f"keyslot {slot} is not bound to the data segment: its key "
                               f"cannot open the data")
        return [slot]
    ids = [i for i in sorted(meta.keyslots) if i in digest.keyslots]
    high = [i for i in ids if meta.keyslots[i].priority == 2]
    normal = [i for i in ids if meta.keyslots[i].priority not in (0, 2)]
    return high + normal


def _slot_kdf(loaded: LuksHeader, i: int) -> kdfs.KdfParams:
    if loaded.version == 2:
        ks = loaded.h2.metadata.keyslots[i]
        if ks.kdf is None or ks.unusable is not None:
            raise NotSupported(f"keyslot {i} cannot be opened: {ks.unusable}")
        return ks.kdf
    s = loaded.h1.slots[i]
    if s.marker is not None:
        raise CorruptHeader(f"LUKS1 key slot {i} is in an invalid state 0x{s.marker:08x}")
    return kdfs.Pbkdf2(loaded.h1.hash_spec, s.iterations)


def _slot_key_length(loaded: LuksHeader, i: int) -> int:
    """Bytes the keyslot's KDF derives (its area key): PBKDF2's work grows with them."""
    if loaded.version == 2:
        return loaded.h2.metadata.keyslots[i].area.key_size
    return loaded.h1.key_bytes


def _digest_length(loaded: LuksHeader, i: int | None) -> int:
    if loaded.version == 2:
        meta = loaded.h2.metadata
        return len((meta.segment_digest(0) if i is None else meta.keyslot_digest(i))[1].digest)
    return len(loaded.h1.mk_digest)


def _digest_kdf(loaded: LuksHeader, i: int | None) -> kdfs.Pbkdf2:
    """The PBKDF2 that checks what keyslot ``i`` decrypts (None: a volume key for the
    data segment): run for every slot tried,
    right passphrase or not, so it counts against the unlock's budget as the slot's own
    KDF does (a header with 32 slots and a 5M-iteration digest took 38 s per wrong
    passphrase when only the keyslot KDFs were counted)."""
    if loaded.version == 2:
        meta = loaded.h2.metadata
        digest = meta.segment_digest(0)[1] if i is None else meta.keyslot_digest(i)[1]
        return kdfs.Pbkdf2(digest.hash, digest.iterations)
    return kdfs.Pbkdf2(loaded.h1.hash_spec, loaded.h1.mk_digest_iterations)


def _try_slot(dev: Device, loaded: LuksHeader, i: int, secret: bytes) -> bytes | None:
    """The volume key if ``secret`` opens keyslot ``i``, else None."""
    if loaded.version == 2:
        meta = loaded.h2.metadata
        ks = meta.keyslots[i]
        area = dev.read_exact(ks.area.offset, keyslots.luks2_material_size(ks),
                              f"keyslot {i} area")
        return keyslots.open_luks2(ks, meta.keyslot_digest(i)[1], secret, area)
    h = loaded.h1
    material = dev.read_exact(h.slots[i].offset * luks1.SECTOR,
                              keyslots.luks1_material_size(h), f"key slot {i} material")
    return keyslots.open_luks1(h, i, secret, material)


def open_key(dev: Device, loaded: LuksHeader, secret: bytes | None,
             volume_key: bytes | None, slot: int | None = None, *,
             for_data: bool = True, skip: int | None = None) -> tuple[int | None, bytes]:
    """(slot, volume key) for the passphrase or volume key given (slot None for a volume
    key). ``slot`` limits the search to that keyslot, ``skip`` leaves one out.
    ``for_data``: the key is to open the data (or change keyslots), so the header's
    features must all be supported and the key must be the data segment's; without it
    only the passphrase is checked, as ``cryptsetup open --test-passphrase`` does.
    Whatever the passphrase, the work is capped as a whole (``kdf.Limits``)."""
    if loaded.version == 2 and for_data:
        loaded.h2.metadata.check_supported()
    if volume_key is not None:
        kdfs.check_digest(_digest_kdf(loaded, None), length=_digest_length(loaded, None))
        ok = (keyslots.check_luks2_key(loaded.h2.metadata.segment_digest(0)[1], volume_key)
              if loaded.version == 2 else keyslots.check_luks1_key(loaded.h1, volume_key))
        if not ok:
            raise WrongPassphrase("the volume key does not match the header's digest")
        return None, bytes(volume_key)
    if secret is None:
        raise InvalidRequest("give a passphrase, a key file or a volume key")
    # a slot that cannot be tried must not lock out the others. One over the KDF limits
    # (it may hold this passphrase) is named if nothing opens; one this reader cannot
    # open at all (unknown type or KDF) only if no slot could be tried
    over_limit: CryptoplaneError | None = None
    unusable: CryptoplaneError | None = None
    tried = False
    spent = 0.0  # a header with many costly slots must not make one unlock take hours
    for i in _candidates(loaded, slot, for_data):
        if i == skip:
            continue
        try:
            params = _slot_kdf(loaded, i)
            digest = _digest_kdf(loaded, i)
        except (CorruptHeader, NotSupported) as e:
            unusable = unusable or e
            continue
        try:
            size, digest_size = _slot_key_length(loaded, i), _digest_length(loaded, i)
            kdfs.check(params, length=size)  # a slot over the limits is skipped, not tried
            kdfs.check_digest(digest, length=digest_size)
        except (CorruptHeader, NotSupported) as e:
            over_limit = over_limit or e
            continue
        spent += kdfs.cost(params, length=size) + kdfs.cost(digest, length=digest_size)
        if spent > kdfs.LIMITS.total_work:
            raise over_limit or KdfLimitExceeded(
                "the keyslots together ask for more KDF work than one unlock may spend")
        try:
            key = _try_slot(dev, loaded, i, secret)
        except (CorruptHeader, NotSupported) as e:
            over_limit = over_limit or e
            continue
        tried = True
        if key is not None:
            return i, key
    if over_limit is not None:
        raise over_limit
    if unusable is not None and not tried:
        raise unusable
    raise WrongPassphrase("no keyslot opens with this passphrase")


def data_layout(loaded: LuksHeader, volume_key: bytes, data_size: int, *,
                legacy_ivs: bool = False) -> DataLayout:
    """Where the data segment lies on a data device of ``data_size`` bytes, and how its
    sectors are encrypted. ``legacy_ivs``: as cryptoplane wrote LUKS2 data before it
    counted IVs in 512-byte units (for ``convert-ivs`` to read such data, nothing else)."""
    if loaded.version == 1:
        h = loaded.h1
        offset = h.payload_offset * luks1.SECTOR
        cipher, sector_size, iv_offset, fixed = h.cipher, 512, 0, None
    else:
        seg = loaded.h2.metadata.segments[0]
        offset, cipher, sector_size = seg.offset, seg.encryption, seg.sector_size
        # dm-crypt counts LUKS2 IVs in 512-byte units at every sector size (it never sets
        # iv_large_sectors for LUKS2): iv_tweak is the first sector's IV as it stands
        iv_offset = seg.iv_tweak // (sector_size // 512) if legacy_ivs else seg.iv_tweak
        fixed = seg.size
    if data_size < offset:
        raise CorruptHeader(f"the data device ({data_size} bytes) ends before the data "
                            f"offset {offset}")
    size = fixed if fixed is not None else (data_size - offset) // sector_size * sector_size
    if offset + size > data_size:
        raise CorruptHeader(f"the data segment ends at {offset + size}, past the device's "
                            f"{data_size} bytes")
    return DataLayout(cipher, volume_key, offset, size, sector_size, iv_offset,
                      iv_large_sectors=legacy_ivs and sector_size > 512)


__all__ = ["data_layout", "open_key"]
