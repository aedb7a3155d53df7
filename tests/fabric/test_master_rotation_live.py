"""Issue 16: master-key rotation rewraps every key without stopping the server.

The operator's sequence (``cryptoplane keystore rotate-master --help``): new key on top
of the master-key file, SIGHUP, ``keystore rotate-master``, old line removed, SIGHUP.
Meanwhile a client keeps encrypting and decrypting under many keys; not one request
fails, and afterwards a server holding only the new key reads everything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from cryptoplane.fabric.client_sync import Client
from cryptoplane.fabric.keystore import MasterKey, open_keystore

CLI = [sys.executable, "-m", "cryptoplane"]


def _start(store: str, master_file: Path, folder: Path, name: str
           ) -> tuple[subprocess.Popen[bytes], str, Path]:
    ready = folder / f"{name}.ready"
    log = folder / f"{name}.log"
    proc = subprocess.Popen([*CLI, "server", "--store", store, "--master-key-file",
                             str(master_file), "--listen", "tcp://127.0.0.1:0",
                             "--ready-file", str(ready), "--grace", "1"],
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    deadline = time.monotonic() + 60
    while not (ready.exists() and ready.read_text().strip()):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())["listen"][0], log


def _hup(proc: subprocess.Popen[bytes], log: Path, count: int) -> None:
    proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while log.read_text().count("master keys reloaded") < count:
        assert "not reloaded" not in log.read_text(), log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


def test_master_key_rotation_while_serving(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'keys.db'}"
    old, new = os.urandom(32).hex(), os.urandom(32).hex()
    master_file = tmp_path / "master.key"
    master_file.write_text(old + "\n")
    with open_keystore(store, MasterKey.from_text(old)) as ks:
        token = ks.create_token("acme")
    proc, url, log = _start(store, master_file, tmp_path, "s")
    sealed: dict[str, list[tuple[bytes, bytes]]] = {}
    failures: list[BaseException] = []
    ops = 0
    stop = threading.Event()
    try:
        with Client(url, token=token) as c:
            for i in range(24):
                name = f"k{i}"
                c.create_key(name, "aes256-gcm96")
                for _ in range(i % 3):
                    c.rotate_key(name)
                sealed[name] = [(b"m%d" % i, c.encrypt(name, b"m%d" % i))]

            def traffic() -> None:
                nonlocal ops
                n = 0
                while not stop.is_set():
                    name = f"k{n % 24}"
                    try:
                        msg = b"traffic %d" % n
                        blob = c.encrypt(name, msg)
                        assert c.decrypt(name, blob) == msg
                        assert c.decrypt(name, sealed[name][0][1]) == sealed[name][0][0]
                        if n % 50 == 0:
                            sealed[name].append((msg, blob))
                    except BaseException as e:  # every failure is counted, none expected
                        failures.append(e)
                    n += 1
                    ops = n
            t = threading.Thread(target=traffic)
            t.start()
            master_file.write_text(f"{new}\n{old}\n")
            _hup(proc, log, 1)
            c.create_key("made-mid-rotation", "chacha20-poly1305")
            sealed["made-mid-rotation"] = [(b"mid", c.encrypt("made-mid-rotation", b"mid"))]
            run = subprocess.run([*CLI, "keystore", "rotate-master", "--store", store,
                                  "--master-key-file", str(master_file), "--batch", "5"],
                                 capture_output=True, text=True, timeout=120)
            assert run.returncode == 0, run.stderr
            assert "rewrapped" in run.stdout
            status = json.loads(subprocess.run(
                [*CLI, "keystore", "status", "--json", "--store", store,
                 "--master-key-file", str(master_file)],
                capture_output=True, text=True, check=True).stdout)
            new_id = MasterKey.from_text(new).id
            assert status["master"] == new_id
            assert set(status["versions_by_master"]) == {new_id}
            versions = sum(1 + i % 3 for i in range(24)) + 1  # and the one made meanwhile
            assert sum(status["versions_by_master"].values()) == versions
            master_file.write_text(new + "\n")
            _hup(proc, log, 2)
            time.sleep(0.5)
            stop.set()
            t.join(30)
        assert not failures, failures[:3]
        assert ops > 100, ops
    finally:
        stop.set()
        proc.terminate()
        proc.wait(20)
    # a fresh server with only the new key reads every ciphertext ever answered
    proc, url, log = _start(store, master_file, tmp_path, "fresh")
    try:
        with Client(url, token=token) as c:
            for name, pairs in sealed.items():
                for msg, blob in pairs:
                    assert c.decrypt(name, blob) == msg
    finally:
        proc.terminate()
        proc.wait(20)
    # and the old key alone no longer opens the store
    bad = tmp_path / "old.key"
    bad.write_text(old)
    refused = subprocess.run([*CLI, "keystore", "status", "--store", store,
                              "--master-key-file", str(bad)], capture_output=True, text=True)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert old not in refused.stderr and new not in refused.stderr
