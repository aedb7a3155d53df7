"""The client against the real server (in this process, over a SQLite keystore): every
method round trip, batches, throttling, deadlines, GOAWAY and a restarted server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from realserver import RealServer

from cryptoplane.exceptions import AuthenticationFailed, InvalidRequest, Timeout
from cryptoplane.fabric import AsyncClient, Client, codec
from cryptoplane.fabric.errors import (
    ConnectionLost,
    KeyExists,
    KeyNotFound,
    KeyVersionRejected,
    PolicyViolation,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealServer]:
    with RealServer(tmp_path_factory.mktemp("srv")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: RealServer) -> Iterator[Client]:
    with Client(server.url, token=server.token()) as c:
        yield c


def test_capabilities(client: Client) -> None:
    caps = client.capabilities
    assert caps["tenant"] == "acme" and caps["version"] == 1
    assert "aes256-gcm96" in caps["key_types"] and caps["limits"]["max_in_flight"] > 0


def test_encrypt_decrypt_rewrap_with_aad_and_versions(client: Client) -> None:
    client.create_key("enc", "aes256-gcm96")
    ct = client.encrypt("enc", b"secret", aad=b"hdr")
    assert client.decrypt("enc", ct, aad=b"hdr") == b"secret"
    with pytest.raises(AuthenticationFailed):
        client.decrypt("enc", ct, aad=b"other")
    with pytest.raises(KeyExists):
        client.create_key("enc", "aes256-gcm96")
    assert client.rotate_key("enc")["latest_version"] == 2
    ct2 = client.rewrap("enc", ct, aad=b"hdr")
    assert ct2 != ct and client.decrypt("enc", ct2, aad=b"hdr") == b"secret"
    v1 = client.encrypt("enc", b"old", version=1)
    client.config_key("enc", min_decryption_version=2)
    with pytest.raises(KeyVersionRejected):
        client.decrypt("enc", v1)
    assert client.trim_key("enc", 2)["min_available_version"] == 2
    with pytest.raises(KeyNotFound):
        client.encrypt("missing", b"x")


def test_derived_keys_need_a_context(client: Client) -> None:
    client.create_key("der", "aes256-gcm96", derived=True)
    ct = client.encrypt("der", b"x", context=b"user-1")
    assert client.decrypt("der", ct, context=b"user-1") == b"x"
    with pytest.raises(AuthenticationFailed):
        client.decrypt("der", ct, context=b"user-2")
    with pytest.raises(InvalidRequest):
        client.encrypt("der", b"x")


def test_datakeys(client: Client) -> None:
    client.create_key("dk", "aes256-gcm96")
    plain, wrapped = client.datakey("dk", bits=256)
    assert plain is not None and len(plain) == 32
    assert client.decrypt("dk", wrapped) == plain
    none, wrapped2 = client.datakey("dk", plaintext=False, bits=128)
    assert none is None and len(client.decrypt("dk", wrapped2)) == 16


def _public(client: Client, name: str) -> object:
    pem = client.read_key(name)["public_keys"]["1"]
    return serialization.load_pem_public_key(pem.encode())


def test_signatures_of_every_key_type_verify_locally(client: Client) -> None:
    msg = b"message"
    for name, kind in (("rsa", "rsa-2048"), ("ec", "ecdsa-p256"), ("ed", "ed25519")):
        client.create_key(name, kind)
        blob = client.sign(name, msg)
        assert client.verify(name, msg, blob)
        assert not client.verify(name, b"other", blob)
        assert isinstance(_public(client, name), (rsa.RSAPublicKey,
                                                  ec.EllipticCurvePublicKey,
                                                  ed25519.Ed25519PublicKey))
    pk = client.sign("rsa", msg, padding="pkcs1v15", hash="sha384")
    assert client.verify("rsa", msg, pk, padding="pkcs1v15", hash="sha384")
    digest = hashlib.sha256(msg).digest()
    pre = client.sign("ec", digest, prehashed=True)
    assert client.verify("ec", msg, pre)
    assert client.verify("ec", digest, pre, prehashed=True)


def test_hmac_digest_random(client: Client) -> None:
    client.create_key("mac", "hmac")
    tag = client.hmac("mac", b"data")
    assert client.verify_hmac("mac", b"data", tag)
    assert not client.verify_hmac("mac", b"datb", tag)
    assert client.hmac("mac", b"data", algorithm="sha512") != tag
    assert client.digest(b"abc") == hashlib.sha256(b"abc").digest()
    assert client.digest(b"abc", "sha3-256") == hashlib.sha3_256(b"abc").digest()
    r = client.random(64)
    assert len(r) == 64 and r != client.random(64)


def test_batches_answer_item_by_item(client: Client) -> None:
    client.create_key("b", "aes256-gcm96")
    items: list[dict[str, object]] = [{"data": b"%d" % i} for i in range(100)]
    cts = client.batch("encrypt", "b", items)
    assert all(isinstance(c, bytes) for c in cts)
    back = client.batch("decrypt", "b", [{"ciphertext": c} for c in cts]
                        + [{"ciphertext": b"garbage"}])
    assert back[:100] == [b"%d" % i for i in range(100)]
    assert isinstance(back[100], Exception)
    client.create_key("bs", "ed25519")
    sigs = client.batch("sign", "bs", [{"data": b"a"}, {"data": b"b"}])
    oks = client.batch("verify", "bs", [{"data": b"a", "signature": sigs[0]},
                                        {"data": b"a", "signature": sigs[1]}])
    assert oks == [True, False]
    with pytest.raises(InvalidRequest):
        client.batch("digest", "b", [])
    many = client.batch("encrypt", "b", [{"data": b"%d" % i} for i in range(25_000)])
    assert len(many) == 25_000  # three batches of at most 10,000
    assert client.batch("decrypt", "b", [{"ciphertext": many[-1]}]) == [b"24999"]


def test_key_management(client: Client) -> None:
    client.create_key("exp", "aes256-gcm96", exportable=True, deletion_allowed=True)
    assert "exp" in client.list_keys()
    assert client.read_key("exp")["exportable"] is True
    material = client.export_key("exp")["keys"]
    assert len(material) == 1
    client.create_key("noexp", "aes256-gcm96")
    with pytest.raises(PolicyViolation):
        client.export_key("noexp")
    with pytest.raises(PolicyViolation):
        client.delete_key("noexp")
    client.delete_key("exp")
    assert "exp" not in client.list_keys()
    pem = client.wrapping_key()
    assert b"BEGIN PUBLIC KEY" in pem
    own = bytes(range(32))
    client.import_key("byok", "aes256-gcm96", material=own, exportable=True)
    ct = client.encrypt("byok", b"x")
    assert client.decrypt("byok", ct) == b"x"
    exported = client.export_key("byok", 1)["keys"]
    assert base64.b64decode(next(iter(exported.values()))) == own


def test_streams_round_trip_in_pieces(client: Client) -> None:
    client.create_key("st", "aes256-gcm96")
    data = bytes(range(256)) * 12_000  # ~3 MiB: several pieces
    sealed = b"".join(client.encrypt_stream("st", io.BytesIO(data)))
    assert len(sealed) > len(data)
    pieces = [sealed[i:i + 100_000] for i in range(0, len(sealed), 100_000)]
    assert b"".join(client.decrypt_stream("st", pieces)) == data
    assert b"".join(client.decrypt_stream("st", sealed)) == data  # bytes as the source
    bad = bytearray(sealed)
    bad[-5] ^= 1
    with pytest.raises(AuthenticationFailed):
        b"".join(client.decrypt_stream("st", [bytes(bad)]))


def test_raw_sessions(client: Client) -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    key = bytes(32)
    s = client.open_session("aes-256-gcm", key)
    nonce = bytes(12)
    out = client.raw("encrypt", s, {codec.Field.DATA: b"abc", codec.Field.NONCE: nonce})
    assert out[codec.Field.DATA] == AESGCM(key).encrypt(nonce, b"abc", None)
    client.close_session(s)


def test_request_and_low_level_fields(client: Client) -> None:
    out = client.request(codec.Op.DIGEST, "", {codec.Field.DATA: b"x"})
    assert out[codec.Field.DATA] == hashlib.sha256(b"x").digest()


def test_a_deadline_ends_a_request_with_timeout(client: Client) -> None:
    with pytest.raises(Timeout):
        client.create_key("slow", "rsa-4096", timeout=0.001)


def test_throttled_requests_wait_and_succeed(server: RealServer, client: Client) -> None:
    client.create_key("thr", "aes256-gcm96")
    token = server.token("slowco")
    with Client(server.url, token=token) as c:
        c.create_key("thr", "aes256-gcm96")
        client.set_tenant_limits("slowco", ops=100)
        try:
            t0 = time.monotonic()
            for _ in range(150):
                c.encrypt("thr", b"x", timeout=10)
            took = time.monotonic() - t0
            assert c.counters["throttled"] > 0
            assert took > 0.3
        finally:
            client.set_tenant_limits("slowco", ops=0)


def test_goaway_during_load_and_reconnect_after_restart(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    a = RealServer(tmp_path / "a").start()
    b = RealServer(tmp_path / "a", master=a.master).start()  # the same keystore
    token = a.token()

    async def main() -> None:
        async with await AsyncClient.connect([a.url, b.url], token=token) as c:
            await c.create_key("g", "aes256-gcm96")
            while c.live_connections < 4:  # both servers' connections are up
                await asyncio.sleep(0.01)
            tasks = [asyncio.ensure_future(c.encrypt("g", b"%d" % i)) for i in range(3000)]
            await asyncio.sleep(0.01)
            await asyncio.get_running_loop().run_in_executor(None, a.stop, 2.0)
            cts = await asyncio.gather(*tasks)
            assert len(cts) == 3000
            assert await c.decrypt("g", cts[-1]) == b"2999"
            assert c.counters["goaways"] >= 1
            # b restarts on its port: the pool reconnects and requests carry on
            port = b.port
            await asyncio.get_running_loop().run_in_executor(None, b.stop, 0.0)
            later = asyncio.ensure_future(c.decrypt("g", cts[0], timeout=20))
            await asyncio.sleep(0.3)
            b.port = port
            await asyncio.get_running_loop().run_in_executor(None, b.start)
            assert await later == b"0"
            assert c.counters["reconnects"] >= 1

    try:
        asyncio.run(main())
    finally:
        a.close()
        b.close()


def test_a_unix_socket_url(tmp_path: Path) -> None:
    sock = tmp_path / "cp.sock"
    with RealServer(tmp_path, unix=str(sock)) as s, Client(f"unix://{sock}",
                                                           token=s.token()) as c:
        assert c.digest(b"u") == hashlib.sha256(b"u").digest()


def test_a_stream_larger_than_its_window_with_a_slow_reader(client: Client) -> None:
    client.create_key("big", "aes256-gcm96")
    piece = bytes(range(256)) * 4096  # 1 MiB
    pieces = 12
    out = client.encrypt_stream("big", (piece for _ in range(pieces)))
    sealed = []
    for chunk in out:
        sealed.append(chunk)
        time.sleep(0.005)  # a slow reader: the sender waits on the window
    back = b"".join(client.decrypt_stream("big", sealed))
    assert len(back) == pieces * len(piece) and back[:len(piece)] == piece


def test_a_stream_whose_server_dies_raises_connection_lost(tmp_path: Path) -> None:
    srv = RealServer(tmp_path).start()
    try:
        async def main() -> None:
            async with await AsyncClient.connect(srv.url, token=srv.token()) as c:
                await c.create_key("s", "aes256-gcm96")
                stop = asyncio.Event()

                async def source() -> AsyncIterator[bytes]:
                    yield b"x" * 100_000
                    await stop.wait()  # never ends by itself
                    yield b""

                got = c.encrypt_stream("s", source())
                first = await got.__anext__()
                assert first
                await asyncio.get_running_loop().run_in_executor(None, srv.stop, 0.0)
                with pytest.raises(ConnectionLost):
                    async for _ in got:
                        pass
        asyncio.run(main())
    finally:
        srv.close()


def test_connects_and_pipelines_from_a_uvloop_loop(server: RealServer) -> None:
    """uvloop's transports are not ``asyncio.Transport`` subclasses: the client must take
    them as they are (it once asserted the class and could not connect)."""
    import uvloop  # a dependency of the package: never missing
    token = server.token()

    async def main() -> None:
        async with await AsyncClient.connect(server.url, token=token) as c:
            await c.create_key("uv", "aes256-gcm96")
            cts = await asyncio.gather(*(c.encrypt("uv", b"%d" % i) for i in range(200)))
            assert await c.decrypt("uv", cts[-1]) == b"199"
            assert c.live_connections >= 1

    uvloop.run(main())
