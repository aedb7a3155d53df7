"""Foreign signatures on a device that also holds a LUKS2 header. Sans-I/O.

cryptsetup recovers a LUKS2 header with one damaged copy from the other, unless blkid
finds another signature on the device (an LVM physical volume label, a file system):
then the device may have been reused, the surviving LUKS2 copy may be the stale one,
and it refuses, asking for ``cryptsetup repair``. This module looks for the common
signatures blkid would report, at their fixed offsets; it is no full blkid (no
partition tables, no RAID), only enough that a device reused as one of these is not
taken for a LUKS volume that merely needs its header repaired.
"""

from __future__ import annotations

_SECTOR = 512


def _at(blob: bytes, offset: int, magic: bytes) -> bool:
    return blob[offset:offset + len(magic)] == magic


def _lvm2(blob: bytes) -> bool:
    # the label sits in one of the first four sectors: "LABELONE", its own sector
    # number at +8, and the type "LVM2 001" at +24
    for sector in range(4):
        at = sector * _SECTOR
        if (_at(blob, at, b"LABELONE") and _at(blob, at + 24, b"LVM2 001")
                and int.from_bytes(blob[at + 8:at + 16], "little") == sector):
            return True
    return False


def _ext(blob: bytes) -> bool:
    # the superblock at 1024: magic 0xEF53 at +56; a sane block size and a block count
    # keep two random bytes from passing for one
    sb = 1024
    if blob[sb + 56:sb + 58] != b"\x53\xef":
        return False
    log_block = int.from_bytes(blob[sb + 24:sb + 28], "little")
    blocks = int.from_bytes(blob[sb + 4:sb + 8], "little")
    return log_block <= 6 and blocks > 0


def _fat(blob: bytes) -> bool:
    # a boot sector's 0x55AA and the file system type FAT12/16 (at 54) or FAT32 (at 82)
    return blob[510:512] == b"\x55\xaa" and (_at(blob, 54, b"FAT") or _at(blob, 82, b"FAT32"))


_FIXED: tuple[tuple[str, int, bytes], ...] = (
    ("xfs", 0, b"XFSB"),
    ("swap", 4096 - 10, b"SWAPSPACE2"),
    ("swap", 4096 - 10, b"SWAP-SPACE"),
    ("iso9660", 32769, b"CD001"),
    ("btrfs", 65536 + 64, b"_BHRfS_M"),
    ("gpt", 512, b"EFI PART"),
)


def foreign(blob: bytes) -> str | None:
    """The name of a non-LUKS signature in a device's first bytes, or None."""
    if _lvm2(blob):
        return "LVM2_member"
    if _ext(blob):
        return "ext2/3/4"
    if _fat(blob):
        return "vfat"
    for name, offset, magic in _FIXED:
        if _at(blob, offset, magic):
            return name
    return None


__all__ = ["foreign"]
