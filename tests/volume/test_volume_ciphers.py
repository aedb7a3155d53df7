"""Cipher specs as sector transforms: parsing, dm-crypt's key rules, each IV scheme against
an independent computation with ``cryptography`` (qemu's implementation is the oracle in
test_volume_interop.py), and round trips."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

import cryptoplane as cp
from cryptoplane.exceptions import InvalidRequest, KeyRejected, NotSupported
from cryptoplane.volume.ciphers import parse_spec, sector_cipher

SPECS = ["aes-xts-plain64", "aes-xts-plain64be", "aes-xts-plain", "aes-xts-essiv:sha256",
         "aes-cbc-plain", "aes-cbc-plain64", "aes-cbc-plain64be", "aes-cbc-essiv:sha256",
         "aes-ctr-plain64"]
KEY_SIZES = {"xts": (32, 64), "cbc": (16, 24, 32), "ctr": (16, 24, 32)}
WRAP = 1 << 32


def key_for(spec: str, size: int | None = None) -> bytes:
    return os.urandom(size or KEY_SIZES[spec.split("-")[1]][-1])


def one_sector(spec: str, key: bytes, sector: int, data: bytes, *, encrypt: bool) -> bytes:
    """dm-crypt's per-sector definition, computed independently of ciphers.py."""
    _, chain, iv = spec.split("-", 2)
    if iv == "plain":
        ivb = (sector % WRAP).to_bytes(4, "little") + bytes(12)
    elif iv == "plain64be":
        ivb = bytes(8) + sector.to_bytes(8, "big")
    else:
        ivb = sector.to_bytes(8, "little") + bytes(8)
    if iv.startswith("essiv:"):
        salt = hashlib.sha256(key).digest()
        ivb = Cipher(algorithms.AES(salt), modes.ECB()).encryptor().update(ivb)
    make: Any = {"xts": modes.XTS, "cbc": modes.CBC, "ctr": modes.CTR}[chain]
    mode = make(ivb)
    c = Cipher(algorithms.AES(key), mode)
    ctx = c.encryptor() if encrypt else c.decryptor()
    return ctx.update(data) + ctx.finalize()


@pytest.mark.parametrize("spec", ["twofish-xts-plain64", "aes-ecb", "aes-cbc-benbi",
                                  "aes-xts-plain64:x", "aes-cbc-essiv:sha1", "aes-xts-null",
                                  "capi:xts(aes)-plain64", "aes-gcm-random", "aes-xts-lmk",
                                  "aes--plain64", ""])
def test_unsupported_specs_are_named(spec: str) -> None:
    with pytest.raises(NotSupported, match="cipher"):
        parse_spec(spec)
    with pytest.raises(NotSupported):
        sector_cipher(spec, os.urandom(64), 512)


def test_parse() -> None:
    assert parse_spec("aes-cbc-essiv:sha256") == ("aes", "cbc", "essiv", "sha256")
    assert parse_spec("aes-xts-plain64") == ("aes", "xts", "plain64", "")


@pytest.mark.parametrize(("spec", "size"), [("aes-xts-plain64", 16), ("aes-xts-plain64", 63),
                                            ("aes-cbc-plain64", 64), ("aes-ctr-plain64", 8),
                                            ("aes-xts-essiv:sha256", 24)])
def test_key_sizes_follow_dm_crypt(plane: cp.Plane, spec: str, size: int) -> None:
    with pytest.raises(KeyRejected, match="bit"):
        sector_cipher(spec, os.urandom(size), 512, plane)


def test_xts_with_aes192_keys_is_not_supported(plane: cp.Plane) -> None:
    with pytest.raises(NotSupported, match="384"):
        sector_cipher("aes-xts-plain64", os.urandom(48), 512, plane)


def test_equal_xts_halves_are_refused(plane: cp.Plane) -> None:
    half = os.urandom(32)
    with pytest.raises(KeyRejected, match="equal"):
        sector_cipher("aes-xts-plain64", half + half, 512, plane)


def test_bad_sector_size_and_missing_plane() -> None:
    with pytest.raises(InvalidRequest, match="sector size"):
        sector_cipher("aes-cbc-plain64", os.urandom(32), 520)
    with pytest.raises(InvalidRequest, match="plane"):
        sector_cipher("aes-xts-plain64", os.urandom(64), 512)


def test_repr_carries_no_key(plane: cp.Plane) -> None:
    key = os.urandom(64)
    for spec in ("aes-xts-plain64", "aes-xts-essiv:sha256"):
        text = repr(sector_cipher(spec, key, 512, plane))
        assert spec in text and key.hex()[:16] not in text


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("sector_size", [512, 1024, 4096])
@pytest.mark.parametrize("large", [False, True], ids=["512-byte-ivs", "iv-large-sectors"])
def test_each_sector_matches_dm_crypt_definition(plane: cp.Plane, spec: str,
                                                 sector_size: int, large: bool) -> None:
    """dm-crypt's IVs count 512-byte units (LUKS), or whole sectors with its
    iv_large_sectors flag. (cryptsetup's own code is the oracle in
    test_dmcrypt_oracle.py; this pins the rule for every spec, cryptsetup or not.)"""
    step = 1 if large else sector_size // 512
    for size in KEY_SIZES[spec.split("-")[1]]:
        key = key_for(spec, size)
        t = sector_cipher(spec, key, sector_size, plane, iv_large_sectors=large)
        assert t.iv_step == step
        first = 77
        plain = os.urandom(3 * sector_size)
        out = bytearray(len(plain))
        t.encrypt(plain, first, out)
        want = b"".join(one_sector(spec, key, first + i * step,
                                   plain[i * sector_size:(i + 1) * sector_size], encrypt=True)
                        for i in range(3))
        assert out == want
        t.decrypt(out, first, out)  # in place
        assert out == plain


