"""Keyslot operations, header copies and damage, backups, detached headers and crash
safety of cryptoplane's LUKS volumes (no external program needed)."""

from __future__ import annotations

import fcntl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cryptoplane.exceptions import Busy, CryptoplaneError, InvalidRequest, NotSupported
from cryptoplane.volume import kdf, luks, luks2
from cryptoplane.volume.errors import (
    CorruptHeader,
    KdfLimitExceeded,
    KeyslotError,
    WrongPassphrase,
)

ARGON_FAST = {"time": 1, "memory": 8192, "cpus": 1}
PBKDF2_FAST = {"iterations": 1000}
PARAMS = {1: PBKDF2_FAST, 2: ARGON_FAST}


def image(tmp_path: Path, size: int = 20 << 20) -> Path:
    p = tmp_path / "v.img"
    with open(p, "wb") as f:
        f.truncate(size)
    return p


@pytest.fixture(params=[1, 2], ids=["luks1", "luks2"])
def vol(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, int]:
    img = image(tmp_path)
    luks.format(img, b"old", version=request.param, kdf_params=PARAMS[request.param])
    return img, request.param


def opens(img: Path, secret: bytes, **kw: object) -> bool:
    try:
        luks.unlock(img, passphrase=secret, **kw)  # type: ignore[arg-type]
        return True
    except WrongPassphrase:
        return False


def test_add_test_change_remove(vol: tuple[Path, int]) -> None:
    img, version = vol
    p = PARAMS[version]
    key = luks.unlock(img, passphrase=b"old").volume_key
    assert luks.add_key(img, passphrase=b"old", new_passphrase=b"two", kdf_params=p) == 1
    assert luks.add_key(img, volume_key=key, new_passphrase=b"three", slot=5,
                        kdf_params=p) == 5
    assert luks.test_passphrase(img, passphrase=b"three") == 5
    with pytest.raises(KeyslotError):
        luks.add_key(img, passphrase=b"old", new_passphrase=b"x", slot=5, kdf_params=p)
    new_slot = luks.change_key(img, b"two", b"deux", kdf_params=p)
    assert not opens(img, b"two")
    assert luks.unlock(img, passphrase=b"deux").volume_key == key
    assert luks.remove_key(img, passphrase=b"deux") == new_slot
    assert not opens(img, b"deux")
    assert luks.remove_key(img, slot=5, passphrase=b"old") == 5
    assert opens(img, b"old") and not opens(img, b"three")
    with pytest.raises(KeyslotError):
        luks.remove_key(img, slot=5, passphrase=b"old")
    with pytest.raises(KeyslotError):
        luks.remove_key(img, slot=0, passphrase=b"old", allow_last=False)
    with pytest.raises(WrongPassphrase):
        luks.add_key(img, passphrase=b"bad", new_passphrase=b"x", kdf_params=p)
    with pytest.raises(WrongPassphrase):
        luks.unlock(img, volume_key=bytes(len(key)))


def test_removed_keyslot_area_is_wiped(tmp_path: Path) -> None:
    img = image(tmp_path)
    luks.format(img, b"a", kdf_params=ARGON_FAST)
    luks.add_key(img, passphrase=b"a", new_passphrase=b"b", kdf_params=ARGON_FAST)
    meta = luks2.decode(img.read_bytes()[:luks2.READ_SIZE]).metadata
    area = meta.keyslots[1].area
    before = img.read_bytes()[area.offset:area.offset + area.size]
    luks.remove_key(img, slot=1, passphrase=b"a")
    after = img.read_bytes()[area.offset:area.offset + area.size]
    assert before != after and before[:4096] not in after


def test_luks1_keyslots_use_pbkdf2_only(tmp_path: Path) -> None:
    img = image(tmp_path)
    luks.format(img, b"a", version=1, kdf_params=PBKDF2_FAST)
    with pytest.raises(InvalidRequest):
        luks.add_key(img, passphrase=b"a", new_passphrase=b"b", kdf="argon2id",
                     kdf_params=ARGON_FAST)


