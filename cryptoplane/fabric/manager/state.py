"""The manager's state, all of it in the keystore's database: servers and their leases,
grants and where they are placed, the managers' signing keys.

A ``FabricState`` holds nothing but counters, so a manager restart loses nothing and
several managers can share one PostgreSQL:

- **Admission** runs in one write transaction that first locks the pool's one row
  (``fabric_pool``, ``SELECT ... FOR UPDATE``; SQLite's ``BEGIN IMMEDIATE`` already
  serialises writers): every change to what is granted or placed takes it, so two
  managers can never both admit into the same room.
- **Leases**: ``expire()`` may be called by every manager; on PostgreSQL only the one
  that gets a transaction-scoped advisory lock does the work.
- **Events** ("moved", "revoked", "servers") go out with ``NOTIFY cryptoplane_fabric``
  inside the changing transaction, so every manager (this one included) hears them at
  commit through its own LISTEN; on SQLite (one machine) subscribers are called in
  process after the commit.

The arithmetic (what fits, which servers, what share) is in ``placement.py``, the rows
and the per-transaction view of the servers in ``ledger.py``, the events' listener in
``events.py``.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import KeyNotFound, QuotaRefused
from . import placement as pl
from .events import CHANNEL, LISTEN_WAIT, Event, EventCallback, call, listen, retryable
from .ledger import (
    GRANT_COLS,
    SERVER_COLS,
    ExpiryReport,
    GrantRow,
    Pool,
    ServerRow,
    best_servers,
    chunks,
    grant_row,
    live_capacity,
    rates_of,
    server_row,
    sql_in,
    tenants_seen,
    used_by_tenant,
)
from .protocol import Grant, GrantServer, Heartbeat, QuotaRequest, Rates, Registration

if TYPE_CHECKING:
    from ..keystore import Keystore
    from ..keystore.core import Tx


# any constant shared by every manager of one database ("cpfabric")
EXPIRY_LOCK = 0x6370_6661_6272_6963
# released and revoked grants are kept this long (revoked_for() reads them)
KEEP_ENDED = 600.0
# expired grants an admission clears before it counts (the rest wait for expire())
SWEEP_BATCH = 200
RETRIES = 5
T = TypeVar("T")


class FabricState:
    """The manager's view of the pool, over ``store``'s database (migrated here if it is
    older). The store stays the caller's: ``close`` stops only this object's listeners.
    ``clock`` gives every time stored and compared (tests pass a fake one; ``expire``
    reads it only once it holds the leader's lock)."""

    def __init__(self, store: Keystore, *, lease_seconds: float = 10.0,
                 overcommit: float = 1.0, manager_id: str = "manager",
                 clock: Callable[[], float] = time.time) -> None:
        if lease_seconds <= 0 or overcommit <= 0:
            raise ValueError("lease_seconds and overcommit must be above 0")
        self._store = store
        self.lease_seconds = float(lease_seconds)
        self.overcommit = float(overcommit)
        self.manager_id = manager_id
        self._clock = clock
        self._pg = store.dialect == "postgresql"
        self._subs: list[EventCallback] = []
        self._lock = threading.Lock()
        self._stops: list[threading.Event] = []
        self._threads: list[threading.Thread] = []
        self.refusals = 0
        store.migrate()

    def __repr__(self) -> str:
        return f"FabricState({self.manager_id!r}, {self._store.dialect})"

    # -- transactions and events ------------------------------------------------------

    def _run(self, write: bool, body: Callable[[Tx, list[Event]], T]) -> T:
        """``body`` in one transaction, retried when PostgreSQL picked it as a deadlock
        victim; its events go out at commit (NOTIFY in the transaction, or the local
        subscribers after it)."""
        for attempt in range(RETRIES):
            events: list[Event] = []
            try:
                with self._store.transaction(write) as tx:
                    result = body(tx, events)
                    if self._pg:
                        for e in events:
                            tx.one("SELECT pg_notify(?, ?)", CHANNEL, json.dumps(e))
            except Exception as e:
                if attempt + 1 < RETRIES and retryable(e):
                    time.sleep(0.01 * (attempt + 1))
                    continue
                raise
            if not self._pg:
                self._deliver(events)
            return result
        raise AssertionError("unreachable")

    def _deliver(self, events: Iterable[Event]) -> None:
        with self._lock:
            subs = list(self._subs)
        for e in events:
            for cb in subs:
                call(cb, e)

    def _lock_pool(self, tx: Tx) -> Rates:
        return self._pool_row(tx, lock=True)[0]

    def _pool_row(self, tx: Tx, *, lock: bool) -> tuple[Rates, int]:
        """The pool's granted total and removal count (``lock``: taking its lock)."""
        row = tx.one("SELECT granted, removals FROM fabric_pool WHERE id = 1"
                     + (self._store.for_update if lock else ""))
        return (rates_of(row[0]), int(row[1])) if row else ({}, 0)

    def _save_pool(self, tx: Tx, granted: Rates) -> None:
        tx.run("UPDATE fabric_pool SET granted = ? WHERE id = 1", json.dumps(granted))

    # -- signing keys -----------------------------------------------------------------

    def publish_signing_key(self, key_id: str, public_b64: str) -> None:
        def body(tx: Tx, _: list[Event]) -> None:
            tx.run("INSERT INTO fabric_signing_keys (key_id, public_b64, created_at) "
                   "VALUES (?, ?, ?) ON CONFLICT (key_id) DO NOTHING", key_id, public_b64,
                   self._clock())
        self._run(True, body)

    def signing_keys(self) -> dict[str, str]:
        def body(tx: Tx, _: list[Event]) -> dict[str, str]:
            return {str(k): str(v) for k, v in tx.all(
                "SELECT key_id, public_b64 FROM fabric_signing_keys ORDER BY key_id")}
        return self._run(False, body)

    # -- servers ----------------------------------------------------------------------

    def register(self, reg: Registration) -> None:
        """Adds the server or renews it (a lapsed server coming back keeps what is
        placed on it); its lease runs ``lease_seconds`` from now."""
        def body(tx: Tx, events: list[Event]) -> None:
            now = self._clock()
            tx.run("INSERT INTO fabric_servers (server_id, address, capacity, load, "
                   "inflight, registered_at, heartbeat_at, lease_expires, manager) VALUES "
                   "(?, ?, ?, '{}', 0, ?, ?, ?, ?) ON CONFLICT (server_id) DO UPDATE SET "
                   "address = excluded.address, capacity = excluded.capacity, "
                   "load = excluded.load, tenant_load = '{}', inflight = 0, "
                   "registered_at = excluded.registered_at, "
                   "heartbeat_at = excluded.heartbeat_at, "
                   "lease_expires = excluded.lease_expires, manager = excluded.manager",
                   reg.server_id, reg.address, json.dumps(reg.capacity), now, now,
                   now + self.lease_seconds, self.manager_id)
            offered = sorted(c for c, r in reg.capacity.items() if r["ops"] or r["bytes"])
            # a class no longer offered keeps its row (grants may be placed on it)
            tx.run("UPDATE fabric_capacity SET cap_ops = 0, cap_bytes = 0 WHERE server_id = ?"
                   + (" AND class NOT IN " + sql_in(offered) if offered else ""),
                   reg.server_id, *offered)
            tx.many("INSERT INTO fabric_capacity (server_id, class, cap_ops, cap_bytes, "
                    "placed_ops, placed_bytes) VALUES (?, ?, ?, ?, 0, 0) ON CONFLICT "
                    "(server_id, class) DO UPDATE SET cap_ops = excluded.cap_ops, "
                    "cap_bytes = excluded.cap_bytes",
                    [(reg.server_id, cls, reg.capacity[cls]["ops"], reg.capacity[cls]["bytes"])
                     for cls in offered])
            events.append({"event": "servers"})
        self._run(True, body)

    def heartbeat(self, beat: Heartbeat) -> bool:
        """Renews the lease with the server's load; False if the server is unknown or
        its lease lapsed (it must register again)."""
        def body(tx: Tx, _: list[Event]) -> bool:
            now = self._clock()
            return tx.run("UPDATE fabric_servers SET load = ?, tenant_load = ?, "
                          "inflight = ?, heartbeat_at = ?, lease_expires = ?, manager = ? "
                          "WHERE server_id = ? AND lease_expires >= ?",
                          json.dumps(beat.load), json.dumps(beat.tenants), beat.inflight,
                          now, now + self.lease_seconds, self.manager_id, beat.server_id,
                          now) > 0
        return self._run(True, body)

    def leave(self, server_id: str) -> list[Grant]:
        """Removes the server now; returns its grants, moved to the live servers."""
        def body(tx: Tx, events: list[Event]) -> list[Grant]:
            now = self._clock()
            granted = self._lock_pool(tx)
            removed = self._remove_servers(tx, [server_id], now, None)
            if not removed:
                return []
            events.append({"event": "servers"})
            moved = self._move_grants_off(tx, removed, now, events)
            self._save_pool(tx, granted)
            return moved
        return self._run(True, body)

    def expire(self) -> ExpiryReport:
        """Removes servers whose lease lapsed and moves their grants to live servers;
        clears expired grants from the totals, and deletes grants expired over a ttl ago
        and released or revoked ones older than ``KEEP_ENDED``. On PostgreSQL one caller
        at a time does it (``leader``); the others return at once."""
        def body(tx: Tx, events: list[Event]) -> ExpiryReport:
            if self._pg:
                got = tx.one("SELECT pg_try_advisory_xact_lock(?)", EXPIRY_LOCK)
                if not (got and got[0]):
                    return ExpiryReport(leader=False)
            now = self._clock()
            granted = self._lock_pool(tx)
            report = ExpiryReport()
            while self._sweep(tx, now, granted, SWEEP_BATCH * 5) == SWEEP_BATCH * 5:
                pass
            report.removed_servers = self._remove_servers(
                tx, [str(r[0]) for r in tx.all(
                    "SELECT server_id FROM fabric_servers WHERE lease_expires < ? "
                    "ORDER BY server_id", now)], now, now)
            if report.removed_servers:
                events.append({"event": "servers"})
                report.moved = self._move_grants_off(tx, report.removed_servers, now, events)
            report.expired_grants = [str(r[0]) for r in tx.all(
                "SELECT grant_id FROM fabric_grants WHERE counted = 0 AND released_at IS "
                "NULL AND revoked_at IS NULL AND expires_at + ttl < ?", now)]
            for ids in chunks(report.expired_grants):
                tx.run("DELETE FROM fabric_grant_servers WHERE grant_id IN " + sql_in(ids),
                       *ids)
                tx.run("DELETE FROM fabric_grants WHERE grant_id IN " + sql_in(ids), *ids)
            tx.run("DELETE FROM fabric_grants WHERE counted = 0 AND (released_at < ? OR "
                   "revoked_at < ?)", now - KEEP_ENDED, now - KEEP_ENDED)
            self._save_pool(tx, granted)
            return report
        return self._run(True, body)

    def servers(self) -> list[ServerRow]:
        def body(tx: Tx, _: list[Event]) -> list[ServerRow]:
            now = self._clock()
            return [server_row(r, now) for r in tx.all(
                "SELECT " + SERVER_COLS + " FROM fabric_servers ORDER BY server_id")]
        return self._run(False, body)

    def _remove_servers(self, tx: Tx, ids: Sequence[str], now: float,
                        lapsed_before: float | None) -> list[str]:
        """Deletes these servers (with ``lapsed_before``: only if their lease is still
        lapsed, as a heartbeat may have come in the meantime); returns those deleted."""
        removed = []
        for sid in ids:
            if lapsed_before is None:
                n = tx.run("DELETE FROM fabric_servers WHERE server_id = ?", sid)
            else:
                n = tx.run("DELETE FROM fabric_servers WHERE server_id = ? AND "
                           "lease_expires < ?", sid, lapsed_before)
            if n:
                tx.run("DELETE FROM fabric_capacity WHERE server_id = ?", sid)
                removed.append(sid)
        if removed:
            tx.run("UPDATE fabric_pool SET removals = removals + 1 WHERE id = 1")
        return removed

    def _move_grants_off(self, tx: Tx, gone: Sequence[str], now: float,
                         events: list[Event]) -> list[Grant]:
        """Re-places every counted grant that named one of the servers ``gone``."""
        ids: set[str] = set()
        for chunk in chunks(gone):
            ids.update(str(r[0]) for r in tx.all(
                "SELECT DISTINCT grant_id FROM fabric_grant_servers WHERE server_id IN "
                + sql_in(chunk), *chunk))
        if not ids:
            return []
        rows: list[Any] = []
        for chunk in chunks(sorted(ids)):
            rows += tx.all("SELECT " + GRANT_COLS + " FROM fabric_grants WHERE counted = 1 "
                           "AND grant_id IN " + sql_in(chunk) + " ORDER BY grant_id"
                           + self._store.for_update, *chunk)
        pool = Pool(tx, now)
        moved = self._replace(tx, pool, [grant_row(r).grant for r in rows], set(gone))
        pool.flush(tx)
        events.extend({"event": "moved", "grant_id": g.grant_id} for g in moved)
        return moved

    # -- grants -----------------------------------------------------------------------

    def admit(self, tenant: str, req: QuotaRequest) -> Grant:
        """Grants ``req`` to ``tenant`` if the pool has room for it, placed on live
        servers; else ``QuotaRefused`` saying what is left per asked class."""
        classes = pl.asked_classes(req.quota)
        limit = max(req.spread, 2)

        def body(tx: Tx, events: list[Event]) -> Grant | tuple[str, Rates]:
            now = self._clock()
            # the servers are read before the pool's lock, so that admissions queue only
            # for their writes; they change under it only when one is removed (a lease
            # lapsing meanwhile is a lease that lapses just after: expire() moves it)
            before = self._pool_row(tx, lock=False)[1]
            capacity = live_capacity(tx, now, classes)
            pool = best_servers(tx, now, req.quota, self.overcommit, capacity, limit)
            granted, removals = self._pool_row(tx, lock=True)
            if removals != before:
                capacity = live_capacity(tx, now, classes)
                pool = best_servers(tx, now, req.quota, self.overcommit, capacity, limit)
            refused = pl.refusal(req.quota, capacity, granted, self.overcommit)
            # grants that expired unrenewed still count until swept: sweep before saying
            # no (and expire() sweeps them all)
            if refused is not None and self._sweep(tx, now, granted, SWEEP_BATCH):
                self._save_pool(tx, granted)
                refused = pl.refusal(req.quota, capacity, granted, self.overcommit)
            if refused is not None:
                return refused
            shares = pl.place(req.quota, req.mode, req.spread, pool.live.values(),
                              self.overcommit, pool_capacity=capacity)
            if not shares:
                return ("no live server offers every class asked (" + ", ".join(classes)
                        + ")", pl.left_of(capacity, granted, self.overcommit, classes))
            quota = pl.only(req.quota, classes)
            grant = Grant(grant_id="g-" + secrets.token_hex(10), tenant=tenant,
                          label=req.label, quota=quota, priority=req.priority,
                          mode=req.mode, spread=req.spread, servers=[], issued_at=now,
                          expires_at=now + req.ttl, ttl=req.ttl)
            for c, rates in shares:
                pool.add(c.server_id, rates)
            grant = self._write_placement(tx, [(grant, shares)], new=True)[0]
            pool.flush(tx)
            pl.add_rates(granted, quota)
            self._save_pool(tx, granted)
            return grant
        got = self._run(True, body)
        if isinstance(got, Grant):
            return got
        with self._lock:
            self.refusals += 1
        raise QuotaRefused(got[0], left=got[1])

    def renew(self, tenant: str, grant_id: str) -> Grant:
        """Extends a live grant by its ttl from now, moving it first if one of its
        servers is gone (``QuotaRefused`` while no live server can take it)."""
        def body(tx: Tx, events: list[Event], pooled: bool) -> Grant | tuple[str, Rates] | None:
            now = self._clock()
            # the pool's lock comes first, as everywhere: a renewal that finds a server
            # gone gives up the row lock it took and starts again with both
            granted = self._lock_pool(tx) if pooled else {}
            row = self._load(tx, grant_id, lock=True)
            if row is None or row.grant.tenant != tenant or not _live(row, now):
                raise KeyNotFound("grant not found")
            grant = row.grant
            named = [s.server_id for s in grant.servers]
            alive = {str(r[0]) for r in tx.all(
                "SELECT server_id FROM fabric_servers WHERE lease_expires >= ? AND "
                "server_id IN " + sql_in(named), now, *named)} if named else set()
            if not named or alive != set(named):
                if not pooled:
                    return None
                classes = pl.asked_classes(grant.quota)
                pool = Pool(tx, now, classes)
                if not pl.eligible(pool.live.values(), pl.asked(grant.quota)):
                    return ("no live server offers every class of this grant ("
                            + ", ".join(classes) + ")", pl.left_of(
                                pool.capacity(), granted, self.overcommit, classes))
                grant = self._replace(tx, pool, [grant], set(named) - alive)[0]
                pool.flush(tx)
                events.append({"event": "moved", "grant_id": grant_id})
            tx.run("UPDATE fabric_grants SET expires_at = ? WHERE grant_id = ?",
                   now + grant.ttl, grant_id)
            return replace(grant, expires_at=now + grant.ttl)
        got = self._run(True, lambda tx, ev: body(tx, ev, False))
        if got is None:
            got = self._run(True, lambda tx, ev: body(tx, ev, True))
        assert got is not None
        if isinstance(got, Grant):
            return got
        with self._lock:
            self.refusals += 1
        raise QuotaRefused(got[0], left=got[1])

    def release(self, tenant: str, grant_id: str) -> None:
        """Ends the grant and frees its share; releasing it again does nothing. Another
        tenant's grant is not found, as an unknown one."""
        def body(tx: Tx, _: list[Event]) -> None:
            granted = self._lock_pool(tx)
            row = self._load(tx, grant_id, lock=True)
            if row is None or row.grant.tenant != tenant:
                raise KeyNotFound("grant not found")
            if row.released_at is None and row.revoked_at is None:
                tx.run("UPDATE fabric_grants SET released_at = ? WHERE grant_id = ?",
                       self._clock(), grant_id)
            if row.counted:
                self._uncount(tx, [(grant_id, row.grant.quota)], granted)
                self._save_pool(tx, granted)
        self._run(True, body)

    def revoke(self, grant_id: str) -> Grant | None:
        """Ends the grant at once (an operator's act): its share is freed and its
        servers drop it at their next heartbeat (``revoked_for``). None if unknown."""
        def body(tx: Tx, events: list[Event]) -> Grant | None:
            granted = self._lock_pool(tx)
            row = self._load(tx, grant_id, lock=True)
            if row is None:
                return None
            if row.revoked_at is None:
                tx.run("UPDATE fabric_grants SET revoked_at = ? WHERE grant_id = ?",
                       self._clock(), grant_id)
                events.append({"event": "revoked", "grant_id": grant_id})
            if row.counted:
                self._uncount(tx, [(grant_id, row.grant.quota)], granted)
                self._save_pool(tx, granted)
            return row.grant
        return self._run(True, body)

    def get_grant(self, grant_id: str) -> Grant | None:
        """The grant if it is live (not expired, released or revoked), else None."""
        def body(tx: Tx, _: list[Event]) -> Grant | None:
            row = self._load(tx, grant_id, lock=False)
            return row.grant if row is not None and _live(row, self._clock()) else None
        return self._run(False, body)

    def list_grants(self, tenant: str | None = None) -> list[Grant]:
        """Live grants, of one tenant or all, oldest first."""
        def body(tx: Tx, _: list[Event]) -> list[Grant]:
            sql = ("SELECT " + GRANT_COLS + " FROM fabric_grants WHERE counted = 1 AND "
                   "released_at IS NULL AND revoked_at IS NULL AND expires_at > ?")
            args: list[Any] = [self._clock()]
            if tenant is not None:
                sql += " AND tenant = ?"
                args.append(tenant)
            return [grant_row(r).grant for r in tx.all(sql + " ORDER BY issued_at, "
                                                        "grant_id", *args)]
        return self._run(False, body)

    def revoked_for(self, server_id: str, since: float) -> list[str]:
        """Ids of grants revoked after ``since`` that this server enforces (or did)."""
        def body(tx: Tx, _: list[Event]) -> list[str]:
            out = []
            for gid, placement in tx.all("SELECT grant_id, placement FROM fabric_grants "
                                         "WHERE revoked_at > ? ORDER BY grant_id", since):
                if any(s.get("server_id") == server_id for s in json.loads(placement)):
                    out.append(str(gid))
            return out
        return self._run(False, body)

    def _load(self, tx: Tx, grant_id: str, *, lock: bool) -> GrantRow | None:
        r = tx.one("SELECT " + GRANT_COLS + " FROM fabric_grants WHERE grant_id = ?"
                   + (self._store.for_update if lock else ""), grant_id)
        return grant_row(r) if r is not None else None

    def _sweep(self, tx: Tx, now: float, granted: Rates, limit: int) -> int:
        """Takes up to ``limit`` grants that expired while counted out of the totals;
        returns how many."""
        # FOR UPDATE re-reads a row a concurrent renewal changed, and skips it then
        rows = tx.all("SELECT grant_id, quota FROM fabric_grants WHERE counted = 1 AND "
                      "expires_at <= ? ORDER BY expires_at LIMIT ?" + self._store.for_update,
                      now, limit)
        self._uncount(tx, [(str(g), rates_of(q)) for g, q in rows], granted)
        return len(rows)

    def _uncount(self, tx: Tx, grants: Sequence[tuple[str, Rates]], granted: Rates) -> None:
        """Frees these grants' shares on their servers and their quota in ``granted``."""
        if not grants:
            return
        deltas: dict[tuple[str, str], list[float]] = {}
        ids = [g for g, _ in grants]
        for chunk in chunks(ids):
            for sid, cls, ops, nbytes in tx.all(
                    "SELECT server_id, class, ops, bytes FROM fabric_grant_servers WHERE "
                    "grant_id IN " + sql_in(chunk), *chunk):
                d = deltas.setdefault((str(sid), str(cls)), [0.0, 0.0])
                d[0] -= float(ops)
                d[1] -= float(nbytes)
            tx.run("DELETE FROM fabric_grant_servers WHERE grant_id IN " + sql_in(chunk),
                   *chunk)
            tx.run("UPDATE fabric_grants SET counted = 0 WHERE grant_id IN " + sql_in(chunk),
                   *chunk)
        pool = Pool(None)
        pool.delta = deltas
        pool.flush(tx)
        for _, quota in grants:
            pl.add_rates(granted, quota, -1.0)

    def _replace(self, tx: Tx, pool: Pool, grants: Sequence[Grant],
                 gone: set[str]) -> list[Grant]:
        """Places these grants again (same rates) among the live servers, keeping those
        of their servers still there; a grant no live server can take keeps none."""
        for chunk in chunks([g.grant_id for g in grants]):
            tx.run("DELETE FROM fabric_grant_servers WHERE grant_id IN " + sql_in(chunk),
                   *chunk)
        placed = []
        # the highest priority first: it gets the freest servers when room is short
        for grant in sorted(grants, key=lambda g: -g.priority):
            for s in grant.servers:
                pool.add(s.server_id, s.rates, -1.0)
            keep = {s.server_id for s in grant.servers} - gone
            shares = pl.place(grant.quota, grant.mode, grant.spread, pool.live.values(),
                              self.overcommit, prefer=keep)
            for c, rates in shares:  # before the next grant is placed
                pool.add(c.server_id, rates)
            placed.append((grant, shares))
        return self._write_placement(tx, placed)

    def _write_placement(self, tx: Tx, placed: Sequence[tuple[Grant, Sequence[tuple[
            pl.Candidate, Rates]]]], *, new: bool = False) -> list[Grant]:
        """Records each grant on its servers (``new``: the grants' rows are inserted)."""
        out = [replace(g, servers=[GrantServer(c.server_id, c.address, rates)
                                   for c, rates in shares]) for g, shares in placed]
        placements = [json.dumps([s.to_json() for s in g.servers]) for g in out]
        if new:
            tx.many("INSERT INTO fabric_grants (" + GRANT_COLS + ") VALUES (?, ?, ?, ?, ?, "
                    "?, ?, ?, ?, ?, NULL, NULL, 1, ?)", [
                        (g.grant_id, g.tenant, g.label, json.dumps(g.quota), g.priority,
                         g.mode, g.spread, g.ttl, g.issued_at, g.expires_at, p)
                        for g, p in zip(out, placements, strict=True)])
        else:
            tx.many("UPDATE fabric_grants SET placement = ? WHERE grant_id = ?",
                    [(p, g.grant_id) for g, p in zip(out, placements, strict=True)])
        tx.many("INSERT INTO fabric_grant_servers (grant_id, server_id, class, ops, bytes) "
                "VALUES (?, ?, ?, ?, ?)", [
                    (g.grant_id, s.server_id, cls, r.get("ops", 0.0), r.get("bytes", 0.0))
                    for g in out for s in g.servers for cls, r in sorted(s.rates.items())])
        return out

    # -- the pool at a glance ---------------------------------------------------------

    def status(self, tenant: str | None = None, *, grants: bool = True) -> dict[str, Any]:
        """The pool as JSON: capacity of the live servers, granted and left per class,
        each server, and the live grants (of ``tenant`` only, if given; none with
        ``grants=False``, for a periodic snapshot of a pool of many grants)."""
        def body(tx: Tx, _: list[Event]) -> tuple[float, Rates, Rates, dict[str, int],
                                                 dict[str, Rates]]:
            now = self._clock()
            pool = Pool(tx, now)
            row = tx.one("SELECT granted FROM fabric_pool WHERE id = 1")
            counts = {str(s): int(n) for s, n in tx.all(
                "SELECT server_id, COUNT(DISTINCT grant_id) FROM fabric_grant_servers "
                "GROUP BY server_id")}
            placed: dict[str, Rates] = {}
            for sid, cls, ops, nbytes in tx.all(
                    "SELECT server_id, class, placed_ops, placed_bytes FROM fabric_capacity "
                    "WHERE placed_ops > 0 OR placed_bytes > 0"):
                placed.setdefault(str(sid), {})[str(cls)] = {"ops": float(ops),
                                                             "bytes": float(nbytes)}
            return now, pool.capacity(), rates_of(row[0] if row else None), counts, placed
        now, capacity, granted, counts, placed = self._run(False, body)
        capacity = {c: v for c, v in capacity.items() if v["ops"] or v["bytes"]}
        granted = {c: v for c, v in granted.items() if v.get("ops") or v.get("bytes")}
        classes = sorted(set(capacity) | set(granted))
        servers = self.servers()
        return {
            "manager_id": self.manager_id,
            "managers": sorted({s.manager for s in servers if s.lease_expires >= now}
                               | {self.manager_id}),
            "lease_seconds": self.lease_seconds,
            "overcommit": self.overcommit,
            "capacity": capacity,
            "granted": granted,
            "left": pl.left_of(capacity, granted, self.overcommit, classes),
            "servers": [{"server_id": s.server_id, "address": s.address,
                         "capacity": s.capacity, "load": s.load,
                         "tenant_load": tenants_seen(s.tenant_load, tenant),
                         "inflight": s.inflight,
                         "lease_age": s.lease_age,
                         "lease_expires_in": s.lease_expires - s.read_at,
                         "grants": counts.get(s.server_id, 0),
                         "granted": placed.get(s.server_id, {})} for s in servers],
            "used_by_tenant": used_by_tenant(servers, now, tenant),
            "grants": [g.to_json() for g in self.list_grants(tenant)] if grants else [],
            "refusals": self.refusals,
        }

    # -- events -----------------------------------------------------------------------

    def subscribe(self, on_event: EventCallback) -> Callable[[], None]:
        """Calls ``on_event`` with every event of every manager of this database:
        ``{"event": "moved"|"revoked", "grant_id"}``, ``{"event": "servers"}``, and on
        PostgreSQL ``{"event": "resync"}`` after its listener reconnected (events meanwhile
        are lost: reload what matters). Returns the function that stops it."""
        with self._lock:
            self._subs.append(on_event)
        stop = threading.Event()
        if self._pg:
            ready = threading.Event()
            from ..keystore.postgres import PostgresKeystore
            assert isinstance(self._store, PostgresKeystore)
            t = threading.Thread(target=listen, name="fabric-listen", daemon=True,
                                 args=(self._store.dedicated_connection, on_event, stop,
                                       ready))
            with self._lock:
                self._stops.append(stop)
                self._threads.append(t)
            t.start()
            ready.wait(LISTEN_WAIT)

        def unsubscribe() -> None:
            stop.set()
            with self._lock:
                if on_event in self._subs:
                    self._subs.remove(on_event)
        return unsubscribe

    def close(self) -> None:
        """Stops the listeners (the store stays open: it is the caller's)."""
        with self._lock:
            stops, threads = list(self._stops), list(self._threads)
            self._subs.clear()
        for s in stops:
            s.set()
        for t in threads:
            t.join(timeout=5.0)


def _live(row: GrantRow, now: float) -> bool:
    return (row.counted and row.released_at is None and row.revoked_at is None
            and row.grant.expires_at > now)


__all__ = ["CHANNEL", "EXPIRY_LOCK", "ExpiryReport", "FabricState", "ServerRow"]
