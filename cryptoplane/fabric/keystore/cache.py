"""A server's in-memory view of the keys it uses: unwrapped records, kept fresh.

Freshness comes from two signals. The store's ``subscribe`` reports changes (those made
through the same store object at once; on PostgreSQL every server's, by NOTIFY within
milliseconds) and resets (the listener reconnected: NOTIFY has no replay, so the whole
cache goes). As a safety net for both backends, at most every ``max_age`` seconds a
``get`` reads the store's generation counter, one row that every change bumps, and drops
everything if it moved: a change made anywhere is seen within ``max_age`` even if every
notification was lost. "No such key" is remembered for ``max_age`` at most.

A fetch that raced an invalidation is not cached (the epoch check), so a notification
arriving while a record is being read can never leave the old record behind.
"""

from __future__ import annotations

import threading
import time
from typing import Self

from ..errors import KeyNotFound
from ..keytypes import KeyRecord
from ..transit.source import not_found
from .base import Keystore


class KeyCache:
    def __init__(self, store: Keystore, max_age: float = 1.0, *, listen: bool = True) -> None:
        self.store = store
        self.max_age = max_age
        self._lock = threading.Lock()
        # (tenant, name) -> (record, or None for "no such key", when it was read)
        self._entries: dict[tuple[str, str], tuple[KeyRecord | None, float]] = {}
        self._epoch = 0
        self._generation = store.generation()
        self._checked = time.monotonic()
        self._unsubscribe = store.subscribe(self.invalidate, self.clear) if listen else None

    def get(self, tenant: str, name: str) -> KeyRecord:
        """The key, from memory when it is known to be current; ``KeyNotFound`` as the
        store raises it."""
        now = time.monotonic()
        if now - self._checked >= self.max_age:
            self._check_generation(now)
        entry = self._entries.get((tenant, name))
        if entry is not None:
            record, at = entry
            if record is not None:
                return record
            if now - at < self.max_age:
                raise not_found(name)
        epoch = self._epoch
        try:
            record = self.store.get_key(tenant, name)
        except KeyNotFound:
            self._put(epoch, tenant, name, None, now)
            raise
        self._put(epoch, tenant, name, record, now)
        return record

    def _put(self, epoch: int, tenant: str, name: str, record: KeyRecord | None,
             now: float) -> None:
        with self._lock:
            if epoch == self._epoch:
                self._entries[(tenant, name)] = (record, now)

    def _check_generation(self, now: float) -> None:
        self._checked = now  # first, so concurrent gets do not all read it
        epoch = self._epoch
        generation = self.store.generation()
        with self._lock:
            if generation != self._generation:
                self._generation = generation
                self._entries.clear()
                self._epoch += 1
            elif epoch != self._epoch:
                pass  # an invalidation ran meanwhile; it already dropped what it must

    def invalidate(self, tenant: str, name: str) -> None:
        """Forgets ``tenant``/``name`` (``name=""``: a tenant-level change, no key)."""
        with self._lock:
            self._epoch += 1
            if name:
                self._entries.pop((tenant, name), None)

    def clear(self) -> None:
        with self._lock:
            self._epoch += 1
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
