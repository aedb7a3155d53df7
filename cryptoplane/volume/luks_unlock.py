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


def _candidates(loaded: LuksHeader, slot: int | None) -> list[int]:
    """The slots to try, in cryptsetup's order: LUKS2 high priority first, never those
    marked ignore (priority 0) unless named."""
    if loaded.version == 1:
        if slot is not None and not 0 <= slot < luks1.SLOTS:
            raise KeyslotError(f"LUKS1 key slot {slot} does not exist (0..7)")
        return [i for i in range(luks1.SLOTS)
                if loaded.h1.slots[i].active and slot in (None, i)]
    meta = loaded.h2.metadata
    _, digest = meta.segment_digest(0)
    if slot is not None:
        if slot not in meta.keyslots:
            raise KeyslotError(f"keyslot {slot} is not active")
        return [slot] if slot in digest.keyslots else []
    ids = [i for i in sorted(meta.keyslots) if i in digest.keyslots]
    high = [i for i in ids if meta.keyslots[i].priority == 2]
    normal = [i for i in ids if meta.keyslots[i].priority not in (0, 2)]
    return high + normal


def _slot_kdf(loaded: LuksHeader, i: int) -> kdfs.KdfParams:
    if loaded.version == 2:
        return loaded.h2.metadata.keyslots[i].kdf
    return kdfs.Pbkdf2(loaded.h1.hash_spec, loaded.h1.slots[i].iterations)


def _try_slot(dev: Device, loaded: LuksHeader, i: int, secret: bytes) -> bytes | None:
    """The volume key if ``secret`` opens keyslot ``i``, else None."""
    if loaded.version == 2:
        meta = loaded.h2.metadata
        ks = meta.keyslots[i]
        area = dev.read_exact(ks.area.offset, keyslots.luks2_material_size(ks),
                              f"keyslot {i} area")
        return keyslots.open_luks2(ks, meta.segment_digest(0)[1], secret, area)
    h = loaded.h1
    material = dev.read_exact(h.slots[i].offset * luks1.SECTOR,
                              keyslots.luks1_material_size(h), f"key slot {i} material")
    return keyslots.open_luks1(h, i, secret, material)


def open_key(dev: Device, loaded: LuksHeader, secret: bytes | None,
             volume_key: bytes | None, slot: int | None = None,
             ) -> tuple[int | None, bytes]:
    """(slot, volume key) for the passphrase or volume key given (slot None for a volume
    key). ``slot`` limits the search to that keyslot."""
    if loaded.version == 2:
        loaded.h2.metadata.check_supported()
    if volume_key is not None:
        ok = (keyslots.check_luks2_key(loaded.h2.metadata.segment_digest(0)[1], volume_key)
              if loaded.version == 2 else keyslots.check_luks1_key(loaded.h1, volume_key))
        if not ok:
            raise WrongPassphrase("the volume key does not match the header's digest")
        return None, bytes(volume_key)
    if secret is None:
        raise InvalidRequest("give a passphrase, a key file or a volume key")
    # one slot that cannot be tried (hostile costs, unknown cipher) must not lock out the
    # others; its error is reported only if no other slot opens
    refused: CryptoplaneError | None = None
    spent = 0.0  # a header with many costly slots must not make one unlock take hours
    for i in _candidates(loaded, slot):
        params = _slot_kdf(loaded, i)
        try:
            kdfs.check(params)  # a slot over the limits is skipped, not tried
        except (CorruptHeader, NotSupported) as e:
            refused = refused or e
            continue
        spent += kdfs.cost(params)
        if spent > kdfs.LIMITS.total_work:
            raise refused or KdfLimitExceeded(
                "the keyslots together ask for more KDF work than one unlock may spend")
        try:
            key = _try_slot(dev, loaded, i, secret)
        except (CorruptHeader, NotSupported) as e:
            refused = refused or e
            continue
        if key is not None:
            return i, key
    if refused is not None:
        raise refused
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
