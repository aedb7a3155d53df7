"""encrypt_sectors through the plane API, on both sector backends (acceptance: output
equals cryptography's XTS sector by sector; in place works; bad runs get a clear error)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import unavailable

import cryptoplane as cp
from cryptoplane import _native

BACKENDS = ["native", "python"]


@pytest.fixture(scope="module")
def plane() -> Iterator[cp.Plane]:
    with cp.Plane(engines=["inline"]) as p:
        yield p


def make_key(backend: str, material: bytes) -> cp.Key:
    key = cp.Key("aes-256-xts" if len(material) == 64 else "aes-128-xts", material)
    kernel = key.kernel()
    if backend == "python":
        kernel._sectors = _native.PythonXtsKey(material)  # type: ignore[attr-defined]
    elif _native.NativeXtsKey is None:
        unavailable("native sector kernel not built")
    return key


def reference(material: bytes, data: bytes, first: int, size: int) -> bytes:
    out = b""
    for i in range(len(data) // size):
        tweak = ((first + i) % (1 << 64)).to_bytes(16, "little")
        enc = Cipher(algorithms.AES(material), modes.XTS(tweak)).encryptor()
        out += enc.update(data[i * size:(i + 1) * size]) + enc.finalize()
    return out


materials = st.binary(min_size=64, max_size=64).filter(lambda m: m[:32] != m[32:]) | \
    st.binary(min_size=32, max_size=32).filter(lambda m: m[:16] != m[16:])


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(material=materials, size=st.sampled_from([512, 4096]), count=st.integers(1, 4),
       first=st.integers(0, (1 << 64) - 1), data=st.data())
def test_sectors_equal_per_sector_xts(plane: cp.Plane, backend: str, material: bytes,
                                      size: int, count: int, first: int,
                                      data: st.DataObject) -> None:
    key = make_key(backend, material)
    buf = data.draw(st.binary(min_size=size * count, max_size=size * count))
    out = plane.encrypt_sectors(key, buf, sector=first, sector_size=size)
    assert out == reference(material, buf, first, size)
    assert plane.decrypt_sectors(key, out, sector=first, sector_size=size) == buf
    inplace = bytearray(buf)
    assert plane.encrypt_sectors(key, inplace, sector=first, sector_size=size,
                                 out=inplace) is inplace
    assert inplace == out
    # an unaligned start address inside a bigger buffer is fine: only lengths matter
    big = bytearray(len(buf) + 1)
    view = memoryview(big)[1:]
    view[:] = buf
    plane.encrypt_sectors(key, view, sector=first, sector_size=size, out=view)
    assert bytes(view) == out


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 3 * 4096 + 17), size=st.sampled_from([512, 4096]))
def test_odd_runs_rejected(plane: cp.Plane, backend: str, n: int, size: int) -> None:
    key = make_key(backend, bytes(range(64)))
    if n and n % size == 0:
        assert len(plane.encrypt_sectors(key, bytes(n), sector_size=size)) == n
        return
    with pytest.raises(cp.InvalidRequest, match=f"multiple of {size} bytes, got {n}"):
        plane.encrypt_sectors(key, bytes(n), sector_size=size)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_buffers_rejected(plane: cp.Plane, backend: str) -> None:
    key = make_key(backend, bytes(range(64)))
    with pytest.raises(cp.InvalidRequest):  # read-only destination
        plane.encrypt_sectors(key, bytes(4096), out=bytes(4096))
    with pytest.raises(cp.InvalidRequest):  # destination of the wrong size
        plane.encrypt_sectors(key, bytes(4096), out=bytearray(512))
    strided = memoryview(bytearray(8192))[::2]
    with pytest.raises((cp.InvalidRequest, TypeError, BufferError)):
        plane.encrypt_sectors(key, strided)


@pytest.mark.parametrize(("engine", "backend"), [("inline", "native"), ("inline", "python"),
                                                 ("pool", "native")])
def test_tweak_unit_512_counts_as_dm_crypt_does(engine: str, backend: str) -> None:
    """``tweak_unit=512``: a 4096-byte sector's tweak is 8 past the previous one's (dm-crypt's
    LUKS2 IVs), on the fast path (native kernel and its Python fallback) and through the
    scheduler and a worker process alike."""
    material = bytes(range(64))
    key = make_key(backend, material)
    data = bytes(range(256)) * 64  # four 4096-byte sectors
    want = b"".join(reference(material, data[i * 4096:(i + 1) * 4096], 40 + 8 * i, 4096)
                    for i in range(4))
    with cp.Plane(engines=[engine]) as p:
        if engine == "inline":
            got = p.encrypt_sectors(key, data, sector=40, sector_size=4096, tweak_unit=512)
        else:
            got = p.submit(cp.EncryptSectors(key, data, sector=40, sector_size=4096,
                                             tweak_unit=512)).result(timeout=60)
            assert p.stats()["engines"]["pool"]["requests"] >= 1
        assert got == want
        back = p.run(cp.DecryptSectors(key, want, sector=40, sector_size=4096,
                                       tweak_unit=512))
        assert back == data
        # the default counts whole sectors (dm-crypt's iv_large_sectors)
        assert p.encrypt_sectors(key, data, sector=40, sector_size=4096) != want
        for bad in (256, 8192, 1000):
            with pytest.raises(cp.InvalidRequest, match="tweak_unit"):
                p.encrypt_sectors(key, data, sector=0, sector_size=4096, tweak_unit=bad)
        with pytest.raises(cp.InvalidRequest, match="tweak_unit"):
            p.encrypt_sectors(key, data[:1024], sector=0, sector_size=512, tweak_unit=1024)
