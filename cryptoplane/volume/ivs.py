"""dm-crypt's per-sector IV schemes over AES, for keyslot material and LUKS1 volumes.

A cipher spec is cryptsetup's ``cipher-mode-iv[:ivopts]`` string: ``aes-xts-plain64``,
``aes-xts-plain``, ``aes-cbc-essiv:sha256``, ``aes-cbc-plain``, ``aes-cbc-plain64``,
``aes-ctr-plain64``. Each sector is encrypted on its own with an IV made from its number:

- ``plain``: the sector number modulo 2^32, little-endian, zero-padded to 16 bytes;
- ``plain64``: the sector number modulo 2^64, little-endian, zero-padded;
- ``essiv:HASH``: ``AES_s(plain64 IV)`` with ``s = HASH(key)`` (for CBC only).

The primitives are ``cryptography``'s (OpenSSL); nothing here is a cipher. The per-sector
transform is the data path's (``ciphers.PerSector``): setting up a ``Cipher`` costs
microseconds per sector, fine for the few hundred sectors of a keyslot; bulk data goes
through the plane's sector kernel instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes

from cryptoplane.exceptions import InvalidRequest, KeyRejected, NotSupported
from cryptoplane.volume.ciphers import PerSector

_ESSIV_HASHES: dict[str, type[hashes.HashAlgorithm]] = {  # what the grammar names
    "sha256": hashes.SHA256,
    "sha1": hashes.SHA1,
    "sha512": hashes.SHA512,
}
_MODES = {"xts": ("plain", "plain64"), "cbc": ("plain", "plain64", "essiv"),
          "ctr": ("plain", "plain64")}


@dataclass(frozen=True)
class CipherSpec:
    """A parsed cryptsetup cipher spec, e.g. ``aes``, ``cbc``, ``essiv``, ``sha256``."""

    cipher: str
    mode: str
    iv: str
    iv_hash: str = ""

    def __str__(self) -> str:
        tail = f":{self.iv_hash}" if self.iv_hash else ""
        return f"{self.cipher}-{self.mode}-{self.iv}{tail}"

    def key_sizes(self) -> tuple[int, ...]:
        """The volume key sizes in bytes this spec accepts."""
        return (32, 64) if self.mode == "xts" else (16, 24, 32)


def parse_spec(spec: str) -> CipherSpec:
    """Parse and check a cipher spec; ``NotSupported`` names what is not implemented."""
    if not isinstance(spec, str) or not spec or len(spec) > 64:
        raise InvalidRequest("cipher spec must be a short string like 'aes-xts-plain64'")
    head, _, iv_hash = spec.partition(":")
    parts = head.split("-")
    if len(parts) != 3:
        raise NotSupported(f"cipher spec {spec!r} is not of the form cipher-mode-iv")
    cipher, mode, iv = parts
    if cipher != "aes":
        raise NotSupported(f"cipher {cipher!r} is not supported (only aes)")
    if mode not in _MODES:
        raise NotSupported(f"cipher mode {mode!r} is not supported (xts, cbc, ctr)")
    if iv not in _MODES[mode]:
        raise NotSupported(f"IV scheme {iv!r} is not supported with {mode}")
    if iv == "essiv":
        if iv_hash not in _ESSIV_HASHES:
            raise NotSupported(f"essiv hash {iv_hash!r} is not supported")
    elif iv_hash:
        raise NotSupported(f"IV scheme {iv!r} takes no option, got {iv_hash!r}")
    return CipherSpec(cipher, mode, iv, iv_hash)


def split_luks1(spec: str) -> tuple[str, str]:
    """LUKS1 stores a spec as cipher name and mode: ``aes`` + ``xts-plain64``."""
    name, _, mode = spec.partition("-")
    return name, mode


class SectorCipher:
    """Encrypts or decrypts runs of sectors of one spec with one key: keyslot material,
    checked as a keyslot needs (key sizes, distinct XTS halves), on the data path's own
    per-sector transform (``ciphers.PerSector``: dm-crypt's IVs, one ``cryptography``
    Cipher per sector), so that the two cannot drift apart.

    ``first_sector`` is the IV number of the first sector of ``data``; each following
    sector takes the next number. ``data`` must be a whole number of sectors.
    """

    __slots__ = ("_per", "sector_size", "spec")

    def __init__(self, spec: str | CipherSpec, key: bytes, sector_size: int = 512) -> None:
        self.spec = spec if isinstance(spec, CipherSpec) else parse_spec(spec)
        if len(key) not in self.spec.key_sizes():
            raise KeyRejected(f"{self.spec} takes a {self.spec.key_sizes()}-byte key, "
                              f"got {len(key)} bytes")
        if self.spec.mode == "xts" and key[: len(key) // 2] == key[len(key) // 2:]:
            raise KeyRejected("XTS key halves must differ")
        if sector_size < 16 or sector_size % 16:
            raise InvalidRequest(f"sector size {sector_size} is not a multiple of 16")
        if self.spec.iv == "essiv" and _ESSIV_HASHES[self.spec.iv_hash]().digest_size not in (
                16, 24, 32):  # sha1's 20 bytes, sha512's 64, cannot key AES
            raise NotSupported(f"essiv:{self.spec.iv_hash} gives no AES key size")
        self.sector_size = sector_size
        self._per = PerSector(str(self.spec), bytes(key), sector_size, self.spec.mode,
                              self.spec.iv, self.spec.iv_hash)

    def __repr__(self) -> str:
        return f"SectorCipher({str(self.spec)!r}, sector_size={self.sector_size})"

    def _run(self, data: bytes, first_sector: int, encrypt: bool) -> bytes:
        if len(data) % self.sector_size:
            raise InvalidRequest(f"{len(data)} bytes is not a whole number of "
                                 f"{self.sector_size}-byte sectors")
        if first_sector < 0:
            raise InvalidRequest("sector numbers are not negative")
        out = bytearray(len(data))
        if data:
            (self._per.encrypt if encrypt else self._per.decrypt)(data, first_sector, out)
        return bytes(out)

    def encrypt(self, data: bytes, first_sector: int = 0) -> bytes:
        return self._run(data, first_sector, True)

    def decrypt(self, data: bytes, first_sector: int = 0) -> bytes:
        return self._run(data, first_sector, False)


__all__ = ["CipherSpec", "SectorCipher", "parse_spec", "split_luks1"]