@pytest.mark.parametrize("spec", ["aes-xts-plain", "aes-cbc-plain"])
@pytest.mark.parametrize(("ss", "first"), [(512, WRAP - 2), (4096, WRAP - 12)])
def test_plain_wraps_at_2_to_the_32(plane: cp.Plane, spec: str, ss: int, first: int) -> None:
    """The run crosses the wrap: IVs ..., 2**32-1, 0, 1 (512-byte sectors) or
    2**32-12, 2**32-4, 4, 12 (4096-byte sectors, IVs 8 apart)."""
    key = key_for(spec)
    t = sector_cipher(spec, key, ss, plane)
    plain = os.urandom(4 * ss)
    out = bytearray(len(plain))
    t.encrypt(plain, first, out)
    step = ss // 512
    for i in range(4):
        want = one_sector(spec, key, (first + i * step) % WRAP, plain[i * ss:(i + 1) * ss],
                          encrypt=True)
        assert out[i * ss:(i + 1) * ss] == want
    low = bytearray(len(plain))
    sector_cipher(spec, key, ss, plane).encrypt(plain, first % WRAP, low)
    assert low == out


def test_plain_equals_plain64_below_the_wrap(plane: cp.Plane) -> None:
    key = key_for("aes-xts-plain")
    data = os.urandom(8 * 4096)
    a, b = bytearray(len(data)), bytearray(len(data))
    sector_cipher("aes-xts-plain", key, 4096, plane).encrypt(data, 1000, a)
    sector_cipher("aes-xts-plain64", key, 4096, plane).encrypt(data, 1000, b)
    assert a == b


@settings(max_examples=40, deadline=None)
@given(spec=st.sampled_from(SPECS), sector_size=st.sampled_from([512, 1024, 4096]),
       count=st.integers(1, 5), first=st.integers(0, (1 << 64) - 8), seed=st.binary(
           min_size=16, max_size=16))
def test_round_trip_and_runs_split_anywhere(plane: cp.Plane, spec: str, sector_size: int,
                                            count: int, first: int, seed: bytes) -> None:
    key = hashlib.sha512(seed).digest()[:KEY_SIZES[spec.split("-")[1]][-1]]
    t = sector_cipher(spec, key, sector_size, plane)
    data = os.urandom(count * sector_size)
    whole = bytearray(len(data))
    t.encrypt(data, first, whole)
    # a run is the concatenation of its sectors, each by its own number
    for i in range(count):
        piece = bytearray(sector_size)
        t.encrypt(data[i * sector_size:(i + 1) * sector_size], first + i * t.iv_step, piece)
        assert whole[i * sector_size:(i + 1) * sector_size] == piece
    back = bytearray(whole)
    t.decrypt(back, first, back)
    assert back == data


def test_partial_sectors_are_refused() -> None:
    t = sector_cipher("aes-cbc-plain64", os.urandom(32), 512)
    with pytest.raises(InvalidRequest, match="whole"):
        t.encrypt(bytes(100), 0, bytearray(100))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_any_spec_parses_or_is_not_supported(spec: str) -> None:
    try:
        name, chain, iv, opts = parse_spec(spec)
    except NotSupported as e:
        assert "cipher" in str(e)
    else:
        assert name == "aes" and chain in ("xts", "cbc", "ctr")
        assert spec == f"{name}-{chain}-{iv}" + (f":{opts}" if opts else "")


@pytest.mark.parametrize("spec", ["aes-xts-plain64", "aes-xts-plain", "aes-cbc-essiv:sha256",
                                  "aes-xts-essiv:sha256", "aes-ctr-plain64"])
def test_only_a_guarded_kernel_reads_from_a_mapping(plane: cp.Plane, spec: str) -> None:
    """A volume decrypts straight from its mapped image only where the cipher says so:
    the plane's XTS runs on the native kernel (which turns the SIGBUS of a shrunk file
    into an error); never the per-sector ciphers, which copy out of it unguarded."""
    from cryptoplane import _native

    key = os.urandom(64 if "xts" in spec else 32)
    cipher = sector_cipher(spec, key, 4096, plane)
    on_plane = spec.startswith("aes-xts-plain")
    assert cipher.can_read_mapped() is (on_plane and _native.BACKEND == "native")
    assert plane.guard_mapped_reads() is (_native.BACKEND == "native")
