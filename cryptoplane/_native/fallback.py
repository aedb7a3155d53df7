"""Pure-Python AES-XTS over runs of sectors: the native kernel's stand-in.

Same constructor, methods, errors and bytes as ``cryptoplane._native._sectors.XtsKey``,
built on the ``cryptography`` package.  It pays for a new ``Cipher`` per sector (XTS
takes its tweak at construction) and holds the GIL, so it is tens of times slower; it
exists so that cryptoplane works, and gives identical results, where the C extension
could not be built.
"""

from __future__ import annotations

import ctypes
import errno
import operator
import os
from collections.abc import Sequence
from typing import NoReturn

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = [
    "SECTOR_SIZES",
    "TWEAK_PLAIN64",
    "TWEAK_PLAIN64BE",
    "XtsKey",
    "sector_tweak",
    "tweak_step",
    "xts_data_unit",
]

TWEAK_PLAIN64 = 0
TWEAK_PLAIN64BE = 1
SECTOR_SIZES = (512, 1024, 2048, 4096)
_LAYOUT_MASK = 0xFF
_STEP_SHIFT = 8


def tweak_step(step: int) -> int:
    """The bits of a tweak code that make each sector's tweak ``step`` more than the
    previous one's (1, 2, 4 or 8). dm-crypt counts LUKS2 IVs in 512-byte units at every
    sector size, so a run of 4096-byte sectors takes ``TWEAK_PLAIN64 | tweak_step(8)``:
    tweaks 0, 8, 16, ... The default, step 1, counts whole sectors (dm-crypt's
    ``iv_large_sectors``)."""
    if step not in (1, 2, 4, 8):
        raise ValueError(f"the tweak step must be 1, 2, 4 or 8, got {step}")
    return (step.bit_length() - 1) << _STEP_SHIFT


def _valid_code(tweak: object) -> bool:
    return (isinstance(tweak, int) and not tweak & ~0x3FF
            and tweak & _LAYOUT_MASK in (TWEAK_PLAIN64, TWEAK_PLAIN64BE))

_U64 = (1 << 64) - 1


def sector_tweak(sector: int, tweak: int = TWEAK_PLAIN64) -> bytes:
    """The 16-byte XTS tweak that dm-crypt's IV generator gives ``sector``.

    plain64: little-endian in bytes 0..7; plain64be: big-endian in bytes 8..15.
    """
    sector &= _U64
    if _valid_code(tweak):
        tweak &= _LAYOUT_MASK
    if tweak == TWEAK_PLAIN64:
        return sector.to_bytes(8, "little") + bytes(8)
    if tweak == TWEAK_PLAIN64BE:
        return bytes(8) + sector.to_bytes(8, "big")
    raise ValueError(f"tweak must be TWEAK_PLAIN64 (0) or TWEAK_PLAIN64BE (1), got {tweak}")


def xts_data_unit(
    key: bytes, tweak16: bytes, data: bytes | memoryview, encrypt: bool = True
) -> bytes:
    """Encrypt or decrypt one XTS data unit with a raw 16-byte tweak.

    This is the whole per-sector path of the fallback, kept separate so that the
    IEEE 1619 vectors (arbitrary tweaks, short data units) can check it directly.
    """
    cipher = Cipher(algorithms.AES(key), modes.XTS(tweak16))
    ctx = cipher.encryptor() if encrypt else cipher.decryptor()
    return ctx.update(data) + ctx.finalize()


def _as_int(value: object, name: str) -> int:
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None


