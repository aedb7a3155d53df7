"""The LUKS building blocks alone: the AF splitter, the IV schemes, the KDFs, and the
LUKS1/LUKS2 header codecs, checked against independent computations and their rules."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from cryptoplane.exceptions import InvalidRequest, KeyRejected, NotSupported
from cryptoplane.volume import af, kdf, keyslots, luks1, luks2
from cryptoplane.volume.errors import CorruptHeader
from cryptoplane.volume.ivs import SectorCipher, parse_spec

# -- AF ------------------------------------------------------------------------------

def reference_merge(material: bytes, n: int, stripes: int, hash_name: str) -> bytes:
    """The LUKS1 spec's AFmerge written out with hashlib, as an independent oracle."""
    size = hashlib.new(hash_name).digest_size
    d = bytes(n)
    for i in range(stripes - 1):
        x = bytes(a ^ b for a, b in zip(d, material[i * n:(i + 1) * n], strict=True))
        out = b""
        for j in range(0, n, size):
            piece = x[j:j + size]
            out += hashlib.new(hash_name, (j // size).to_bytes(4, "big") + piece
                               ).digest()[:len(piece)]
        d = out
    last = material[(stripes - 1) * n:stripes * n]
    return bytes(a ^ b for a, b in zip(d, last, strict=True))


@pytest.mark.parametrize("hash_name", ["sha1", "sha256", "sha512"])
@pytest.mark.parametrize("n", [16, 32, 64, 50])
def test_af_split_merge_matches_the_spec(hash_name: str, n: int) -> None:
    key = bytes(range(n))
    material = af.split(key, hash_name, 40)
    assert len(material) == af.material_size(n, 40) and len(material) % 512 == 0
    assert af.merge(material, n, hash_name, 40) == key
    assert reference_merge(material, n, 40, hash_name) == key
    # destroying one stripe destroys the key
    broken = bytes(64) + material[64:]
    assert af.merge(broken, n, hash_name, 40) != key


def test_af_sizes_and_errors() -> None:
    assert af.material_size(64) == 256000 and af.material_size(32) == 128000
    with pytest.raises(InvalidRequest):
        af.merge(b"short", 64)
    with pytest.raises(NotSupported):
        af.split(b"k" * 16, "md4", 2)


# -- IV schemes ----------------------------------------------------------------------

def aes(mode: modes.Mode, key: bytes, data: bytes) -> bytes:
    e = Cipher(algorithms.AES(key), mode).encryptor()
    return e.update(data) + e.finalize()


def test_ivs_match_their_definitions() -> None:
    key64, key32 = bytes(range(64)), bytes(range(32))
    data = bytes(range(256)) * 4  # two 512-byte sectors
    sector = 0x1_0000_0003  # above 2^32: plain wraps, plain64 does not
    xts = SectorCipher("aes-xts-plain64", key64).encrypt(data, sector)
    assert xts[:512] == aes(modes.XTS(sector.to_bytes(16, "little")), key64, data[:512])
    assert xts[512:] == aes(modes.XTS((sector + 1).to_bytes(16, "little")), key64, data[512:])
    plain = SectorCipher("aes-xts-plain", key64).encrypt(data, sector)
    assert plain[:512] == aes(modes.XTS((3).to_bytes(16, "little")), key64, data[:512])
    salt = hashlib.sha256(key32).digest()
    iv = aes(modes.ECB(), salt, sector.to_bytes(16, "little"))
    essiv = SectorCipher("aes-cbc-essiv:sha256", key32).encrypt(data, sector)
    assert essiv[:512] == aes(modes.CBC(iv), key32, data[:512])
    ctr = SectorCipher("aes-ctr-plain64", key32).encrypt(data, 7)
    assert ctr[512:] == aes(modes.CTR((8).to_bytes(16, "little")), key32, data[512:])
    for spec in ("aes-xts-plain64", "aes-cbc-essiv:sha256", "aes-cbc-plain", "aes-ctr-plain64",
                 "aes-cbc-plain64", "aes-xts-plain"):
        key = key64 if "xts" in spec else key32
        c = SectorCipher(spec, key, 4096)
        assert c.decrypt(c.encrypt(data * 4, 9), 9) == data * 4


def test_iv_spec_errors() -> None:
    for bad in ("twofish-xts-plain64", "aes-gcm-random", "aes-xts-essiv:sha256",
                "aes-cbc-essiv:md5", "aes-xts", "aes-cbc-benbi"):
        with pytest.raises(NotSupported):
            parse_spec(bad)
    with pytest.raises(KeyRejected):
        SectorCipher("aes-xts-plain64", bytes(64))  # equal halves
    with pytest.raises(KeyRejected):
        SectorCipher("aes-cbc-plain64", bytes(20))
    with pytest.raises(InvalidRequest):
        SectorCipher("aes-cbc-plain64", bytes(32)).encrypt(b"x" * 100)
    assert "key" not in repr(SectorCipher("aes-cbc-plain64", bytes(32)))


# -- KDF -----------------------------------------------------------------------------

def test_kdfs_known_answers() -> None:
    # RFC 6070 PBKDF2-HMAC-SHA1 vector; argon2 cross-checked with hashlib's scrypt-free
    # reference: argon2-cffi's own raw hash of the same inputs
    assert kdf.derive(kdf.Pbkdf2("sha1", 2), b"password", b"salt", 20).hex() == \
        "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957"
    assert kdf.derive(kdf.Pbkdf2("sha256", 1000), b"p", b"s" * 32, 32) == \
        hashlib.pbkdf2_hmac("sha256", b"p", b"s" * 32, 1000, 32)
    a = kdf.derive(kdf.Argon2("argon2id", 1, 64, 1), b"p", b"s" * 32, 32)
    assert len(a) == 32 and a != kdf.derive(kdf.Argon2("argon2i", 1, 64, 1), b"p",
                                            b"s" * 32, 32)


def test_kdf_benchmark_scales_with_the_clock() -> None:
    clock = iter([0.0, 0.001, 0.0, 0.1]).__next__  # 1000 iterations: too quick; 2000: 100 ms
    assert kdf.benchmark("pbkdf2", iter_time_ms=2000, clock=clock) == \
        kdf.Pbkdf2("sha256", 40_000)
    clock = iter([0.0, 10.0]).__next__  # absurdly slow: never below the minimum
    assert kdf.benchmark("pbkdf2", iter_time_ms=100, clock=clock) == \
        kdf.Pbkdf2("sha256", 1000)
    clock = iter([0.0, 0.01]).__next__  # argon2: 1 pass over the 64 MiB trial in 10 ms
    a = kdf.benchmark("argon2id", iter_time_ms=2000, max_memory_kib=64 << 10, cpus=2,
                      clock=clock)
    assert a == kdf.Argon2("argon2id", 200, 64 << 10, 2)
    clock = iter([0.0, 1.0]).__next__  # too slow for 4 passes: memory is lowered
    a = kdf.benchmark("argon2id", iter_time_ms=2000, max_memory_kib=64 << 10, cpus=2,
                      clock=clock)
    assert a == kdf.Argon2("argon2id", 4, 32768, 2)
    with pytest.raises(InvalidRequest):
        kdf.from_mapping("argon2id", {"time": 1})


# -- LUKS1 codec ---------------------------------------------------------------------

def luks1_header() -> luks1.Header:
    offsets, _ = luks1.slot_offsets(64)
    slots = tuple(luks1.Slot(i == 0, 1000 if i == 0 else 0, bytes([i]) * 32, off)
                  for i, off in enumerate(offsets))
    return luks1.Header("aes", "xts-plain64", "sha256", 4096, 64, b"d" * 20, b"s" * 32,
                        1000, "0b5a3c0e-1111-2222-3333-444455556666", slots)


def test_luks1_round_trip_and_layout() -> None:
    h = luks1_header()
    raw = h.encode()
    assert len(raw) == 592 and raw[:8] == b"LUKS\xba\xbe\0\1"
    assert luks1.decode(raw) == h
    assert luks1.slot_offsets(64) == ([8, 512, 1016, 1520, 2024, 2528, 3032, 3536], 4040)
    assert luks1.slot_offsets(32)[0][:2] == [8, 264]
    assert "salt" not in repr(h.slots[0]) or "b'\\x00" not in repr(h.slots[0])


def test_luks1_rules() -> None:
    h = luks1_header()
    with pytest.raises(CorruptHeader, match="truncated"):
        luks1.decode(h.encode()[:500])
    overlap = h.with_slot(1, luks1.Slot(True, 1000, bytes(32), 100))
    with pytest.raises(CorruptHeader, match="overlaps key slot 1"):
        luks1.decode(overlap.encode())
    into_payload = h.with_slot(7, luks1.Slot(True, 1000, bytes(32), 4000))
    with pytest.raises(CorruptHeader, match=r"slot 7 .*payload"):
        luks1.decode(into_payload.encode())
    # every slot is checked, used or not: a disabled one is where the next key goes
    for bad, what in ((luks1.Slot(False, 0, bytes(32), 4000), "slot 7 .*payload"),
                      (luks1.Slot(False, 0, bytes(32), 1), "slot 7 .*header"),
                      (luks1.Slot(False, 0, bytes(32), 3536 - 10), "slot 6 .*overlaps"),
                      (luks1.Slot(False, 0, bytes(32), 3536, 3999), "slot 7 .*stripes")):
        with pytest.raises(CorruptHeader, match=what):
            luks1.decode(h.with_slot(7, bad).encode())
    # a detached header (payload 0) has no payload to run into
    luks1.decode(dataclasses.replace(h, payload_offset=0).encode())
    with pytest.raises(CorruptHeader, match="too small"):
        luks1.check_device_size(h, 3536 * 512 + 250 * 512 - 1)
    luks1.check_device_size(h, luks1.header_sectors(h) * 512)
    # an unknown slot state is kept (written back as read) and the slot counts as used
    raw = bytearray(h.encode())
    raw[208 + 48 * 3:208 + 48 * 3 + 4] = (0x1234).to_bytes(4, "big")
    odd = luks1.decode(bytes(raw))
    assert odd.slots[3].marker == 0x1234 and odd.slots[3].in_use and not odd.slots[3].active
    assert odd.encode() == bytes(raw)
    assert luks1.describe(odd)["invalid_keyslots"] == {"3": "state 0x00001234"}
    raw = bytearray(h.encode())
    raw[108:112] = (40).to_bytes(4, "big")
    with pytest.raises(CorruptHeader, match="key size"):
        luks1.decode(bytes(raw))


def test_text_fields_are_nul_terminated_and_bounded() -> None:
    """Both codecs' text fields: what follows the first NUL is not part of the text, a
    field is one byte longer than its longest text (cryptsetup reads up to the NUL),
    and text in the wrong encoding is a corrupt header, never a UnicodeError."""
    h = luks1_header()
    raw = bytearray(h.encode())
    raw[40:72] = b"xts-plain64\0junk".ljust(32, b"\0")  # the cipher mode field
    assert luks1.decode(bytes(raw)).cipher_mode == "xts-plain64"
    raw[40] = 0xFF
    with pytest.raises(CorruptHeader, match="LUKS1 cipher mode is not ASCII"):
        luks1.decode(bytes(raw))
    with pytest.raises(CorruptHeader, match=r"LUKS1 UUID .* is longer than 39 bytes"):
        dataclasses.replace(h, uuid="u" * 40).encode()
    with pytest.raises(CorruptHeader, match=r"LUKS1 hash spec .* is not ASCII"):
        dataclasses.replace(h, hash_spec="sha256\u00e9").encode()
    dataclasses.replace(h, uuid="u" * 39).encode()
    h2 = luks2_header()
    with pytest.raises(CorruptHeader, match=r"LUKS2 label .* is longer than 47 bytes"):
        luks2.encode_copy(h2.replace(label="\u00e9" * 24), False)  # 48 bytes in UTF-8
    copy = bytearray(luks2.encode_copy(h2.replace(label="\u00e9" * 23), False))
    assert luks2.decode(bytes(copy) + luks2.encode_copy(h2, True)).label == "\u00e9" * 23


# -- LUKS2 codec ---------------------------------------------------------------------

def luks2_header(seqid: int = 5) -> luks2.Header:
    ks = luks2.Keyslot(64, luks2.Area(32768, 258048), kdf.Argon2("argon2id", 4, 32768, 2),
                       b"k" * 32)
    meta = luks2.Metadata(
        {0: ks}, {}, {0: luks2.Segment(16 << 20, None, 0, "aes-xts-plain64", 4096)},
        {0: luks2.Digest((0,), (0,), "sha256", 1000, b"s" * 32, b"d" * 32)},
        luks2.Config(12288, (16 << 20) - 32768))
    return luks2.Header(meta, seqid, "0b5a3c0e-1111-2222-3333-444455556666", "label", "",
                        "sha256", (b"1" * 64, b"2" * 64))


def blob_of(h: luks2.Header, primary: luks2.Header | None = None) -> bytes:
    return luks2.encode_copy(primary or h, False) + luks2.encode_copy(h, True)


def test_luks2_round_trip_and_copy_choice() -> None:
    h = luks2_header()
    got = luks2.decode(blob_of(h))
    assert got == h and got.in_sync
    assert luks2.encode_copy(got, False)[:6] == b"LUKS\xba\xbe"
    newer = luks2_header(6)
    got = luks2.decode(blob_of(newer, primary=h))  # the secondary is newer
    assert got.seqid == 6 and not got.primary_ok and got.secondary_ok
    text = luks2.encode_copy(h, False)[4096:].rstrip(b"\0")
    assert json.loads(text)["config"] == {"json_size": "12288",
                                          "keyslots_size": str((16 << 20) - 32768)}


def patched(mutate: object) -> bytes:
    """A valid copy whose JSON was changed by ``mutate`` and re-checksummed."""
    h = luks2_header()
    j = luks2.metadata_to_json(h.metadata)
    mutate(j)  # type: ignore[operator]
    text = json.dumps(j).encode()
    copy = bytearray(luks2.encode_copy(h, False))
    copy[4096:] = text.ljust(12288, b"\0")
    copy[448:512] = bytes(64)
    copy[448:480] = hashlib.sha256(bytes(copy)).digest()
    return bytes(copy)


JSON_CASES = {
    "u64 as int": lambda j: j["segments"]["0"].__setitem__("offset", 16777216),
    "bool key size": lambda j: j["keyslots"]["0"].__setitem__("key_size", True),
    "negative": lambda j: j["keyslots"]["0"]["kdf"].__setitem__("time", -1),
    "leading plus": lambda j: j["segments"]["0"].__setitem__("iv_tweak", "+1"),
    "area overlaps header": lambda j: j["keyslots"]["0"]["area"].__setitem__("offset", "4096"),
    "area past keyslots": lambda j: j["keyslots"]["0"]["area"].__setitem__("offset",
                                                                           "16777216"),
    "no digest": lambda j: j["digests"].clear(),
    "dangling ref": lambda j: j["digests"]["0"].__setitem__("keyslots", ["7"]),
    "bad sector": lambda j: j["segments"]["0"].__setitem__("sector_size", 1000),
    "json_size": lambda j: j["config"].__setitem__("json_size", "4096"),
    "keyslot id": lambda j: j["keyslots"].__setitem__("99", j["keyslots"]["0"]),
    "no config": lambda j: j.pop("config"),
    "keyslot in no digest": lambda j: j["digests"]["0"].__setitem__("keyslots", []),
    "keyslot in two digests": lambda j: j["digests"].__setitem__("1", j["digests"]["0"]),
    "af type": lambda j: j["keyslots"]["0"]["af"].__setitem__("type", "luks2"),
    "area type": lambda j: j["keyslots"]["0"]["area"].__setitem__("type", "dm-crypt"),
    "argon2 without memory": lambda j: j["keyslots"]["0"]["kdf"].pop("memory"),
    "any keyslot without area": lambda j: j["keyslots"].__setitem__("1", {"type": "x",
                                                                          "key_size": 64}),
}

# what cryptsetup loads though this reader cannot open the slot: it is kept, unusable
UNUSABLE_CASES = {
    "bad salt": (lambda j: j["keyslots"]["0"]["kdf"].__setitem__("salt", "!!"), "salt"),
    "stripes": (lambda j: j["keyslots"]["0"]["af"].__setitem__("stripes", 10), "stripes"),
    "unknown kdf": (lambda j: j["keyslots"]["0"]["kdf"].__setitem__("type", "argon2"),
                    "KDF 'argon2'"),
    "unknown type": (lambda j: j["keyslots"]["0"].__setitem__("type", "luks3"),
                     "type 'luks3'"),
    "af hash": (lambda j: j["keyslots"]["0"]["af"].__setitem__("hash", "md4"), "md4"),
}


@pytest.mark.parametrize("case", sorted(JSON_CASES))
def test_luks2_json_rules(case: str) -> None:
    with pytest.raises(CorruptHeader):
        luks2.decode_copy(patched(JSON_CASES[case]), 0, False)


@pytest.mark.parametrize("case", sorted(UNUSABLE_CASES))
def test_luks2_unusable_keyslots_are_kept(case: str) -> None:
    mutate, reason = UNUSABLE_CASES[case]
    copy = luks2.decode_copy(patched(mutate), 0, False)
    ks = copy.metadata.keyslots[0]
    assert ks.unusable is not None and reason in ks.unusable
    assert (ks.area.offset, ks.area.size) == (32768, 258048)
    # written back exactly as it was read
    j = luks2.metadata_to_json(luks2_header().metadata)
    mutate(j)
    assert luks2.metadata_to_json(copy.metadata)["keyslots"]["0"] == j["keyslots"]["0"]
    with pytest.raises(NotSupported, match="cannot be opened"):
        keyslots.open_luks2(ks, copy.metadata.keyslot_digest(0)[1], b"pw", bytes(258048))


def test_luks2_leftover_kdf_fields_are_dropped() -> None:
    # older cryptsetup left argon2 fields in pbkdf2 keyslots and pbkdf2 fields in argon2
    # ones; cryptsetup ignores them and drops them on its next write, as does this reader
    def leftover(j: dict[str, Any]) -> None:
        j["keyslots"]["0"]["kdf"].update({"iterations": 1001, "hash": "sha256"})

    copy = luks2.decode_copy(patched(leftover), 0, False)
    ks = copy.metadata.keyslots[0]
    assert ks.unusable is None and ks.kdf == kdf.Argon2("argon2id", 4, 32768, 2)
    written = luks2.metadata_to_json(copy.metadata)["keyslots"]["0"]["kdf"]
    assert set(written) == {"type", "time", "memory", "cpus", "salt"}


def test_luks2_json_text_rules() -> None:
    good = patched(lambda j: None)
    assert luks2.decode_copy(good, 0, False).seqid == 5
    for text in (b'{"a":1} x', b' {"a":1}', b'{"a":NaN}', b'{"a":1,"a":2}',
                 b"[" * 100000, b'{"a":' + b"[" * 100000 + b"}", b'{"a":"\xff"}'):
        with pytest.raises(CorruptHeader):
            luks2.parse_json_area(text + b"\0")
    with pytest.raises(CorruptHeader, match="NUL"):
        luks2.parse_json_area(b'{"a":1}\0\0x\0')
    with pytest.raises(CorruptHeader, match="checksum"):
        luks2.decode_copy(good[:5000] + b"X" + good[5001:], 0, False)


def test_digest_round_trip() -> None:
    key = bytes(range(32))
    salt, value = keyslots.make_digest(key, 1000)
    d = luks2.Digest((0,), (0,), "sha256", 1000, salt, value)
    assert keyslots.check_luks2_key(d, key) and not keyslots.check_luks2_key(d, bytes(32))
    assert base64.b64encode(value)  # 32 bytes: the hash's own size, as cryptsetup
    assert len(value) == 32
