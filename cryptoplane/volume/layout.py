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
    ``iv_offset`` is the number of the first data sector, counted in ``sector_size``
    units, that the IV/tweak of the segment's first sector takes (LUKS2's ``iv_tweak``).
    The volume key never appears in ``repr``.
    """

    cipher: str
    volume_key: bytes = field(repr=False)
    offset: int
    size: int
    sector_size: int = 512
    iv_offset: int = 0
