"""Issue 16, acceptance 1, 2, 3 and 5 end to end: two real ``cryptoplane server``
processes sharing one PostgreSQL (the tests' own cluster, Unix socket only), clients of
two tenants over loopback.

Everything deterministic is compared with what ``cryptography`` computes locally from the
exported key (AEAD plaintexts, HMACs, PKCS#1 v1.5 and Ed25519 signatures); the rest is
verified locally with the public key the server hands out.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac as hmac_mod
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from pg import PostgresCluster

from cryptoplane.fabric import errors as fe
from cryptoplane.fabric.client import AsyncClient
from cryptoplane.fabric.client_sync import Client
from cryptoplane.fabric.keystore import open_keystore
from cryptoplane.fabric.keystore.master import MasterKey
from cryptoplane.fabric.transit import parse_ciphertext, parse_signature, parse_tag

CLI = [sys.executable, "-m", "cryptoplane"]


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    url: str
    http: str
    log: Path

    def rss_peak_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


@dataclass
class Fabric:
    dsn: str
    master_file: Path
    master: MasterKey
    folder: Path
    cluster: PostgresCluster
    servers: list[ServerProcess] = field(default_factory=list)
    tokens: dict[str, str] = field(default_factory=dict)

    def start_server(self, name: str) -> ServerProcess:
        ready = self.folder / f"{name}.ready"
        ready.unlink(missing_ok=True)
        log = self.folder / f"{name}.log"
        proc = subprocess.Popen(
            [*CLI, "server", "--store", self.dsn, "--master-key-file", str(self.master_file),
             "--listen", "tcp://127.0.0.1:0", "--http", "127.0.0.1:0",
             "--ready-file", str(ready), "--server-id", name, "--grace", "2"],
            stdout=subprocess.DEVNULL, stderr=log.open("ab"))
        deadline = time.monotonic() + 60
        while not ready.exists() or not ready.read_text().strip():
            if proc.poll() is not None:
                raise AssertionError(f"server {name} exited: {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"server {name} not ready: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        event = json.loads(ready.read_text())
        server = ServerProcess(proc, event["listen"][0], event["http"], log)
        self.servers.append(server)
        return server

    def client(self, server: ServerProcess, tenant: str) -> Client:
        return Client(server.url, token=self.tokens[tenant], timeout=60)


def _stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


@pytest.fixture(scope="module")
def fabric(pg_cluster: PostgresCluster, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Fabric]:
    folder = tmp_path_factory.mktemp("e2e")
    dsn = pg_cluster.create_database("fabric_e2e")
    master_file = folder / "master.key"
    master_file.write_text(os.urandom(32).hex())
    master = MasterKey.from_file(master_file)
    master_file.chmod(0o600)
    f = Fabric(dsn, master_file, master, folder, pg_cluster)
    with open_keystore(dsn, master) as store:
        f.tokens["tenant-a"] = store.create_token("tenant-a", label="e2e a")
        f.tokens["tenant-b"] = store.create_token("tenant-b", label="e2e b")
        f.tokens["admin"] = store.create_token("operator", ops=("admin",), label="e2e admin")
    try:
        f.start_server("s1")
        f.start_server("s2")
        yield f
    finally:
        for s in f.servers:
            _stop(s.proc)


def _until(fn: Any, timeout: float = 2.0) -> Any:
    """What ``fn`` returns once it stops raising: a change made on one server reaches the
    other through PostgreSQL within a second."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except (fe.KeyNotFound, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _material(c: Client, name: str, version: int) -> bytes:
    keys = c.export_key(name)["keys"]
    raw = keys.get(str(version), keys.get(version))  # type: ignore[call-overload]
    return base64.b64decode(raw) if isinstance(raw, str) else bytes(raw)


AEADS = {"aes256-gcm96": AESGCM, "chacha20-poly1305": ChaCha20Poly1305}


