"""Issue 17, acceptance 1 and 2, end to end: two ``cryptoplane manager`` processes on one
PostgreSQL (the tests' own cluster), three ``cryptoplane server --manager`` processes,
four clients of two tenants placed by grants.

Each client's results are compared with what the library computes locally: deterministic
signatures (RSA PKCS#1 v1.5, Ed25519) byte for byte against the exported key, AEAD
ciphertexts opened locally, and the plane's remote engine against the inline engine.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pg import PostgresCluster
from poolkit import PoolFabric

import cryptoplane as cp
from cryptoplane.fabric import errors as fe
from cryptoplane.fabric.client import AsyncClient
from cryptoplane.fabric.granted import connect_managed
from cryptoplane.fabric.manager.client import ManagerClient
from cryptoplane.fabric.manager.protocol import QuotaRequest
from cryptoplane.fabric.pool import Pool
from cryptoplane.fabric.transit import parse_ciphertext, parse_signature

CAPACITY = "rsa2048=600,ed25519=3000,aead=200000:1e9"


@pytest.fixture(scope="module")
def pool(pg_cluster: PostgresCluster, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[PoolFabric]:
    f = PoolFabric.create(pg_cluster, tmp_path_factory.mktemp("pool-e2e"),
                          database="fabric_pool_e2e", lease=2.0)
    try:
        f.start_manager("m1", overcommit=1.5)
        f.start_manager("m2", overcommit=1.5)
        # s1, s2 register through both managers' list; s3 measures its own capacity
        f.start_server("s1", capacity=CAPACITY)
        f.start_server("s2", capacity=CAPACITY)
        f.start_server("s3")
        f.wait_servers({"s1", "s2", "s3"})
        yield f
    finally:
        f.close()


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def _material(raw: dict[str, Any], version: int = 1) -> bytes:
    keys = raw["keys"]
    value = keys.get(str(version), keys.get(version))
    return base64.b64decode(value)


async def _admin_keys(pool: PoolFabric) -> dict[str, bytes]:
    """Keys made through a server without a grant (key management needs none) and
    exported, for the local comparisons."""
    url = pool.servers["s1"].url
    out: dict[str, bytes] = {}
    async with await AsyncClient.connect(url, token=pool.tokens["tenant-a"]) as a:
        for name, ktype in (("a-rsa", "rsa-2048"), ("a-aes", "aes256-gcm96")):
            await a.create_key(name, ktype, exportable=True)
            out[name] = _material(await a.export_key(name))
        # data without a grant: refused, the server serves granted clients only
        with pytest.raises(fe.Forbidden):
            await a.encrypt("a-aes", b"x")
    async with await AsyncClient.connect(url, token=pool.tokens["tenant-b"]) as b:
        for name, ktype in (("b-ed", "ed25519"), ("b-aes", "aes256-gcm96")):
            await b.create_key(name, ktype, exportable=True)
            out[name] = _material(await b.export_key(name))
    return out


def test_four_clients_of_two_tenants_placed_by_grants(pool: PoolFabric) -> None:
    keys = _run(_admin_keys(pool))
    m1 = "manager://" + pool.managers["m1"].url.removeprefix("tcp://")
    m2 = "manager://" + pool.managers["m2"].url.removeprefix("tcp://")
    live = {"s1", "s2", "s3"}

    async def tenant_a_transit() -> dict[str, Any]:
        # client 1: tenant a through manager 1, least-loaded over its grant's servers
        async with await connect_managed(
                m1, token=pool.tokens["tenant-a"], label="a1",
                quota={"rsa2048": {"ops": 200}, "aead": {"ops": 2000}},
                key_classes={"a-rsa": "rsa2048", "a-aes": "aead"}) as c:
            grant = c.grant
            assert grant is not None and grant.tenant == "tenant-a"
            assert {s.server_id for s in grant.servers} <= live
            assert len(grant.servers) == 2
            priv = serialization.load_der_private_key(keys["a-rsa"], None)
            assert isinstance(priv, rsa.RSAPrivateKey)
            for i in range(20):
                msg = b"message %d" % i
                blob = await c.sign("a-rsa", msg, padding="pkcs1v15")
                _, sig = parse_signature(blob)
                assert sig == priv.sign(msg, padding.PKCS1v15(), hashes.SHA256())
                ct = await c.encrypt("a-aes", msg, aad=b"a1")
                _, nonce, body = parse_ciphertext(ct)
                assert AESGCM(keys["a-aes"]).decrypt(nonce, bytes(body), b"a1") == msg
            used = {u for u, n in c.per_server_counts().items() if n.get("sent", 0)}
            return {"grant": grant, "used": used,
                    "addresses": {s.address for s in grant.servers}}

    async def tenant_b_transit() -> dict[str, Any]:
        # client 3: tenant b through manager 2, round-robin
        async with await connect_managed(
                m2, token=pool.tokens["tenant-b"], label="b1", placement="round-robin",
                quota={"ed25519": {"ops": 500}}) as c:
            grant = c.grant
            assert grant is not None and grant.tenant == "tenant-b"
            priv = serialization.load_der_private_key(keys["b-ed"], None)
            assert isinstance(priv, ed25519.Ed25519PrivateKey)
            for i in range(20):
                msg = b"b message %d" % i
                _, sig = parse_signature(await c.sign("b-ed", msg))
                assert sig == priv.sign(msg)
            # another tenant's key is as missing as a missing one, grant or not
            with pytest.raises(fe.KeyNotFound):
                await c.sign("a-rsa", b"x")
            used = {u for u, n in c.per_server_counts().items() if n.get("sent", 0)}
            return {"grant": grant, "used": used,
                    "addresses": {s.address for s in grant.servers}}

    def plane_client(tenant: str, manager: str, label: str) -> dict[str, Any]:
        # clients 2 and 4: planes whose remote engine holds a grant; results equal the
        # inline engine's byte for byte
        quota = {"rsa2048": {"ops": 100}, "aead": {"ops": 1000}}
        with cp.Plane(engines=["inline"], remote=manager, quota=quota,
                      token=pool.tokens[tenant]) as plane, \
                cp.Plane(engines=["inline"]) as local:
            remote = next(e for e in plane.engines.values() if not e.traits.local)
            rsa_key = cp.Key.generate("rsa-pkcs1v15-sha256")
            aes_key = cp.Key.generate("aes-256-gcm")
            for key in (rsa_key, aes_key):
                plane.session(key, engine=remote.name)
            before = remote.counters()["sent"]
            for i in range(10):
                msg = b"%s %d" % (label.encode(), i)
                req: cp.Request = cp.Sign(rsa_key, msg)
                assert plane.run(req) == local.run(req)
                req = cp.Encrypt(aes_key, msg, nonce=os.urandom(12), aad=b"x")
                assert plane.run(req) == local.run(req)
            assert remote.counters()["sent"] - before >= 20
            return remote.describe()

    a1 = _run(tenant_a_transit())
    b1 = _run(tenant_b_transit())
    assert a1["used"] and a1["used"] <= a1["addresses"]
    assert b1["used"] and b1["used"] <= b1["addresses"]
    plane_client("tenant-a", m2, "a2")
    plane_client("tenant-b", pool.manager_url, "b2")

    # the operator's view: what the test set up
    st = pool.status()
    assert {s["server_id"] for s in st["servers"]} == live
    by_id = {s["server_id"]: s for s in st["servers"]}
    assert by_id["s1"]["capacity"]["rsa2048"]["ops"] == 600
    assert by_id["s1"]["address"] == pool.servers["s1"].url
    # s3 measured itself at start: every class, above zero
    assert by_id["s3"]["capacity"]["rsa2048"]["ops"] > 0
    assert by_id["s3"]["capacity"]["aead"]["bytes"] > 0
    assert st["capacity"]["rsa2048"]["ops"] == pytest.approx(
        1200 + by_id["s3"]["capacity"]["rsa2048"]["ops"])
    table = pool.status_table()
    for sid in live:
        assert sid in table
    assert "rsa2048" in table


def test_admission_up_to_capacity_times_overcommit(pool: PoolFabric) -> None:
    """Acceptance 2: grants up to C x overcommit, then a refusal that says what is left;
    a release frees its share; an expired grant's token is refused by the servers."""
    async def go() -> None:
        mc = await ManagerClient.connect(pool.manager_url, token=pool.tokens["tenant-a"])
        try:
            st = await mc.status()
            c = st["capacity"]["ed25519"]["ops"]
            left = st["left"]["ed25519"]["ops"]
            assert left == pytest.approx(c * 1.5 - st["granted"].get(
                "ed25519", {"ops": 0})["ops"])
            share = left / 4
            grants = [await mc.request_grant(QuotaRequest(
                quota={"ed25519": {"ops": share}}, label=f"fill {i}")) for i in range(4)]
            with pytest.raises(fe.QuotaRefused) as refused:
                await mc.request_grant(QuotaRequest(quota={"ed25519": {"ops": 10}}))
            assert refused.value.left["ed25519"]["ops"] == pytest.approx(0, abs=1e-6)
            assert "ed25519" in str(refused.value)
            first = grants[0].grant
            assert first is not None
            await mc.release(first.grant_id)
            again = await mc.request_grant(QuotaRequest(quota={"ed25519": {"ops": share}}))
            assert again.granted
            for g in [*grants[1:], again]:
                assert g.grant is not None
                await mc.release(g.grant.grant_id)

            # a grant past its expiry: the server refuses its token in HELLO
            short = await mc.request_grant(QuotaRequest(quota={"ed25519": {"ops": 5}},
                                                        ttl=1.0))
            assert short.grant is not None
            url = short.grant.servers[0].address
            ok = Pool([url], token=pool.tokens["tenant-a"], connections=1, timeout=5)
            ok.hello_extra = {"grant": short.token}
            await ok.start()
            await ok.close()
            time.sleep(1.2)
            late = Pool([url], token=pool.tokens["tenant-a"], connections=1, timeout=5)
            late.hello_extra = {"grant": short.token}
            with pytest.raises(fe.Unauthorized) as refused_hello:
                await late.start()
            assert "expired" in str(refused_hello.value)
        finally:
            await mc.close()

    _run(go())


def test_status_json_names_managers_leases_and_grants(pool: PoolFabric,
                                                      tmp_path: Path) -> None:
    st = pool.status()
    for s in st["servers"]:
        assert 0 <= s["lease_age"] < 2 * pool.lease
    assert st["lease_seconds"] == pytest.approx(pool.lease)
    assert st["overcommit"] == pytest.approx(1.5)
