"""LUKS2/LUKS1 encrypted volumes: the on-disk format, keyslots, and the sector data path.

``open_volume`` is the one call most users need: unlock a LUKS image (or block device,
with an optional detached header) and get a ``Volume`` — a ``BlockDevice`` that reads
and writes plaintext through the plane's sector kernel and that ``cryptoplane serve``
exports over NBD.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from cryptoplane.volume.layout import DataLayout

if TYPE_CHECKING:
    from cryptoplane.plane import Plane
    from cryptoplane.volume.device import Volume

__all__ = ["DataLayout", "open_volume"]


def open_volume(path: str | os.PathLike[str], *, passphrase: bytes | None = None,
                key_file: str | os.PathLike[str] | None = None,
                volume_key: bytes | None = None,
                header: str | os.PathLike[str] | None = None, plane: Plane | None = None,
                read_only: bool = False) -> Volume:
    """Unlock the LUKS volume at ``path`` and open its data for reading and writing.

    Exactly one of ``passphrase``, ``key_file`` (its whole contents are the passphrase,
    as cryptsetup's ``--key-file``) or ``volume_key``. ``header`` is a detached header
    file. Raises ``WrongPassphrase`` when no keyslot opens, ``CorruptHeader`` for a
    damaged header, ``NotSupported`` for a cipher or feature not implemented.
    """
    from cryptoplane.volume import luks
    from cryptoplane.volume.device import Volume

    layout = luks.unlock(path, passphrase=passphrase,
                         key_file=None if key_file is None else os.fspath(key_file),
                         volume_key=volume_key,
                         header=None if header is None else os.fspath(header))
    return Volume(path, layout, plane=plane, read_only=read_only)