def test_symmetric_operations_match_local_byte_for_byte(fabric: Fabric) -> None:
    s1, s2 = fabric.servers
    with fabric.client(s1, "tenant-a") as a1, fabric.client(s2, "tenant-a") as a2:
        for ktype, aead in AEADS.items():
            name = f"sym-{ktype}"
            a1.create_key(name, ktype, exportable=True)
            # created on s1, used on s2 within a second (shared PostgreSQL)
            blob = _until(lambda n=name: a2.encrypt(n, b"hello world", aad=b"hdr"))
            version, nonce, ct = parse_ciphertext(blob)
            material = _material(a1, name, version)
            assert aead(material).decrypt(nonce, bytes(ct), b"hdr") == b"hello world"
            assert a1.decrypt(name, blob, aad=b"hdr") == b"hello world"
            # batch form: per-item results equal the single form's rules
            items = [{"data": bytes([i]) * i} for i in range(1, 40)]
            blobs = a2.batch("encrypt", name, items)
            for i, b in enumerate(blobs, 1):
                v, n, c = parse_ciphertext(b)  # type: ignore[arg-type]
                assert aead(_material(a1, name, v)).decrypt(n, bytes(c), None) == bytes([i]) * i
            plains = a1.batch("decrypt", name, [{"ciphertext": b} for b in blobs]
                              + [{"ciphertext": b"garbage"}])
            assert plains[:-1] == [bytes([i]) * i for i in range(1, 40)]
            assert isinstance(plains[-1], fe.InvalidRequest)
        # HMAC equals the library's with the exported key
        a1.create_key("mac", "hmac", exportable=True)
        tag_blob = _until(lambda: a2.hmac("mac", b"message"))
        v, tag = parse_tag(tag_blob)
        expect = hmac_mod.new(_material(a1, "mac", v), b"message", hashlib.sha256).digest()
        assert tag == expect
        assert a1.verify_hmac("mac", b"message", tag_blob) is True
        assert a1.verify_hmac("mac", b"messagE", tag_blob) is False
        tags = a2.batch("hmac", "mac", [{"data": b"m%d" % i} for i in range(10)])
        assert [parse_tag(t)[1] for t in tags] == [  # type: ignore[arg-type]
            hmac_mod.new(_material(a1, "mac", v), b"m%d" % i, hashlib.sha256).digest()
            for i in range(10)]
        # digest and random
        assert a1.digest(b"abc", "sha256") == hashlib.sha256(b"abc").digest()
        assert a2.digest(b"abc", "sha3-256") == hashlib.sha3_256(b"abc").digest()
        assert len(a1.random(77)) == 77


SIGNERS = ["rsa-2048", "ecdsa-p256", "ecdsa-p384", "ed25519"]


def _local_verify(pem: bytes, ktype: str, data: bytes, sig: bytes, pad: str) -> None:
    pub = serialization.load_pem_public_key(pem)
    if ktype.startswith("rsa"):
        assert isinstance(pub, rsa.RSAPublicKey)
        p = (padding.PSS(padding.MGF1(hashes.SHA256()), hashes.SHA256.digest_size)
             if pad == "pss" else padding.PKCS1v15())
        pub.verify(sig, data, p, hashes.SHA256())
    elif ktype.startswith("ecdsa"):
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        # transit signs P-384 with SHA-384 by default (curve strength), P-256 with SHA-256
        h = hashes.SHA384() if ktype.endswith("384") else hashes.SHA256()
        pub.verify(sig, data, ec.ECDSA(h))
    else:
        assert isinstance(pub, ed25519.Ed25519PublicKey)
        pub.verify(sig, data)


