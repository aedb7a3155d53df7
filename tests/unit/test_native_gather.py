"""The sector kernel's batches: ``decrypt_gather`` and ``encrypt_scatter`` give the bytes
of one ``decrypt``/``encrypt`` per item, native and fallback alike."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path
from typing import Any

import pytest

from cryptoplane import _native

IMPLS: list[Any] = [_native.PythonXtsKey]
if _native.NativeXtsKey is not None:
    IMPLS.insert(0, _native.NativeXtsKey)
# LUKS1 (512-byte sectors, IVs per sector), LUKS2 4 KiB sectors (IVs in 512-byte units)
SHAPES = [(512, _native.TWEAK_PLAIN64), (4096, _native.TWEAK_PLAIN64 | _native.tweak_step(8)),
          (4096, _native.TWEAK_PLAIN64BE)]


def batch(rng: random.Random, ss: int, src_len: int, count: int) -> list[tuple[int, int, int]]:
    """(offset, first sector, length): random whole-sector runs, overlaps allowed."""
    out = []
    for _ in range(count):
        n = ss * rng.randint(1, 4)
        off = ss * rng.randrange(0, (src_len - n) // ss + 1)
        out.append((off, rng.randrange(0, 1 << 64), n))
    return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("ss", "tweak"), SHAPES)
def test_gather_equals_one_decrypt_per_item(impl: Any, ss: int, tweak: int) -> None:
    rng = random.Random(ss + tweak)
    key_bytes = rng.randbytes(64)
    key = impl(key_bytes)
    src = rng.randbytes(64 * 1024)
    for _ in range(20):
        items = batch(rng, ss, len(src), rng.randint(1, 32))
        outs = [bytearray(n) for _, _, n in items]
        got_bytes = key.decrypt_gather(
            memoryview(src), [(o, f, b) for (o, f, _), b in zip(items, outs, strict=True)],
            ss, tweak)
        assert got_bytes == sum(n for _, _, n in items)
        for (off, first, n), got in zip(items, outs, strict=True):
            want = _native.PythonXtsKey(key_bytes).decrypt(src[off:off + n], first, ss,
                                                           None, tweak)
            assert bytes(got) == want


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("ss", "tweak"), SHAPES)
def test_scatter_equals_one_encrypt_and_pwrite_per_item(impl: Any, ss: int, tweak: int,
                                                        tmp_path: Path) -> None:
    """In order: overlapping items end as the last one wrote them."""
    rng = random.Random(ss * 3 + tweak)
    key_bytes = rng.randbytes(32)
    size = 64 * 1024
    a, b = tmp_path / "a", tmp_path / "b"
    start = rng.randbytes(size)
    a.write_bytes(start)
    b.write_bytes(start)
    ref = _native.PythonXtsKey(key_bytes)
    key = impl(key_bytes)
    scratch = bytearray(4 * ss)
    fa, fb = os.open(a, os.O_RDWR), os.open(b, os.O_RDWR)
    try:
        for _ in range(20):
            items = [(off, first, rng.randbytes(n))
                     for off, first, n in batch(rng, ss, size, rng.randint(1, 32))]
            assert key.encrypt_scatter(fa, items, ss, tweak, scratch) == (
                len(items), 0, sum(len(d) for _, _, d in items))
            for off, first, data in items:
                os.pwrite(fb, ref.encrypt(data, first, ss, None, tweak), off)
        assert a.read_bytes() == b.read_bytes() != start
    finally:
        os.close(fa)
        os.close(fb)


@pytest.mark.parametrize("impl", IMPLS)
def test_scatter_reports_the_first_failed_write(impl: Any, tmp_path: Path) -> None:
    key = impl(bytes(range(64)))
    path = tmp_path / "ro"
    path.write_bytes(bytes(8192))
    fd = os.open(path, os.O_RDONLY)  # every pwrite fails with EBADF
    try:
        got = key.encrypt_scatter(fd, [(0, 0, bytes(512)), (512, 1, bytes(512))], 512, 0,
                                  bytearray(512))
    finally:
        os.close(fd)
    assert got == (0, errno.EBADF, 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_items_are_refused(impl: Any) -> None:
    key = impl(bytes(range(64)))
    src = bytes(4096)
    with pytest.raises(ValueError):
        key.decrypt_gather(src, [(4096 - 512, 0, bytearray(1024))], 512, 0)  # past the end
    with pytest.raises(ValueError):
        key.decrypt_gather(src, [(0, 0, bytearray(100))], 512, 0)  # not whole sectors
    with pytest.raises(ValueError):
        key.encrypt_scatter(-1, [(0, 0, bytes(1024))], 512, 0, bytearray(512))  # > scratch
    # numbers outside 0..2**64-1 are refused, not taken modulo 2**64 ("K" would)
    for bad in ((0, -1), (-512, 0), (0, 1 << 64)):
        with pytest.raises(OverflowError):
            key.decrypt_gather(src, [(bad[0], bad[1], bytearray(512))], 512, 0)
    # nothing ran: a good item before a bad one is left as it was
    first = bytearray(b"x" * 512)
    with pytest.raises(ValueError):
        key.decrypt_gather(src, [(0, 0, first), (0, 0, bytearray(100))], 512, 0)
    assert first == b"x" * 512
