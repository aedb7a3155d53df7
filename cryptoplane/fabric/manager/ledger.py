"""The rows the manager's state reads and writes: servers and grants as typed values,
and ``Pool``, the live servers' capacity and placements as one transaction sees them,
with the changes it makes written back at once. ``state.py`` holds the transactions."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..capacity import CLASSES
from . import placement as pl
from .protocol import Grant, GrantServer, Rates

if TYPE_CHECKING:
    from ..keystore.core import Tx

GRANT_COLS = ("grant_id, tenant, label, quota, priority, mode, spread, ttl, issued_at, "
              "expires_at, released_at, revoked_at, counted, placement")
CANDIDATES_SQL = ("SELECT s.server_id, s.address, c.class, c.cap_ops, c.cap_bytes, "
                  "c.placed_ops, c.placed_bytes FROM fabric_servers s JOIN fabric_capacity c "
                  "ON c.server_id = s.server_id WHERE s.lease_expires >= ?")


@dataclass(frozen=True)
class ServerRow:
    server_id: str
    address: str
    capacity: Rates
    load: Rates
    inflight: int
    registered_at: float
    heartbeat_at: float
    lease_expires: float
    manager: str
    read_at: float = 0.0  # the clock when the row was read
    # tenant -> its rates served over the last heartbeat interval (the busiest tenants)
    tenant_load: dict[str, Rates] = field(default_factory=dict)

    @property
    def lease_age(self) -> float:
        """Seconds since the last heartbeat (or registration)."""
        return max(0.0, self.read_at - self.heartbeat_at)


@dataclass
class ExpiryReport:
    removed_servers: list[str] = field(default_factory=list)
    moved: list[Grant] = field(default_factory=list)
    expired_grants: list[str] = field(default_factory=list)
    leader: bool = True


@dataclass
class GrantRow:
    """A grant row as read, before it becomes a ``Grant``."""

    grant: Grant
    released_at: float | None
    revoked_at: float | None
    counted: bool


def rates_of(text: Any) -> Rates:
    value = json.loads(text) if text else {}
    return value if isinstance(value, dict) else {}


SERVER_COLS = ("server_id, address, capacity, load, inflight, registered_at, heartbeat_at, "
               "lease_expires, manager, tenant_load")


def server_row(r: Sequence[Any], now: float) -> ServerRow:
    """A ``fabric_servers`` row read as ``SERVER_COLS``, at ``now``."""
    return ServerRow(str(r[0]), str(r[1]), rates_of(r[2]), rates_of(r[3]), int(r[4]),
                     float(r[5]), float(r[6]), float(r[7]), str(r[8]), now,
                     tenant_loads_of(r[9]))


def tenant_loads_of(text: Any) -> dict[str, Rates]:
    value = json.loads(text) if text else {}
    if not isinstance(value, dict):
        return {}
    return {str(t): r for t, r in value.items() if isinstance(r, dict)}


def tenants_seen(loads: dict[str, Rates], tenant: str | None) -> dict[str, Rates]:
    """``loads`` as ``tenant`` may see them: its own only (None: an admin, all)."""
    if tenant is None:
        return loads
    return {tenant: loads[tenant]} if tenant in loads else {}


def used_by_tenant(servers: Sequence[ServerRow], now: float,
                   tenant: str | None = None) -> dict[str, Rates]:
    """Per tenant and class, the rates the live servers served (summed over them); of
    ``tenant`` only, if given."""
    out: dict[str, Rates] = {}
    for s in servers:
        if s.lease_expires < now:
            continue
        for tenant_name, rates in tenants_seen(s.tenant_load, tenant).items():
            mine = out.setdefault(tenant_name, {})
            for cls, rate in rates.items():
                if not isinstance(rate, dict):
                    continue
                acc = mine.setdefault(cls, {"ops": 0.0, "bytes": 0.0})
                acc["ops"] += float(rate.get("ops", 0.0))
                acc["bytes"] += float(rate.get("bytes", 0.0))
    return {t: out[t] for t in sorted(out)}


def grant_row(r: Sequence[Any]) -> GrantRow:
    placement = json.loads(r[13]) if r[13] else []
    servers = [GrantServer(s["server_id"], s["address"], s["rates"]) for s in placement]
    grant = Grant(grant_id=str(r[0]), tenant=str(r[1]), label=str(r[2]),
                  quota=rates_of(r[3]),
                  priority=int(r[4]), mode=str(r[5]), spread=int(r[6]), servers=servers,
                  issued_at=float(r[8]), expires_at=float(r[9]), ttl=float(r[7]))
    return GrantRow(grant, None if r[10] is None else float(r[10]),
                None if r[11] is None else float(r[11]), bool(r[12]))


def sql_in(ids: Sequence[str]) -> str:
    return "(" + ", ".join("?" * len(ids)) + ")"


def chunks(items: Sequence[str], n: int = 500) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def live_capacity(tx: Tx, now: float, classes: Sequence[str]) -> Rates:
    """The live servers' capacity in these classes, summed (in SQL: a pool of a
    thousand servers is not read row by row at every admission)."""
    out: Rates = {cls: {"ops": 0.0, "bytes": 0.0} for cls in classes}
    for cls, ops, nbytes in tx.all(
            "SELECT c.class, SUM(c.cap_ops), SUM(c.cap_bytes) FROM fabric_capacity c JOIN "
            "fabric_servers s ON s.server_id = c.server_id WHERE s.lease_expires >= ? AND "
            "c.class IN " + sql_in(classes) + " GROUP BY c.class", now, *classes):
        out[str(cls)] = {"ops": float(ops or 0.0), "bytes": float(nbytes or 0.0)}
    return out


def best_servers(tx: Tx, now: float, quota: Rates, overcommit: float, capacity: Rates,
                 limit: int) -> Pool:
    """The ``limit`` live servers ``placement.place`` would rank first for ``quota``
    (those offering every asked class; with room in each first; then by free capacity
    over the pool's), chosen in SQL, read in the same statement."""
    pairs = pl.asked(quota)
    classes = pl.asked_classes(quota)
    if not set(classes) <= set(CLASSES):  # they are spelled into the SQL below
        raise ValueError(f"unknown algorithm class in {classes}")
    oc = repr(float(overcommit))
    elig, room, score = [], [], []
    for cls in classes:
        ms = [m for c, m in pairs if c == cls]
        free = {m: f"(c.cap_{m} * {oc} - c.placed_{m})" for m in ms}
        elig.append("(c.class = '" + cls + "' AND " + " AND ".join(
            f"c.cap_{m} > 0" for m in ms) + ")")
        room.append("(c.class = '" + cls + "' AND " + " AND ".join(
            f"{free[m]} > 0" for m in ms) + ")")
        score.append(f"WHEN c.class = '{cls}' THEN " + " + ".join(
            f"(CASE WHEN {free[m]} > 0 THEN {free[m]} ELSE 0 END) / "
            f"{float(capacity.get(cls, {}).get(m) or 1.0)!r}" for m in ms))
    pool = Pool(None)
    if len(classes) == 1:  # the common case, without the grouping
        pool.live = pl.candidates_from_rows(tx.all(
            CANDIDATES_SQL + " AND " + elig[0] + " ORDER BY CASE WHEN " + room[0]
            + " THEN 1 ELSE 0 END DESC, CASE " + score[0] + " END DESC, s.server_id "
            "LIMIT ?", now, limit))
        return pool
    best = ("SELECT c.server_id FROM fabric_capacity c JOIN fabric_servers s ON "
            "s.server_id = c.server_id WHERE s.lease_expires >= ? AND (" + " OR ".join(elig)
            + ") GROUP BY c.server_id HAVING COUNT(*) = ? ORDER BY MIN(CASE WHEN "
            + " OR ".join(room) + " THEN 1 ELSE 0 END) DESC, SUM(CASE " + " ".join(score)
            + " ELSE 0 END) DESC, c.server_id LIMIT ?")
    pool.live = pl.candidates_from_rows(tx.all(
        CANDIDATES_SQL + " AND c.class IN " + sql_in(classes) + " AND s.server_id IN ("
        + best + ")", now, *classes, now, len(classes), limit))
    return pool


class Pool:
    """The live servers as one transaction sees them, with the placement changes it
    makes, written back at once by ``flush`` (in a fixed order: concurrent transactions
    lock capacity rows in the same order and cannot deadlock)."""

    def __init__(self, tx: Tx | None, now: float = 0.0,
                 classes: Sequence[str] | None = None,
                 servers: Sequence[str] | None = None) -> None:
        sql, args = CANDIDATES_SQL, [now]  # type: str, list[Any]
        if classes is not None:
            sql += " AND c.class IN " + sql_in(classes)
            args += classes
        if servers is not None:
            sql += " AND s.server_id IN " + sql_in(servers)
            args += servers
        # without a transaction: only to write changes back
        rows = tx.all(sql, *args) if tx is not None and servers != [] else []
        self.live = pl.candidates_from_rows(rows)
        self.delta: dict[tuple[str, str], list[float]] = {}

    def capacity(self) -> Rates:
        return pl.totals(self.live.values())

    def add(self, server_id: str, rates: Rates, sign: float = 1.0) -> None:
        c = self.live.get(server_id)
        if c is not None:
            c.add(rates, sign)
        for cls, rate in rates.items():
            d = self.delta.setdefault((server_id, cls), [0.0, 0.0])
            d[0] += sign * rate.get("ops", 0.0)
            d[1] += sign * rate.get("bytes", 0.0)

    def flush(self, tx: Tx) -> None:
        # placed rates never go below 0: float dust from many shares is dropped
        tx.many("UPDATE fabric_capacity SET placed_ops = CASE WHEN placed_ops + ? > 1e-6 "
                "THEN placed_ops + ? ELSE 0 END, placed_bytes = CASE WHEN placed_bytes + ? "
                "> 1e-6 THEN placed_bytes + ? ELSE 0 END WHERE server_id = ? AND class = ?",
                [(d[0], d[0], d[1], d[1], sid, cls)
                 for (sid, cls), d in sorted(self.delta.items())])
        self.delta.clear()
