"""The plane's sector batches: ``decrypt_sectors_gather`` and ``encrypt_sectors_scatter``
give byte for byte what one ``decrypt_sectors``/``encrypt_sectors`` per item gives, on
the fast path (native kernel and its Python fallback) and off it (a key bound to the
threads engine); they count their bytes; bad batches are ``InvalidRequest``."""

from __future__ import annotations

import errno
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import unavailable

import cryptoplane as cp
from cryptoplane import _native
from cryptoplane.volume.ciphers import sector_cipher

# fast path on the native kernel, on its Python fallback; off the fast path (threads)
MODES = ["native", "python", "threads"]
# LUKS1-like (512-byte sectors, plain64), LUKS2 4 KiB sectors (IVs in 512-byte units),
# and the big-endian layout
SHAPES = [(512, "plain64", None), (4096, "plain64", 512), (4096, "plain64be", None)]
SRC_SECTORS = 16


@pytest.fixture(scope="module")
def plane() -> Iterator[cp.Plane]:
    with cp.Plane(engines=["inline", "threads"]) as p:
        yield p


def make_key(p: cp.Plane, mode: str, material: bytes) -> cp.Key:
    key = cp.Key("aes-256-xts" if len(material) == 64 else "aes-128-xts", material)
    if mode == "python":
        key.kernel()._sectors = _native.PythonXtsKey(material)  # type: ignore[attr-defined]
    elif mode == "native" and _native.NativeXtsKey is None:
        unavailable("native sector kernel not built")
    if mode == "threads":
        p.session(key, engine="threads")  # off the fast path: through the scheduler
    return key


def oracle(material: bytes) -> cp.Key:
    """A second key with the same material: its single runs are what a batch must equal."""
    return cp.Key("aes-256-xts" if len(material) == 64 else "aes-128-xts", material)


materials = st.binary(min_size=64, max_size=64).filter(lambda m: m[:32] != m[32:]) | \
    st.binary(min_size=32, max_size=32).filter(lambda m: m[:16] != m[16:])


@st.composite
def batches(draw: st.DrawFn, ss: int) -> list[tuple[int, int, int]]:
    """(offset, first sector, length): whole-sector runs in a SRC_SECTORS-sector source,
    overlapping freely, first sectors anywhere in 0..2**64-1 (wrapping included)."""
    out = []
    for _ in range(draw(st.integers(0, 12))):
        n = draw(st.integers(1, 4))
        at = draw(st.integers(0, SRC_SECTORS - n))
        first = draw(st.integers(0, (1 << 64) - 1) | st.integers((1 << 64) - 8, (1 << 64) - 1))
        out.append((at * ss, first, n * ss))
    return out


fast = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("ss", "tweak", "unit"), SHAPES)
@fast
@given(material=materials, data=st.data())
def test_gather_equals_one_decrypt_per_item(plane: cp.Plane, mode: str, ss: int, tweak: str,
                                            unit: int | None, material: bytes,
                                            data: st.DataObject) -> None:
    key, ref = make_key(plane, mode, material), oracle(material)
    src = random.Random(data.draw(st.integers(0, 1 << 32))).randbytes(SRC_SECTORS * ss)
    items = data.draw(batches(ss))
    outs = [bytearray(n) for _, _, n in items]
    plane.decrypt_sectors_gather(
        key, memoryview(src), [(o, f, b) for (o, f, _), b in zip(items, outs, strict=True)],
        sector_size=ss, tweak=tweak, tweak_unit=unit)
    for (off, first, n), got in zip(items, outs, strict=True):
        want = plane.decrypt_sectors(ref, src[off:off + n], sector=first, sector_size=ss,
                                     tweak=tweak, tweak_unit=unit)
        assert bytes(got) == want


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("ss", "tweak", "unit"), SHAPES)
@fast
@given(material=materials, data=st.data())
def test_scatter_equals_one_encrypt_and_pwrite_per_item(
        plane: cp.Plane, mode: str, ss: int, tweak: str, unit: int | None, material: bytes,
        data: st.DataObject) -> None:
    """In order: where items overlap, the file ends as the last one wrote it."""
    key, ref = make_key(plane, mode, material), oracle(material)
    rng = random.Random(data.draw(st.integers(0, 1 << 32)))  # bytes too many to draw
    items = [(o, f, rng.randbytes(n)) for o, f, n in data.draw(batches(ss))]
    size = SRC_SECTORS * ss
    with tempfile.TemporaryFile() as got, tempfile.TemporaryFile() as want:
        for f in (got, want):
            f.truncate(size)
        scratch = bytearray(4 * ss)
        assert plane.encrypt_sectors_scatter(key, got.fileno(), items, scratch,
                                             sector_size=ss, tweak=tweak,
                                             tweak_unit=unit) == (len(items), 0)
        for off, first, plain in items:
            os.pwrite(want.fileno(), plane.encrypt_sectors(
                ref, plain, sector=first, sector_size=ss, tweak=tweak, tweak_unit=unit), off)
        assert os.pread(got.fileno(), size, 0) == os.pread(want.fileno(), size, 0)