def test_all_luks1_slots_full(tmp_path: Path) -> None:
    img = image(tmp_path)
    luks.format(img, b"0", version=1, kdf_params=PBKDF2_FAST)
    for i in range(1, 8):
        luks.add_key(img, passphrase=b"0", new_passphrase=str(i).encode(),
                     kdf_params=PBKDF2_FAST)
    with pytest.raises(KeyslotError):
        luks.add_key(img, passphrase=b"0", new_passphrase=b"9", kdf_params=PBKDF2_FAST)
    assert luks.test_passphrase(img, passphrase=b"7") == 7


def test_key_file_and_dump_hold_no_secrets(vol: tuple[Path, int], tmp_path: Path) -> None:
    img, version = vol
    kf = tmp_path / "kf"
    kf.write_bytes(b"old")
    layout = luks.unlock(img, key_file=kf)
    d = luks.dump(img)
    assert d["version"] == version and "0" in d["keyslots"]
    text = repr(d)
    assert layout.volume_key.hex() not in text and "old" not in text
    assert "volume_key" not in repr(layout)


def test_backup_and_restore(vol: tuple[Path, int], tmp_path: Path) -> None:
    img, version = vol
    backup = tmp_path / "hdr.bak"
    luks.backup_header(img, backup)
    with pytest.raises(InvalidRequest):
        luks.backup_header(img, backup)  # never overwrites
    luks.change_key(img, b"old", b"new", kdf_params=PARAMS[version])
    luks.restore_header(img, backup)
    assert opens(img, b"old") and not opens(img, b"new")
    bad = tmp_path / "bad.bak"
    bad.write_bytes(b"\0" * 4096)
    with pytest.raises(CorruptHeader):
        luks.restore_header(img, bad)
    assert opens(img, b"old")


def test_restore_refuses_a_different_data_offset(tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    for p in (a, b):
        with open(p, "wb") as f:
            f.truncate(20 << 20)
    luks.format(a, b"x", kdf_params=ARGON_FAST)
    luks.format(b, b"x", kdf_params=ARGON_FAST, data_offset=8 << 20)
    luks.backup_header(a, tmp_path / "a.bak")
    with pytest.raises(InvalidRequest, match="data offset"):
        luks.restore_header(b, tmp_path / "a.bak")


@pytest.mark.parametrize("version", [1, 2])
def test_detached_header(tmp_path: Path, version: int) -> None:
    data = image(tmp_path, 1 << 20)
    hdr = tmp_path / "hdr"
    luks.format(data, b"pw", version=version, kdf_params=PARAMS[version], header=hdr)
    assert data.read_bytes() == bytes(1 << 20)
    layout = luks.unlock(data, passphrase=b"pw", header=hdr)
    assert layout.offset == 0 and layout.size == 1 << 20
    luks.add_key(data, passphrase=b"pw", new_passphrase=b"2", header=hdr,
                 kdf_params=PARAMS[version])
    assert luks.test_passphrase(data, passphrase=b"2", header=hdr) == 1
    with pytest.raises(CorruptHeader):
        luks.unlock(data, passphrase=b"pw")  # the data device holds no header


def test_luks2_sizes_round_down_and_iv_tweak(tmp_path: Path) -> None:
    img = image(tmp_path, (20 << 20) + 1000)
    luks.format(img, b"pw", kdf_params=ARGON_FAST)
    layout = luks.unlock(img, passphrase=b"pw")
    assert layout.size == (4 << 20) and layout.sector_size == 4096
    # iv_tweak is the first sector's IV, in 512-byte units as every IV of a LUKS2 segment
    # (dm-crypt's iv_offset, never shifted: LUKS2 does not set iv_large_sectors)
    blob = img.read_bytes()[:luks2.READ_SIZE]
    h = luks2.decode(blob)
    seg = h.metadata.segments[0]
    meta = h.metadata.__class__(h.metadata.keyslots, h.metadata.tokens,
                                {0: seg.__class__(seg.offset, None, 80, seg.encryption, 4096)},
                                h.metadata.digests, h.metadata.config)
    new = h.replace(metadata=meta, seqid=h.seqid + 1)
    with open(img, "r+b") as f:
        f.write(luks2.encode_copy(new, False))
        f.seek(h.hdr_size)
        f.write(luks2.encode_copy(new, True))
    opened = luks.unlock(img, passphrase=b"pw")
    assert (opened.iv_offset, opened.iv_step, opened.iv_large_sectors) == (80, 8, False)


# -- damage --------------------------------------------------------------------------

def corrupt(img: Path, offset: int, length: int = 16) -> None:
    with open(img, "r+b") as f:
        f.seek(offset)
        old = f.read(length)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in old))


