"""Every operation through a live server, in raw frames: answers match transit's."""

from __future__ import annotations

import base64
import hashlib

from serverwire import Running, Wire, message

from cryptoplane.fabric import codec as C
from cryptoplane.fabric.codec import Field, FrameType, Op, Status
from cryptoplane.fabric.service import Service
from cryptoplane.fabric.transit import wrap_for_import
from cryptoplane.keys import Key


def test_encrypt_decrypt_rewrap(server: Running, token: str, service: Service) -> None:
    with Wire(server.port, token) as w:
        assert w.welcome is not None and w.welcome["tenant"] == "acme"
        for key in (b"aes", b"chacha"):
            st, f = w.call(Op.ENCRYPT, key, {Field.DATA: b"hello"})
            assert st == 0 and f[Field.VERSION] == C.u32(1)
            ct = f[Field.CIPHERTEXT]
            assert service.transit.decrypt("acme", key.decode(), ct) == b"hello"
            st, f = w.call(Op.DECRYPT, key, {Field.CIPHERTEXT: ct})
            assert (st, f[Field.DATA]) == (0, b"hello")
            st, f = w.call(Op.REWRAP, key, {Field.CIPHERTEXT: ct})
            assert st == 0 and service.transit.decrypt("acme", key.decode(),
                                                       f[Field.CIPHERTEXT]) == b"hello"
        # the hot paths refuse what they cannot vouch for; the general path says why
        ct = w.call(Op.ENCRYPT, b"aes", {Field.DATA: b"v1"})[1][Field.CIPHERTEXT]
        assert w.call(Op.DECRYPT, b"aes", {Field.CIPHERTEXT: ct})[1][Field.DATA] == b"v1"
        bad = bytearray(ct)
        bad[-1] ^= 1
        assert w.call(Op.DECRYPT, b"aes", {Field.CIPHERTEXT: bytes(bad)})[0] == (
            Status.AUTHENTICATION_FAILED)
        future = ct[:1] + C.u32(9) + ct[5:]
        assert w.call(Op.DECRYPT, b"aes", {Field.CIPHERTEXT: future})[0] == (
            Status.KEY_VERSION_REJECTED)
        service.transit.rotate("acme", "aes")
        service.transit.config("acme", "aes", min_decryption_version=2)
        assert w.call(Op.DECRYPT, b"aes", {Field.CIPHERTEXT: ct})[0] == (
            Status.KEY_VERSION_REJECTED)
        st, f = w.call(Op.ENCRYPT, b"aes", {Field.DATA: b"v2"})
        assert (st, f[Field.VERSION]) == (0, C.u32(2))
        assert w.call(Op.DECRYPT, b"aes", {Field.CIPHERTEXT: f[Field.CIPHERTEXT]})[1][
            Field.DATA] == b"v2"
        # every use is audited with the principal, hot paths included
        uses = list(service.transit.source.uses)  # type: ignore[attr-defined]
        assert uses[-1].op == "decrypt" and uses[-1].principal.startswith("acme/")
        assert {u.op for u in uses} >= {"encrypt", "decrypt", "rewrap"}
        # aad: the general path
        st, f = w.call(Op.ENCRYPT, b"aes", {Field.DATA: b"x", Field.AAD: b"ctx"})
        ct = f[Field.CIPHERTEXT]
        st, f = w.call(Op.DECRYPT, b"aes", {Field.CIPHERTEXT: ct, Field.AAD: b"nope"})
        assert st == Status.AUTHENTICATION_FAILED
        st, f = w.call(Op.DECRYPT, b"aes", {Field.CIPHERTEXT: ct, Field.AAD: b"ctx"})
        assert (st, f[Field.DATA]) == (0, b"x")


