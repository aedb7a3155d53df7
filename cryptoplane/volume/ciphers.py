"""cryptsetup cipher specs (``aes-xts-plain64``, ``aes-cbc-essiv:sha256``...) as sector
transforms: a run of whole sectors in, the same number of bytes out, each sector with
dm-crypt's IV for its number.

``aes-xts-plain64`` (and ``-plain64be``, and ``-plain`` away from its 2**32 wrap) is the
fast path: the plane's native kernel does a whole run in one call with the GIL released.
The other modes qemu and cryptsetup make for LUKS1 run one ``cryptography`` Cipher per
sector: correct and interoperable, an order of magnitude slower, and rare in practice.

A run starts at an IV number (the segment's ``iv_offset`` plus the run's position), and
each following sector's IV is ``iv_step`` more: dm-crypt counts IVs in 512-byte units
at every sector size for LUKS1 and LUKS2, so a 4096-byte sector advances the IV by 8.
Only with dm-crypt's ``iv_large_sectors`` (plain dm-crypt devices, BitLocker, and the
volumes cryptoplane wrote before it learnt this) does the IV count whole sectors.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from cryptoplane.exceptions import InvalidRequest, KeyRejected, NotSupported
from cryptoplane.keys import Key
from cryptoplane.plane import Plane
from cryptoplane.requests import tweak_code

SECTOR_SIZES = (512, 1024, 2048, 4096)
_U64 = (1 << 64) - 1
_PLAIN_WRAP = 1 << 32  # "plain" IVs keep the low 32 bits of the sector number

# ESSIV hashes whose digest is an AES key (dm-crypt's essiv template and qemu both key
# the IV cipher with the digest, so its length must be 16, 24 or 32 bytes)
_ESSIV_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
}
_MODES = ("xts", "cbc", "ctr")
_IV_MODES = ("plain", "plain64", "plain64be", "essiv")


class SectorCipher(Protocol):
    """Encrypts or decrypts runs of whole sectors. ``out`` may be ``data`` itself."""

    spec: str
    sector_size: int
    iv_step: int  # how far the IV advances from one sector to the next

    def encrypt(self, data: Any, sector: int, out: Any) -> None: ...

    def decrypt(self, data: Any, sector: int, out: Any) -> None: ...

    def batch(self) -> Any:
        """What runs many requests' sectors in one native call (``decrypt_gather``,
        ``encrypt_scatter``, as ``XtsPlain.batch`` gives), or None: each request alone."""
        ...

    def can_read_mapped(self) -> bool:
        """Whether ``decrypt`` may take its ``data`` from a shared mapping of the image:
        a file that shrinks under the mapping makes such a read SIGBUS, and only a
        kernel that guards its runs turns that into ``OSError`` instead of a crash."""
        ...


def parse_spec(spec: str) -> tuple[str, str, str, str]:
    """``cipher-chainmode-ivmode[:ivopts]`` -> its four parts; ``NotSupported`` for any
    spec this module cannot run (naming it)."""
    parts = spec.split("-", 2)
    if len(parts) != 3 or not all(parts):
        raise NotSupported(f"cipher {spec!r}: expected cipher-chainmode-ivmode "
                           "(e.g. aes-xts-plain64)")
    name, chain, iv = parts
    ivmode, _, ivopts = iv.partition(":")
    if name != "aes":
        raise NotSupported(f"cipher {spec!r}: only aes is supported, not {name!r}")
    if chain not in _MODES:
        raise NotSupported(f"cipher {spec!r}: chain mode {chain!r} is not supported "
                           f"(supported: {', '.join(_MODES)})")
    if ivmode not in _IV_MODES:
        raise NotSupported(f"cipher {spec!r}: IV mode {ivmode!r} is not supported "
                           f"(supported: {', '.join(_IV_MODES)})")
    if ivmode == "essiv":
        if ivopts not in _ESSIV_HASHES:
            raise NotSupported(f"cipher {spec!r}: ESSIV hash {ivopts!r} is not supported "
                               f"(supported: {', '.join(_ESSIV_HASHES)})")
    elif ivopts:
        raise NotSupported(f"cipher {spec!r}: IV mode {ivmode!r} takes no options")
    return name, chain, ivmode, ivopts


def sector_cipher(spec: str, volume_key: bytes, sector_size: int,
                  plane: Plane | None = None, *,
                  iv_large_sectors: bool = False) -> SectorCipher:
    """The transform for ``spec`` keyed with ``volume_key`` (dm-crypt's key sizes: XTS
    takes two AES keys, 32 or 64 bytes; CBC and CTR one of 16, 24 or 32). XTS with plain
    IVs needs ``plane`` (the fast path); the other modes do not use it. IVs count
    512-byte units, as dm-crypt's do for LUKS, unless ``iv_large_sectors``."""
    _, chain, ivmode, ivopts = parse_spec(spec)
    if sector_size not in SECTOR_SIZES:
        raise InvalidRequest(f"sector size must be one of {SECTOR_SIZES}, got {sector_size}")
    key = bytes(volume_key)
    _check_key(spec, chain, key)
    step = 1 if iv_large_sectors else sector_size // 512
    if chain == "xts" and ivmode != "essiv":
        if plane is None:
            raise InvalidRequest(f"cipher {spec!r} runs on the plane: pass plane=")
        return XtsPlain(spec, key, sector_size, plane, ivmode, step)
    return PerSector(spec, key, sector_size, chain, ivmode, ivopts, step)


