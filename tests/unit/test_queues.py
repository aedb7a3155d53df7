from __future__ import annotations

import itertools

from cryptoplane.scheduler.queues import PATIENCE, PriorityQueues


def drain_order(q: PriorityQueues[str], n: int) -> list[str]:
    out = []
    for _ in range(n):
        cls = q.choose()
        if cls is None:
            break
        out.append(q.pop(cls))
    return out


def test_strict_priority_when_lower_classes_are_empty() -> None:
    q: PriorityQueues[str] = PriorityQueues()
    for i in range(3):
        q.put("normal", f"n{i}")
    q.put("high", "h0")
    assert drain_order(q, 10) == ["h0", "n0", "n1", "n2"]


def test_bulk_progresses_under_a_flood_of_high() -> None:
    q: PriorityQueues[str] = PriorityQueues()
    for i in range(100):
        q.put("high", f"h{i}")
    for i in range(5):
        q.put("bulk", f"b{i}")
    order = drain_order(q, 45)
    bulk = [i for i, x in enumerate(order) if x.startswith("b")]
    assert len(bulk) == 5 and bulk[0] == PATIENCE  # served after PATIENCE passes
    gaps = [b - a for a, b in itertools.pairwise(bulk)]
    assert all(g == PATIENCE + 1 for g in gaps)


def test_high_is_delayed_by_at_most_one_dispatch_per_lower_class() -> None:
    q: PriorityQueues[str] = PriorityQueues(patience=2)
    for i in range(10):
        q.put("normal", f"n{i}")
        q.put("bulk", f"b{i}")
    q.choose(), q.choose(), q.choose()  # lower classes accumulate passes
    q.put("high", "h")
    order = drain_order(q, 4)
    assert order.index("h") <= 2


def test_delayed_items_wait_for_their_time() -> None:
    q: PriorityQueues[str] = PriorityQueues()
    q.put("high", "later", not_before=10.0, now=0.0)
    q.put("bulk", "now")
    assert q.choose() == "bulk"
    assert q.release_due(5.0) == 10.0
    assert q.depth()["delayed"] == 1
    assert q.release_due(10.0) is None
    assert q.pop("high") == "later"


def test_put_front_keeps_place_and_drain_empties() -> None:
    q: PriorityQueues[str] = PriorityQueues()
    q.put("normal", "a")
    q.put("normal", "b")
    first = q.pop("normal")
    q.put_front("normal", first)
    assert q.peek("normal") == "a"
    q.put("bulk", "x", not_before=5.0, now=0.0)
    assert sorted(q.drain()) == ["a", "b", "x"]
    assert len(q) == 0