def test_primary_damage_opens_from_secondary_and_is_repaired(tmp_path: Path) -> None:
    img = image(tmp_path)
    luks.format(img, b"pw", kdf_params=ARGON_FAST)
    corrupt(img, 4096 + 20)  # inside the primary JSON
    h = luks2.decode(img.read_bytes()[:luks2.READ_SIZE])
    assert not h.primary_ok and h.secondary_ok
    assert opens(img, b"pw")
    assert luks.dump(img)["header_copies"] == {"primary": False, "secondary": True}
    luks.add_key(img, passphrase=b"pw", new_passphrase=b"2", kdf_params=ARGON_FAST)
    h = luks2.decode(img.read_bytes()[:luks2.READ_SIZE])
    assert h.primary_ok and h.secondary_ok
    corrupt(img, 0, 6)  # primary magic gone: still found by the secondary
    assert luks.test_passphrase(img, passphrase=b"2") == 1


def test_both_copies_damaged(tmp_path: Path) -> None:
    img = image(tmp_path)
    luks.format(img, b"pw", kdf_params=ARGON_FAST)
    corrupt(img, 4096 + 20)
    corrupt(img, 16384 + 4096 + 20)
    with pytest.raises(CorruptHeader, match="checksum"):
        luks.unlock(img, passphrase=b"pw")


def test_truncated_and_foreign_images(tmp_path: Path) -> None:
    img = image(tmp_path)
    luks.format(img, b"pw", kdf_params=ARGON_FAST)
    data = img.read_bytes()
    cases = {
        "short": data[:3000],
        "no-keyslot-area": data[:40000],
        "empty": b"",
        "zeros": bytes(1 << 20),
        "v3": data[:6] + b"\0\3" + data[8:1 << 20],
    }
    for name, blob in cases.items():
        p = tmp_path / name
        p.write_bytes(blob)
        with pytest.raises(CorruptHeader) as e:
            luks.unlock(p, passphrase=b"pw")
        assert str(e.value), name
    with pytest.raises(CorruptHeader, match="unknown LUKS version 3"):
        luks.unlock(tmp_path / "v3", passphrase=b"pw")
    with pytest.raises(CorruptHeader, match="truncated"):
        luks.unlock(tmp_path / "no-keyslot-area", passphrase=b"pw")


def test_luks1_damage(tmp_path: Path) -> None:
    img = image(tmp_path)
    luks.format(img, b"pw", version=1, kdf_params=PBKDF2_FAST)
    corrupt(img, 208, 4)  # slot 0's active marker
    with pytest.raises(CorruptHeader, match="slot 0"):
        luks.unlock(img, passphrase=b"pw")


