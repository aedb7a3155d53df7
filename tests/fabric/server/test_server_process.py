"""Streams, the operations endpoint, and the real ``cryptoplane server`` process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from serverwire import Running, Tokens, Wire, make_service, running

from cryptoplane.fabric import bulk
from cryptoplane.fabric import codec as C
from cryptoplane.fabric.codec import Field, Flag, FrameType, Op, Status
from cryptoplane.fabric.service import Service


def _stream(w: Wire, op: int, key: bytes, data: bytes, piece: int) -> tuple[bytes, int]:
    fid = w.request(op, key, {})
    for i in range(0, max(len(data), 1), piece):
        last = i + piece >= len(data)
        w.send(C.encode_frame(FrameType.DATA, fid, op=op, payload=data[i:i + piece],
                              flags=Flag.END if last else 0))
    out = []
    while True:
        f = w.recv()
        assert f.id == fid
        if f.type == FrameType.RESPONSE:
            return b"".join(out), f.status
        out.append(f.payload)
        if f.flags & Flag.END:
            return b"".join(out), 0


def test_streams_round_trip(server: Running, token: str, service: Service) -> None:
    data = os.urandom(3 * 1024 * 1024 + 1234)
    with Wire(server.port, token) as w:
        for piece in (1 << 20, 100_000):  # worker-sized and inline-sized pieces
            sealed, st = _stream(w, Op.ENCRYPT_STREAM, b"aes", data, piece)
            assert st == 0
            assert bulk.decrypt_all(service.transit, "acme", "aes", sealed,
                                    service.plane) == data
            plain, st = _stream(w, Op.DECRYPT_STREAM, b"aes", sealed, piece)
            assert (st, plain == data) == (0, True)
        # an empty stream, and a tampered one
        sealed, st = _stream(w, Op.ENCRYPT_STREAM, b"aes", b"", 1 << 20)
        assert st == 0 and _stream(w, Op.DECRYPT_STREAM, b"aes", sealed, 1 << 20) == (b"", 0)
        sealed, _ = _stream(w, Op.ENCRYPT_STREAM, b"aes", data[:200_000], 1 << 20)
        bad = bytearray(sealed)
        bad[-100] ^= 1
        plain, st = _stream(w, Op.DECRYPT_STREAM, b"aes", bytes(bad), 1 << 20)
        assert st == Status.AUTHENTICATION_FAILED
        # the connection goes on
        assert w.call(Op.ENCRYPT, b"aes", {Field.DATA: b"x"})[0] == 0
        _, st = _stream(w, Op.ENCRYPT_STREAM, b"nokey", b"abc", 1 << 20)
        assert st == Status.KEY_NOT_FOUND


def test_metrics_and_probes(tokens: Tokens) -> None:
    svc = make_service(tokens)
    svc.transit.create_key("acme", "aes", "aes256-gcm96")
    token = tokens.add("acme")
    with running(svc, http="127.0.0.1:0") as srv:
        assert srv.server is not None and srv.server.http_port
        base = f"http://127.0.0.1:{srv.server.http_port}"
        with Wire(srv.port, token) as w:
            for _ in range(3):
                assert w.call(Op.ENCRYPT, b"aes", {Field.DATA: b"x" * 10})[0] == 0
            assert w.call(Op.DECRYPT, b"aes", {Field.CIPHERTEXT: b"bad"})[0] != 0
        body = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
        assert ('cryptoplane_fabric_requests_total{op="encrypt",status="ok",tenant="acme"} 3.0'
                in body)
        assert 'op="decrypt",status="invalid_request"' in body
        assert urllib.request.urlopen(f"{base}/healthz", timeout=5).status == 200
        assert urllib.request.urlopen(f"{base}/readyz", timeout=5).status == 200
    svc.close()


def test_cli_server_process(tmp_path: Path) -> None:
    """``cryptoplane tokens create`` and ``cryptoplane server --ready-file``, SIGTERM."""
    key = tmp_path / "master.key"
    key.write_text(os.urandom(32).hex())
    store = f"sqlite://{tmp_path / 'keys.db'}"
    common = ["--store", store, "--master-key-file", str(key)]
    cli = [sys.executable, "-m", "cryptoplane"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    token = subprocess.run([*cli, "tokens", "create", "--tenant", "acme", "--expires", "1d",
                            "--label", "test", *common], check=True, capture_output=True,
                           text=True, env=env).stdout.strip()
    assert token.startswith("cpt_")
    listed = subprocess.run([*cli, "tokens", "list", "--tenant", "acme", "--json", *common],
                            check=True, capture_output=True, text=True, env=env).stdout
    assert json.loads(listed.splitlines()[0])["label"] == "test"
    out = subprocess.run([*cli, "tenants", "limits", "acme", "--ops", "5000", *common],
                         check=True, capture_output=True, text=True, env=env).stdout
    assert json.loads(out)["ops_per_s"] == 5000
    ready = tmp_path / "ready.json"
    sock = tmp_path / "cp.sock"
    proc = subprocess.Popen([*cli, "server", *common, "--listen", "tcp://127.0.0.1:0",
                             "--listen", f"unix://{sock}", "--http", "127.0.0.1:0",
                             "--ready-file", str(ready), "--workers", "2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        event = json.loads(ready.read_text())
        assert event["event"] == "ready" and event["http"]
        port = int(next(a for a in event["listen"] if a.startswith("tcp")).rsplit(":", 1)[1])
        with Wire(port, token) as w:
            st, d = w.json(Op.KEY_CREATE, b"k", {"type": "aes256-gcm96"})
            assert st == 0, d
            st, f = w.call(Op.ENCRYPT, b"k", {Field.DATA: b"persisted"})
            assert st == 0
            ct = f[Field.CIPHERTEXT]
        with Wire(0, token, unix=str(sock)) as w:
            st, f = w.call(Op.DECRYPT, b"k", {Field.CIPHERTEXT: ct})
            assert (st, f[Field.DATA]) == (0, b"persisted")
        status = urllib.request.urlopen(f"http://{event['http']}/readyz", timeout=5).status
        assert status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not ready.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.communicate()
    # revoked: a new server no longer takes the token
    token_id = token[4:].split("_", 1)[0]
    subprocess.run([*cli, "tokens", "revoke", token_id, *common], check=True,
                   capture_output=True, env=env)
    listed = subprocess.run([*cli, "tokens", "list", "--tenant", "acme", *common],
                            check=True, capture_output=True, text=True, env=env).stdout
    assert token_id not in listed


def test_two_servers_share_a_keystore(keystore_url: str) -> None:
    """A key created and rotated through one server is used by another server over the
    same keystore within its cache TTL (SQLite: the generation check; PostgreSQL adds
    NOTIFY)."""
    from cryptoplane.fabric.keystore import MasterKey
    from cryptoplane.fabric.service import open_service

    master = MasterKey.generate()
    url = keystore_url
    a = open_service(url, master=master, engines=["inline"], cache_ttl=0.5)
    b = open_service(url, master=master, engines=["inline"], cache_ttl=0.5)
    assert a.store is not None
    token = a.store.create_token("acme")
    try:
        with running(a) as sa, running(b) as sb, Wire(sa.port, token) as wa, \
                Wire(sb.port, token) as wb:
            assert wb.call(Op.ENCRYPT, b"k", {Field.DATA: b"x"})[0] == Status.KEY_NOT_FOUND
            assert wa.json(Op.KEY_CREATE, b"k", {"type": "aes256-gcm96"})[0] == 0

            def version_on_b() -> int:
                deadline = time.monotonic() + 3
                while True:
                    st, f = wb.call(Op.ENCRYPT, b"k", {Field.DATA: b"x"})
                    if st == 0 or time.monotonic() > deadline:
                        return C.get_u32(f, Field.VERSION) if st == 0 else -st
                    time.sleep(0.05)

            start = time.monotonic()
            assert version_on_b() == 1
            assert wa.json(Op.KEY_ROTATE, b"k")[1]["latest_version"] == 2
            while version_on_b() != 2:
                assert time.monotonic() - start < 5
                time.sleep(0.05)
    finally:
        a.close()
        b.close()


def test_cli_second_signal_stops_at_once(tmp_path: Path) -> None:
    """SIGTERM drains (GOAWAY, in-flight answered); a second signal cuts the drain short
    and the process exits 128 + that signal."""
    key = tmp_path / "master.key"
    key.write_text(os.urandom(32).hex())
    common = ["--store", f"sqlite://{tmp_path / 'keys.db'}", "--master-key-file", str(key)]
    cli = [sys.executable, "-m", "cryptoplane"]
    token = subprocess.run([*cli, "tokens", "create", "--tenant", "acme", *common],
                           check=True, capture_output=True, text=True).stdout.strip()
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen([*cli, "server", *common, "--listen", "tcp://127.0.0.1:0",
                             "--ready-file", str(ready), "--workers", "1", "--grace", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        event = json.loads(ready.read_text())
        port = int(event["listen"][0].rsplit(":", 1)[1])
        with Wire(port, token) as w:
            assert w.json(Op.KEY_CREATE, b"rsa", {"type": "rsa-4096"})[0] == 0
            n = 2000  # RSA-4096 signs: seconds of work for one worker
            w.send(b"".join(C.encode_frame(FrameType.REQUEST, i, op=Op.SIGN, key=b"rsa",
                                           payload=C.encode_fields({Field.DATA: b"m"}))
                            for i in range(1, n + 1)))
            first = w.recv()
            assert first.type == FrameType.RESPONSE and first.status == 0
            proc.send_signal(signal.SIGTERM)
            while w.recv().type != FrameType.GOAWAY:
                pass
            start = time.monotonic()
            proc.send_signal(signal.SIGINT)
            assert proc.wait(20) == 128 + signal.SIGINT
            assert time.monotonic() - start < 10
            answered = 0
            try:
                while True:
                    w.recv()
                    answered += 1
            except (ConnectionError, OSError):
                pass
            assert answered < n - 1  # cut short: not everything was answered
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.communicate()


def test_keys_rotate_on_their_period(tmp_path: Path) -> None:
    from cryptoplane.fabric.keystore import MasterKey
    from cryptoplane.fabric.service import open_service

    svc = open_service(f"sqlite://{tmp_path / 'k.db'}", master=MasterKey.generate(),
                       engines=["inline"])
    try:
        svc.transit.create_key("acme", "short", "aes256-gcm96", auto_rotate_period=0.3)
        svc.transit.create_key("acme", "never", "aes256-gcm96")
        with running(svc, rotate_interval=0.2, frame_timeout=0.4):
            deadline = time.monotonic() + 5
            while svc.transit.read_key("acme", "short")["latest_version"] < 2:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert svc.transit.read_key("acme", "never")["latest_version"] == 1
    finally:
        svc.close()