def test_datakey_digest_random(server: Running, token: str, service: Service) -> None:
    with Wire(server.port, token) as w:
        st, f = w.call(Op.DATAKEY, b"aes", {})
        assert st == 0 and len(f[Field.PLAINTEXT]) == 32
        assert service.transit.decrypt("acme", "aes", f[Field.WRAPPED]) == f[Field.PLAINTEXT]
        st, f = w.call(Op.DATAKEY, b"aes", {Field.PLAINTEXT: b"\x00", Field.LENGTH: C.u32(128)})
        assert st == 0 and Field.PLAINTEXT not in f
        assert len(service.transit.decrypt("acme", "aes", f[Field.WRAPPED])) == 16
        st, f = w.call(Op.DIGEST, b"", {Field.DATA: b"abc"})
        assert (st, f[Field.DATA]) == (0, hashlib.sha256(b"abc").digest())
        st, f = w.call(Op.DIGEST, b"", {Field.DATA: b"abc", Field.ALGORITHM: b"sha3-256"})
        assert f[Field.DATA] == hashlib.sha3_256(b"abc").digest()
        st, f = w.call(Op.RANDOM, b"", {Field.LENGTH: C.u32(100)})
        assert st == 0 and len(f[Field.DATA]) == 100
        st, f = w.call(Op.RANDOM, b"", {Field.LENGTH: C.u32(0)})
        assert st == Status.INVALID_REQUEST


def test_sign_verify_hmac(server: Running, token: str) -> None:
    with Wire(server.port, token) as w:
        for key, extra in ((b"rsa", {}), (b"rsa", {Field.PADDING: b"pkcs1v15"}),
                           (b"ec", {}), (b"rsa", {Field.HASH: b"sha512"})):
            st, f = w.call(Op.SIGN, key, {Field.DATA: b"msg", **extra})
            assert st == 0, message(f)
            sig = f[Field.SIGNATURE]
            st, f = w.call(Op.VERIFY, key, {Field.DATA: b"msg", Field.SIGNATURE: sig, **extra})
            assert (st, f[Field.VALID]) == (0, b"\x01")
            st, f = w.call(Op.VERIFY, key, {Field.DATA: b"msh", Field.SIGNATURE: sig, **extra})
            assert (st, f[Field.VALID]) == (0, b"\x00")
        st, f = w.call(Op.HMAC, b"mac", {Field.DATA: b"m"})
        assert st == 0 and f[Field.VERSION] == C.u32(1)
        tag = f[Field.MAC]
        st, f = w.call(Op.VERIFY_HMAC, b"mac", {Field.DATA: b"m", Field.MAC: tag})
        assert f[Field.VALID] == b"\x01"
        st, f = w.call(Op.VERIFY_HMAC, b"mac", {Field.DATA: b"n", Field.MAC: tag})
        assert f[Field.VALID] == b"\x00"
        st, f = w.call(Op.SIGN, b"aes", {Field.DATA: b"m"})
        assert st == Status.INVALID_REQUEST


def test_key_management(server: Running, token: str, service: Service) -> None:
    with Wire(server.port, token) as w:
        st, d = w.json(Op.KEY_CREATE, b"new", {"type": "aes256-gcm96", "exportable": True})
        assert st == 0 and d["name"] == "new" and d["latest_version"] == 1
        st, d = w.json(Op.KEY_CREATE, b"new", {"type": "aes256-gcm96"})
        assert st == Status.KEY_EXISTS
        st, d = w.json(Op.KEY_CREATE, b"bad", {"type": "rot13"})
        assert st in (Status.INVALID_REQUEST, Status.NOT_SUPPORTED)
        st, d = w.json(Op.KEY_LIST)
        assert st == 0 and "new" in d["keys"] and "secret" not in d["keys"]
        st, d = w.json(Op.KEY_ROTATE, b"new")
        assert d["latest_version"] == 2
        st, d = w.json(Op.KEY_CONFIG, b"new", {"min_decryption_version": 2})
        assert st == 0 and d["min_decryption_version"] == 2
        st, d = w.json(Op.KEY_TRIM, b"new", {"min_version": 2})
        assert st == 0 and d["versions"] == [2]
        st, d = w.json(Op.KEY_EXPORT, b"new", {"version": "latest"})
        assert st == 0 and len(base64.b64decode(d["keys"]["2"])) == 32
        st, d = w.json(Op.KEY_EXPORT, b"aes")
        assert st == Status.POLICY_VIOLATION
        st, d = w.json(Op.KEY_READ, b"rsa")
        assert st == 0 and d["public_keys"]["1"].startswith("-----BEGIN PUBLIC KEY")
        st, d = w.json(Op.KEY_DELETE, b"aes")
        assert st == Status.POLICY_VIOLATION
        st, d = w.json(Op.KEY_DELETE, b"gone")
        assert (st, d) == (0, {})
        st, d = w.json(Op.KEY_READ, b"gone")
        assert st == Status.KEY_NOT_FOUND
        # BYOK: wrap material for the server's wrapping key, import it, use it
        st, d = w.json(Op.WRAPPING_KEY)
        assert st == 0
        material = bytes(range(32))
        wrapped = wrap_for_import(d["public_key"].encode(), material)
        st, d = w.json(Op.KEY_IMPORT, b"byok", {"type": "aes256-gcm96",
                                                "wrapped": base64.b64encode(wrapped).decode()})
        assert st == 0, d
        st, f = w.call(Op.ENCRYPT, b"byok", {Field.DATA: b"z"})
        ct = f[Field.CIPHERTEXT]
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        assert AESGCM(material).decrypt(ct[5:17], ct[17:], None) == b"z"


