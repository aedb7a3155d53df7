"""What both backends share beneath the key API: transactions, migrations, the master
keys a store holds, the change signal, and the audit plumbing.

The backends differ only in a small dialect: how a transaction starts and locks
(``BEGIN IMMEDIATE`` in SQLite; ``SELECT ... FOR UPDATE`` row locks in PostgreSQL), the
placeholder (``?`` vs ``%s``, translated here once per statement), and how other
servers hear of a change (PostgreSQL NOTIFY; SQLite has only the generation row). All
SQL is written once, with ``?``, in this module and ``base.py``.
"""

from __future__ import annotations

import abc
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from functools import cache
from typing import Any, ClassVar, Self

from .audit import AuditLog, AuditRow
from .master import MasterKey, MasterKeyRejected, UnwrapFailed, new_salt
from .migrations import BOOTSTRAP, LATEST, MIGRATIONS, statements

Row = tuple[Any, ...]
ChangeCallback = Callable[[str, str], None]   # (tenant, key name; "" for the tenant)
ResetCallback = Callable[[], None]            # everything may have changed


@cache
def _to_pyformat(sql: str) -> str:
    # the SQL here never holds a literal '?' or '%', so a plain replace is exact
    return sql.replace("?", "%s")


class Tx:
    """One transaction's statements, over a DB-API cursor, with ``?`` placeholders."""

    __slots__ = ("_cur", "_pyformat")

    def __init__(self, cursor: Any, pyformat: bool) -> None:
        self._cur = cursor
        self._pyformat = pyformat

    def _sql(self, sql: str) -> str:
        return _to_pyformat(sql) if self._pyformat else sql

    def run(self, sql: str, *params: Any) -> int:
        self._cur.execute(self._sql(sql), params)
        return int(self._cur.rowcount)

    def one(self, sql: str, *params: Any) -> Row | None:
        self._cur.execute(self._sql(sql), params)
        row = self._cur.fetchone()
        return tuple(row) if row is not None else None

    def all(self, sql: str, *params: Any) -> list[Row]:
        self._cur.execute(self._sql(sql), params)
        return [tuple(r) for r in self._cur.fetchall()]

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._cur.executemany(self._sql(sql), rows)