def test_hostile_kdf_costs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(KdfLimitExceeded):
        kdf.derive(kdf.Argon2("argon2id", 4, 64 * 1024 * 1024, 4), b"p", bytes(32), 32)
    with pytest.raises(KdfLimitExceeded):
        kdf.derive(kdf.Argon2("argon2id", 100_000, 1024, 1), b"p", bytes(32), 32)
    with pytest.raises(KdfLimitExceeded):
        kdf.derive(kdf.Pbkdf2("sha256", 0xFFFFFFFF), b"p", bytes(32), 32)
    img = image(tmp_path)
    luks.format(img, b"pw", kdf_params={"time": 1, "memory": 8192, "cpus": 1})
    luks.add_key(img, passphrase=b"pw", new_passphrase=b"other", kdf_params=ARGON_FAST)
    h = luks2.decode(img.read_bytes()[:luks2.READ_SIZE])
    ks = h.metadata.keyslots[0]
    huge = ks.__class__(ks.key_size, ks.area, kdf.Argon2("argon2id", 1000, 4 << 20, 1),
                        ks.salt)
    meta = h.metadata.__class__({**h.metadata.keyslots, 0: huge}, h.metadata.tokens,
                                h.metadata.segments, h.metadata.digests, h.metadata.config)
    new = h.replace(metadata=meta, seqid=h.seqid + 1)
    with open(img, "r+b") as f:
        f.write(luks2.encode_copy(new, False))
        f.write(luks2.encode_copy(new, True))
    t0 = time.monotonic()
    # the hostile slot does not lock out the good one...
    assert luks.test_passphrase(img, passphrase=b"other") == 1
    # ...and when nothing else opens, the refusal says why
    with pytest.raises(KdfLimitExceeded, match="argon2"):
        luks.unlock(img, passphrase=b"pw")
    assert time.monotonic() - t0 < 5