def test_signatures_verify_locally_and_deterministic_ones_match(fabric: Fabric) -> None:
    s1, s2 = fabric.servers
    with fabric.client(s1, "tenant-a") as a1, fabric.client(s2, "tenant-a") as a2:
        for ktype in SIGNERS:
            name = f"sig-{ktype}"
            a1.create_key(name, ktype, exportable=True)
            pads = ["pss", "pkcs1v15"] if ktype.startswith("rsa") else [None]
            for pad in pads:
                kw: dict[str, Any] = {"padding": pad} if pad else {}
                sig_blob = _until(lambda n=name, k=kw: a2.sign(n, b"to be signed", **k))
                version, sig = parse_signature(sig_blob)
                pem = a1.read_key(name)["public_keys"]
                pem_v = (pem.get(str(version)) or pem.get(version)).encode()  # type: ignore[union-attr]
                _local_verify(pem_v, ktype, b"to be signed", sig, pad or "")
                assert a1.verify(name, b"to be signed", sig_blob, **kw) is True
                assert a1.verify(name, b"to be signed!", sig_blob, **kw) is False
                priv = serialization.load_der_private_key(_material(a1, name, version), None)
                if pad == "pkcs1v15":
                    assert isinstance(priv, rsa.RSAPrivateKey)
                    assert sig == priv.sign(b"to be signed", padding.PKCS1v15(),
                                            hashes.SHA256())
                if ktype == "ed25519":
                    assert isinstance(priv, ed25519.Ed25519PrivateKey)
                    assert sig == priv.sign(b"to be signed")
                sigs = a2.batch("sign", name, [{"data": b"d%d" % i, **({"padding": pad} if pad
                                                                      else {})}
                                               for i in range(5)])
                for i, s in enumerate(sigs):
                    _local_verify(pem_v, ktype, b"d%d" % i, parse_signature(s)[1],  # type: ignore[arg-type]
                                  pad or "")


def test_rotation_min_version_rewrap_and_data_keys(fabric: Fabric) -> None:
    s1, s2 = fabric.servers
    with fabric.client(s1, "tenant-a") as a1, fabric.client(s2, "tenant-a") as a2:
        a1.create_key("rot", "aes256-gcm96")
        old = _until(lambda: a2.encrypt("rot", b"v1 data"))
        assert parse_ciphertext(old)[0] == 1
        a1.rotate_key("rot")

        def on_v2() -> bytes:
            blob = a2.encrypt("rot", b"v2 data")
            assert parse_ciphertext(blob)[0] == 2
            return blob
        new = _until(on_v2)  # the other server encrypts under the new version within 1 s
        assert a2.decrypt("rot", old) == b"v1 data"  # old ciphertexts still decrypt
        rewrapped = a1.rewrap("rot", old)
        assert parse_ciphertext(rewrapped)[0] == 2
        assert a2.decrypt("rot", rewrapped) == b"v1 data"
        a1.config_key("rot", min_decryption_version=2)

        def refused() -> None:  # the other server learns the new minimum within 1 s
            try:
                a2.decrypt("rot", old)
            except fe.KeyVersionRejected:
                return
            raise AssertionError("s2 still decrypts a version below the minimum")
        _until(refused)
        assert a2.decrypt("rot", new) == b"v2 data"
        # data keys: plaintext plus wrapped, and wrapped only
        plain, wrapped = a1.datakey("rot", bits=256)
        assert plain is not None and len(plain) == 32
        assert a2.decrypt("rot", wrapped) == plain
        none, wrapped2 = a2.datakey("rot", plaintext=False)
        assert none is None and len(a1.decrypt("rot", wrapped2)) == 32


def test_tenants_cannot_reach_each_other(fabric: Fabric) -> None:
    s1, s2 = fabric.servers
    with fabric.client(s1, "tenant-a") as a, fabric.client(s2, "tenant-b") as b:
        a.create_key("private-a", "aes256-gcm96", exportable=True)
        blob = a.encrypt("private-a", b"x")
        with contextlib.suppress(fe.KeyNotFound):
            _until(lambda: b.read_key("private-a") and None, 1.5)  # it never appears
        calls = {
            "encrypt": lambda k: b.encrypt(k, b"x"),
            "decrypt": lambda k: b.decrypt(k, blob),
            "read": lambda k: b.read_key(k),
            "rotate": lambda k: b.rotate_key(k),
            "export": lambda k: b.export_key(k),
            "delete": lambda k: b.delete_key(k),
        }
        for what, call in calls.items():
            errors = []
            for key in ("private-a", "no-such-key"):
                with pytest.raises(fe.KeyNotFound) as info:
                    call(key)
                errors.append(str(info.value).replace(key, "K"))
            assert errors[0] == errors[1], what  # same error, same text as a missing key
        assert "private-a" not in b.list_keys()