class StoreCore(abc.ABC):
    """Transactions, schema, master keys, change signals, audit: no key semantics."""

    dialect: ClassVar[str]
    # appended to the SELECT that reads a row about to be changed; SQLite's BEGIN
    # IMMEDIATE already holds the database's one write lock
    for_update: ClassVar[str] = ""

    def __init__(self, *, audit: str = "aggregate", audit_interval: float = 1.0) -> None:
        self._masters: dict[str, MasterKey] = {}
        self._master: MasterKey | None = None
        self._listeners: list[tuple[ChangeCallback, ResetCallback]] = []
        self._listeners_lock = threading.Lock()
        self._audit = AuditLog(self.write_audit, mode=audit, interval=audit_interval)
        self._closed = False

    # -- the dialect ------------------------------------------------------------------

    @abc.abstractmethod
    def _transaction(self, write: bool) -> AbstractContextManager[Tx]:
        """A transaction; ``write``: one that will change rows (SQLite takes the write
        lock at BEGIN, so two writers never deadlock upgrading a read lock)."""

    @abc.abstractmethod
    def _close_connections(self) -> None: ...

    def transaction(self, write: bool) -> AbstractContextManager[Tx]:
        """A transaction for tables that share the keystore's database (the fabric
        manager's servers and grants): the same connections, dialect and locking."""
        return self._transaction(write)

    def _lock_for_migration(self, tx: Tx) -> None:
        """Serialises migrations between processes opening the store at once (SQLite:
        BEGIN IMMEDIATE already does)."""
        return None

    def _notify(self, tx: Tx, tenant: str, name: str) -> None:
        """Tells other servers, at commit, that ``tenant``/``name`` changed (SQLite:
        nothing to tell; they poll the generation)."""
        return None

    # -- schema -----------------------------------------------------------------------

    def schema_version(self) -> int:
        with self._transaction(write=False) as tx:
            row = tx.one("SELECT version FROM schema_version")
        return int(row[0]) if row else 0

    def migrate(self, target: int = LATEST) -> int:
        """Applies the missing migrations up to ``target``, each in its own transaction;
        returns the version reached. Safe to run again, and from several processes."""
        for m in MIGRATIONS:
            if m.version > target:
                break
            with self._transaction(write=True) as tx:
                self._lock_for_migration(tx)
                tx.run(BOOTSTRAP)
                row = tx.one("SELECT version FROM schema_version")
                if row is None:
                    tx.run("INSERT INTO schema_version (version) VALUES (0)")
                    current = 0
                else:
                    current = int(row[0])
                if current >= m.version:
                    continue
                if current != m.version - 1:
                    raise RuntimeError(f"keystore schema at {current}, cannot apply "
                                       f"migration {m.version}")
                for sql in statements(m, self.dialect):
                    tx.run(sql)
                tx.run("UPDATE schema_version SET version = ?", m.version)
        version = self.schema_version()
        if version > LATEST:
            raise RuntimeError(f"keystore schema {version} is newer than this program "
                               f"knows ({LATEST}): upgrade cryptoplane")
        return version

    # -- metadata and master keys -----------------------------------------------------

    def _meta(self, tx: Tx, name: str) -> str | None:
        row = tx.one("SELECT value FROM metadata WHERE name = ?", name)
        return str(row[0]) if row else None

    def _meta_default(self, tx: Tx, name: str, value: str) -> str:
        """The stored value, storing ``value`` first if there is none (race-free: the
        first writer wins and everyone reads its value)."""
        tx.run("INSERT INTO metadata (name, value) VALUES (?, ?) ON CONFLICT (name) "
               "DO NOTHING", name, value)
        got = self._meta(tx, name)
        assert got is not None
        return got

    def kdf_salt(self) -> bytes:
        """The salt for a passphrase-derived master key, made on first use."""
        with self._transaction(write=True) as tx:
            return bytes.fromhex(self._meta_default(tx, "kdf_salt", new_salt().hex()))

    def attach_masters(self, master: MasterKey, previous: Sequence[MasterKey] = ()) -> None:
        """Checks the keys against the store and starts using them: ``master`` wraps
        what is written from now on; ``previous`` only unwraps (the old key of an
        unfinished rotation). Raises ``MasterKeyRejected`` if a key is wrong or one the
        store still needs is missing; the message names key ids only."""
        given = {m.id: m for m in (*previous, master)}
        with self._transaction(write=True) as tx:
            current = self._meta_default(tx, "master_current", master.id)
            for m in given.values():
                check = self._meta(tx, f"master_check:{m.id}")
                if check is not None and not hmac.compare_digest(check, m.check_value()):
                    raise MasterKeyRejected(f"master key {m.id} is not the key this store "
                                            "knows by that id")
            if master.id != current and current not in given:
                raise MasterKeyRejected(
                    f"this store's master key is {current}, not {master.id}: give the "
                    f"new key as master and {current} as previous to rotate")
            needed = {current} | {str(r[0]) for r in tx.all(
                "SELECT DISTINCT master_id FROM key_versions")}
            missing = sorted(needed - given.keys())
            if missing:
                raise MasterKeyRejected(
                    f"this store needs master key(s) {', '.join(missing)} (given "
                    f"{', '.join(sorted(given))}); after an unfinished rotation give the "
                    "new key as master and the old one as previous")
            for m in given.values():
                self._meta_default(tx, f"master_check:{m.id}", m.check_value())
        self._masters = given
        self._master = master

    @property
    def master_id(self) -> str:
        """The id of the master key that wraps new versions."""
        return self._wrapping_master().id

    def _wrapping_master(self) -> MasterKey:
        if self._master is None:
            raise MasterKeyRejected("the store has no master key attached")
        return self._master

    def _wrap(self, tenant: str, name: str, version: int, material: bytes) -> tuple[str,
                                                                                  bytes]:
        m = self._wrapping_master()
        return m.id, m.wrap(tenant, name, version, material)

    def _unwrap(self, tenant: str, name: str, version: int, master_id: str,
                blob: bytes) -> bytes:
        m = self._masters.get(master_id)
        if m is None:
            raise UnwrapFailed(f"key {name!r} version {version} of tenant {tenant!r} is "
                               f"wrapped under master key {master_id}, which was not given")
        return m.unwrap(tenant, name, version, bytes(blob))

    def master_usage(self) -> dict[str, int]:
        """How many key versions each master key id wraps (a rotation's progress)."""
        with self._transaction(write=False) as tx:
            return {str(r[0]): int(r[1]) for r in tx.all(
                "SELECT master_id, COUNT(*) FROM key_versions GROUP BY master_id")}

    def rotate_master(self, new: MasterKey | None = None, *, batch: int = 100,
                      on_batch: Callable[[int], None] | None = None) -> int:
        """Rewraps every key version under ``new`` (default: the store's master) in
        short transactions of ``batch`` rows, while the store stays in use; returns the
        versions rewrapped. Until it finishes, rows are under old or new, and the store
        unwraps both; after a crash, open with ``master=new, previous=[old]`` and call
        this again. Other servers sharing the store must hold both keys first."""
        old = self._wrapping_master()
        if new is not None and new.id != old.id:
            self._masters = {**self._masters, new.id: new}
            self._master = new
        m = self._wrapping_master()
        with self._transaction(write=True) as tx:
            self._meta_default(tx, f"master_check:{m.id}", m.check_value())
            tx.run("UPDATE metadata SET value = ? WHERE name = 'master_current'", m.id)
            self._admin(tx, "", "", "master-rotate", detail=f"start {old.id}->{m.id}")
        done = 0
        while True:
            with self._transaction(write=True) as tx:
                rows = tx.all("SELECT tenant, name, version, master_id, wrapped FROM "
                              "key_versions WHERE master_id <> ? ORDER BY tenant, name, "
                              "version LIMIT ?" + self.for_update, m.id, batch)
                for tenant, name, version, master_id, blob in rows:
                    material = self._unwrap(tenant, name, version, master_id, blob)
                    tx.run("UPDATE key_versions SET master_id = ?, wrapped = ? WHERE "
                           "tenant = ? AND name = ? AND version = ? AND master_id = ?",
                           m.id, m.wrap(tenant, name, version, material), tenant, name,
                           version, master_id)
                if not rows:
                    self._admin(tx, "", "", "master-rotate", count=done,
                                detail=f"done {m.id}")
            if not rows:
                return done
            done += len(rows)
            if on_batch is not None:
                on_batch(done)

    # -- change signals ---------------------------------------------------------------

    @contextmanager
    def _change(self, tenant: str, name: str) -> Iterator[Tx]:
        """A write transaction that changes ``tenant``/``name``: bumps the generation,
        notifies other servers at commit, and this process's listeners after it."""
        with self._transaction(write=True) as tx:
            yield tx
            tx.run("UPDATE generation SET value = value + 1 WHERE id = 1")
            self._notify(tx, tenant, name)
        with self._listeners_lock:
            listeners = list(self._listeners)
        for on_change, _ in listeners:
            on_change(tenant, name)

    @staticmethod
    def notify_payload(tenant: str, name: str) -> str:
        return json.dumps([tenant, name])

    def generation(self) -> int:
        """A counter every key change bumps: a cheap "did anything change?"."""
        with self._transaction(write=False) as tx:
            row = tx.one("SELECT value FROM generation WHERE id = 1")
        return int(row[0]) if row else 0

    def subscribe(self, on_change: ChangeCallback,
                  on_reset: ResetCallback) -> Callable[[], None]:
        """Calls ``on_change(tenant, name)`` after a key changes (here: changes made
        through this object; PostgreSQL adds other servers' changes and calls
        ``on_reset()`` when it may have missed some). Returns the unsubscribe."""
        pair = (on_change, on_reset)
        with self._listeners_lock:
            self._listeners.append(pair)

        def unsubscribe() -> None:
            with self._listeners_lock:
                if pair in self._listeners:
                    self._listeners.remove(pair)
        return unsubscribe

    # -- audit ------------------------------------------------------------------------

    def _admin(self, tx: Tx, tenant: str, key: str, op: str, *, version: int = 0,
               count: int = 1, principal: str = "", detail: str = "") -> None:
        """An admin event's row, in the transaction of the change it records."""
        self._insert_audit(tx, [AuditRow(time.time(), "admin", tenant, key, version, op,
                                         count, 0, principal, detail)])

    def _insert_audit(self, tx: Tx, rows: Sequence[AuditRow]) -> None:
        tx.many("INSERT INTO audit (ts, kind, tenant, key_name, version, op, count, "
                "nbytes, principal, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(r.ts, r.kind, r.tenant, r.key, r.version, r.op, r.count, r.nbytes,
                  r.principal, r.detail) for r in rows])

    def write_audit(self, rows: Sequence[AuditRow]) -> None:
        """Appends use records (the audit log's flush calls this)."""
        with self._transaction(write=True) as tx:
            self._insert_audit(tx, rows)

    def record_use(self, tenant: str, key: str, version: int, op: str, nbytes: int = 0,
                   principal: str = "") -> None:
        """Counts one use of a key version (aggregated in memory until flushed)."""
        self._audit.record(tenant, key, version, op, nbytes, principal)

    def flush_audit(self) -> int:
        return self._audit.flush()

    def audit_rows(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """The trail, oldest first, pending use records flushed first."""
        self.flush_audit()
        sql = ("SELECT id, ts, kind, tenant, key_name, version, op, count, nbytes, "
               "principal, detail FROM audit")
        with self._transaction(write=False) as tx:
            rows = (tx.all(sql + " WHERE tenant = ? ORDER BY id", tenant)
                    if tenant is not None else tx.all(sql + " ORDER BY id"))
        names = ("id", "ts", "kind", "tenant", "key", "version", "op", "count", "nbytes",
                 "principal", "detail")
        return [dict(zip(names, r, strict=True)) for r in rows]

    # -- life -------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the background audit flusher."""
        self._audit.start()

    def close(self) -> None:
        """Flushes the audit trail and closes the connections."""
        if self._closed:
            return
        self._closed = True
        try:
            self._audit.close()
        finally:
            with self._listeners_lock:
                self._listeners.clear()
            self._close_connections()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
