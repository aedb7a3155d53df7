"""Per-priority queues with a rule that keeps low priorities from starving.

The rule (documented in README too): a dispatch takes the oldest request of the highest
non-empty class, except that a lower class passed over ``PATIENCE`` times in a row while
it had work is served once. So with ``high`` and ``normal`` flooding, ``bulk`` still gets
at least one dispatch in ``PATIENCE + 1``; ``high`` is never delayed by more than one
dispatch per lower class.

Plain data structure: not thread-safe on its own; the scheduler holds its lock around it.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

PRIORITIES = ("high", "normal", "bulk")
PATIENCE = 8


class PriorityQueues(Generic[T]):
    def __init__(self, patience: int = PATIENCE) -> None:
        self._queues: dict[str, deque[T]] = {p: deque() for p in PRIORITIES}
        self._passed = dict.fromkeys(PRIORITIES, 0)
        self._patience = patience
        # requests held back by QoS until a time: (due, seq, priority, item)
        self._delayed: list[tuple[float, int, str, T]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values()) + len(self._delayed)

    def depth(self) -> dict[str, int]:
        d = {p: len(q) for p, q in self._queues.items()}
        d["delayed"] = len(self._delayed)
        return d

    def put(self, priority: str, item: T, *, not_before: float = 0.0, now: float = 0.0) -> None:
        if not_before > now:
            heapq.heappush(self._delayed, (not_before, next(self._seq), priority, item))
        else:
            self._queues[priority].append(item)

    def has_work_for(self, names: frozenset[str]) -> bool:
        """Whether a queue head could go to one of ``names`` (items with ``engines``)."""
        return any(q and not names.isdisjoint(getattr(q[0], "engines", ()))
                   for q in self._queues.values())

    def put_front(self, priority: str, item: T) -> None:
        """Give back an item an engine could not take: it keeps its place."""
        self._queues[priority].appendleft(item)

    def release_due(self, now: float) -> float | None:
        """Move delayed items that are due into their queues; returns the next due time."""
        while self._delayed and self._delayed[0][0] <= now:
            _, _, priority, item = heapq.heappop(self._delayed)
            self._queues[priority].append(item)
        return self._delayed[0][0] if self._delayed else None

    def next_class(self) -> str | None:
        """The class the next dispatch serves, by the rule above (None: all empty)."""
        nonempty = [p for p in PRIORITIES if self._queues[p]]
        if not nonempty:
            return None
        for p in reversed(nonempty[1:]):  # the most starved lower class first
            if self._passed[p] >= self._patience:
                return p
        return nonempty[0]

    def served(self, chosen: str) -> None:
        """Count a dispatch from ``chosen``: every other waiting class was passed over."""
        for p in PRIORITIES:
            if self._queues[p] or p == chosen:
                self._passed[p] = 0 if p == chosen else self._passed[p] + 1

    def choose(self) -> str | None:
        """``next_class`` and count it served (for callers that always dispatch)."""
        chosen = self.next_class()
        if chosen is not None:
            self.served(chosen)
        return chosen

    def pop(self, priority: str) -> T:
        return self._queues[priority].popleft()

    def peek(self, priority: str) -> T:
        return self._queues[priority][0]

    def drain(self) -> Iterator[T]:
        """Everything still queued (for close and failover), emptying the queues."""
        for q in self._queues.values():
            while q:
                yield q.popleft()
        while self._delayed:
            yield heapq.heappop(self._delayed)[3]