def _address(view: memoryview) -> int | None:
    """Start address of a writable buffer, or None where Python cannot tell."""
    if view.readonly:
        return None
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _byte_view(obj: object, name: str) -> memoryview:
    try:
        view = memoryview(obj)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"{name} must support the buffer protocol, not {type(obj).__name__}"
        ) from None
    if not view.c_contiguous:
        raise TypeError(f"{name} must be a C-contiguous buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


_I64 = (1 << 63) - 1  # the largest file offset


def batch_runs(items: Sequence[tuple[int, int, object]], sector_size: int, room: int, *,
               gather: bool) -> list[int]:
    """Each batch item's length, every item checked before any runs, as the native
    kernel's batch parsing does: numbers in 0..2**64-1, a buffer of whole sectors
    (writable where a gather fills it), inside ``room`` bytes (the source, from the
    item's offset, for a gather; the scratch buffer for a scatter, whose offsets are
    file offsets). Raises ValueError, TypeError or OverflowError as the kernel does; the
    plane's per-item path (``sector_runs``) checks its batches with this too."""
    runs = []
    for i, item in enumerate(items):
        try:
            offset, first, buf = item
        except (TypeError, ValueError):
            raise TypeError(f"item {i} is not (offset, first sector, buffer)") from None
        offset, first = _as_int(offset, "offset"), _as_int(first, "first_sector")
        for number in (offset, first):
            if not 0 <= number <= _U64:
                raise OverflowError(f"item {i}: {number} is outside 0..2**64-1")
        view = _byte_view(buf, f"item {i}")
        n = len(view)
        if gather and view.readonly:
            raise TypeError(f"item {i}: the buffer is read-only")
        if n == 0 or n % sector_size:
            raise ValueError(f"item {i}: {n} bytes is not a non-zero multiple of the "
                             f"sector size {sector_size}")
        if gather and offset + n > room:
            raise ValueError(f"item {i} lies outside the source")
        if not gather and (n > room or offset > _I64):
            raise ValueError(f"item {i} is longer than the scratch buffer, or its offset "
                             "is past 2**63-1")
        runs.append(n)
    return runs


def pwrite_all(fd: int, data: memoryview, offset: int) -> int:
    """Write all of ``data`` at ``offset``: 0, or the errno that stopped it (EIO for a
    write that took nothing), which is how the native scatter reports a failed write."""
    put = 0
    try:
        while put < len(data):
            wrote = os.pwrite(fd, data[put:], offset + put)
            if wrote == 0:
                return errno.EIO
            put += wrote
    except OSError as exc:
        return exc.errno or errno.EIO
    return 0


def _check_batch_args(sector_size: int, tweak: int) -> None:
    if sector_size not in SECTOR_SIZES:
        raise ValueError(f"sector_size must be 512, 1024, 2048 or 4096, got {sector_size}")
    if not _valid_code(tweak):
        raise ValueError(f"bad tweak code {tweak}")


class XtsKey:
    """An AES-XTS key (32 bytes: AES-128-XTS, 64 bytes: AES-256-XTS) for sector runs."""

    __slots__ = ("__key",)

    def __init__(self, key: bytes) -> None:
        material = bytes(_byte_view(key, "key"))
        if len(material) not in (32, 64):
            raise ValueError(
                "AES-XTS key must be 32 bytes (AES-128-XTS) or 64 bytes "
                f"(AES-256-XTS), got {len(material)} bytes"
            )
        half = len(material) // 2
        if material[:half] == material[half:]:
            raise ValueError(
                "AES-XTS key halves are equal: the data key and the tweak key "
                "must differ (IEEE 1619; OpenSSL refuses such keys too)"
            )
        self.__key = material

    @property
    def key_size(self) -> int:
        """Key length in bytes (32 or 64)."""
        return len(self.__key)

    def __repr__(self) -> str:
        # Only the size: key material must never reach a log.
        return f"<XtsKey AES-{len(self.__key) * 4}-XTS python>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("XtsKey cannot be pickled or copied: it holds key material")

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        self.__reduce__()

    def __copy__(self) -> NoReturn:
        self.__reduce__()

    def __deepcopy__(self, memo: object) -> NoReturn:
        self.__reduce__()

    def encrypt(
        self,
        src: object,
        first_sector: int,
        sector_size: int,
        out: object = None,
        tweak: int = TWEAK_PLAIN64,
    ) -> object:
        """Encrypt a run of sectors; sector i uses tweak first_sector + i * step (mod
        2**64), the step being 1 unless ``tweak`` carries a ``tweak_step``.

        Returns new bytes, or ``out`` when given (which may be ``src`` itself).
        """
        return self._run(src, first_sector, sector_size, out, tweak, True)

    def decrypt(
        self,
        src: object,
        first_sector: int,
        sector_size: int,
        out: object = None,
        tweak: int = TWEAK_PLAIN64,
    ) -> object:
        """Decrypt a run of sectors; the inverse of encrypt with the same arguments."""
        return self._run(src, first_sector, sector_size, out, tweak, False)

    def _run(
        self,
        src: object,
        first_sector: int,
        sector_size: int,
        out: object,
        tweak: int,
        encrypt: bool,
    ) -> object:
        # Checks mirror the C extension's one for one, messages included.
        source = _byte_view(src, "src")
        first_sector = _as_int(first_sector, "first_sector")
        if not 0 <= first_sector <= _U64:
            raise ValueError(
                "first_sector must be an unsigned 64-bit sector number (0 <= first_sector < 2**64)"
            )
        sector_size = _as_int(sector_size, "sector_size")
        if sector_size not in SECTOR_SIZES:
            raise ValueError(f"sector_size must be 512, 1024, 2048 or 4096, got {sector_size}")
        if not _valid_code(tweak):
            raise ValueError("tweak must be TWEAK_PLAIN64 (0) or TWEAK_PLAIN64BE (1), plus "
                             f"tweak_step(n) for n in 0..3, got {tweak}")
        n = len(source)
        if n == 0 or n % sector_size:
            raise ValueError(
                "data length must be a non-zero multiple of the sector size: "
                f"got {n} bytes with sector_size {sector_size}"
            )
        key = self.__key
        step = 1 << (tweak >> _STEP_SHIFT)
        units = (
            xts_data_unit(
                key,
                sector_tweak(first_sector + i * step, tweak),
                source[lo : lo + sector_size],
                encrypt,
            )
            for i, lo in enumerate(range(0, n, sector_size))
        )
        if out is None:
            return b"".join(units)
        target = self._out_view(out, source)
        # Each sector is computed in full before it is stored, so in-place is safe.
        for lo, unit in zip(range(0, n, sector_size), units, strict=True):
            target[lo : lo + sector_size] = unit
        return out

    @staticmethod
    def _out_view(out: object, source: memoryview) -> memoryview:
        try:
            target = memoryview(out)  # type: ignore[arg-type]
        except TypeError:
            target = None
        if target is None or target.readonly or not target.c_contiguous:
            raise TypeError(f"out must be a writable C-contiguous buffer, not {type(out).__name__}")
        if target.format != "B" or target.ndim != 1:
            target = target.cast("B")
        if len(target) != len(source):
            raise ValueError(
                f"out must be exactly as long as src: got {len(target)} bytes for "
                f"{len(source)} bytes of data"
            )
        dst_at, src_at = _address(target), _address(source)
        if (
            dst_at is not None
            and src_at is not None
            and dst_at != src_at
            and dst_at < src_at + len(source)
            and src_at < dst_at + len(target)
        ):
            raise ValueError(
                "out overlaps src without being the same memory; use the "
                "same buffer for in-place work or a disjoint one"
            )
        return target

    def decrypt_gather(self, src: object, items: Sequence[tuple[int, int, object]],
                       sector_size: int, tweak: int) -> int:
        """Decrypt many runs of ``src``: items are ``(offset in src, first_sector,
        out)``, each ``out`` filled with the plaintext of ``len(out)`` bytes at
        ``offset`` (the native kernel's batch, for an NBD server's reads of one receive).
        Every item is checked before any runs; returns the bytes decrypted."""
        _check_batch_args(sector_size, tweak)
        data = _byte_view(src, "src")
        runs = batch_runs(items, sector_size, len(data), gather=True)
        for (offset, first, out), n in zip(items, runs, strict=True):
            self.decrypt(data[offset:offset + n], first, sector_size, out, tweak)
        return sum(runs)

    def encrypt_scatter(self, fd: int, items: Sequence[tuple[int, int, object]],
                        sector_size: int, tweak: int,
                        scratch: object) -> tuple[int, int, int]:
        """Encrypt each item's plaintext ``(file offset, first_sector, data)`` into
        ``scratch`` and write it to ``fd`` at the offset, in order; every item is checked
        before any runs. Returns (items written, errno of the first that failed or 0,
        bytes written), as the native kernel does."""
        _check_batch_args(sector_size, tweak)
        buf = _byte_view(scratch, "scratch")
        runs = batch_runs(items, sector_size, len(buf), gather=False)
        written = 0
        for done, ((offset, first, data), n) in enumerate(zip(items, runs, strict=True)):
            out = buf[:n]
            self.encrypt(data, first, sector_size, out, tweak)
            err = pwrite_all(fd, out, offset)
            if err:
                return done, err, written
            written += n
        return len(items), 0, written
