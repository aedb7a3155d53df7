"""The shared backend: PostgreSQL through psycopg 3, for several servers on several
machines.

Writers lock the key's row (``SELECT ... FOR UPDATE``) so concurrent rotations queue;
every key change sends ``NOTIFY cryptoplane_keystore`` with ``[tenant, name]``,
delivered at commit, which ``subscribe``'s listener thread (its own connection) turns
into cache invalidations. NOTIFY has no replay, so after the listener (re)connects it
reports a reset: whoever caches drops everything. The first connection needs none:
``subscribe`` returns only once it is listening (so nothing can be cached yet that a
missed notification would leave stale), unless that took longer than ``LISTEN_WAIT``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from .base import Keystore
from .core import ChangeCallback, ResetCallback, Tx

log = logging.getLogger(__name__)

CHANNEL = "cryptoplane_keystore"
# any constant shared by every process migrating the same database
MIGRATION_LOCK = 0x6370_6B73  # "cpks"
LISTEN_WAIT = 5.0


class PostgresKeystore(Keystore):
    dialect = "postgresql"
    for_update = " FOR UPDATE"

    def __init__(self, conninfo: str, *, pool_size: int = 8, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._conninfo = conninfo
        self._pool_size = pool_size
        self._idle: list[tuple[psycopg.Connection[Any], float]] = []
        self._pool_lock = threading.Lock()
        self._listener_stops: list[threading.Event] = []
        self._threads: list[threading.Thread] = []
        self._put(self._connect())  # fail now, at open, if the database is unreachable

    def __repr__(self) -> str:
        return "PostgresKeystore(...)"  # the conninfo may hold a password

    def dedicated_connection(self) -> psycopg.Connection[Any]:
        """A new autocommit connection outside the pool, the caller's to close (a
        LISTEN needs one of its own)."""
        return self._connect()

    def _connect(self) -> psycopg.Connection[Any]:
        # autocommit: transactions are explicit (conn.transaction()), never implicit
        return psycopg.connect(self._conninfo, autocommit=True)

    # -- the pool ---------------------------------------------------------------------

    def _begin(self) -> psycopg.Connection[Any]:
        """A connection in a fresh transaction. BEGIN doubles as the liveness check: a
        pooled connection that died (a database restart, an idle timeout) fails there,
        before anything ran, so trying the next one is safe; the last resort is a new
        connection, whose failure is the caller's."""
        while True:
            with self._pool_lock:
                conn = self._idle.pop()[0] if self._idle else None
            if conn is None:
                conn = self._connect()
                conn.execute("BEGIN")
                return conn
            try:
                conn.execute("BEGIN")
                return conn
            except psycopg.OperationalError:
                conn.close()

    def _put(self, conn: psycopg.Connection[Any]) -> None:
        healthy = not (conn.closed or conn.broken) and (
            conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE)
        with self._pool_lock:
            if healthy and not self._closed and len(self._idle) < self._pool_size:
                self._idle.append((conn, time.monotonic()))
                return
        conn.close()

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[Tx]:
        conn = self._begin()
        try:
            with conn.cursor() as cur:
                yield Tx(cur, pyformat=True)
            conn.execute("COMMIT")
        except BaseException:
            if not (conn.closed or conn.broken):
                try:
                    conn.execute("ROLLBACK")
                except psycopg.Error:
                    conn.close()
            raise
        finally:
            self._put(conn)

    def _lock_for_migration(self, tx: Tx) -> None:
        tx.one("SELECT pg_advisory_xact_lock(?)", MIGRATION_LOCK)

    def _notify(self, tx: Tx, tenant: str, name: str) -> None:
        tx.one("SELECT pg_notify(?, ?)", CHANNEL, self.notify_payload(tenant, name))

    def _close_connections(self) -> None:
        for stop in self._listener_stops:
            stop.set()
        for t in self._threads:
            t.join(timeout=5.0)  # a listener stuck connecting is a daemon: let it be
        with self._pool_lock:
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.close()

    # -- other servers' changes ---------------------------------------------------------

    def subscribe(self, on_change: ChangeCallback,
                  on_reset: ResetCallback) -> Callable[[], None]:
        local = super().subscribe(on_change, on_reset)
        stop = threading.Event()
        started = _Started()
        t = threading.Thread(target=self._listen, args=(on_change, on_reset, stop, started),
                             name="keystore-listen", daemon=True)
        self._listener_stops.append(stop)
        self._threads.append(t)
        t.start()
        started.wait(LISTEN_WAIT)

        def unsubscribe() -> None:
            local()
            stop.set()
        return unsubscribe

    def _listen(self, on_change: ChangeCallback, on_reset: ResetCallback,
                stop: threading.Event, started: _Started) -> None:
        backoff = 0.1
        while not stop.is_set():
            try:
                with self._connect() as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    if not started.listening():
                        on_reset()  # whatever happened while not listening is unknown
                    backoff = 0.1
                    while not stop.is_set():
                        for n in conn.notifies(timeout=0.2):
                            try:
                                tenant, name = json.loads(n.payload)
                            except (ValueError, TypeError):
                                on_reset()
                                continue
                            on_change(str(tenant), str(name))
            except psycopg.Error:
                log.warning("keystore listener lost its connection; reconnecting")
                on_reset()
                stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)


class _Started:
    """Whether a listener's first LISTEN came while ``subscribe`` still waited for it
    (then nothing was cached before it, and no reset is needed)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._gave_up = False

    def wait(self, timeout: float) -> None:
        self._event.wait(timeout)
        with self._lock:
            self._gave_up = not self._event.is_set()

    def listening(self) -> bool:
        """Records that LISTEN is on; true if it is the first time and in time."""
        with self._lock:
            first = not self._event.is_set() and not self._gave_up
            self._event.set()
            return first
