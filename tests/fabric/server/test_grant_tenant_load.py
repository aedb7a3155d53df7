"""What a server counts per tenant under grants (``GrantTable.tenant_load``): each
tenant's admitted ops and bytes per class, its grants sharing one table, refusals and
refunds not counted, the busiest tenants reported, idle ones forgotten."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cryptoplane.fabric.capability import GrantClaims, key_id, public_key_b64, sign_grant
from cryptoplane.fabric.grants import GrantEntry, GrantTable

KEY = Ed25519PrivateKey.generate()
NOW = 1_800_000_000.0
RATES = {"rsa2048": (100.0, 0.0), "aead": (1e6, 1e9)}


def _table() -> tuple[GrantTable, list[float]]:
    t = [100.0]
    wall = [NOW]
    table = GrantTable("s1", keys={key_id(KEY.public_key()): public_key_b64(
        KEY.public_key())}, clock=lambda: t[0], wall=lambda: wall[0])
    return table, t


def _enter(table: GrantTable, grant_id: str, tenant: str,
           rates: dict[str, tuple[float, float]] = RATES) -> GrantEntry:
    return table.present(sign_grant(KEY, GrantClaims(
        grant_id=grant_id, tenant=tenant, expires_at=NOW + 60, issued_at=NOW,
        servers={"s1": rates})), tenant)


def test_two_tenants_split() -> None:
    table, t = _table()
    a1, a2, b = _enter(table, "a1", "a"), _enter(table, "a2", "a"), _enter(table, "b1", "b")
    assert a1.by_tenant is a2.by_tenant is not b.by_tenant  # one table per tenant
    assert table.tenant_load() == {}  # nothing served yet: nobody reported
    for _ in range(2):  # the rsa2048 burst (20 ms at 100/s): 2 each
        assert a1.admit("rsa2048", 1, 0) == 0.0
    assert a1.admit("rsa2048", 1, 0) > 0  # refused: not counted
    assert a2.admit("aead", 3, 300) == 0.0
    assert b.admit("aead", 5, 1000) == 0.0
    assert b.admit("aead", 1, 100) == 0.0
    b.refund("aead", 1, 100)  # refused by another limit after: not counted
    t[0] += 2.0
    assert table.tenant_load() == {
        "a": {"rsa2048": {"ops": 1.0, "bytes": 0.0}, "aead": {"ops": 1.5, "bytes": 150.0}},
        "b": {"aead": {"ops": 2.5, "bytes": 500.0}}}
    # the per-class totals count the same requests
    assert table.load() == {"rsa2048": {"ops": 1.0, "bytes": 0.0},
                            "aead": {"ops": 4.0, "bytes": 650.0}}
    t[0] += 1.0
    assert b.admit("aead", 1, 10) == 0.0
    t[0] += 1.0
    assert table.tenant_load() == {"b": {"aead": {"ops": 0.5, "bytes": 5.0}}}


def test_busiest_reported_and_idle_forgotten() -> None:
    table, t = _table()
    entries = [_enter(table, f"g{i}", f"t{i}") for i in range(10)]
    for i, e in enumerate(entries):
        assert e.admit("aead", i + 1, 0) == 0.0
    t[0] += 1.0
    top = table.tenant_load(limit=3)
    assert sorted(top) == ["t7", "t8", "t9"] and top["t9"]["aead"]["ops"] == 10.0
    # the rest were counted and reset too: nothing left for the next interval
    t[0] += 1.0
    assert table.tenant_load() == {}
    assert len(table._tenants) == 10  # idle, but their grants are held
    assert table.revoke([f"g{i}" for i in range(9)]) == 9
    t[0] += 1.0
    assert table.tenant_load() == {}
    assert list(table._tenants) == ["t9"]
    # a tenant forgotten and back starts a new table; its old entries are gone
    again = _enter(table, "g0b", "t0")
    assert again.admit("aead", 2, 20) == 0.0
    t[0] += 2.0
    assert table.tenant_load() == {"t0": {"aead": {"ops": 1.0, "bytes": 10.0}}}


def test_default_bound() -> None:
    table, t = _table()
    for i in range(300):
        assert _enter(table, f"g{i}", f"t{i}").admit("aead", 1, i) == 0.0
    t[0] += 1.0
    got = table.tenant_load()
    assert len(got) == 256
    assert "t299" in got and "t0" not in got  # equal ops: more bytes first
