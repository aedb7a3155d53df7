"""LUKS headers against the real programs: cryptsetup (LUKS1 and LUKS2) and qemu-img
(LUKS1) format, cryptoplane opens; cryptoplane formats, cryptsetup dumps, tests
passphrases, adds and kills keyslots."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import support

from cryptoplane.volume import luks
from cryptoplane.volume.errors import WrongPassphrase

ARGON_FAST = {"time": 1, "memory": 8192, "cpus": 1}
PBKDF2_FAST = {"iterations": 1000}
CS_PBKDF2 = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")
CS_ARGON = ("--pbkdf", "argon2id", "--pbkdf-memory", "32768", "--pbkdf-force-iterations", "4")


def need(*programs: str) -> None:
    for p in programs:
        if shutil.which(p) is None:
            support.unavailable(f"{p} is not installed")


def run(*argv: str | Path, check: bool = True,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv[0]} failed ({proc.returncode}): {proc.stderr}")
    return proc


@pytest.fixture
def pw(tmp_path: Path) -> Path:
    p = tmp_path / "pw"
    p.write_bytes(b"correct horse")
    return p


def image(tmp_path: Path, name: str = "v.img", size: int = 20 << 20) -> Path:
    p = tmp_path / name
    with open(p, "wb") as f:
        f.truncate(size)
    return p


def dumped_key(img: Path, pw: Path, *extra: str) -> bytes:
    out = run("cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode", "--key-file",
              pw, *extra, img).stdout
    block = out.split("MK dump:", 1)[1]
    return bytes.fromhex("".join(re.findall(r"\b[0-9a-f]{2}\b", block)))


CRYPTSETUP_FORMATS = [
    pytest.param(["--type", "luks2", *CS_ARGON, "--sector-size", "4096"], 4096,
                 id="luks2-argon2id-4096"),
    pytest.param(["--type", "luks2", *CS_PBKDF2, "--sector-size", "512"], 512,
                 id="luks2-pbkdf2-512"),
    pytest.param(["--type", "luks2", *CS_ARGON, "--sector-size", "512", "--key-size", "256"],
                 512, id="luks2-argon2id-512-xts256"),
    pytest.param(["--type", "luks2", *CS_PBKDF2, "--cipher", "aes-cbc-essiv:sha256",
                  "--key-size", "256", "--hash", "sha512"], 4096,
                 id="luks2-cbc-essiv-sha512"),
    pytest.param(["--type", "luks1", *CS_PBKDF2], 512, id="luks1-xts-plain64"),
    pytest.param(["--type", "luks1", *CS_PBKDF2, "--cipher", "aes-cbc-essiv:sha256",
                  "--key-size", "256"], 512, id="luks1-cbc-essiv"),
    pytest.param(["--type", "luks1", *CS_PBKDF2, "--cipher", "aes-xts-plain"], 512,
                 id="luks1-xts-plain"),
    pytest.param(["--type", "luks1", *CS_PBKDF2, "--cipher", "aes-cbc-plain64",
                  "--key-size", "256"], 512, id="luks1-cbc-plain64"),
]


@pytest.mark.parametrize(("args", "sector"), CRYPTSETUP_FORMATS)
def test_cryptsetup_volume_unlocks_with_its_volume_key(
        tmp_path: Path, pw: Path, args: list[str], sector: int) -> None:
    need("cryptsetup")
    img = image(tmp_path)
    run("cryptsetup", "luksFormat", "--batch-mode", "--key-file", pw, *args, img)
    layout = luks.unlock(img, passphrase=pw.read_bytes())
    assert layout.volume_key == dumped_key(img, pw)
    assert layout.sector_size == sector
    if "luks2" in args:
        meta = json.loads(run("cryptsetup", "luksDump", "--dump-json-metadata", img).stdout)
        seg = meta["segments"]["0"]
        assert layout.offset == int(seg["offset"])
        assert layout.cipher == seg["encryption"]
    else:
        dump = run("cryptsetup", "luksDump", img).stdout
        payload = int(re.search(r"Payload offset:\s*(\d+)", dump).group(1))  # type: ignore[union-attr]
        assert layout.offset == payload * 512
        cipher = args[args.index("--cipher") + 1] if "--cipher" in args else "aes-xts-plain64"
        assert layout.cipher == cipher
    assert layout.size == (20 << 20) - layout.offset
    assert luks.test_passphrase(img, key_file=pw) == 0
    with pytest.raises(WrongPassphrase):
        luks.unlock(img, passphrase=b"wrong")


def test_qemu_img_luks1_unlocks(tmp_path: Path, pw: Path) -> None:
    need("qemu-img", "cryptsetup")
    img = tmp_path / "q.img"
    for _ in range(3):  # qemu times its PBKDF2 by CPU usage, which fails under load
        proc = run("qemu-img", "create", "-f", "luks", "--object",
                   "secret,id=sec0,file=" + str(pw), "-o", "key-secret=sec0",
                   "-o", "iter-time=10", img, "16M", check=False)
        if proc.returncode == 0:
            break
    if proc.returncode != 0 and "accurate CPU usage" in proc.stderr:
        # not a missing tool: qemu times its PBKDF2 with CPU-usage counters that this
        # sandbox does not provide; only this exact failure is skipped, never others
        pytest.skip("qemu-img cannot create LUKS here: 'Unable to get accurate CPU "
                    "usage' (sandbox limitation, seen under load)")
    assert proc.returncode == 0, proc.stderr
    layout = luks.unlock(img, passphrase=pw.read_bytes())
    assert layout.volume_key == dumped_key(img, pw)
    assert layout.cipher == "aes-xts-plain64" and layout.size == 16 << 20


@pytest.mark.parametrize("version", [1, 2])
def test_cryptoplane_volume_opens_in_cryptsetup(tmp_path: Path, pw: Path, version: int) -> None:
    need("cryptsetup")
    img = image(tmp_path)
    params = PBKDF2_FAST if version == 1 else ARGON_FAST
    luks.format(img, pw.read_bytes(), version=version, kdf_params=params, label=None)
    dump = run("cryptsetup", "luksDump", img).stdout
    assert f"Version:       \t{version}" in dump
    assert dumped_key(img, pw) == luks.unlock(img, key_file=pw).volume_key
    run("cryptsetup", "open", "--test-passphrase", "--key-file", pw, img)
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"nope")
    assert run("cryptsetup", "open", "--test-passphrase", "--key-file", wrong, img,
               check=False).returncode == 2
    # cryptsetup adds a slot; we open with it; cryptsetup kills it; we no longer can
    new = tmp_path / "new"
    new.write_bytes(b"second passphrase")
    run("cryptsetup", "luksAddKey", "--batch-mode", "--key-file", pw, *CS_PBKDF2, img, new)
    assert luks.test_passphrase(img, key_file=new) == 1
    assert luks.unlock(img, key_file=new).volume_key == luks.unlock(img, key_file=pw).volume_key
    run("cryptsetup", "luksKillSlot", "--batch-mode", img, "1")
    with pytest.raises(WrongPassphrase):
        luks.unlock(img, key_file=new)
    # and our own add_key is understood by cryptsetup
    third = tmp_path / "third"
    third.write_bytes(b"third")
    slot = luks.add_key(img, key_file=pw, new_passphrase=b"third", kdf_params=params)
    run("cryptsetup", "open", "--test-passphrase", "--key-slot", str(slot), "--key-file",
        third, img)


def test_luks2_label_and_uuid_as_cryptsetup_sees_them(tmp_path: Path, pw: Path) -> None:
    need("cryptsetup")
    img = image(tmp_path)
    u = "12345678-1234-5678-9abc-def012345678"
    luks.format(img, b"x", kdf="pbkdf2", kdf_params=PBKDF2_FAST, label="backups", uuid=u,
                sector_size=512)
    meta = json.loads(run("cryptsetup", "luksDump", "--dump-json-metadata", img).stdout)
    assert meta["segments"]["0"]["sector_size"] == 512
    dump = run("cryptsetup", "luksDump", img).stdout
    assert "backups" in dump and u in dump
    assert run("cryptsetup", "luksUUID", img).stdout.strip() == u


def test_detached_header_opens_in_cryptsetup(tmp_path: Path, pw: Path) -> None:
    need("cryptsetup")
    data = image(tmp_path, "data.img", 4 << 20)
    hdr = tmp_path / "hdr.img"
    luks.format(data, pw.read_bytes(), kdf_params=ARGON_FAST, header=hdr)
    assert data.read_bytes() == bytes(4 << 20)  # nothing written to the data device
    run("cryptsetup", "open", "--test-passphrase", "--header", hdr, "--key-file", pw, data)
    layout = luks.unlock(data, key_file=pw, header=hdr)
    assert layout.offset == 0 and layout.size == 4 << 20
    assert layout.volume_key == dumped_key(hdr, pw)


@pytest.mark.parametrize("kind", ["luks1", "luks2"])
def test_cryptsetup_header_backup_restores_here(tmp_path: Path, pw: Path, kind: str) -> None:
    need("cryptsetup")
    img = image(tmp_path)
    run("cryptsetup", "luksFormat", "--batch-mode", "--type", kind, "--key-file", pw,
        *CS_PBKDF2, img)
    backup = tmp_path / "backup"
    run("cryptsetup", "luksHeaderBackup", "--batch-mode", "--header-backup-file", backup, img)
    key = luks.unlock(img, key_file=pw).volume_key
    luks.erase(img)
    with pytest.raises(WrongPassphrase):
        luks.unlock(img, key_file=pw)
    luks.restore_header(img, backup)
    assert luks.unlock(img, key_file=pw).volume_key == key
    ours = tmp_path / "ours"
    luks.backup_header(img, ours)
    assert ours.read_bytes() == backup.read_bytes()


@pytest.mark.parametrize("version", [1, 2])
def test_crypto_erase_is_fast_and_total(tmp_path: Path, pw: Path, version: int) -> None:
    need("cryptsetup")
    img = image(tmp_path, size=64 << 20)
    params = PBKDF2_FAST if version == 1 else ARGON_FAST
    luks.format(img, pw.read_bytes(), version=version, kdf_params=params)
    luks.add_key(img, key_file=pw, new_passphrase=b"other", kdf_params=params)
    t0 = time.perf_counter()
    luks.erase(img)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"erase took {elapsed:.3f} s"
    for secret in (b"correct horse", b"other"):
        with pytest.raises(WrongPassphrase):
            luks.unlock(img, passphrase=secret)
    dump = run("cryptsetup", "luksDump", img).stdout
    if version == 2:
        assert "luks2" not in dump.split("Keyslots:", 1)[1].split("Tokens:", 1)[0]
    else:
        assert "ENABLED" not in dump
    assert run("cryptsetup", "open", "--test-passphrase", "--key-file", pw, img,
               check=False).returncode != 0


def test_tokens_survive_keyslot_changes(tmp_path: Path, pw: Path) -> None:
    need("cryptsetup")
    img = image(tmp_path)
    luks.format(img, pw.read_bytes(), kdf_params=ARGON_FAST)
    luks.add_key(img, key_file=pw, new_passphrase=b"two", kdf_params=ARGON_FAST)
    run("cryptsetup", "token", "add", "--key-description", "vol-key", "--key-slot", "1", img)
    luks.change_key(img, b"two", b"deux", kdf_params=ARGON_FAST)
    tokens = json.loads(run("cryptsetup", "luksDump", "--dump-json-metadata", img).stdout
                        )["tokens"]
    assert tokens["0"]["key_description"] == "vol-key" and tokens["0"]["keyslots"] == ["1"]
    luks.remove_key(img, slot=1, passphrase=pw.read_bytes())
    tokens = json.loads(run("cryptsetup", "luksDump", "--dump-json-metadata", img).stdout
                        )["tokens"]
    assert tokens["0"]["keyslots"] == []


@pytest.mark.parametrize(("version", "cipher", "bits"), [
    (1, "aes-cbc-essiv:sha256", 256), (1, "aes-xts-plain", 512), (1, "aes-cbc-plain64", 256),
    (1, "aes-cbc-plain", 128), (2, "aes-cbc-essiv:sha256", 256), (2, "aes-xts-plain64", 256),
])
def test_cryptoplane_ciphers_open_in_cryptsetup(tmp_path: Path, pw: Path, version: int,
                                                cipher: str, bits: int) -> None:
    need("cryptsetup")
    img = image(tmp_path)
    info = luks.format(img, pw.read_bytes(), version=version, cipher=cipher, key_size=bits,
                       kdf="pbkdf2", kdf_params=PBKDF2_FAST, sector_size=512)
    assert dumped_key(img, pw) == luks.unlock(img, key_file=pw).volume_key
    dump = run("cryptsetup", "luksDump", img).stdout
    assert cipher.split("-", 1)[1] in dump
    assert info.key_size == bits
