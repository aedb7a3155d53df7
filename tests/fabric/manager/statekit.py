"""Helpers for the manager-state tests: a clock tests move by hand, short ways to build
registrations and quotas, and reads straight from the database that check the
manager's bookkeeping against the rows themselves."""

from __future__ import annotations

import json
import sqlite3
import threading
from typing import Any

from cryptoplane.fabric.manager.protocol import QuotaRequest, Registration

MEASURES = ("ops", "bytes")


class Clock:
    """A clock that moves only when told (leases lapse without sleeping)."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


def reg(server_id: str, **rates: float | tuple[float, float]) -> Registration:
    """``reg("s1", rsa2048=1000, aead=(1e5, 1e9))``: capacity in ops (and bytes)/s."""
    cap = {}
    for cls, r in rates.items():
        ops, nbytes = r if isinstance(r, tuple) else (r, 0.0)
        cap[cls.replace("_", "-")] = {"ops": float(ops), "bytes": float(nbytes)}
    return Registration(server_id, f"tcp://{server_id}.test:7000", cap)


def ask(*, ttl: float = 60.0, spread: int = 2, mode: str = "spread",
        **rates: float | tuple[float, float]) -> QuotaRequest:
    quota = {}
    for cls, r in rates.items():
        ops, nbytes = r if isinstance(r, tuple) else (r, 0.0)
        quota[cls.replace("_", "-")] = {"ops": float(ops), "bytes": float(nbytes)}
    return QuotaRequest(quota=quota, ttl=ttl, spread=spread, mode=mode)


def sql(url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    """Runs ``query`` (``?`` placeholders) on the store's database, committed."""
    if url.startswith(("postgresql://", "postgres://")):
        import psycopg
        with psycopg.connect(url, autocommit=True) as conn:
            cur = conn.execute(query.replace("?", "%s").encode(), params)
            return [tuple(r) for r in cur.fetchall()] if cur.description else []
    db = sqlite3.connect(url.removeprefix("sqlite://"), isolation_level=None, timeout=10)
    try:
        return [tuple(r) for r in db.execute(query, params).fetchall()]
    finally:
        db.close()


def live_quota_sum(url: str, now: float) -> dict[str, dict[str, float]]:
    """The quotas of the grants live at ``now``, summed per class, from the rows."""
    out: dict[str, dict[str, float]] = {}
    for (quota,) in sql(url, "SELECT quota FROM fabric_grants WHERE released_at IS NULL "
                        "AND revoked_at IS NULL AND expires_at > ?", now):
        for cls, r in json.loads(quota).items():
            t = out.setdefault(cls, {"ops": 0.0, "bytes": 0.0})
            for m in MEASURES:
                t[m] += r.get(m, 0.0)
    return out


def check_books(url: str) -> None:
    """Every server's placed rates equal the sum of the shares on it, and the pool's
    granted total equals the counted grants' quotas."""
    shares: dict[tuple[str, str], list[float]] = {}
    for sid, cls, ops, nbytes in sql(url, "SELECT server_id, class, ops, bytes FROM "
                                     "fabric_grant_servers"):
        s = shares.setdefault((sid, cls), [0.0, 0.0])
        s[0] += ops
        s[1] += nbytes
    for sid, cls, ops, nbytes in sql(url, "SELECT server_id, class, placed_ops, "
                                     "placed_bytes FROM fabric_capacity"):
        want = shares.pop((sid, cls), [0.0, 0.0])
        assert abs(ops - want[0]) < 1e-3 and abs(nbytes - want[1]) < 1e-3, (sid, cls)
    # shares left only on servers already gone would be a leak
    assert not {k: v for k, v in shares.items() if v != [0.0, 0.0]}, shares
    counted: dict[str, list[float]] = {}
    for (quota,) in sql(url, "SELECT quota FROM fabric_grants WHERE counted = 1"):
        for cls, r in json.loads(quota).items():
            c = counted.setdefault(cls, [0.0, 0.0])
            c[0] += r["ops"]
            c[1] += r["bytes"]
    granted = json.loads(sql(url, "SELECT granted FROM fabric_pool")[0][0])
    for cls in set(counted) | set(granted):
        got = granted.get(cls, {"ops": 0.0, "bytes": 0.0})
        want = counted.get(cls, [0.0, 0.0])
        assert abs(got["ops"] - want[0]) < 1e-3 and abs(got["bytes"] - want[1]) < 1e-3, cls


def total(rates_list: list[dict[str, dict[str, float]]], cls: str, m: str = "ops") -> float:
    return sum(r.get(cls, {}).get(m, 0.0) for r in rates_list)