def test_sessions_match_local_plane(server: Running, token: str, service: Service) -> None:
    plane = service.plane
    with Wire(server.port, token) as w:
        material = bytes(32)
        st, f = w.call(Op.SESSION_OPEN, b"", {Field.ALGORITHM: b"aes-256-gcm",
                                              Field.KEY: material})
        assert st == 0
        sid = f[Field.SESSION]
        nonce = bytes(12)
        st, f = w.call(Op.RAW_ENCRYPT, b"", {Field.SESSION: sid, Field.DATA: b"abc",
                                             Field.NONCE: nonce, Field.AAD: b"a"})
        local = Key("aes-256-gcm", material)
        assert (st, f[Field.DATA]) == (0, plane.encrypt(local, b"abc", nonce, b"a"))
        ct = f[Field.DATA]
        st, f = w.call(Op.RAW_DECRYPT, b"", {Field.SESSION: sid, Field.DATA: ct,
                                             Field.NONCE: nonce, Field.AAD: b"a"})
        assert (st, f[Field.DATA]) == (0, b"abc")
        st, f = w.call(Op.RAW_DECRYPT, b"", {Field.SESSION: sid, Field.DATA: ct,
                                             Field.NONCE: nonce, Field.AAD: b"b"})
        assert st == Status.AUTHENTICATION_FAILED
        # an asymmetric session: PKCS#8 DER in, deterministic PKCS#1 v1.5 signatures
        rsa = Key.generate("rsa-pkcs1v15-sha256")
        st, f = w.call(Op.SESSION_OPEN, b"", {Field.ALGORITHM: b"rsa-pkcs1v15-sha256",
                                              Field.KEY: rsa.export_der()})
        assert st == 0
        rid = f[Field.SESSION]
        st, f = w.call(Op.RAW_SIGN, b"", {Field.SESSION: rid, Field.DATA: b"m"})
        assert (st, f[Field.SIGNATURE]) == (0, plane.sign(rsa, b"m"))
        st, f = w.call(Op.RAW_VERIFY, b"", {Field.SESSION: rid, Field.DATA: b"m",
                                            Field.SIGNATURE: f[Field.SIGNATURE]})
        assert st == 0
        st, f = w.call(Op.RAW_VERIFY, b"", {Field.SESSION: rid, Field.DATA: b"n",
                                            Field.SIGNATURE: bytes(256)})
        assert st == Status.INVALID_SIGNATURE
        # MAC sessions
        st, f = w.call(Op.SESSION_OPEN, b"", {Field.ALGORITHM: b"hmac-sha256",
                                              Field.KEY: b"k" * 32})
        mid = f[Field.SESSION]
        st, f = w.call(Op.RAW_MAC, b"", {Field.SESSION: mid, Field.DATA: b"d"})
        tag = f[Field.MAC]
        assert tag == plane.mac(Key("hmac-sha256", b"k" * 32), b"d")
        st, f = w.call(Op.RAW_VERIFY_MAC, b"", {Field.SESSION: mid, Field.DATA: b"d",
                                                Field.MAC: tag})
        assert st == 0
        st, f = w.call(Op.RAW_VERIFY_MAC, b"", {Field.SESSION: mid, Field.DATA: b"e",
                                                Field.MAC: tag})
        assert st == Status.AUTHENTICATION_FAILED
        st, f = w.call(Op.SESSION_CLOSE, b"", {Field.SESSION: sid})
        assert st == 0
        st, f = w.call(Op.RAW_ENCRYPT, b"", {Field.SESSION: sid, Field.DATA: b"abc",
                                             Field.NONCE: nonce})
        assert st == Status.KEY_REJECTED
        st, f = w.call(Op.SESSION_OPEN, b"", {Field.ALGORITHM: b"aes-256-gcm",
                                              Field.KEY: b"short"})
        assert st == Status.KEY_REJECTED