def _check_key(spec: str, chain: str, key: bytes) -> None:
    bits = len(key) * 8
    if chain == "xts":
        if len(key) == 48:
            raise NotSupported(f"cipher {spec!r} with a 384-bit key (AES-192-XTS) is not "
                               "supported: use a 256- or 512-bit key")
        if len(key) not in (32, 64):
            raise KeyRejected(f"cipher {spec!r} needs a 256- or 512-bit key, got {bits} bits")
        if key[: len(key) // 2] == key[len(key) // 2:]:
            raise KeyRejected(f"cipher {spec!r}: the two XTS key halves are equal")
    elif len(key) not in (16, 24, 32):
        raise KeyRejected(f"cipher {spec!r} needs a 128-, 192- or 256-bit key, "
                          f"got {bits} bits")


class XtsPlain:
    """AES-XTS with plain64/plain64be/plain tweaks: one native call per run (split only
    where a ``plain`` tweak wraps at 2**32, since below the wrap it equals plain64)."""

    def __init__(self, spec: str, key: bytes, sector_size: int, plane: Plane,
                 ivmode: str, iv_step: int = 1) -> None:
        self.spec = spec
        self.sector_size = sector_size
        self.iv_step = iv_step
        # the tweak counts units of this many bytes: the sector, or 512 (dm-crypt's LUKS)
        self._unit = sector_size // iv_step
        self._plane = plane
        self._key = Key("aes-256-xts" if len(key) == 64 else "aes-128-xts", key)
        self._tweak = "plain64be" if ivmode == "plain64be" else "plain64"
        self._wrap = ivmode == "plain"
        tweak_code(sector_size, self._tweak, self._unit)  # a bad layout fails here, not later
        # ``plain`` IVs wrap at 2**32, which a batch's items would each have to split at
        self._batch = None if self._wrap else SectorBatch(plane, self._key, sector_size,
                                                          self._tweak, self._unit)

    def encrypt(self, data: Any, sector: int, out: Any) -> None:
        if self._wrap:
            self._split(self._plane.encrypt_sectors, data, sector, out)
        else:  # one call, nothing else: this is every read and write of most volumes
            self._plane.encrypt_sectors(self._key, data, sector=sector & _U64,
                                        sector_size=self.sector_size, out=out,
                                        tweak=self._tweak, tweak_unit=self._unit)

    def decrypt(self, data: Any, sector: int, out: Any) -> None:
        if self._wrap:
            self._split(self._plane.decrypt_sectors, data, sector, out)
        else:
            self._plane.decrypt_sectors(self._key, data, sector=sector & _U64,
                                        sector_size=self.sector_size, out=out,
                                        tweak=self._tweak, tweak_unit=self._unit)

    def can_read_mapped(self) -> bool:
        return self._plane.guard_mapped_reads()

    def batch(self) -> SectorBatch | None:
        """The batch path: the plane's batch calls on this key; None for ``plain`` IVs."""
        return self._batch

    def _split(self, fn: Callable[..., Any], data: Any, sector: int, out: Any) -> None:
        ss, step = self.sector_size, self.iv_step
        src, dst = memoryview(data), memoryview(out)
        done, count = 0, len(src) // ss
        while done < count:
            low = (sector + done * step) % _PLAIN_WRAP
            n = min(count - done, -(-(_PLAIN_WRAP - low) // step))  # IVs below the wrap
            a, b = done * ss, (done + n) * ss
            fn(self._key, src[a:b], sector=low, sector_size=ss, out=dst[a:b],
               tweak="plain64", tweak_unit=self._unit)
            done += n

    def __repr__(self) -> str:
        return (f"<XtsPlain {self.spec} sector_size={self.sector_size} "
                f"iv_step={self.iv_step}>")


class SectorBatch:
    """Many runs of one XTS key in one plane call (one native call on its fast path;
    the plane counts the bytes as single runs are counted). Items are ``(offset, first
    sector, buffer)``; the caller checked ranges and alignment."""

    __slots__ = ("_key", "_plane", "_ss", "_tweak", "_unit")

    def __init__(self, plane: Plane, key: Key, sector_size: int, tweak: str,
                 tweak_unit: int) -> None:
        self._plane = plane
        self._key = key
        self._ss = sector_size
        self._tweak = tweak
        self._unit = tweak_unit

    def decrypt_gather(self, src: Any, items: list[tuple[int, int, Any]]) -> None:
        """Fill each item's buffer with the plaintext at its offset in ``src``."""
        self._plane.decrypt_sectors_gather(self._key, src, items, sector_size=self._ss,
                                           tweak=self._tweak, tweak_unit=self._unit)

    def encrypt_scatter(self, fd: int, items: list[tuple[int, int, Any]],
                        scratch: Any) -> tuple[int, int]:
        """Encrypt each item's buffer and write it to ``fd`` at its offset, in order:
        (items written, errno of the first that failed or 0)."""
        return self._plane.encrypt_sectors_scatter(self._key, fd, items, scratch,
                                                   sector_size=self._ss, tweak=self._tweak,
                                                   tweak_unit=self._unit)


class PerSector:
    """CBC, CTR, and XTS with ESSIV: one ``cryptography`` Cipher per sector, each with
    dm-crypt's IV. The AES key objects are made once; ESSIV IVs of a whole run come from
    one ECB call on the IV cipher (keyed once with the hash of the volume key)."""

    def __init__(self, spec: str, key: bytes, sector_size: int, chain: str, ivmode: str,
                 ivopts: str, iv_step: int = 1) -> None:
        self.spec = spec
        self.sector_size = sector_size
        self.iv_step = iv_step
        self._alg = algorithms.AES(key)
        self._mode: Callable[[bytes], Any] = {
            "xts": modes.XTS, "cbc": modes.CBC, "ctr": modes.CTR}[chain]
        self._ivmode = ivmode
        self._essiv: Any = None
        self._essiv_lock = threading.Lock()
        if ivmode == "essiv":
            h = hashes.Hash(_ESSIV_HASHES[ivopts]())
            h.update(key)
            # ECB is right here: it encrypts single, unique 16-byte IV blocks
            self._essiv = Cipher(algorithms.AES(h.finalize()), modes.ECB()).encryptor()

    def ivs(self, sector: int, count: int) -> list[bytes]:
        """The 16-byte IVs of ``count`` sectors, the first numbered ``sector``."""
        mode = self._ivmode
        numbers = range(sector, sector + count * self.iv_step, self.iv_step)
        if mode == "plain":
            return [(n % _PLAIN_WRAP).to_bytes(4, "little") + bytes(12) for n in numbers]
        if mode == "plain64be":
            return [bytes(8) + (n & _U64).to_bytes(8, "big") for n in numbers]
        plain = [(n & _U64).to_bytes(8, "little") + bytes(8) for n in numbers]
        if mode == "plain64":
            return plain
        with self._essiv_lock:  # a cryptography context serves one caller at a time
            enc = self._essiv.update(b"".join(plain))
        return [enc[16 * i:16 * i + 16] for i in range(count)]

    def batch(self) -> None:
        return None  # one ``cryptography`` Cipher per sector: nothing to batch

    def can_read_mapped(self) -> bool:
        return False  # ``ctx.update`` would copy out of the mapping unguarded

    def encrypt(self, data: Any, sector: int, out: Any) -> None:
        self._run(True, data, sector, out)

    def decrypt(self, data: Any, sector: int, out: Any) -> None:
        self._run(False, data, sector, out)

    def _run(self, encrypt: bool, data: Any, sector: int, out: Any) -> None:
        ss = self.sector_size
        src, dst = memoryview(data).cast("B"), memoryview(out).cast("B")
        if len(src) % ss or len(dst) < len(src):
            raise InvalidRequest(f"{self.spec}: a run of whole {ss}-byte sectors is needed, "
                                 f"got {len(src)} bytes into {len(dst)}")
        for i, iv in enumerate(self.ivs(sector, len(src) // ss)):
            c = Cipher(self._alg, self._mode(iv))
            ctx = c.encryptor() if encrypt else c.decryptor()
            a = i * ss
            dst[a:a + ss] = ctx.update(src[a:a + ss])

    def __repr__(self) -> str:
        return (f"<PerSector {self.spec} sector_size={self.sector_size} "
                f"iv_step={self.iv_step}>")
