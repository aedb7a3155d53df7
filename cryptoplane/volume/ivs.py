"""dm-crypt's per-sector IV schemes over AES, for keyslot material and LUKS1 volumes.

A cipher spec is cryptsetup's ``cipher-mode-iv[:ivopts]`` string: ``aes-xts-plain64``,
``aes-xts-plain``, ``aes-cbc-essiv:sha256``, ``aes-cbc-plain``, ``aes-cbc-plain64``,
``aes-ctr-plain64``. Each sector is encrypted on its own with an IV made from its number:

- ``plain``: the sector number modulo 2^32, little-endian, zero-padded to 16 bytes;
- ``plain64``: the sector number modulo 2^64, little-endian, zero-padded;
- ``essiv:HASH``: ``AES_s(plain64 IV)`` with ``s = HASH(key)`` (for CBC only).

The primitives are ``cryptography``'s (OpenSSL); nothing here is a cipher. Setting up a
``Cipher`` costs microseconds per sector, which is fine for the few hundred sectors of a
keyslot; bulk data goes through the plane's sector kernel instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from cryptoplane.exceptions import InvalidRequest, KeyRejected, NotSupported

_ESSIV_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
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


def iv_bytes(iv: str, sector: int) -> bytes:
    """The plain or plain64 IV of ``sector`` (16 bytes)."""
    if iv == "plain":
        return (sector & 0xFFFFFFFF).to_bytes(16, "little")
    return (sector & 0xFFFFFFFFFFFFFFFF).to_bytes(16, "little")


class SectorCipher:
    """Encrypts or decrypts runs of sectors of one spec with one key.

    ``first_sector`` is the IV number of the first sector of ``data``; each following
    sector takes the next number. ``data`` must be a whole number of sectors.
    """

    __slots__ = ("_essiv", "_key", "sector_size", "spec")

    def __init__(self, spec: str | CipherSpec, key: bytes, sector_size: int = 512) -> None:
        self.spec = spec if isinstance(spec, CipherSpec) else parse_spec(spec)
        if len(key) not in self.spec.key_sizes():
            raise KeyRejected(f"{self.spec} takes a {self.spec.key_sizes()}-byte key, "
                              f"got {len(key)} bytes")
        if self.spec.mode == "xts" and key[: len(key) // 2] == key[len(key) // 2:]:
            raise KeyRejected("XTS key halves must differ")
        if sector_size < 16 or sector_size % 16:
            raise InvalidRequest(f"sector size {sector_size} is not a multiple of 16")
        self._key = bytes(key)
        self.sector_size = sector_size
        self._essiv: Cipher[modes.ECB] | None = None
        if self.spec.iv == "essiv":
            h = hashes.Hash(_ESSIV_HASHES[self.spec.iv_hash]())
            h.update(self._key)
            salt = h.finalize()
            if len(salt) not in (16, 24, 32):  # sha1's 20 bytes cannot key AES
                raise NotSupported(f"essiv:{self.spec.iv_hash} gives no AES key size")
            self._essiv = Cipher(algorithms.AES(salt), modes.ECB())

    def __repr__(self) -> str:
        return f"SectorCipher({str(self.spec)!r}, sector_size={self.sector_size})"

    def _iv(self, sector: int) -> bytes:
        plain = iv_bytes("plain" if self.spec.iv == "plain" else "plain64", sector)
        if self._essiv is not None:
            enc = self._essiv.encryptor()
            return enc.update(plain) + enc.finalize()
        return plain

    def _mode(self, iv: bytes) -> modes.XTS | modes.CBC | modes.CTR:
        if self.spec.mode == "xts":
            return modes.XTS(iv)
        if self.spec.mode == "cbc":
            return modes.CBC(iv)
        return modes.CTR(iv)

    def _run(self, data: bytes, first_sector: int, encrypt: bool) -> bytes:
        ss = self.sector_size
        if len(data) % ss:
            raise InvalidRequest(f"{len(data)} bytes is not a whole number of "
                                 f"{ss}-byte sectors")
        if first_sector < 0:
            raise InvalidRequest("sector numbers are not negative")
        out = bytearray(len(data))
        view = memoryview(data)
        for i in range(len(data) // ss):
            c = Cipher(algorithms.AES(self._key), self._mode(self._iv(first_sector + i)))
            ctx = c.encryptor() if encrypt else c.decryptor()
            out[i * ss:(i + 1) * ss] = ctx.update(view[i * ss:(i + 1) * ss]) + ctx.finalize()
        return bytes(out)

    def encrypt(self, data: bytes, first_sector: int = 0) -> bytes:
        return self._run(data, first_sector, True)

    def decrypt(self, data: bytes, first_sector: int = 0) -> bytes:
        return self._run(data, first_sector, False)


__all__ = ["CipherSpec", "SectorCipher", "iv_bytes", "parse_spec", "split_luks1"]
