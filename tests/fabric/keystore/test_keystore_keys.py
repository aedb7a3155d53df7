"""Keys: every call's round trip, policy rules, tenant isolation, concurrent rotation."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import pytest

from cryptoplane.exceptions import InvalidRequest
from cryptoplane.fabric.errors import KeyExists, KeyNotFound, PolicyViolation
from cryptoplane.fabric.keystore import Keystore, TenantLimits
from cryptoplane.fabric.keytypes import KeyPolicy, KeyType

AES = KeyPolicy(KeyType.AES256_GCM)
Opener = Callable[..., Keystore]  # the open_store fixture


def k32() -> bytes:
    return os.urandom(32)


def test_create_get_list_round_trip(store: Keystore) -> None:
    m1 = k32()
    rec = store.create_key("acme", "orders", AES, m1)
    assert (rec.tenant, rec.name, rec.latest_version, rec.min_available_version) == (
        "acme", "orders", 1, 1)
    assert rec.versions == {1: m1} and rec.created_at > 0
    got = store.get_key("acme", "orders")
    assert got.versions == {1: m1} and got.policy == AES
    store.create_key("acme", "billing", KeyPolicy(KeyType.ED25519, exportable=True), b"der")
    assert store.list_keys("acme") == ["billing", "orders"]
    assert store.list_tenants() == ["acme"]
    assert store.get_key("acme", "billing").policy.type is KeyType.ED25519
    with pytest.raises(KeyExists):
        store.create_key("acme", "orders", AES, k32())


def test_rotate_trim_delete(store: Keystore) -> None:
    ms = [k32() for _ in range(4)]
    store.create_key("acme", "k", AES, ms[0])
    for i, m in enumerate(ms[1:], start=2):
        rec = store.rotate_key("acme", "k", m)
        assert rec.latest_version == i and rec.versions[i] == m
    assert store.get_key("acme", "k").versions == dict(enumerate(ms, start=1))
    with pytest.raises(InvalidRequest):  # may not pass min_decryption_version (1)
        store.trim_key("acme", "k", 3)
    store.update_policy("acme", "k", min_decryption_version=3)
    rec = store.trim_key("acme", "k", 3)
    assert rec.min_available_version == 3 and sorted(rec.versions) == [3, 4]
    assert sorted(store.get_key("acme", "k").versions) == [3, 4]
    with pytest.raises(InvalidRequest):  # below what is left
        store.update_policy("acme", "k", min_decryption_version=2)
    with pytest.raises(PolicyViolation):
        store.delete_key("acme", "k")
    store.update_policy("acme", "k", deletion_allowed=True)
    store.delete_key("acme", "k")
    assert store.list_keys("acme") == []
    with pytest.raises(KeyNotFound):
        store.get_key("acme", "k")
    store.create_key("acme", "k", AES, ms[0])  # the name is free again, at version 1
    assert store.get_key("acme", "k").latest_version == 1


def test_update_policy_rules(store: Keystore) -> None:
    store.create_key("acme", "k", AES, k32())
    store.rotate_key("acme", "k", k32())
    rec = store.update_policy("acme", "k", min_encryption_version=2, auto_rotate_period=3600,
                              exportable=True)
    assert rec.policy.min_encryption_version == 2 and rec.policy.exportable
    assert store.get_key("acme", "k").policy.auto_rotate_period == 3600.0
    with pytest.raises(PolicyViolation):
        store.update_policy("acme", "k", exportable=False)
    for fixed in ("type", "derived", "convergent"):
        change: dict[str, Any] = {fixed: True}
        with pytest.raises(PolicyViolation):
            store.update_policy("acme", "k", **change)
    with pytest.raises(InvalidRequest):
        store.update_policy("acme", "k", colour="red")
    bad: list[dict[str, Any]] = [{"min_decryption_version": 3}, {"min_decryption_version": 0},
           {"min_encryption_version": 3}, {"auto_rotate_period": -1},
           {"deletion_allowed": "yes"}, {"min_decryption_version": True}]
    for change in bad:
        with pytest.raises(InvalidRequest):
            store.update_policy("acme", "k", **change)
    assert store.get_key("acme", "k").policy.min_encryption_version == 2  # untouched


def test_export_follows_the_policy(store: Keystore) -> None:
    m = k32()
    store.create_key("acme", "k", AES, m)
    with pytest.raises(PolicyViolation):
        store.export_key("acme", "k")
    store.update_policy("acme", "k", exportable=True)
    assert store.export_key("acme", "k", principal="ops").versions == {1: m}
    assert [r["op"] for r in store.audit_rows("acme")][-1] == "export"


def test_bad_input_is_refused(store: Keystore) -> None:
    for tenant, name in [("", "k"), ("acme", ""), ("a/b", "k"), ("acme", ".hidden"),
                         ("acme", "x" * 129), ("acme", "a b")]:
        with pytest.raises(InvalidRequest):
            store.create_key(tenant, name, AES, k32())
    for material in (b"", b"x" * (64 * 1024 + 1)):
        with pytest.raises(InvalidRequest):
            store.create_key("acme", "k", AES, material)
    with pytest.raises(InvalidRequest):
        store.create_key("acme", "k", KeyPolicy(KeyType.AES256_GCM, convergent=True), k32())
    with pytest.raises(InvalidRequest):
        store.create_key("acme", "k", KeyPolicy(KeyType.AES256_GCM,
                                                min_decryption_version=2), k32())
    assert store.list_keys("acme") == []


def test_tenants_and_limits(store: Keystore) -> None:
    assert store.create_tenant("acme", ops=100, bytes=1e6)
    assert not store.create_tenant("acme", ops=1)  # exists: unchanged
    assert store.tenant_limits("acme") == TenantLimits(100.0, 1e6)
    assert store.set_tenant_limits("acme", None, 5e5) == TenantLimits(None, 5e5)
    assert store.tenant_limits("acme") == TenantLimits(None, 5e5)
    assert store.tenant_limits("nobody") == TenantLimits()
    store.set_tenant_limits("newco", 10, None)  # creates the tenant
    assert store.list_tenants() == ["acme", "newco"]
    with pytest.raises(InvalidRequest):
        store.set_tenant_limits("acme", -1, None)
    with pytest.raises(InvalidRequest):
        store.set_tenant_limits("acme", float("inf"), None)


def test_a_tenant_cannot_see_or_touch_another_tenants_keys(store: Keystore) -> None:
    """Another tenant's key and a key that exists nowhere fail alike: same type, same
    message, and nothing changes."""
    m = k32()
    store.create_key("a", "secret", AES.updated(deletion_allowed=True, exportable=True), m)
    store.create_key("b", "mine", AES, k32())

    def failure(fn: object, *args: object, **kw: object) -> tuple[type, str]:
        with pytest.raises(KeyNotFound) as e:
            fn(*args, **kw)  # type: ignore[operator]
        return type(e.value), str(e.value)

    calls = [(store.get_key, ()), (store.rotate_key, (k32(),)), (store.export_key, ()),
             (store.update_policy, ()), (store.trim_key, (1,)), (store.delete_key, ())]
    for fn, extra in calls:
        kw = {"deletion_allowed": True} if fn == store.update_policy else {}
        theirs = failure(fn, "b", "secret", *extra, **kw)
        missing = failure(fn, "b", "nothing-here", *extra, **kw)
        assert theirs[0] is missing[0] is KeyNotFound
        assert theirs[1] == missing[1].replace("nothing-here", "secret")
    assert store.list_keys("b") == ["mine"]
    rec = store.get_key("a", "secret")
    assert rec.versions == {1: m} and rec.latest_version == 1


def test_concurrent_rotations_lose_no_version(open_store: Opener) -> None:
    """Two "servers" (store objects, own connections) rotating the same key at once:
    every rotation gets its own version and its material."""
    a, b = open_store(), open_store()
    a.create_key("acme", "k", AES, b"v1")
    n = 15
    made: dict[int, bytes] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def rotate(s: Keystore, tag: bytes) -> None:
        try:
            for i in range(n):
                m = tag + bytes([i])
                v = s.rotate_key("acme", "k", m).latest_version
                with lock:
                    assert v not in made
                    made[v] = m
        except BaseException as e:
            errors.append(e)

    # two threads on one object as well: the server calls a store from many threads
    ts = [threading.Thread(target=rotate, args=(s, t))
          for s, t in ((a, b"A"), (b, b"B"), (a, b"C"))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    rec = b.get_key("acme", "k")
    assert rec.latest_version == 3 * n + 1
    assert sorted(made) == list(range(2, 3 * n + 2))
    assert all(rec.versions[v] == m for v, m in made.items())


def test_repr_and_errors_hold_no_material(store: Keystore) -> None:
    m = b"\x01TOPSECRET-material-0123456789ab"
    rec = store.create_key("acme", "k", AES, m)
    for text in (repr(rec), str(rec), repr(store), str(rec.describe())):
        assert "TOPSECRET" not in text and m.hex() not in text
    with pytest.raises(KeyExists) as e:
        store.create_key("acme", "k", AES, m)
    assert "TOPSECRET" not in str(e.value)