def counted(p: cp.Plane, op: str) -> dict[str, Any]:
    found: dict[str, Any] = p.stats()["algorithms"].get("aes-256-xts", {}).get(
        op, {"requests": 0, "bytes": 0})
    return found


@pytest.mark.parametrize("mode", MODES)
def test_batches_count_their_bytes(mode: str) -> None:
    """On the fast path a batch is one request of all its bytes (as a single run is
    counted); off it, one request per item, counted by the engine."""
    with cp.Plane(engines=["inline", "threads"]) as p:
        key = make_key(p, mode, bytes(range(64)))
        items = [(0, 3, bytearray(1024)), (512, 9, bytearray(2048)), (0, 1, bytearray(512))]
        p.decrypt_sectors_gather(key, bytes(8192), items, sector_size=512)
        dec = counted(p, "decrypt_sectors")
        assert dec["bytes"] == 3584
        assert dec["requests"] == (3 if mode == "threads" else 1)
        with tempfile.TemporaryFile() as f:
            done = p.encrypt_sectors_scatter(key, f.fileno(), [(4096, 0, bytes(4096))] * 2,
                                             bytearray(4096))
        assert done == (2, 0)
        enc = counted(p, "encrypt_sectors")
        assert enc["bytes"] == 8192
        assert enc["requests"] == (2 if mode == "threads" else 1)
        if mode == "threads":
            assert p.stats()["engines"]["threads"]["requests"] == 5


def test_first_batch_binds_the_key() -> None:
    """A key the plane has never seen takes the fast path from its first batch: no
    single run needed first (the volume's first receive is batched too)."""
    with cp.Plane(engines=["inline", "threads"]) as p:
        key = cp.Key("aes-256-xts", bytes(range(64)))
        out = bytearray(4096)
        p.decrypt_sectors_gather(key, bytes(4096), [(0, 0, out)])
        assert key.session_hint.fast_plane is p
        assert counted(p, "decrypt_sectors")["requests"] == 1
        assert p.stats()["engines"]["threads"]["requests"] == 0


def test_volume_cipher_batches_from_the_start() -> None:
    with cp.Plane(engines=["inline"]) as p:
        cipher = sector_cipher("aes-xts-plain64", bytes(range(64)), 4096, p)
        batch = cipher.batch()
        assert batch is not None
        out = bytearray(8192)
        batch.decrypt_gather(bytes(8192), [(0, 8, out)])
        want = bytearray(8192)
        cipher.decrypt(bytes(8192), 8, want)
        assert out == want
        # "plain" IVs wrap at 2**32, which a batch does not split at
        assert sector_cipher("aes-xts-plain", bytes(range(64)), 512, p).batch() is None


BAD_ARGS = [
    ({"tweak": "essiv"}, "tweak layout"),
    ({"tweak_unit": 1000}, "tweak_unit"),
    ({"sector_size": 1000}, "sector_size must be one of"),
    ({"sector_size": 4096}, "4096"),  # the 512-byte items below
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("kw", "match"), BAD_ARGS)
def test_gather_refuses_bad_arguments(plane: cp.Plane, mode: str, kw: dict[str, Any],
                                      match: str) -> None:
    key = make_key(plane, mode, bytes(range(64)))
    args: dict[str, Any] = {"sector_size": 512, **kw}
    out = bytearray(512)
    with pytest.raises(cp.InvalidRequest, match=match):
        plane.decrypt_sectors_gather(key, bytes(4096), [(0, 0, out)], **args)
    with tempfile.TemporaryFile() as f, pytest.raises(cp.InvalidRequest, match=match):
        plane.encrypt_sectors_scatter(key, f.fileno(), [(0, 0, bytes(512))],
                                      bytearray(4096), **args)


