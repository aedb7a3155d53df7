"""The master key: constructors, wrapping bound to its row, wrong keys refused at open,
rotation while in use, and a rotation killed half-way."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from rawsql import execute

from cryptoplane.fabric.keystore import (
    Keystore,
    MasterKey,
    MasterKeyRejected,
    UnwrapFailed,
    open_keystore,
)
from cryptoplane.fabric.keytypes import KeyPolicy, KeyType

Opener = Callable[..., Keystore]
AES = KeyPolicy(KeyType.AES256_GCM)
KEY = bytes(range(32))


def test_constructors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = MasterKey(KEY)
    raw, hexa = tmp_path / "raw", tmp_path / "hex"
    raw.write_bytes(KEY)
    hexa.write_text(KEY.hex() + "\n")
    assert MasterKey.from_file(raw) == ref == MasterKey.from_file(hexa)
    monkeypatch.setenv("MK_HEX", KEY.hex().upper())
    monkeypatch.setenv("MK_B64", base64.b64encode(KEY).decode())
    monkeypatch.setenv("MK_URL", base64.urlsafe_b64encode(KEY).decode().rstrip("="))
    for var in ("MK_HEX", "MK_B64", "MK_URL"):
        assert MasterKey.from_env(var) == ref
    bad = tmp_path / "bad"
    bad.write_text("deadbeef" * 5)
    makers: list[Callable[[], MasterKey]] = [
        lambda: MasterKey.from_file(bad), lambda: MasterKey.from_env("MK_NONE"),
        lambda: MasterKey(b"short"), lambda: MasterKey.from_text("zz" * 32)]
    for make in makers:
        with pytest.raises(MasterKeyRejected) as e:
            make()
        assert "deadbeef" not in str(e.value)
    salt = b"s" * 16
    assert MasterKey.from_passphrase("pw", salt) == MasterKey.from_passphrase(b"pw", salt)
    assert MasterKey.from_passphrase("pw", salt) != MasterKey.from_passphrase("pw", b"t" * 16)


def test_repr_and_id_reveal_nothing() -> None:
    m = MasterKey(KEY)
    assert repr(m) == str(m) == f"MasterKey(id={m.id})" and len(m.id) == 8
    assert KEY.hex()[:8] not in repr(m) and m.id != MasterKey.generate().id
    assert m.id not in m.check_value() and KEY.hex() not in m.check_value()


def test_a_wrapped_blob_is_bound_to_its_row() -> None:
    m = MasterKey(KEY)
    blob = m.wrap("a", "k", 1, b"material")
    assert m.unwrap("a", "k", 1, blob) == b"material"
    for tenant, name, version in (("b", "k", 1), ("a", "j", 1), ("a", "k", 2)):
        with pytest.raises(UnwrapFailed):
            m.unwrap(tenant, name, version, blob)
    with pytest.raises(UnwrapFailed):
        MasterKey.generate().unwrap("a", "k", 1, blob)
    with pytest.raises(UnwrapFailed):
        m.unwrap("a", "k", 1, blob[:-1] + bytes([blob[-1] ^ 1]))


def test_a_blob_moved_to_another_row_does_not_unwrap(store: Keystore,
                                                    keystore_url: str) -> None:
    store.create_key("a", "k", AES, b"A" * 32)
    store.create_key("b", "k", AES, b"B" * 32)
    execute(keystore_url, "UPDATE key_versions SET wrapped = (SELECT wrapped FROM "
            "key_versions WHERE tenant = 'a') WHERE tenant = 'b'")
    with pytest.raises(UnwrapFailed):
        store.get_key("b", "k")
    assert store.get_key("a", "k").versions == {1: b"A" * 32}


def test_a_wrong_master_key_is_refused(keystore_url: str, master: MasterKey,
                                       open_store: Opener) -> None:
    open_store().create_key("a", "k", AES, b"A" * 32)
    with pytest.raises(MasterKeyRejected) as e:
        open_keystore(keystore_url, MasterKey.generate())
    assert master.id in str(e.value)
    # a wrong key given as "previous" is no way in either
    with pytest.raises(MasterKeyRejected):
        open_keystore(keystore_url, MasterKey.generate(), previous=[MasterKey.generate()])
    assert open_store().get_key("a", "k").versions == {1: b"A" * 32}


def test_passphrase_master_key(keystore_url: str) -> None:
    with open_keystore(keystore_url, master_passphrase="correct horse") as s:
        s.create_key("a", "k", AES, b"A" * 32)
        mid = s.master_id
    with open_keystore(keystore_url, master_passphrase="correct horse") as s:
        assert s.get_key("a", "k").versions == {1: b"A" * 32} and s.master_id == mid
    with pytest.raises(MasterKeyRejected):
        open_keystore(keystore_url, master_passphrase="battery staple")
    with pytest.raises(MasterKeyRejected):
        open_keystore(keystore_url)


def test_rotation_rewraps_everything(keystore_url: str, master: MasterKey,
                                     open_store: Opener) -> None:
    s = open_store()
    made = {}
    for i in range(7):
        m = os.urandom(32)
        s.create_key("a", f"k{i}", AES, m)
        made[(f"k{i}", 1)] = m
        if i % 2:
            m2 = os.urandom(32)
            s.rotate_key("a", f"k{i}", m2)
            made[(f"k{i}", 2)] = m2
    other = open_store()  # another server, holding both keys before the rotation
    new = MasterKey.generate()
    other.close()
    other = open_store(master=new, previous=[master])
    assert s.rotate_master(new, batch=3) == len(made)
    assert s.master_usage() == {new.id: len(made)}
    assert s.rotate_master(new) == 0  # nothing left
    s.rotate_key("a", "k0", b"after" * 8)
    for store in (s, other):
        for (name, v), m in made.items():
            assert store.get_key("a", name).versions[v] == m
    s.close()
    other.close()
    with open_keystore(keystore_url, new) as fresh:  # the old key is no longer needed
        assert fresh.get_key("a", "k0").versions[2] == b"after" * 8
    with pytest.raises(MasterKeyRejected):
        open_keystore(keystore_url, master)
    events = [r["detail"] for r in fresh_rows(keystore_url, new) if r["op"] == "master-rotate"]
    assert events[0].startswith("start") and events[-1] == f"done {new.id}"


def fresh_rows(url: str, master: MasterKey) -> list[dict[str, str]]:
    with open_keystore(url, master) as s:
        return [{k: str(v) for k, v in r.items()} for r in s.audit_rows("")]


CHILD = textwrap.dedent("""
    import sys, time
    from cryptoplane.fabric.keystore import MasterKey, open_keystore
    url, old, new = sys.argv[1:]
    store = open_keystore(url, MasterKey(bytes.fromhex(old)))
    def progress(n):
        print(n, flush=True)
        time.sleep(0.05)
    store.rotate_master(MasterKey(bytes.fromhex(new)), batch=2, on_batch=progress)
    print("finished", flush=True)
