"""The embedded backend: one SQLite file in WAL mode (stdlib ``sqlite3``).

One connection per store object, behind a lock: every call is a few short statements,
so serialising them costs less than a connection per thread would, and the lock makes
the object safe to call from any thread (an asyncio server's executor included).
Several processes may open the same file: writes take the database's write lock at
``BEGIN IMMEDIATE`` (waiting up to ``busy_timeout``), so concurrent rotations queue
instead of colliding; other processes' changes reach caches through the generation row.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .base import Keystore
from .core import Tx

BUSY_TIMEOUT_MS = 10_000


class SqliteKeystore(Keystore):
    dialect = "sqlite"

    def __init__(self, path: str | os.PathLike[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = os.fspath(path)
        if self.path != ":memory:" and not os.path.exists(self.path):
            # created private: the material is wrapped, but the file is nobody else's
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.path, isolation_level=None,
                                     check_same_thread=False,
                                     timeout=BUSY_TIMEOUT_MS / 1000)
        self._wal()
        # FULL: a key whose creation returned must survive a power cut, or data
        # encrypted under it is lost; key changes are rare enough to pay the fsync
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

    def _wal(self) -> None:
        """Switches a new file to WAL. SQLite answers "database is locked" at once,
        without its busy handler, when several processes or threads make that switch
        together (several servers started at once over one new file): retry it for as
        long as busy_timeout would have waited."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                self._conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def __repr__(self) -> str:
        return f"SqliteKeystore({self.path!r})"

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[Tx]:
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield Tx(cur, pyformat=False)
                cur.execute("COMMIT")
            except BaseException:  # the body's error or a failed COMMIT: undo it all
                if self._conn.in_transaction:
                    cur.execute("ROLLBACK")
                raise
            finally:
                cur.close()

    def _close_connections(self) -> None:
        with self._lock:
            self._conn.close()