@pytest.mark.parametrize("mode", MODES)
def test_gather_refuses_bad_items_before_running_any(plane: cp.Plane, mode: str) -> None:
    key = make_key(plane, mode, bytes(range(64)))
    src = bytes(4096)
    bad: Any
    for bad in [(0, 0, bytearray(700)),            # not whole sectors
                (0, 0, bytearray(0)),              # empty
                (3584, 0, bytearray(1024)),        # runs past the end of src
                (8192, 0, bytearray(512)),         # starts past it
                (0, -1, bytearray(512)),           # sector below 0
                (0, 1 << 64, bytearray(512)),      # sector past 2**64-1
                (0, 0)]:                           # not an item
        first = bytearray(512)
        with pytest.raises(cp.InvalidRequest):
            plane.decrypt_sectors_gather(key, src, [(0, 0, first), bad], sector_size=512)
        assert first == bytearray(512), bad  # the good item before it did not run


@pytest.mark.parametrize("mode", MODES)
def test_scatter_refuses_bad_items_before_writing_any(plane: cp.Plane, mode: str,
                                                      tmp_path: Path) -> None:
    key = make_key(plane, mode, bytes(range(64)))
    path = tmp_path / "image"
    path.write_bytes(bytes(8192))
    with path.open("r+b") as f:
        for bad in [(0, 0, bytes(700)),            # not whole sectors
                    (0, 0, bytes(2048)),           # longer than the scratch buffer
                    (0, -1, bytes(512))]:          # sector below 0
            with pytest.raises(cp.InvalidRequest):
                plane.encrypt_sectors_scatter(key, f.fileno(), [(0, 0, bytes(512)), bad],
                                              bytearray(1024), sector_size=512)
            assert path.read_bytes() == bytes(8192), bad


@pytest.mark.parametrize("mode", MODES)
def test_scatter_reports_a_failed_write(plane: cp.Plane, mode: str, tmp_path: Path) -> None:
    """A write the descriptor refuses is (items written before it, its errno), not an
    exception: the kernel's answer, and the fallback's alike."""
    key = make_key(plane, mode, bytes(range(64)))
    path = tmp_path / "image"
    path.write_bytes(bytes(4096))
    fd = os.open(path, os.O_RDONLY)  # pwrite: EBADF
    try:
        got = plane.encrypt_sectors_scatter(key, fd, [(0, 0, bytes(512))] * 2,
                                            bytearray(512), sector_size=512)
    finally:
        os.close(fd)
    assert got == (0, errno.EBADF)


@pytest.mark.parametrize("mode", MODES)
def test_buffers_that_are_not_byte_buffers_are_refused(plane: cp.Plane, mode: str) -> None:
    key = make_key(plane, mode, bytes(range(64)))
    # the kernel's own words on the fast path, the plane's elsewhere: typed alike
    with pytest.raises(cp.InvalidRequest, match=r"bytes-like|src"):
        plane.decrypt_sectors_gather(key, "text", [], sector_size=512)  # type: ignore[arg-type]
    with pytest.raises(cp.InvalidRequest, match=r"contiguous|scratch|bytes-like"):
        plane.encrypt_sectors_scatter(key, 0, [], memoryview(bytearray(2048))[::2],
                                      sector_size=512)
    with pytest.raises(cp.InvalidRequest, match="item"):
        plane.decrypt_sectors_gather(key, bytes(512), [(0, 0, "text")], sector_size=512)


def test_a_key_without_sector_runs_is_refused(plane: cp.Plane) -> None:
    key = cp.Key("aes-256-gcm", bytes(32))
    with pytest.raises(cp.InvalidRequest):
        plane.decrypt_sectors_gather(key, bytes(512), [(0, 0, bytearray(512))],
                                     sector_size=512)
    with pytest.raises(cp.InvalidRequest):
        plane.decrypt_sectors_gather("not a key", bytes(512),  # type: ignore[arg-type]
                                     [(0, 0, bytearray(512))], sector_size=512)