def test_many_costly_keyslots_are_refused_together(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    img = image(tmp_path)
    luks.format(img, b"pw", kdf="pbkdf2", kdf_params=PBKDF2_FAST)
    for i in range(4):
        luks.add_key(img, passphrase=b"pw", new_passphrase=b"%d" % i, kdf="pbkdf2",
                     kdf_params=PBKDF2_FAST)
    # each slot (1,000 iterations for a 64-byte key: two SHA-256 blocks, 1.0 unit of a
    # lowered 2,000, and 0.5 for its 32-byte digest check) is within the per-slot limit;
    # four slots together (6 units) are, five (7.5) are not
    monkeypatch.setattr(kdf, "LIMITS", kdf.Limits(pbkdf2_work=2000, total_work=6.0))
    assert luks.test_passphrase(img, passphrase=b"1") == 2
    with pytest.raises(KdfLimitExceeded, match="together"):
        luks.unlock(img, passphrase=b"wrong")
    # the digest checks count: without them the five slots would fit in 7 units
    monkeypatch.setattr(kdf, "LIMITS", kdf.Limits(pbkdf2_work=2000, total_work=7.0))
    with pytest.raises(KdfLimitExceeded, match="together"):
        luks.unlock(img, passphrase=b"wrong")


def test_unsupported_features_are_named(tmp_path: Path) -> None:
    img = image(tmp_path)
    luks.format(img, b"pw", kdf_params=ARGON_FAST)
    h = luks2.decode(img.read_bytes()[:luks2.READ_SIZE])
    cfg = h.metadata.config.__class__(h.metadata.config.json_size,
                                      h.metadata.config.keyslots_size,
                                      (), ("online-reencrypt-v2",))
    meta = h.metadata.__class__(h.metadata.keyslots, h.metadata.tokens, h.metadata.segments,
                                h.metadata.digests, cfg)
    new = h.replace(metadata=meta, seqid=h.seqid + 1)
    with open(img, "r+b") as f:
        f.write(luks2.encode_copy(new, False))
        f.write(luks2.encode_copy(new, True))
    with pytest.raises(NotSupported, match="online-reencrypt-v2"):
        luks.unlock(img, passphrase=b"pw")
    assert luks.dump(img)["requirements"] == ["online-reencrypt-v2"]
    seg = h.metadata.segments[0]
    aead = seg.__class__(seg.offset, None, 0, seg.encryption, 4096,
                         integrity={"type": "hmac(sha256)", "journal_encryption": "none",
                                    "journal_integrity": "none"})
    meta = h.metadata.__class__(h.metadata.keyslots, h.metadata.tokens, {0: aead},
                                h.metadata.digests, h.metadata.config)
    with pytest.raises(NotSupported, match="integrity"):
        meta.check_supported()


# -- crash safety --------------------------------------------------------------------

class Crash(Exception):
    pass


def arm_crash(path: Path, k: int, torn: bool) -> None:
    """The write after ``k`` completed writes is dropped (or torn: half of it written)
    and the operation dies there, as if killed."""
    count = [0]

    def hook(offset: int, data: bytes) -> None:
        if count[0] == k:
            luks.write_hook = None
            if torn and len(data) > 1:
                with open(path, "r+b") as f:
                    f.seek(offset)
                    f.write(data[:len(data) // 2])
            raise Crash(f"killed at write {k}")
        count[0] += 1

    luks.write_hook = hook


@pytest.fixture(autouse=True)
def no_hook() -> Iterator[None]:
    yield
    luks.write_hook = None


def count_writes(fn: Callable[[], object]) -> int:
    n = [0]

    def hook(offset: int, data: bytes) -> None:
        n[0] += 1
    luks.write_hook = hook
    try:
        fn()
    finally:
        luks.write_hook = None
    return n[0]


OPS: dict[str, Callable[[Path, int], object]] = {
    "change": lambda img, v: luks.change_key(img, b"old", b"new", kdf_params=PARAMS[v]),
    "add": lambda img, v: luks.add_key(img, passphrase=b"old", new_passphrase=b"new",
                                       kdf_params=PARAMS[v]),
}


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("torn", [False, True], ids=["dropped", "torn"])
def test_a_kill_at_any_write_leaves_old_or_new(
        tmp_path: Path, vol: tuple[Path, int], op: str, torn: bool) -> None:
    img, version = vol
    pristine = img.read_bytes()
    probe = tmp_path / "probe.img"
    probe.write_bytes(pristine)
    total = count_writes(lambda: OPS[op](probe, version))
    assert 2 <= total <= 40
    key = luks.unlock(img, passphrase=b"old").volume_key
    for k in range(total):
        img.write_bytes(pristine)
        arm_crash(img, k, torn)
        with pytest.raises(Crash):
            OPS[op](img, version)
        luks.write_hook = None
        ok = [s for s in (b"old", b"new") if opens(img, s)]
        assert ok, f"{op}: neither passphrase opens after a kill at write {k}"
        for s in ok:
            assert luks.unlock(img, passphrase=s).volume_key == key
        # and the survivor can be changed again (repairs any stale copy)
        luks.add_key(img, passphrase=ok[0], new_passphrase=b"after",
                     kdf_params=PARAMS[version])
        assert opens(img, b"after")


def test_errors_are_typed(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest):
        luks.unlock(tmp_path / "missing", passphrase=b"x")
    img = image(tmp_path)
    with pytest.raises(InvalidRequest):
        luks.format(img, b"x", cipher="aes-xts-plain64", key_size=384)
    with pytest.raises(NotSupported):
        luks.format(img, b"x", cipher="serpent-xts-plain64", kdf_params=ARGON_FAST)
    small = image(tmp_path, 1 << 20)
    small.rename(tmp_path / "small")
    with pytest.raises(InvalidRequest, match="too small"):
        luks.format(tmp_path / "small", b"x", kdf_params=ARGON_FAST)
    assert issubclass(WrongPassphrase, CryptoplaneError)


def test_concurrent_changes_are_locked_out(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    img = image(tmp_path)
    luks.format(img, b"pw", kdf_params=ARGON_FAST)
    monkeypatch.setattr(luks, "LOCK_TIMEOUT_S", 0.2)
    with open(img, "rb") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(Busy, match="locked"):
            luks.add_key(img, passphrase=b"pw", new_passphrase=b"2", kdf_params=ARGON_FAST)
        with pytest.raises(Busy):
            luks.unlock(img, passphrase=b"pw")
    assert luks.add_key(img, passphrase=b"pw", new_passphrase=b"2",
                        kdf_params=ARGON_FAST) == 1