""")


def test_sigkill_mid_rotation_leaves_every_key_usable(keystore_url: str,
                                                      open_store: Opener) -> None:
    old_key, new_key = os.urandom(32), os.urandom(32)
    old, new = MasterKey(old_key), MasterKey(new_key)
    s = open_store(master=old)
    made = {f"k{i}": os.urandom(32) for i in range(30)}
    for name, m in made.items():
        s.create_key("a", name, AES, m)
    s.close()
    child = subprocess.Popen([sys.executable, "-c", CHILD, keystore_url, old_key.hex(),
                              new_key.hex()], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if line.strip() != "finished" and int(line) >= 6:
                break
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    # half-way: some rows under each key, so neither key alone opens the store
    for alone in (old, new):
        with pytest.raises(MasterKeyRejected):
            open_keystore(keystore_url, alone)
    with open_keystore(keystore_url, new, previous=[old]) as s:
        usage = s.master_usage()
        assert usage[old.id] > 0 and usage[new.id] >= 6, usage
        for name, m in made.items():
            assert s.get_key("a", name).versions == {1: m}
        assert s.rotate_master() == usage[old.id]  # finish the job
    with open_keystore(keystore_url, new) as s:
        assert all(s.get_key("a", n).versions == {1: m} for n, m in made.items())