def test_batches(server: Running, token: str, service: Service) -> None:
    with Wire(server.port, token) as w:
        items = [{Field.DATA: bytes([i]) * 10} for i in range(50)]
        items.insert(7, {Field.AAD: b"no data"})  # a bad item fails alone
        items.insert(9, {Field.DATA: b"with aad", Field.AAD: b"a"})
        f = w.batch(Op.ENCRYPT, b"aes", items)
        assert f.type == FrameType.BATCH_RESPONSE and f.status == 0
        results = C.decode_batch_response(f.payload)
        assert len(results) == 52
        assert results[7][0] == Status.INVALID_REQUEST
        cts = []
        for i, (st, raw) in enumerate(results):
            if i == 7:
                continue
            assert st == 0
            cts.append(C.decode_fields(raw)[Field.CIPHERTEXT])
        f = w.batch(Op.DECRYPT, b"aes", [{Field.CIPHERTEXT: c} for c in cts] + [
            {Field.CIPHERTEXT: b"garbage"}])
        results = C.decode_batch_response(f.payload)
        # the item encrypted with aad fails without it, alone
        assert [st for st, _ in results[:-1]] == [0] * 8 + [Status.AUTHENTICATION_FAILED] + [
            0] * 42
        assert results[-1][0] == Status.INVALID_REQUEST
        assert C.decode_fields(results[0][1])[Field.DATA] == b"\x00" * 10
        # the whole batch fails for a missing key: one RESPONSE
        f = w.batch(Op.ENCRYPT, b"missing", [{Field.DATA: b"x"}])
        assert (f.type, f.status) == (FrameType.RESPONSE, Status.KEY_NOT_FOUND)
        # sign at the workers; digests item by item
        f = w.batch(Op.SIGN, b"ec", [{Field.DATA: b"a"}, {Field.DATA: b"b"}])
        results = C.decode_batch_response(f.payload)
        assert [st for st, _ in results] == [0, 0]
        f = w.batch(Op.DIGEST, b"", [{Field.DATA: b"a"}, {Field.ALGORITHM: b"md5",
                                                           Field.DATA: b"b"}])
        results = C.decode_batch_response(f.payload)
        assert results[0] == (0, C.encode_fields({Field.DATA: hashlib.sha256(b"a").digest()}))
        assert results[1][0] == Status.INVALID_REQUEST
        # a count that does not add up: the batch is refused, the connection lives
        fid = next(w.ids)
        w.send(C.encode_frame(FrameType.BATCH, fid, op=Op.ENCRYPT, key=b"aes",
                              payload=C.u32(5)))
        f = w.recv()
        assert (f.id, f.status) == (fid, Status.INVALID_REQUEST)
        st, _ = w.call(Op.ENCRYPT, b"aes", {Field.DATA: b"still here"})
        assert st == 0
        f = w.batch(Op.KEY_CREATE, b"x", [{}])
        assert f.status == Status.NOT_SUPPORTED


def test_pipelined_answers_all_arrive(server: Running, token: str) -> None:
    with Wire(server.port, token) as w:
        frames = []
        for i in range(1, 501):
            op = Op.SIGN if i % 50 == 0 else Op.ENCRYPT
            key = b"ec" if op == Op.SIGN else b"aes"
            frames.append(C.encode_frame(FrameType.REQUEST, i, op=op, key=key,
                                         payload=C.encode_fields({Field.DATA: b"x" * 64})))
        w.send(b"".join(frames))
        got = {w.recv().id for _ in range(500)}
        assert got == set(range(1, 501))


def test_ping_and_unknown_op(server: Running, token: str) -> None:
    with Wire(server.port, token) as w:
        w.send(C.encode_frame(FrameType.PING, 77, payload=b"hi"))
        f = w.recv()
        assert (f.type, f.id, f.payload) == (FrameType.PONG, 77, b"hi")
        st, f = w.call(999, b"", {})
        assert st == Status.NOT_SUPPORTED
        st, f = w.call(Op.ENCRYPT, b"aes", payload=b"\x63\x00\x00\x00\x00")
        assert st == Status.INVALID_REQUEST  # unknown field tag