def _post_limits(c: Client, tenant: str, ops: float) -> None:
    c.set_tenant_limits(tenant, ops=ops)


def test_qos_limit_holds_under_a_saturating_neighbour_and_changes_live(fabric: Fabric
                                                                       ) -> None:
    """Acceptance 5: tenant B limited to N ops/s stays within +-5% of N over 10 s while
    tenant A saturates the same server; THROTTLED answers carry a retry time the client
    honours; the limit changes live."""
    s1 = fabric.servers[0]
    n = 400
    with fabric.client(s1, "admin") as admin, fabric.client(s1, "tenant-a") as a:
        a.create_key("qos-a", "aes256-gcm96")
        with fabric.client(s1, "tenant-b") as b:
            b.create_key("qos-b", "aes256-gcm96")
        admin.set_tenant_limits("tenant-b", ops=n)

        async def hammer(token: str, key: str, seconds: float, inflight: int) -> int:
            done = 0
            async with await AsyncClient.connect(s1.url, token=token, timeout=60) as c:
                stop = time.monotonic() + seconds

                async def worker() -> None:
                    nonlocal done
                    while time.monotonic() < stop:
                        await c.encrypt(key, b"x" * 64, timeout=30)
                        if time.monotonic() <= stop:
                            done += 1
                await asyncio.gather(*(worker() for _ in range(inflight)))
            return done

        async def run(seconds: float) -> tuple[int, int]:
            noisy, limited = await asyncio.gather(
                hammer(fabric.tokens["tenant-a"], "qos-a", seconds, 64),
                hammer(fabric.tokens["tenant-b"], "qos-b", seconds, 16))
            return noisy, limited

        noisy, limited = asyncio.run(run(10.0))
        rate = limited / 10.0
        print(f"QoS: limit {n}/s, limited tenant {rate:.1f}/s, neighbour {noisy / 10:.0f}/s")
        assert abs(rate - n) <= 0.05 * n, (rate, noisy)
        assert noisy / 10.0 > 2 * n  # the neighbour really was saturating
        admin.set_tenant_limits("tenant-b", ops=2 * n)  # live change
        _, limited = asyncio.run(run(3.0))
        assert abs(limited / 3.0 - 2 * n) <= 0.05 * 2 * n
        admin.set_tenant_limits("tenant-b", ops=0)


