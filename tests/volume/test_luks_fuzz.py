"""Hostile headers: whatever the bytes of a binary header, a JSON area or a keyslot area,
the LUKS codecs and unlock raise nothing but a ``CryptoplaneError`` and return quickly."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryptoplane.exceptions import CryptoplaneError
from cryptoplane.volume import kdf, keyslots, luks, luks1, luks2, luks_io, signatures

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def decode_any(blob: bytes) -> None:
    try:
        if luks2.probe_version(blob) == 1:
            luks1.decode(blob)
        else:
            luks2.decode(blob)
    except CryptoplaneError:
        pass
    # and with the device-size and foreign-signature checks a device read adds
    for size in (len(blob), len(blob) // 3):
        with contextlib.suppress(CryptoplaneError):
            luks_io.decode_header(blob, size)


@functools.cache
def _images() -> dict[int, bytes]:
    out = {}
    d = Path(tempfile.mkdtemp(prefix="luks-fuzz-"))
    for version, params in ((1, {"iterations": 1000}),
                            (2, {"time": 1, "memory": 64, "cpus": 1})):
        img = d / f"v{version}.img"
        with open(img, "wb") as f:
            f.truncate(20 << 20)
        luks.format(img, b"pw", version=version, kdf_params=params,
                    data_offset=None if version == 2 else 2 << 20)
        out[version] = img.read_bytes()[: 2 << 20]
        img.unlink()
    d.rmdir()
    return out


class Images:
    """The pristine images, behind a short repr (hypothesis prints arguments)."""

    def __getitem__(self, version: int) -> bytes:
        return _images()[version]

    def __repr__(self) -> str:
        return "Images()"


@pytest.fixture(scope="module")
def images() -> Images:
    return Images()


mutations = st.lists(st.tuples(st.integers(0, 40000), st.binary(min_size=1, max_size=8)),
                     min_size=1, max_size=6)


@FUZZ
@given(version=st.sampled_from([1, 2]), edits=mutations, cut=st.integers(0, 70000) | st.none())
def test_mutated_headers(images: Images, version: int,
                         edits: list[tuple[int, bytes]], cut: int | None) -> None:
    blob = bytearray(images[version])
    for at, data in edits:
        blob[at:at + len(data)] = data
    decode_any(bytes(blob[:cut] if cut is not None else blob))


def rechecksum(copy: bytearray) -> bytes:
    copy[448:512] = bytes(64)
    copy[448:480] = hashlib.sha256(bytes(copy)).digest()
    return bytes(copy)


@FUZZ
@given(edits=mutations)
def test_mutated_binary_header_with_valid_checksum(images: Images,
                                                   edits: list[tuple[int, bytes]]) -> None:
    copy = bytearray(images[2][:16384])
    for at, data in edits:
        at %= 4096
        copy[at:at + len(data)] = data
    decode_any(rechecksum(copy) + images[2][16384:32768])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=12)
    | st.sampled_from(["0", "dynamic", "16777216", "aes-xts-plain64", "argon2id", "pbkdf2",
                       "sha256", "luks2", "raw", "crypt", "18446744073709551616"]),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids,
                                                              max_size=4),
    max_leaves=12)


def paths(j: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(j, dict):
        for k, v in j.items():
            out += paths(v, (*prefix, k))
    elif isinstance(j, list):
        for i, v in enumerate(j):
            out += paths(v, (*prefix, i))
    return out


@FUZZ
@given(data=st.data())
def test_mutated_json_with_valid_checksum(images: Images, data: st.DataObject,
                                          ) -> None:
    copy = bytearray(images[2][:16384])
    j = json.loads(bytes(copy[4096:]).rstrip(b"\0"))
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(paths(j)))
        if not where:
            continue
        parent = j
        for k in where[:-1]:
            parent = parent[k]
        if data.draw(st.booleans()):
            parent[where[-1]] = data.draw(json_values)
        elif isinstance(parent, dict):
            del parent[where[-1]]
    text = json.dumps(j).encode()[:12287]
    copy[4096:] = text.ljust(12288, b"\0")
    blob = rechecksum(copy)
    t0 = time.monotonic()
    decode_any(blob)
    try:
        h = luks2.decode(blob + images[2][16384:])
    except CryptoplaneError:
        return
    # what validates survives a write: unusable keyslots come back as they were read
    again = luks2.decode_copy(luks2.encode_copy(h, False), 0, False).metadata
    assert {i: k.unusable for i, k in again.keyslots.items()} == {
        i: k.unusable for i, k in h.metadata.keyslots.items()}
    # a header that still validates must also unlock or fail cleanly, quickly: the
    # fuzzed KDF costs are capped tightly here
    small = kdf.Limits(pbkdf2_work=20_000, argon2_memory_kib=4096, argon2_time=4,
                       argon2_work_kib=8192)
    try:
        h.metadata.check_supported()
        _, digest = h.metadata.segment_digest(0)
        for ks in h.metadata.keyslots.values():
            off = ks.area.offset
            area = images[2][off:off + keyslots.luks2_material_size(ks)]
            keyslots.open_luks2(ks, digest, b"pw", area, small)
    except CryptoplaneError:
        pass
    assert time.monotonic() - t0 < 10


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(area=st.binary(min_size=0, max_size=2048), flip=st.integers(0, 255999))
def test_hostile_keyslot_areas(images: Images, area: bytes, flip: int) -> None:
    h = luks2.decode(images[2])
    ks = h.metadata.keyslots[0]
    _, digest = h.metadata.segment_digest(0)
    real = bytearray(images[2][ks.area.offset:ks.area.offset + ks.area.size])
    real[flip] ^= 1
    for candidate in (bytes(real), area):
        with contextlib.suppress(CryptoplaneError):
            assert keyslots.open_luks2(ks, digest, b"pw", candidate) is None


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=mutations)
def test_unlock_of_mutated_files(images: Images, tmp_path: Path,
                                 edits: list[tuple[int, bytes]]) -> None:
    for version in (1, 2):
        blob = bytearray(images[version])
        for at, data in edits:
            blob[at:at + len(data)] = data
        img = tmp_path / f"m{version}.img"
        img.write_bytes(bytes(blob))
        with contextlib.suppress(CryptoplaneError):
            luks.unlock(img, passphrase=b"pw")


@settings(max_examples=60, deadline=None)
@given(blob=st.binary(max_size=70000), at=st.integers(0, 70000))
def test_signature_probe_takes_any_bytes(blob: bytes, at: int) -> None:
    # a probe over any bytes names a signature or None, and never raises
    name = signatures.foreign(blob[:at])
    assert name is None or isinstance(name, str)
