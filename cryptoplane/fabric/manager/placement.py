"""The manager's arithmetic, apart from the database: whether a quota fits what the pool
has left (admission), and which servers a grant goes to, with which share (placement).

Pure functions over plain numbers, so the rules can be read (and tested) in one place;
``state.py`` feeds them what one transaction read and writes back what they chose.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .protocol import Rates

MEASURES = ("ops", "bytes")
_ZERO = (0.0, 0.0)
# relative slack on the capacity check, so that float sums of many shares that add up
# to exactly the capacity are not refused over a rounding error
SLACK = 1e-9

Pair = tuple[str, str]  # (class, measure)


@dataclass
class Candidate:
    """A live server as placement sees it: capacity and what is already placed on it,
    per class, as ``[ops, bytes]``."""

    server_id: str
    address: str
    cap: dict[str, list[float]] = field(default_factory=dict)
    placed: dict[str, list[float]] = field(default_factory=dict)

    def capacity(self, cls: str, measure: str) -> float:
        return self.cap.get(cls, [0.0, 0.0])[MEASURES.index(measure)]

    def free(self, cls: str, measure: str, overcommit: float) -> float:
        used = self.placed.get(cls, [0.0, 0.0])[MEASURES.index(measure)]
        return max(0.0, self.capacity(cls, measure) * overcommit - used)

    def add(self, rates: Rates, sign: float = 1.0) -> None:
        """Counts ``rates`` as placed here (``sign`` -1: no longer placed)."""
        for cls, rate in rates.items():
            got = self.placed.setdefault(cls, [0.0, 0.0])
            for i, m in enumerate(MEASURES):
                got[i] = max(0.0, got[i] + sign * rate.get(m, 0.0))


def asked(quota: Rates) -> list[Pair]:
    """The (class, measure) pairs a quota asks a rate above 0 for."""
    return [(cls, m) for cls, rate in sorted(quota.items()) for m in MEASURES
            if rate.get(m, 0.0) > 0]


def asked_classes(quota: Rates) -> list[str]:
    return sorted({cls for cls, _ in asked(quota)})


def totals(candidates: Iterable[Candidate]) -> Rates:
    """The capacity of these servers, summed per class."""
    out: Rates = {}
    for c in candidates:
        for cls, (ops, nbytes) in c.cap.items():
            t = out.setdefault(cls, {"ops": 0.0, "bytes": 0.0})
            t["ops"] += ops
            t["bytes"] += nbytes
    return out


def add_rates(total: Rates, rates: Rates, sign: float = 1.0) -> None:
    """``total += sign * rates`` in place, never below 0 (and float dust dropped: many
    additions and subtractions of the same shares need not cancel exactly)."""
    for cls, rate in rates.items():
        t = total.setdefault(cls, {"ops": 0.0, "bytes": 0.0})
        for m in MEASURES:
            v = t.get(m, 0.0) + sign * rate.get(m, 0.0)
            t[m] = v if v > 1e-6 else 0.0


def left_of(capacity: Rates, granted: Rates, overcommit: float,
            classes: Iterable[str]) -> Rates:
    """What can still be granted per class (ops and bytes) of ``classes``."""
    out: Rates = {}
    for cls in classes:
        cap = capacity.get(cls, {})
        got = granted.get(cls, {})
        out[cls] = {m: max(0.0, cap.get(m, 0.0) * overcommit - got.get(m, 0.0))
                    for m in MEASURES}
    return out


def _num(v: float) -> str:
    return f"{v:.0f}" if v == int(v) or v >= 1000 else f"{v:.2f}"


def refusal(quota: Rates, capacity: Rates, granted: Rates,
            overcommit: float) -> tuple[str, Rates] | None:
    """Why ``quota`` cannot be granted, with what is left per asked class; None if it
    fits: for every class and measure asked, granted + asked <= capacity x overcommit
    (a class no live server offers has capacity 0)."""
    pairs = asked(quota)
    left = left_of(capacity, granted, overcommit, sorted({cls for cls, _ in pairs}))
    short = []
    for cls, m in pairs:
        limit = capacity.get(cls, {}).get(m, 0.0) * overcommit
        want = granted.get(cls, {}).get(m, 0.0) + quota[cls][m]
        if limit <= 0 or want > limit * (1 + SLACK):
            short.append(f"{cls}: asked {_num(quota[cls][m])} {m}/s, "
                         f"{_num(left[cls][m])} left")
    if not short:
        return None
    return "the pool cannot grant this quota: " + "; ".join(short), left


def eligible(candidates: Iterable[Candidate], pairs: Sequence[Pair]) -> list[Candidate]:
    """The servers that offer every asked class and measure."""
    return [c for c in candidates if all(c.capacity(cls, m) > 0 for cls, m in pairs)]


def place(quota: Rates, mode: str, spread: int, candidates: Iterable[Candidate],
          overcommit: float, prefer: Collection[str] = (),
          pool_capacity: Rates | None = None) -> list[tuple[Candidate, Rates]]:
    """The servers a grant of ``quota`` goes to and what each enforces; [] if no live
    server offers every class asked.

    "spread": up to ``spread`` servers, those with the most free capacity for the asked
    classes first, each class's rate split in proportion to their free capacity (so a
    share fits its server's room when the chosen servers have room for the whole rate),
    never 0 for a rate above 0. "fail-over": ``spread`` servers (at least 2 when there
    are 2), each enforcing the whole rate. ``prefer``: server ids placed first (a grant
    being moved keeps its surviving servers). ``pool_capacity``: the whole pool's, when
    ``candidates`` are only the best few of it (free room is weighed against it)."""
    pairs = [(cls, m, MEASURES.index(m)) for cls, m in asked(quota)]
    pool = [c for c in candidates
            if all(c.cap.get(cls, _ZERO)[i] > 0 for cls, _, i in pairs)]
    if not pool:
        return []
    # free capacity measured against the pool's total per pair, so that a class of
    # 10k ops/s and one of 1 GB/s weigh alike in the choice
    if pool_capacity is None:
        scale = [sum(c.cap[cls][i] for c in pool) or 1.0 for cls, _, i in pairs]
    else:
        scale = [pool_capacity.get(cls, {}).get(m) or 1.0 for cls, m, _ in pairs]

    def rank(c: Candidate) -> tuple[bool, bool, float, str]:
        # one pass per server: a moved grant is placed among a thousand of them
        score, roomy = 0.0, True
        for (cls, _, i), s in zip(pairs, scale, strict=True):
            free = c.cap[cls][i] * overcommit - c.placed.get(cls, _ZERO)[i]
            if free > 0:
                score += free / s
            else:
                roomy = False
        return c.server_id not in prefer, not roomy, -score, c.server_id

    n = max(spread, 2) if mode == "fail-over" else spread
    ranked = heapq.nsmallest(n, pool, key=rank)

    def roomy(c: Candidate) -> bool:
        return not rank(c)[1]

    classes = {cls for cls, _, _ in pairs}
    whole = {cls: dict(rate) for cls, rate in quota.items() if cls in classes}
    if mode == "fail-over":
        return [(c, {k: dict(v) for k, v in whole.items()})
                for c in ranked[:max(spread, 2)]]
    chosen = ranked[:spread]
    # a server with no room left would get a share of 0 by proportion: keep it only if
    # nothing better exists (then the rate is split evenly)
    if any(roomy(c) for c in chosen):
        chosen = [c for c in chosen if roomy(c)]
    shares: list[Rates] = [{cls: {"ops": 0.0, "bytes": 0.0} for cls in whole}
                           for _ in chosen]
    for cls, m, _ in pairs:
        rate = quota[cls][m]
        weights = [c.free(cls, m, overcommit) for c in chosen]
        total = sum(weights)
        if total <= 0 or min(weights) <= 0:
            weights, total = [1.0] * len(chosen), float(len(chosen))
        given = 0.0
        for i, w in enumerate(weights):
            # the last share takes the remainder, so the shares sum to the rate exactly
            share = rate - given if i == len(weights) - 1 else rate * w / total
            shares[i][cls][m] = max(share, 0.0)
            given += share
    return list(zip(chosen, shares, strict=True))


def candidates_from_rows(rows: Iterable[Sequence[object]]) -> dict[str, Candidate]:
    """Candidates from ``(server_id, address, class, cap_ops, cap_bytes, placed_ops,
    placed_bytes)`` rows."""
    out: dict[str, Candidate] = {}
    for sid, address, cls, cap_ops, cap_bytes, placed_ops, placed_bytes in rows:
        c = out.get(str(sid))
        if c is None:
            c = out[str(sid)] = Candidate(str(sid), str(address))
        c.cap[str(cls)] = [_f(cap_ops), _f(cap_bytes)]
        c.placed[str(cls)] = [_f(placed_ops), _f(placed_bytes)]
    return out


def _f(v: object) -> float:
    return float(v) if isinstance(v, (int, float)) else 0.0


def rates_sum(parts: Iterable[Rates]) -> Rates:
    out: Rates = {}
    for r in parts:
        add_rates(out, r)
    return out


def only(rates: Mapping[str, Mapping[str, float]], classes: Collection[str]) -> Rates:
    return {cls: dict(v) for cls, v in rates.items() if cls in classes}
