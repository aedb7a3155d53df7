"""The audit trail: uses aggregated (or one row each), admin events at once, nothing
secret in it."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from cryptoplane.fabric.keystore import Keystore
from cryptoplane.fabric.keystore.audit import AuditLog, AuditRow
from cryptoplane.fabric.keytypes import KeyPolicy, KeyType

Opener = Callable[..., Keystore]
AES = KeyPolicy(KeyType.AES256_GCM)


def uses(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    return [r for r in rows if r["kind"] == "use"]


def test_uses_are_aggregated_per_second(store: Keystore) -> None:
    for _ in range(1000):
        store.record_use("acme", "k", 2, "encrypt", 100, principal="token:abc")
    store.record_use("acme", "k", 1, "decrypt", 10)
    store.record_use("other", "k", 1, "encrypt", 5)
    assert store.flush_audit() <= 4  # at most one extra row if a second boundary passed
    assert store.flush_audit() == 0
    rows = uses(store.audit_rows("acme"))
    enc = [r for r in rows if r["op"] == "encrypt"]
    assert sum(int(str(r["count"])) for r in enc) == 1000
    assert sum(int(str(r["nbytes"])) for r in enc) == 100_000
    assert {(r["key"], r["version"], r["principal"]) for r in enc} == {("k", 2, "token:abc")}
    assert [(r["op"], r["count"], r["nbytes"]) for r in rows if r["op"] == "decrypt"] == [
        ("decrypt", 1, 10)]
    assert {r["tenant"] for r in uses(store.audit_rows())} == {"acme", "other"}
    assert all(float(str(r["ts"])).is_integer() for r in rows)  # the second's start


def test_per_request_mode(open_store: Opener) -> None:
    store = open_store(audit="requests")
    for i in range(5):
        store.record_use("acme", "k", 1, "sign", i)
    rows = uses(store.audit_rows("acme"))
    assert [(r["count"], r["nbytes"]) for r in rows] == [(1, i) for i in range(5)]


def test_admin_events_are_written_at_once(open_store: Opener) -> None:
    a, b = open_store(), open_store()
    a.create_key("acme", "k", AES.updated(deletion_allowed=True), b"m" * 32, principal="alice")
    a.rotate_key("acme", "k", b"n" * 32)
    a.update_policy("acme", "k", min_decryption_version=2)
    a.trim_key("acme", "k", 2)
    a.delete_key("acme", "k", principal="bob")
    a.set_tenant_limits("acme", 5, None)
    # read by another store object, no flush on a's side: already in the table
    rows = [(r["op"], r["key"], r["version"], r["principal"])
            for r in b.audit_rows("acme") if r["kind"] == "admin"]
    assert rows == [("tenant-create", "", 0, "alice"), ("create", "k", 1, "alice"),
                    ("rotate", "k", 2, ""), ("config", "k", 0, ""), ("trim", "k", 2, ""),
                    ("delete", "k", 0, "bob"), ("config", "", 0, "")]


def test_background_flusher_and_close(open_store: Opener) -> None:
    a = open_store(audit_interval=0.05)
    b = open_store()
    a.start()
    a.record_use("acme", "k", 1, "encrypt", 1)
    deadline = time.monotonic() + 5
    while not uses(b.audit_rows("acme")) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert uses(b.audit_rows("acme"))
    a.record_use("acme", "k", 1, "decrypt", 1)
    a.close()  # flushes what is left
    assert [r["op"] for r in uses(b.audit_rows("acme"))] == ["encrypt", "decrypt"]


def test_a_failed_flush_keeps_the_rows() -> None:
    written: list[AuditRow] = []
    fail = [True]

    def write(rows: list[AuditRow]) -> None:
        if fail[0]:
            raise OSError("database away")
        written.extend(rows)

    log = AuditLog(write)
    log.record("t", "k", 1, "encrypt", 3)
    with pytest.raises(OSError):
        log.flush()
    fail[0] = False
    assert log.flush() == 1 and written[0].nbytes == 3


def test_record_use_is_cheap(store: Keystore) -> None:
    n = 100_000
    t = time.perf_counter()
    for _ in range(n):
        store.record_use("acme", "k", 1, "encrypt", 64)
    per_call = (time.perf_counter() - t) / n
    assert per_call < 5e-6, f"{per_call * 1e9:.0f} ns per record_use"  # ~0.5 µs here
