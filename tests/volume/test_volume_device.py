"""Volume as a BlockDevice: reads and writes against a plaintext model, ciphertext on disk
checked sector by sector, range and state errors, allocation bounds, and concurrency."""

from __future__ import annotations

import os
import random
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from support import unavailable

import cryptoplane as cp
from cryptoplane import _native
from cryptoplane.exceptions import InvalidRequest, KeyRejected, NotSupported
from cryptoplane.nbd.blockdev import BlockDevice
from cryptoplane.volume.device import Volume
from cryptoplane.volume.layout import DataLayout

OFFSET = 8192


def make(tmp_path: Path, size: int, sector_size: int = 512, cipher: str = "aes-xts-plain64",
         iv_offset: int = 0) -> tuple[Path, DataLayout]:
    img = tmp_path / "vol.img"
    with open(img, "wb") as f:
        f.truncate(OFFSET + size)
    key = os.urandom(64 if "xts" in cipher else 32)
    return img, DataLayout(cipher, key, OFFSET, size, sector_size, iv_offset)


def xts_sector(layout: DataLayout, i: int, data: bytes) -> bytes:
    """Sector ``i`` decrypted by dm-crypt's rule: its IV counts 512-byte units."""
    tweak = (layout.iv_offset + i * layout.sector_size // 512).to_bytes(16, "little")
    return Cipher(algorithms.AES(layout.volume_key), modes.XTS(tweak)).decryptor().update(data)


@pytest.mark.parametrize("sector_size", [512, 4096])
@pytest.mark.parametrize("cipher", ["aes-xts-plain64", "aes-cbc-essiv:sha256"])
def test_random_io_matches_a_model(tmp_path: Path, plane: cp.Plane, sector_size: int,
                                   cipher: str) -> None:
    size = 64 * sector_size
    img, layout = make(tmp_path, size, sector_size, cipher, iv_offset=7)
    rng = random.Random(sector_size)
    with Volume(img, layout, plane, chunk=4 * sector_size) as vol:
        model = bytearray(vol.read(0, size))
        for _ in range(150):
            start = rng.randrange(size)
            n = min(rng.choice([1, 15, sector_size, 3 * sector_size + 5, 20 * sector_size]),
                    size - start)
            if rng.random() < 0.3:
                start -= start % sector_size
            data = rng.randbytes(n)
            vol.pwrite(start, data)
            model[start:start + n] = data
            start = rng.randrange(size)
            n = rng.randrange(min(9 * sector_size, size - start) + 1)
            assert vol.read(start, n) == model[start:start + n]
        assert vol.read(0, size) == model
    if cipher == "aes-xts-plain64":  # the bytes on disk are dm-crypt's, sector by sector
        raw = img.read_bytes()
        assert raw[:OFFSET] == bytes(OFFSET)  # nothing written before the segment
        for i in range(size // sector_size):
            sec = raw[OFFSET + i * sector_size:OFFSET + (i + 1) * sector_size]
            assert xts_sector(layout, i, sec) == model[i * sector_size:(i + 1) * sector_size]


def test_is_a_block_device(tmp_path: Path, plane: cp.Plane) -> None:
    img, layout = make(tmp_path, 16 * 4096, 4096)
    with Volume(img, layout, plane) as vol:
        assert isinstance(vol, BlockDevice)
        assert (vol.size, vol.block_size, vol.read_only) == (16 * 4096, 4096, False)


def test_callers_data_is_never_modified(tmp_path: Path, plane: cp.Plane) -> None:
    img, layout = make(tmp_path, 32 * 512)
    data = bytearray(os.urandom(8 * 512))
    copy = bytes(data)
    with Volume(img, layout, plane) as vol:
        vol.pwrite(0, data)
        vol.pwrite(100, memoryview(data)[:1000])
        assert data == copy


def test_preadinto_fills_a_slice(tmp_path: Path, plane: cp.Plane) -> None:
    img, layout = make(tmp_path, 32 * 512)
    with Volume(img, layout, plane) as vol:
        data = os.urandom(4096)
        vol.write(512, data)
        buf = bytearray(b"\xee" * 8192)
        vol.preadinto(512, memoryview(buf)[100:100 + 4096])
        assert buf[100:4196] == data and buf[:100] == b"\xee" * 100
        assert buf[4196:] == b"\xee" * (8192 - 4196)
        vol.preadinto(700, memoryview(buf)[:0])  # empty requests do nothing
        with pytest.raises(InvalidRequest, match="writable"):
            vol.preadinto(0, bytes(512))


def test_write_zeroes_and_trim(tmp_path: Path, plane: cp.Plane) -> None:
    size = 3 << 20
    img, layout = make(tmp_path, size, 4096)
    with Volume(img, layout, plane) as vol:
        vol.pwrite(0, os.urandom(size))
        vol.write_zeroes(1000, size - 3000, fua=True)
        got = vol.read(0, size)
        assert got[1000:size - 2000] == bytes(size - 3000)
        assert got[:1000] != bytes(1000)
        vol.trim(0, size)  # a hint: the data stays readable
        assert vol.read(0, size) == got
        vol.flush()
        raw = img.read_bytes()[OFFSET:]
        assert raw.count(bytes(4096)) == 0  # zeros are stored encrypted


@pytest.mark.parametrize(("offset", "length"), [(-1, 1), (0, 32 * 512 + 1), (32 * 512, 1),
                                                (5, -1)])
def test_ranges_outside_the_device(tmp_path: Path, plane: cp.Plane, offset: int,
                                   length: int) -> None:
    img, layout = make(tmp_path, 32 * 512)
    with Volume(img, layout, plane) as vol:
        with pytest.raises(InvalidRequest, match="outside"):
            vol.pread(offset, max(length, 0)) if length >= 0 else vol.trim(offset, length)
        with pytest.raises(InvalidRequest, match="outside"):
            if length >= 0:
                vol.pwrite(offset, bytes(length))
            else:
                vol.write_zeroes(offset, length)


def test_read_only_and_closed(tmp_path: Path, plane: cp.Plane) -> None:
    img, layout = make(tmp_path, 32 * 512)
    vol = Volume(img, layout, plane, read_only=True)
    assert vol.read_only and "read-only" in repr(vol)
    with pytest.raises(InvalidRequest, match="read-only"):
        vol.pwrite(0, b"x")
    with pytest.raises(InvalidRequest, match="read-only"):
        vol.write_zeroes(0, 1)
    with pytest.raises(InvalidRequest, match="read-only"):
        vol.trim(0, 512)
    vol.read(0, 512)
    vol.flush()
    vol.close()
    vol.close()
    with pytest.raises(InvalidRequest, match="closed"):
        vol.read(0, 1)


def test_repr_carries_no_key(tmp_path: Path, plane: cp.Plane) -> None:
    img, layout = make(tmp_path, 32 * 512)
    with Volume(img, layout, plane) as vol:
        text = repr(vol)
    assert "aes-xts-plain64" in text
    assert layout.volume_key.hex()[:16] not in text and str(layout.volume_key) not in text


def test_an_fd_is_duplicated(tmp_path: Path, plane: cp.Plane) -> None:
    img, layout = make(tmp_path, 32 * 512)
    fd = os.open(img, os.O_RDWR)
    try:
        with Volume(fd, layout, plane) as vol:
            vol.write(0, b"hello")
            assert vol.read(0, 5) == b"hello"
        os.fstat(fd)  # still ours
    finally:
        os.close(fd)


def test_bad_layouts(tmp_path: Path, plane: cp.Plane) -> None:
    img, layout = make(tmp_path, 32 * 512)
    too_big = DataLayout(layout.cipher, layout.volume_key, OFFSET, 64 * 512, 512)
    with pytest.raises(InvalidRequest, match="holds"):
        Volume(img, too_big, plane)
    odd = DataLayout(layout.cipher, layout.volume_key, OFFSET, 32 * 512 - 1, 512)
    with pytest.raises(InvalidRequest, match="layout"):
        Volume(img, odd, plane)
    with pytest.raises(NotSupported, match="serpent"):
        Volume(img, DataLayout("serpent-xts-plain64", layout.volume_key, OFFSET, 512), plane)
    with pytest.raises(KeyRejected):
        Volume(img, DataLayout("aes-xts-plain64", bytes(20), OFFSET, 512), plane)
    with pytest.raises(FileNotFoundError):
        Volume(tmp_path / "missing", layout, plane)


def test_large_requests_allocate_nothing_per_request(tmp_path: Path, plane: cp.Plane) -> None:
    size = 32 << 20
    img, layout = make(tmp_path, size, 4096)
    data = bytearray(os.urandom(size))
    buf = bytearray(size)
    with Volume(img, layout, plane) as vol:
        vol.pwrite(0, data)  # makes this thread's buffer
        vol.preadinto(0, buf)
        tracemalloc.start()
        try:
            vol.pwrite(0, data)
            vol.preadinto(0, buf)
            vol.pwrite(100, memoryview(data)[:1 << 20])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert buf == data
    assert peak < 64 * 1024, peak


# -- concurrency ----------------------------------------------------------------------------

def test_concurrent_unaligned_writes_lose_nothing(tmp_path: Path, plane: cp.Plane) -> None:
    """Threads own interleaved 100-byte ranges: every sector is shared by several threads,
    each of which read-modify-writes it; the final bytes must be every thread's last."""
    threads, width, rounds = 6, 100, 12
    stride = threads * width
    pieces = 40
    size = ((pieces * stride) // 512 + 1) * 512
    img, layout = make(tmp_path, size)
    expected = bytearray(size)
    # small regions: many stripe locks in play, and writes that cross region boundaries
    with Volume(img, layout, plane, chunk=1024) as vol:
        vol.write_zeroes(0, size)
        errors: list[BaseException] = []
        start = threading.Barrier(threads)

        def worker(t: int) -> None:
            rng = random.Random(t)
            try:
                start.wait(10)
                for r in range(rounds):
                    order = list(range(pieces))
                    rng.shuffle(order)
                    for k in order:
                        vol.pwrite(k * stride + t * width, bytes([t * 16 + r]) * width)
            except BaseException as e:
                errors.append(e)

        pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join(60)
        assert not errors and not any(th.is_alive() for th in pool)
        for t in range(threads):
            for k in range(pieces):
                at = k * stride + t * width
                expected[at:at + width] = bytes([t * 16 + rounds - 1]) * width
        assert vol.read(0, size) == expected


def test_readers_see_whole_sectors_old_or_new(tmp_path: Path, plane: cp.Plane) -> None:
    """Writers replace whole sectors with versions (each sector filled with one byte);
    readers must only ever see a sector that is one version throughout."""
    ss, sectors = 512, 64
    img, layout = make(tmp_path, sectors * ss, ss)
    with Volume(img, layout, plane, chunk=2 * ss) as vol:
        vol.write_zeroes(0, sectors * ss)
        stop = threading.Event()
        bad: list[str] = []

        def writer(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(3000):
                if stop.is_set():
                    return
                first = rng.randrange(sectors - 4)
                vol.pwrite(first * ss, b"".join(bytes([rng.randrange(256)]) * ss
                                                for _ in range(4)))

        def reader() -> None:
            rng = random.Random(99)
            deadline = time.monotonic() + 20
            while not stop.is_set() and time.monotonic() < deadline:
                first = rng.randrange(sectors - 8)
                got = vol.read(first * ss, 8 * ss)
                for i in range(8):
                    sec = got[i * ss:(i + 1) * ss]
                    if sec.count(sec[:1]) != ss:
                        bad.append(f"sector {first + i} torn")
                        return

        ws = [threading.Thread(target=writer, args=(s,)) for s in range(2)]
        rd = threading.Thread(target=reader)
        rd.start()
        for w in ws:
            w.start()
        for w in ws:
            w.join(60)
        stop.set()
        rd.join(60)
        assert not bad, bad


@pytest.mark.parametrize("sectors_apart", [0, 1], ids=["same-sectors", "same-region"])
@pytest.mark.parametrize("source", ["mapped", "pread"])
def test_a_read_overlapped_by_a_write_is_read_again(
        tmp_path: Path, plane: cp.Plane, monkeypatch: pytest.MonkeyPatch,
        sectors_apart: int, source: str) -> None:
    """Reads take no lock (a seqlock). A write that runs while a read is half done (the
    torn read the page cache allows, made deterministic here) must send the read round
    again, under the lock: what it returns is one version throughout, never half old
    and half new, and never garbage decrypted from a torn ciphertext. Both read paths:
    decrypting straight from the mapped image, and pread then decrypt."""
    import cryptoplane.volume.device as device_mod

    if source == "pread":
        monkeypatch.setattr(device_mod, "_map_image", lambda *a: None)
    ss, sectors = 512, 8
    img, layout = make(tmp_path, 64 * ss, ss)
    armed = threading.Event()
    calls: list[int] = []  # calls of the torn function

    with Volume(img, layout, plane) as vol:
        if source == "mapped" and _native.BACKEND != "native":
            unavailable(f"the mapped read path needs the native sector kernel: "
                        f"{_native.BACKEND_REASON}")
        assert (vol._map is not None) == (source == "mapped")
        vol.pwrite(0, b"\x11" * (sectors * ss))
        new = b"\x22" * (sectors * ss)

        def write_meanwhile() -> None:
            writer = threading.Thread(
                target=vol.pwrite, args=(sectors_apart * sectors * ss, new))
            writer.start()
            writer.join(10)

        def torn(real: Callable[..., None],
                 halves: Callable[..., tuple[tuple[Any, ...], tuple[Any, ...]]],
                 ) -> Callable[..., None]:
            """``real``, which once armed runs in two halves with a whole write
            between them (the mapping and the file show the new data from then on)."""
            def call(*args: Any) -> None:
                calls.append(1)
                if not armed.is_set():
                    real(*args)
                    return
                armed.clear()
                first, second = halves(*args)
                real(*first)
                write_meanwhile()
                real(*second)
            return call

        def pread_halves(fd: int, pos: int, view: memoryview) -> tuple[tuple[Any, ...],
                                                                        tuple[Any, ...]]:
            h = len(view) // 2
            return (fd, pos, view[:h]), (fd, pos + h, view[h:])

        def decrypt_halves(data: Any, sector: int, out: Any) -> tuple[tuple[Any, ...],
                                                                      tuple[Any, ...]]:
            h = len(data) // 2
            return (data[:h], sector, out[:h]), (data[h:], sector + h // ss, out[h:])

        if source == "pread":
            monkeypatch.setattr(device_mod, "pread_full",
                                torn(device_mod.pread_full, pread_halves))
        else:
            monkeypatch.setattr(vol._cipher, "decrypt",
                                torn(vol._cipher.decrypt, decrypt_halves))
        armed.set()
        got = vol.read(0, sectors * ss)
        assert len(calls) == 2, "the overlapped read was not done again"
        if sectors_apart == 0:
            assert got == new  # read again after the write: the new version
        else:
            assert got == b"\x11" * (sectors * ss)  # other sectors: unchanged either way
        calls.clear()
        assert vol.read(0, sectors * ss) == got and len(calls) == 1  # no write: one read


def test_a_mapped_image_that_shrinks_gives_an_error_not_a_crash(
        tmp_path: Path, plane: cp.Plane) -> None:
    """Reads decrypt straight from a mapping of the image; if the file is truncated
    under it, the pages are gone and touching them raises SIGBUS. The kernel's guard
    turns that into the same typed error as a short pread, and the process lives on."""
    if _native.BACKEND != "native":
        unavailable(f"the mapped read path needs the native sector kernel: "
                    f"{_native.BACKEND_REASON}")
    ss = 4096
    img, layout = make(tmp_path, 64 * ss, ss)
    with Volume(img, layout, plane) as vol:
        assert vol._map is not None
        data = os.urandom(64 * ss)
        vol.pwrite(0, data)
        assert vol.read(0, 64 * ss) == data
        os.truncate(img, OFFSET + 16 * ss)  # the last 48 sectors are gone
        with pytest.raises(InvalidRequest, match="shrank"):
            vol.read(32 * ss, 8 * ss)
        with pytest.raises(InvalidRequest, match="shrank"):  # and again: still guarded
            vol.read(60 * ss, ss)
        assert vol.read(0, 16 * ss) == data[:16 * ss]  # what is still there reads
        # cut inside a page: the mapping gives zeros after the end, not SIGBUS; the size
        # check after the run catches it, alone and in a batch
        os.truncate(img, OFFSET + 8 * ss + 100)
        with pytest.raises(InvalidRequest, match="shrank"):
            vol.read(8 * ss, ss)
        bufs = [bytearray(ss), bytearray(ss)]
        errors = vol.preadinto_many([(0, bufs[0]), (8 * ss, bufs[1])])
        assert errors[0] is None and bufs[0] == data[:ss]
        assert isinstance(errors[1], InvalidRequest) and "shrank" in str(errors[1])


def test_without_a_plane_the_volume_brings_its_own(tmp_path: Path) -> None:
    img, layout = make(tmp_path, 16 * 4096, 4096)
    with Volume(img, layout) as vol:
        vol.pwrite(10, b"abc")
        assert vol.read(10, 3) == b"abc"
    with pytest.raises(InvalidRequest, match="holds"):  # and closes it when opening fails
        Volume(img, DataLayout(layout.cipher, layout.volume_key, OFFSET, 1 << 30, 4096))


def test_plain_tweaks_wrap_inside_a_request(tmp_path: Path, plane: cp.Plane) -> None:
    """aes-xts-plain keeps 32 bits of the sector number: a request crossing 2**32 is split
    there, and the sector after the wrap is encrypted with tweak 0."""
    img, layout = make(tmp_path, 8 * 512, 512, "aes-xts-plain", iv_offset=(1 << 32) - 4)
    data = os.urandom(8 * 512)
    with Volume(img, layout, plane) as vol:
        vol.pwrite(0, data)
        assert vol.read(0, len(data)) == data
    raw = img.read_bytes()[OFFSET:]
    for i in range(8):
        tweak = ((layout.iv_offset + i) % (1 << 32)).to_bytes(16, "little")
        sec = raw[i * 512:(i + 1) * 512]
        dec = Cipher(algorithms.AES(layout.volume_key), modes.XTS(tweak)).decryptor()
        assert dec.update(sec) == data[i * 512:(i + 1) * 512]


def test_a_shrunken_device_is_a_short_read(tmp_path: Path, plane: cp.Plane) -> None:
    img, layout = make(tmp_path, 32 * 512)
    with Volume(img, layout, plane) as vol:
        os.truncate(img, OFFSET + 512)
        with pytest.raises(InvalidRequest, match="short read"):
            vol.read(1024, 512)
