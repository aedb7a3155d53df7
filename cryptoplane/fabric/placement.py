"""Which server a client's request goes to: the pool's placement modes, after DPDK's
cryptodev scheduler (round-robin, packet-size-distribution, fail-over) plus a
least-loaded mode that weighs each server by its measured speed.

- ``least-loaded`` (the default): per server an EWMA of its service time (an answer's
  latency divided by the requests it had in flight when this one was sent, itself
  included) and its requests in flight; the server with the smallest expected wait,
  ``(in flight + 1) x service time``, gets the call. A server slowed by other work
  answers later, its service time grows, and it gets a smaller share. One call in
  ``EXPLORE`` goes to the next server in turn whatever its estimate, so an estimate
  that was once too high (a key loaded, a slow spell) is measured again and not
  remembered for ever.
- ``round-robin``: each call to the next live server in turn (per server, not per
  connection: a server's connections share its turn).
- ``size-split``: calls whose payload is at least ``threshold`` bytes (128 by default,
  DPDK's) go to the *big* servers, smaller ones to the *small* servers. The big set is
  ``big=`` (URLs) when given, else the first server of the list; the small set is every
  other server. A set with no live server hands its calls to the other.
- ``fail-over``: servers in list order; every call to the first live one; the next is
  used only while every earlier one is down (its connections dead or retired by
  GOAWAY), and calls go back to the first as soon as it is live again.

A mode only chooses among live servers; what happens to a call whose server dies is the
pool's (``pool.py``) and the same in every mode.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from .connection_client import Call, ClientConnection, Endpoint

DEFAULT_THRESHOLD: Final = 128  # bytes: DPDK's packet-size-distribution default
ALPHA: Final = 0.2  # weight of a new service-time sample in the EWMA
WARMUP: Final = 8  # answers during which a faster sample weighs WARM_ALPHA
WARM_ALPHA: Final = 0.5
EXPLORE: Final = 16  # one call in this many refreshes the estimates, in turn
MODES: Final = ("least-loaded", "round-robin", "size-split", "fail-over")


class ServerState:
    """One server of a pool: its connections and what the pool measured of it."""

    __slots__ = ("answered", "conns", "endpoint", "ewma", "failures", "inflight",
                 "retired", "samples", "sent", "url")

    def __init__(self, url: str) -> None:
        self.url = url
        self.endpoint = Endpoint(url)
        self.conns: list[ClientConnection] = []
        self.retired = False  # removed by set_servers: nothing new goes here
        self.inflight = 0  # calls sent here and not yet answered, lost or expired
        self.ewma: float | None = None  # seconds of service per call (None: unknown)
        self.samples = 0
        self.sent = 0  # sends, resends included
        self.answered = 0
        self.failures = 0  # connection attempts failed in a row

    @property
    def live(self) -> bool:
        return not self.retired and any(c.usable for c in self.conns)

    def conn(self) -> ClientConnection | None:
        """Its usable connection with the fewest calls pending and room for one more."""
        best: ClientConnection | None = None
        n = 1 << 62
        for c in self.conns:
            if c.usable:
                k = len(c.pending)
                if k < n and k < c.max_in_flight:
                    best, n = c, k
        return best

    def learn(self, latency: float, inflight_at_send: int) -> None:
        sample = latency / (inflight_at_send + 1)
        self.samples += 1
        if self.ewma is None:
            self.ewma = sample
            return
        # the first answers are often slow (a key's first use loads it): while the
        # estimate is young, faster answers bring it down quickly
        alpha = WARM_ALPHA if self.samples <= WARMUP and sample < self.ewma else ALPHA
        self.ewma += alpha * (sample - self.ewma)

    def __repr__(self) -> str:
        return f"<server {self.url} inflight={self.inflight} sent={self.sent}>"


class Placement:
    """Chooses a connection for a call among the pool's servers (in list order).
    ``measures``: it reads the servers' service times (the pool times answers only
    then: a clock read per send and per answer)."""

    name = ""
    measures = False

    def choose(self, servers: Sequence[ServerState],
               call: Call | None) -> ClientConnection | None:
        raise NotImplementedError

    def describe(self) -> dict[str, object]:
        return {"mode": self.name}


def _least_inflight(servers: Iterable[ServerState]) -> ClientConnection | None:
    best: ClientConnection | None = None
    n = 1 << 62
    for s in servers:
        if s.inflight < n:
            c = s.conn()
            if c is not None:
                best, n = c, s.inflight
    return best


class LeastLoaded(Placement):
    name = "least-loaded"
    measures = True

    def __init__(self) -> None:
        self._calls = 0
        self._turn = RoundRobin()

    def choose(self, servers: Sequence[ServerState],
               call: Call | None) -> ClientConnection | None:
        self._calls += 1
        if self._calls >= EXPLORE:
            self._calls = 0
            c = self._turn.choose(servers, call)
            if c is not None:
                return c
        best: ClientConnection | None = None
        score = float("inf")
        unmeasured = False
        for s in servers:
            e = s.ewma
            if e is None:
                unmeasured = True
                continue
            wait = (s.inflight + 1) * e
            if wait < score:
                c = s.conn()
                if c is not None:
                    best, score = c, wait
        if unmeasured:
            # a server not measured yet is taken to be as fast as the fastest measured
            # (it is tried): its wait, its in-flight calls times that
            fastest = min((s.ewma for s in servers if s.ewma is not None), default=0.0)
            for s in servers:
                if s.ewma is None and (s.inflight + 1) * fastest <= score:
                    c = s.conn()
                    if c is not None:
                        best, score = c, (s.inflight + 1) * fastest
        return best


class RoundRobin(Placement):
    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, servers: Sequence[ServerState],
               call: Call | None) -> ClientConnection | None:
        n = len(servers)
        for i in range(n):
            k = (self._next + i) % n
            c = servers[k].conn()
            if c is not None:
                self._next = k + 1
                return c
        return None


class SizeSplit(Placement):
    name = "size-split"

    def __init__(self, threshold: int = DEFAULT_THRESHOLD,
                 big: Iterable[str] | None = None) -> None:
        if threshold < 0:
            raise ValueError("threshold must be >= 0")
        self.threshold = threshold
        self.big = frozenset(big) if big is not None else None

    def _is_big(self, s: ServerState, first: ServerState) -> bool:
        return s is first if self.big is None else s.url in self.big

    def choose(self, servers: Sequence[ServerState],
               call: Call | None) -> ClientConnection | None:
        if not servers:
            return None
        first = servers[0]
        want_big = call is not None and call.nbytes >= self.threshold
        mine = [s for s in servers if self._is_big(s, first) == want_big]
        if any(s.live for s in mine):
            return _least_inflight(mine)
        return _least_inflight(s for s in servers if self._is_big(s, first) != want_big)

    def describe(self) -> dict[str, object]:
        return {"mode": self.name, "threshold": self.threshold,
                "big": sorted(self.big) if self.big is not None else "first server"}


class FailOver(Placement):
    name = "fail-over"

    def choose(self, servers: Sequence[ServerState],
               call: Call | None) -> ClientConnection | None:
        for s in servers:
            if s.live:
                return s.conn()  # None when it is full: the call waits for it
        return None


def make_placement(placement: str | Placement, *, threshold: int = DEFAULT_THRESHOLD,
                   big: Iterable[str] | None = None) -> Placement:
    """A ``Placement`` from its mode's name (or the object itself)."""
    if isinstance(placement, Placement):
        return placement
    if placement == "least-loaded":
        return LeastLoaded()
    if placement == "round-robin":
        return RoundRobin()
    if placement == "size-split":
        return SizeSplit(threshold, big)
    if placement == "fail-over":
        return FailOver()
    raise ValueError(f"unknown placement {placement!r}; one of {', '.join(MODES)}")


__all__ = ["DEFAULT_THRESHOLD", "MODES", "FailOver", "LeastLoaded", "Placement",
           "RoundRobin", "ServerState", "SizeSplit", "make_placement"]
