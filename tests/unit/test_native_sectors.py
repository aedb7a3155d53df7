"""The sector kernel: native and fallback against `cryptography`, IEEE 1619 and each other."""

from __future__ import annotations

import array
import copy
import mmap
import os
import pickle
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import unavailable

from cryptoplane import _native
from cryptoplane._native import fallback

U64 = 1 << 64

# Both implementations are exercised where both exist; the fallback always is.
IMPLS: list[Any] = [_native.PythonXtsKey]
if _native.NativeXtsKey is not None:
    IMPLS.insert(0, _native.NativeXtsKey)


def native() -> Any:
    """The C extension's XtsKey; in CI its absence is a failure, elsewhere a skip."""
    if _native.NativeXtsKey is None:
        unavailable(f"native sector kernel missing: {_native.BACKEND_REASON}")
    return _native.NativeXtsKey


def reference_tweak(sector: int, layout: int) -> bytes:
    """Written independently of the fallback's sector_tweak, from the dm-crypt spec."""
    sector %= U64
    if layout == _native.TWEAK_PLAIN64:
        return struct.pack("<QQ", sector, 0)
    return struct.pack(">QQ", 0, sector)


def reference(key: bytes, data: bytes, first: int, ss: int, code: int, enc: bool) -> bytes:
    """`cryptography`'s XTS, one data unit per sector, each with its own tweak: the
    layout is the code's low byte, and the tweak advances by 2**(code >> 8) per sector."""
    parts = []
    layout, step = code & 0xFF, 1 << (code >> 8)
    for i in range(len(data) // ss):
        tweak = reference_tweak(first + i * step, layout)
        cipher = Cipher(algorithms.AES(key), modes.XTS(tweak))
        ctx = cipher.encryptor() if enc else cipher.decryptor()
        parts.append(ctx.update(data[i * ss : (i + 1) * ss]) + ctx.finalize())
    return b"".join(parts)


def xts_keys() -> st.SearchStrategy[bytes]:
    return st.sampled_from([32, 64]).flatmap(
        lambda n: st.binary(min_size=n, max_size=n).filter(lambda k: k[: n // 2] != k[n // 2 :])
    )


first_sectors = st.one_of(
    st.integers(0, U64 - 1),
    st.integers(U64 - 8, U64 - 1),  # runs that wrap past 2**64 - 1 back to 0
    st.integers(0, 1 << 33),
)
# a layout, and how far the tweak advances per sector (8: dm-crypt's 4096-byte LUKS2 sectors)
layouts = st.sampled_from([layout | _native.tweak_step(step)
                           for layout in (_native.TWEAK_PLAIN64, _native.TWEAK_PLAIN64BE)
                           for step in (1, 2, 4, 8)])


@st.composite
def runs(draw: st.DrawFn, sizes: tuple[int, ...] = (512, 4096)) -> tuple[int, bytes]:
    ss = draw(st.sampled_from(sizes))
    n = draw(st.integers(1, 6))
    return ss, draw(st.binary(min_size=ss * n, max_size=ss * n))


fast = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- bytes: native vs cryptography, fallback vs native, round trips ---------------


@fast
@given(key=xts_keys(), run=runs(), first=first_sectors, layout=layouts)
def test_native_matches_cryptography_per_sector(
    key: bytes, run: tuple[int, bytes], first: int, layout: int
) -> None:
    ss, data = run
    k = native()(key)
    ct = k.encrypt(data, first, ss, tweak=layout)
    assert isinstance(ct, bytes)
    assert ct == reference(key, data, first, ss, layout, True)
    assert k.decrypt(ct, first, ss, tweak=layout) == data


@settings(max_examples=15, deadline=None)
@given(key=xts_keys(), run=runs((512, 1024, 2048, 4096)), first=first_sectors, layout=layouts)
def test_fallback_equals_native(
    key: bytes, run: tuple[int, bytes], first: int, layout: int
) -> None:
    ss, data = run
    py, nat = _native.PythonXtsKey(key), native()(key)
    ct = py.encrypt(data, first, ss, tweak=layout)
    assert ct == nat.encrypt(data, first, ss, tweak=layout)
    assert py.decrypt(ct, first, ss, tweak=layout) == nat.decrypt(ct, first, ss, tweak=layout)
    assert py.decrypt(ct, first, ss, tweak=layout) == data


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=10, deadline=None)
@given(key=xts_keys(), run=runs(), first=first_sectors, layout=layouts)
def test_round_trip_and_reference(
    impl: Any, key: bytes, run: tuple[int, bytes], first: int, layout: int
) -> None:
    ss, data = run
    k = impl(key)
    ct = k.encrypt(data, first, ss, tweak=layout)
    assert ct == reference(key, data, first, ss, layout, True)
    assert k.decrypt(ct, first, ss, tweak=layout) == data


@pytest.mark.parametrize("impl", IMPLS)
def test_wrap_and_layouts_differ(impl: Any) -> None:
    key = bytes(range(64))
    k = impl(key)
    data = os.urandom(3 * 512)
    wrapped = k.encrypt(data, U64 - 1, 512)
    # Sector numbers wrap: sectors 2**64-1, 0, 1.
    assert wrapped[512:] == k.encrypt(data[512:], 0, 512)
    assert wrapped[:512] == k.encrypt(data[:512], U64 - 1, 512)
    le = k.encrypt(data, 7, 512, tweak=_native.TWEAK_PLAIN64)
    be = k.encrypt(data, 7, 512, tweak=_native.TWEAK_PLAIN64BE)
    assert le != be
    # A tweak of 0 is the same in both layouts.
    assert k.encrypt(data[:512], 0, 512, tweak=1) == k.encrypt(data[:512], 0, 512, tweak=0)


# --- buffers: in place, slices, mmap, non-byte formats --------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_in_place_and_views(impl: Any) -> None:
    key = os.urandom(32) + os.urandom(32)
    k = impl(key)
    data = os.urandom(8 * 512)
    expect = k.encrypt(data, 99, 512)

    buf = bytearray(data)
    assert k.encrypt(buf, 99, 512, out=buf) is buf
    assert bytes(buf) == expect
    assert k.decrypt(buf, 99, 512, buf) is buf
    assert bytes(buf) == data

    big = bytearray(b"\xaa" * 100 + bytes(len(data)) + b"\x55" * 100)
    view = memoryview(big)[100 : 100 + len(data)]
    assert k.encrypt(memoryview(data), 99, 512, out=view) is view
    assert bytes(big[100:-100]) == expect
    assert big[:100] == b"\xaa" * 100 and big[-100:] == b"\x55" * 100

    # In place inside a slice of a bigger buffer.
    k.decrypt(view, 99, 512, out=view)
    assert bytes(big[100:-100]) == data

    with mmap.mmap(-1, len(data)) as mm:
        mm[:] = data
        k.encrypt(mm, 99, 512, out=mm)
        assert mm[:] == expect

    words = array.array("I", data)  # itemsize 4: lengths count bytes, not items
    assert k.encrypt(words, 99, 512) == expect
    k.encrypt(words, 99, 512, out=words)
    assert words.tobytes() == expect


# --- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=25, deadline=None)
@given(ss=st.sampled_from([512, 4096]), n=st.integers(0, 3 * 4096 + 17))
def test_bad_lengths(impl: Any, ss: int, n: int) -> None:
    k = impl(bytes(range(64)))
    if n and n % ss == 0:
        assert len(k.encrypt(bytes(n), 0, ss)) == n
        return
    with pytest.raises(ValueError, match=rf"got {n} bytes with sector_size {ss}"):
        k.encrypt(bytes(n), 0, ss)
    with pytest.raises(ValueError, match="non-zero multiple of the sector size"):
        k.decrypt(bytearray(n), 0, ss, out=bytearray(n))


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=15, deadline=None)
@given(n=st.integers(0, 200).filter(lambda n: n not in (32, 64)))
def test_bad_key_sizes(impl: Any, n: int) -> None:
    with pytest.raises(ValueError, match=rf"32 bytes .* or 64 bytes .*got {n} bytes"):
        impl(os.urandom(n))


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_arguments(impl: Any) -> None:
    half = os.urandom(32)
    for key in (half + half, half[:16] * 2):
        with pytest.raises(ValueError, match="halves are equal"):
            impl(key)
    k = impl(bytes(range(64)))
    data = bytes(1024)
    for ss in (0, 16, 256, 511, 513, 8192, -512):
        with pytest.raises(ValueError, match=r"sector_size must be 512, 1024, 2048 or 4096"):
            k.encrypt(data, 0, ss)
    with pytest.raises(TypeError, match="writable"):
        k.encrypt(data, 0, 512, out=bytes(1024))
    with pytest.raises(TypeError, match="writable"):
        k.encrypt(data, 0, 512, out=memoryview(bytearray(1024)).toreadonly())
    with pytest.raises(ValueError, match="exactly as long as src: got 1536 bytes for 1024"):
        k.encrypt(data, 0, 512, out=bytearray(1536))
    for first in (-1, U64, U64 * 2):
        with pytest.raises(ValueError, match="unsigned 64-bit"):
            k.encrypt(data, first, 512)
    with pytest.raises(TypeError):
        k.encrypt(data, 1.5, 512)
    for bad in (2, 0x400, -1, 0x102):
        with pytest.raises(ValueError, match="TWEAK_PLAIN64"):
            k.encrypt(data, 0, 512, tweak=bad)
    with pytest.raises(TypeError):
        k.encrypt("not bytes", 0, 512)
    shared = bytearray(2048)
    with pytest.raises(ValueError, match="overlaps"):
        k.encrypt(memoryview(shared)[:1024], 0, 512, out=memoryview(shared)[512:1536])


@pytest.mark.parametrize("impl", IMPLS)
def test_key_never_exposed(impl: Any) -> None:
    key = bytes(range(1, 65))
    k = impl(key)
    assert key.hex() not in repr(k) and "64" not in repr(k).replace("AES-256", "")
    assert k.key_size == 64
    with pytest.raises(TypeError, match="pickled"):
        pickle.dumps(k)
    with pytest.raises(TypeError):
        copy.copy(k)
    with pytest.raises(TypeError):
        copy.deepcopy(k)


# --- concurrency: one key, several threads, GIL released ---------------------------------


def test_shared_key_across_threads() -> None:
    k = native()(os.urandom(64))
    data = [os.urandom(64 * 4096) for _ in range(4)]
    expect = [k.encrypt(d, 1000 * i, 4096) for i, d in enumerate(data)]
    errors: list[str] = []

    def work(i: int) -> None:
        for _ in range(20):
            out = bytearray(len(data[i]))
            k.encrypt(data[i], 1000 * i, 4096, out=out)
            if out != expect[i] or k.decrypt(out, 1000 * i, 4096) != data[i]:
                errors.append(f"thread {i} got wrong bytes")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# --- the chooser and the plain-EVP dispatch ------------------------------------------


def _child(code: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return result.stdout.strip()


def test_no_native_env_forces_fallback() -> None:
    out = _child(
        "from cryptoplane import _native as n; print(n.BACKEND, n.XtsKey is n.PythonXtsKey, "
        "n.BACKEND_REASON)",
        CRYPTOPLANE_NO_NATIVE="1",
    )
    assert out == "python True CRYPTOPLANE_NO_NATIVE is set"


def test_backend_is_native_when_built() -> None:
    native()
    if os.environ.get("CRYPTOPLANE_NO_NATIVE", "") not in ("", "0"):
        assert _native.BACKEND == "python"
        assert _native.XtsKey is _native.PythonXtsKey
        return
    assert _native.BACKEND == "native"
    assert _native.XtsKey is _native.NativeXtsKey
    assert _native.BACKEND_REASON == ""
    assert _native.openssl_version().startswith("OpenSSL")


def test_evp_dispatch_gives_same_bytes() -> None:
    native()
    key, data = bytes(range(64)), bytes(range(256)) * 32
    code = (
        "from cryptoplane._native import _sectors as s; k = s.XtsKey(bytes(range(64)));"
        "d = bytes(range(256)) * 32; c = k.encrypt(d, 2**64 - 3, 512, tweak=1);"
        "assert k.decrypt(c, 2**64 - 3, 512, tweak=1) == d; print(s.DISPATCH, c.hex())"
    )
    dispatch, hexed = _child(code, CRYPTOPLANE_NATIVE_DISPATCH="evp").split()
    assert dispatch == "evp"
    assert bytes.fromhex(hexed) == reference(key, data, U64 - 3, 512, 1, True)


# --- IEEE 1619 known answers (NIST CAVP XTSGen, from cryptography-vectors) ------------
#
# No vector has a 512..4096-byte data unit (the longest is 384 bits), so these cannot go
# through XtsKey, which only accepts disk sector sizes.  They check the fallback's
# per-sector path (xts_data_unit and, for sequence-number tweaks, sector_tweak) instead;
# native == fallback == cryptography-per-sector above carries that to the C kernel.


def _vectors(subdir: str, name: str) -> Iterator[dict[str, str]]:
    try:
        import cryptography_vectors as vectors
    except ImportError:
        unavailable("cryptography-vectors is not installed")
    path = Path(vectors.__file__).parent / "ciphers/AES/XTS" / subdir / name
    entry: dict[str, str] = {}
    mode = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line in ("[ENCRYPT]", "[DECRYPT]"):
            mode = line
        elif " = " in line:
            field, value = line.split(" = ", 1)
            entry[field] = value
            if "PT" in entry and "CT" in entry:
                yield {**entry, "mode": mode}
                entry = {}


@pytest.mark.parametrize("name", ["XTSGenAES128.rsp", "XTSGenAES256.rsp"])
@pytest.mark.parametrize("subdir", ["tweak-128hexstr", "tweak-dataunitseqno"])
def test_ieee1619_vectors(subdir: str, name: str) -> None:
    checked = 0
    for v in _vectors(subdir, name):
        if int(v["DataUnitLen"]) % 8:
            continue  # bit-granular data units: no byte-oriented API takes those
        key, pt, ct = (bytes.fromhex(v[f]) for f in ("Key", "PT", "CT"))
        if subdir == "tweak-128hexstr":
            tweak = bytes.fromhex(v["i"])
        else:
            # IEEE 1619: the sequence number as a 128-bit little-endian integer,
            # which is exactly dm-crypt's plain64 for numbers below 2**64.
            tweak = fallback.sector_tweak(int(v["DataUnitSeqNumber"]), _native.TWEAK_PLAIN64)
        if v["mode"] == "[ENCRYPT]":
            assert fallback.xts_data_unit(key, tweak, pt, True) == ct, v
        else:
            assert fallback.xts_data_unit(key, tweak, ct, False) == pt, v
        checked += 1
    assert checked >= 500  # the files hold 1000 entries, 600 of them byte-granular


# -- the SIGBUS guard: runs over a mapping whose file shrank ---------------------------------

def test_a_run_over_a_vanished_mapping_raises_eio(tmp_path: Path) -> None:
    """Decrypting straight from a mapping (as volumes read) whose file was truncated: the
    lost pages raise SIGBUS inside the run, which the guard turns into OSError(EIO), as
    often as it happens; the key stays usable."""
    cls = native()
    assert _native.guard_mapped_reads()  # ahead of pytest's faulthandler: no report
    key = cls(os.urandom(64))
    img = tmp_path / "img"
    img.write_bytes(os.urandom(64 * 4096))
    with open(img, "rb") as f:
        image = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    view = memoryview(image)
    good = key.decrypt(view[:4096], 0, 4096)
    os.truncate(img, 8 * 4096)
    for _ in range(3):
        with pytest.raises(OSError) as info:
            key.decrypt(view[16 * 4096:32 * 4096], 16, 4096, bytearray(16 * 4096))
        assert info.value.errno == 5
    assert key.decrypt(view[:4096], 0, 4096) == good
    view.release()
    image.close()


def test_a_fault_outside_a_run_is_not_swallowed(tmp_path: Path) -> None:
    """The guard catches faults inside sector runs only: Python code touching a lost
    page still dies of SIGBUS (an error elsewhere must not be hidden)."""
    native()
    img = tmp_path / "img"
    img.write_bytes(bytes(64 * 4096))
    code = (
        "import mmap, os, sys\n"
        "from cryptoplane import _native\n"
        "assert _native.guard_mapped_reads()\n"
        f"f = open({str(img)!r}, 'rb')\n"
        "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
        f"os.truncate({str(img)!r}, 4096)\n"
        "print(m[40 * 4096])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -7, (proc.returncode, proc.stderr[-500:])  # -SIGBUS


@pytest.mark.parametrize("impl", IMPLS)
def test_tweak_step_counts_512_byte_units(impl: Any) -> None:
    """dm-crypt's LUKS2 rule: the second 4096-byte sector's tweak is 8, not 1, and a run
    is the concatenation of its sectors, each encrypted alone with its own tweak."""
    k = impl(bytes(range(64)))
    data = os.urandom(4 * 4096)
    code = _native.TWEAK_PLAIN64 | _native.tweak_step(8)
    run = k.encrypt(data, 16, 4096, tweak=code)
    for i in range(4):
        alone = k.encrypt(data[i * 4096:(i + 1) * 4096], 16 + 8 * i, 4096)
        assert run[i * 4096:(i + 1) * 4096] == alone
    assert run != k.encrypt(data, 16, 4096)
    with pytest.raises(ValueError, match="1, 2, 4 or 8"):
        _native.tweak_step(3)
