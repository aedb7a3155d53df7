"""The audit trail's in-memory side: who used which key version for what.

Writing a row per request would put a database write in every encrypt's path, so by
default uses are aggregated in memory per (tenant, key, version, op, principal, second)
as a count and a byte total, and written out by ``flush`` (a background thread calls it
every ``interval`` seconds; ``close`` flushes what is left). ``mode="requests"`` keeps
one record per use instead, still written in batches. Either way a crash loses at most
one interval of use records; admin events do not pass through here: the store writes
them in the same transaction as the change they describe.

Records never hold payloads or secrets: names, numbers and the principal's label.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ...exceptions import InvalidRequest

log = logging.getLogger(__name__)

MODES = ("aggregate", "requests")


@dataclass(frozen=True)
class AuditRow:
    """One row of the ``audit`` table. ``kind`` is "use" or "admin"."""

    ts: float
    kind: str
    tenant: str
    key: str
    version: int
    op: str
    count: int = 1
    nbytes: int = 0
    principal: str = ""
    detail: str = ""


_Slot = tuple[str, str, int, str, str, int]  # tenant, key, version, op, principal, second
_Request = tuple[float, str, str, int, str, int, str]  # ts, tenant, key, version, op, ...
_now = time.time


class AuditLog:
    """Collects uses and hands them to ``write`` (the store's batch insert) on flush."""

    def __init__(self, write: Callable[[list[AuditRow]], None], *,
                 mode: str = "aggregate", interval: float = 1.0) -> None:
        if mode not in MODES:
            raise InvalidRequest(f"audit mode must be one of {', '.join(MODES)}")
        self.mode = mode
        self.interval = interval
        self._write = write
        self._lock = threading.Lock()
        self._counts: dict[_Slot, list[int]] = {}
        self._requests: list[_Request] = []
        self._failed: list[AuditRow] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._flush_lock = threading.Lock()  # one flush at a time keeps rows in order
        if mode == "requests":
            self.record = self._record_request  # type: ignore[method-assign]

    def record(self, tenant: str, key: str, version: int, op: str, nbytes: int = 0,
               principal: str = "") -> None:
        """One use: a dict increment under a lock (well under a microsecond)."""
        slot = (tenant, key, version, op, principal, int(_now()))
        with self._lock:
            c = self._counts.get(slot)
            if c is None:
                self._counts[slot] = [1, nbytes]
            else:
                c[0] += 1
                c[1] += nbytes

    def _record_request(self, tenant: str, key: str, version: int, op: str,
                        nbytes: int = 0, principal: str = "") -> None:
        # a plain tuple: a frozen dataclass per request would cost microseconds
        row = (_now(), tenant, key, version, op, nbytes, principal)
        with self._lock:
            self._requests.append(row)

    def pending(self) -> int:
        with self._lock:
            return len(self._counts) + len(self._requests) + len(self._failed)

    def flush(self) -> int:
        """Write what was recorded since the last flush; returns the rows written. On a
        write failure the rows go back to be retried by the next flush."""
        with self._flush_lock:
            with self._lock:
                counts, self._counts = self._counts, {}
                requests, self._requests = self._requests, []
                rows, self._failed = self._failed, []
            rows += [AuditRow(r[0], "use", r[1], r[2], r[3], r[4], 1, r[5], r[6])
                     for r in requests]
            rows += [AuditRow(float(s[5]), "use", s[0], s[1], s[2], s[3], c[0], c[1], s[4])
                     for s, c in counts.items()]
            if not rows:
                return 0
            rows.sort(key=lambda r: r.ts)
            try:
                self._write(rows)
            except BaseException:
                with self._lock:
                    self._failed[:0] = rows
                raise
            return len(rows)

    # -- the background flusher ---------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="keystore-audit",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.flush()
            except Exception:  # the database may be away; keep the rows, try again
                log.warning("audit flush failed; will retry", exc_info=True)

    def close(self) -> None:
        """Stop the flusher and write what is left."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.flush()
