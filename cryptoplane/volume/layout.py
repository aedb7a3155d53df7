"""Where a volume's encrypted data lies and how it is encrypted: what opening a LUKS
header yields and what the data path (``Volume``) needs, nothing more."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DataLayout:
    """An opened volume's data segment.

    ``cipher`` is cryptsetup's spec (``aes-xts-plain64``, ``aes-cbc-essiv:sha256``, ...).
    ``offset`` and ``size`` are bytes on the data device (``size`` a multiple of
    ``sector_size``; for LUKS2's ``dynamic`` segments, the device's size less ``offset``).
    ``iv_offset`` is the IV/tweak of the segment's first sector (LUKS2's ``iv_tweak``),
    and each following sector's IV is ``sector_size // 512`` more: dm-crypt counts LUKS
    IVs in 512-byte units at every sector size. ``iv_large_sectors`` (dm-crypt's flag of
    that name) counts them in ``sector_size`` units instead, ``iv_offset`` included: no
    LUKS volume is written so, except those cryptoplane wrote with sectors over 512
    bytes before it learnt the rule (``cryptoplane volume convert-ivs`` rewrites them).
    The volume key never appears in ``repr``.
    """

    cipher: str
    volume_key: bytes = field(repr=False)
    offset: int
    size: int
    sector_size: int = 512
    iv_offset: int = 0
    iv_large_sectors: bool = False

    @property
    def iv_step(self) -> int:
        """How far the IV advances from one sector to the next."""
        return 1 if self.iv_large_sectors else self.sector_size // 512