def test_one_gib_stream_round_trips_in_bounded_server_memory(fabric: Fabric) -> None:
    s1 = fabric.servers[0]
    with fabric.client(s1, "tenant-a") as a:
        a.create_key("bulk", "aes256-gcm96")
    piece = os.urandom(1 << 20)
    total = 1 << 30

    async def source() -> AsyncIterator[bytes]:
        for i in range(total // len(piece)):
            yield i.to_bytes(8, "big") + piece[8:]

    expect = hashlib.sha256()
    for i in range(total // len(piece)):
        expect.update(i.to_bytes(8, "big") + piece[8:])
    before = s1.rss_kib()

    async def run() -> tuple[bytes, int, int]:
        got = hashlib.sha256()
        n = 0
        peak = 0
        async with await AsyncClient.connect(s1.url, token=fabric.tokens["tenant-a"],
                                             timeout=120) as c:
            sealed = c.encrypt_stream("bulk", source())
            async for out in c.decrypt_stream("bulk", sealed):
                got.update(out)
                n += len(out)
                if n % (64 << 20) < len(out):
                    peak = max(peak, s1.rss_kib())
        return got.digest(), n, peak

    digest, n, peak = asyncio.run(run())
    assert n == total and digest == expect.digest()
    peak = max(peak, s1.rss_kib())
    print(f"1 GiB stream: server RSS {before // 1024} MiB before, {peak // 1024} MiB at most")
    assert (peak - before) < 64 * 1024, (before, peak)


def test_secrets_never_leak(fabric: Fabric) -> None:
    """Acceptance 2: tokens, key material and the master key appear in no log, error,
    metric, audit record or repr, and the database holds no plaintext key."""
    s1, s2 = fabric.servers
    with fabric.client(s1, "tenant-a") as a:
        a.create_key("leak-check", "aes256-gcm96", exportable=True)
        a.encrypt("leak-check", b"x")
        material = _material(a, "leak-check", 1)
        for bad in (b"garbage", b"\x01" * 40):
            with contextlib.suppress(Exception):
                a.decrypt("leak-check", bad)
        client_repr = repr(a)
    with contextlib.suppress(fe.Unauthorized), Client(s1.url, token="cpt_x_" + "A" * 43):
        pass
    metrics = b"".join(urllib.request.urlopen(f"http://{s.http}/metrics", timeout=10).read()
                       for s in (s1, s2))
    with open_keystore(fabric.dsn, fabric.master) as store:
        store.flush_audit()
        audit = json.dumps(store.audit_rows(), default=str).encode()
    logs = b"".join(s.log.read_bytes() for s in (s1, s2))
    secrets = [t.encode() for t in fabric.tokens.values()]
    secrets += [t.split("_", 2)[2].encode() for t in fabric.tokens.values()]
    secrets += [material, material.hex().encode(), base64.b64encode(material)]
    master_raw = fabric.master_file.read_text().strip().encode()
    secrets += [master_raw]
    dump = fabric.cluster.pg_dump("fabric_e2e")
    assert b"leak-check" in dump  # the dump is of the database the servers use
    for name, text in (("logs", logs), ("metrics", metrics), ("audit", audit), ("pg_dump", dump),
                       ("repr", client_repr.encode())):
        for s in secrets:
            assert s not in text, name


def test_server_killed_during_rotations_restarts_with_every_key_usable(fabric: Fabric
                                                                      ) -> None:
    """Acceptance 3: SIGKILL a server while a client rotates a key and encrypts under each
    new version; a restarted server (and the other one) decrypts every ciphertext it
    answered, and the key goes on at its newest version: a rotation is one transaction,
    there or not, never half."""
    import random
    import threading

    s1 = fabric.servers[0]
    victim = fabric.start_server("victim")
    with fabric.client(s1, "tenant-a") as a:
        a.create_key("kill-rot", "aes256-gcm96")
    answered: list[tuple[bytes, bytes]] = []
    stopped = threading.Event()

    def churn() -> None:
        try:
            with fabric.client(victim, "tenant-a") as c:
                for i in range(100_000):
                    c.rotate_key("kill-rot")
                    msg = b"message %d" % i
                    answered.append((msg, c.encrypt("kill-rot", msg)))
        except Exception:
            pass
        finally:
            stopped.set()

    t = threading.Thread(target=churn)
    t.start()
    time.sleep(random.uniform(0.5, 1.5))
    victim.proc.kill()
    victim.proc.wait(10)
    fabric.servers.remove(victim)
    assert stopped.wait(30)
    t.join()
    assert answered, "the server died before answering anything"
    reborn = fabric.start_server("victim-restarted")
    with fabric.client(reborn, "tenant-a") as r, fabric.client(s1, "tenant-a") as a:
        info = r.read_key("kill-rot")
        assert info["versions"] == list(range(1, info["latest_version"] + 1))
        for msg, blob in answered:
            assert r.decrypt("kill-rot", blob) == msg
            assert a.decrypt("kill-rot", blob) == msg
        fresh = r.encrypt("kill-rot", b"after")
        assert parse_ciphertext(fresh)[0] == info["latest_version"]
    print(f"rotations answered before SIGKILL: {len(answered)}, "
          f"versions afterwards: {info['latest_version']}")
