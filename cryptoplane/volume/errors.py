"""The typed errors of LUKS volumes: what a caller branches on when opening or changing one.

Every one is a ``CryptoplaneError``; a wrong passphrase is an ``AuthenticationFailed``, a
damaged header an ``InvalidRequest``. Messages name what is wrong and never carry a
passphrase or key.
"""

from __future__ import annotations

from cryptoplane.exceptions import AuthenticationFailed, InvalidRequest


class WrongPassphrase(AuthenticationFailed):
    """No keyslot opens with the passphrase, key file or volume key given."""


class CorruptHeader(InvalidRequest):
    """The LUKS header does not parse or validate: bad magic or version, checksum mismatch,
    truncated image, inconsistent JSON metadata, overlapping areas."""


class KdfLimitExceeded(CorruptHeader):
    """A keyslot asks for a KDF cost (argon2 memory or time, pbkdf2 iterations) beyond the
    sane limits this reader accepts: refused before any work is done."""


class RepairNeeded(CorruptHeader):
    """The header could be recovered from its one good copy, but the device also carries
    another signature (an LVM label, a file system): which of the two is current cannot be
    told, so nothing is read or written until ``cryptsetup repair`` (or a header restore)
    settles it, as cryptsetup refuses."""


class KeyslotError(InvalidRequest):
    """A keyslot operation cannot be done: no free slot or area, the slot asked for is
    in use or inactive, or removing it would remove the last one."""


__all__ = ["CorruptHeader", "KdfLimitExceeded", "KeyslotError", "RepairNeeded",
           "WrongPassphrase"]
