"""A crypto server's side of grants: the manager keys it trusts, the grants its clients
presented, and the token buckets that hold each grant to the rates the manager gave this
server.

A client presents its grant's token in HELLO (``"grant"``) or with GRANT_PRESENT; the
server checks it here (``verify``: Ed25519 and a little JSON, no call to the manager)
and the connection keeps the grant's ``GrantEntry``. Every data request is then charged
to the entry's bucket for its algorithm class (``capacity``): over the rate, THROTTLED
with the time to wait and the request does not run, exactly as the tenant limits do
(``qos``: the same burst, the same never-charge-on-refusal rule). One entry per grant
id, shared by every connection that presented it, so a client cannot multiply its rate
by opening connections, and a renewal on one connection counts for all.

Without a grant a connection's ``grant`` is None (grants optional: served as before, one
attribute check) or ``NO_GRANT`` (grants required: data requests FORBIDDEN, key
management, digests and random still served).

Not thread-safe: the server uses it from its event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..scheduler.bucket import Limit
from .capability import GrantClaims, GrantRefused, key_id, public_key_from_b64, verify_grant
from .capacity import CLASSES, FREE
from .errors import Forbidden, Unauthorized
from .qos import BURST_SECONDS

Clock = Callable[[], float]
# class -> {"ops": ops/s, "bytes": bytes/s}, as manager/protocol.py's Rates
Rates = dict[str, dict[str, float]]

# grants one server holds at once; past it, expired ones go and then new ones are
# refused (a client needs a manager-signed token to add one, but keys do leak)
MAX_GRANTS: Final = 65_536
# revoked grant ids remembered (a revocation outlives the grant's entry)
MAX_REVOKED: Final = 65_536
REQUIRED_MESSAGE: Final = "this server serves granted clients; ask the manager for a quota"


class GrantEntry:
    """One grant as this server enforces it: its expiry, whether it was revoked, and a
    ``Limit`` per algorithm class it covers."""

    __slots__ = ("_served", "_wall", "expires_at", "grant_id", "limits", "required",
                 "revoked", "tenant", "throttled")

    def __init__(self, grant_id: str, tenant: str, *, required: bool, wall: Clock,
                 served: dict[str, list[float]], throttled: dict[str, int]) -> None:
        self.grant_id = grant_id
        self.tenant = tenant
        self.expires_at = 0.0
        self.revoked = False
        self.required = required  # a class the grant does not cover is refused
        self.limits: dict[str, Limit] = {}
        self._wall = wall
        self._served = served
        self.throttled = throttled

    def check(self, cls: str, ops: int, nbytes: int) -> float:
        """0.0: ``ops``/``nbytes`` of ``cls`` may run now (``take`` them then); else the
        seconds to wait. Takes nothing. Raises ``Unauthorized`` for an expired or
        revoked grant, ``Forbidden`` for a class it does not cover (grants required)."""
        if self.revoked:
            raise Unauthorized(f"grant {self.grant_id} was revoked; ask the manager again")
        if self._wall() >= self.expires_at:
            raise Unauthorized(f"grant {self.grant_id} expired; renew it")
        limit = self.limits.get(cls)
        if limit is None:
            if self.required:
                raise Forbidden(f"grant {self.grant_id} does not cover {cls} on this "
                                "server; ask the manager for a quota")
            return 0.0
        return limit.wait_for(ops, nbytes)

    def refused(self, cls: str) -> None:
        """Count one request of ``cls`` answered THROTTLED (for /metrics)."""
        self.throttled[cls] = self.throttled.get(cls, 0) + 1

    def take(self, cls: str, ops: int, nbytes: int) -> None:
        """Charge what ``check`` just allowed (it cannot refuse: tokens only grow)."""
        limit = self.limits.get(cls)
        if limit is not None:
            limit.try_take(ops, nbytes)
        row = self._served.get(cls)
        if row is not None:
            row[0] += ops
            row[1] += nbytes

    def admit(self, cls: str, ops: int, nbytes: int) -> float:
        """``check`` and, when it says go, ``take``."""
        wait = self.check(cls, ops, nbytes)
        if wait:
            self.refused(cls)
        else:
            self.take(cls, ops, nbytes)
        return wait


class _NoGrant(GrantEntry):
    """A connection without a grant on a server that requires one."""

    def check(self, cls: str, ops: int, nbytes: int) -> float:
        raise Forbidden(REQUIRED_MESSAGE)


NO_GRANT: Final[GrantEntry] = _NoGrant("", "", required=True, wall=time.time, served={},
                                       throttled={})


class GrantTable:
    """See the module docstring. ``keys``: manager key id -> raw Ed25519 public key,
    base64 (as a registration answer gives them); ``required``: whether connections
    without a grant may ask for data operations."""

    def __init__(self, server_id: str, *, keys: Mapping[str, str] | None = None,
                 required: bool = False, max_grants: int = MAX_GRANTS,
                 burst_seconds: float = BURST_SECONDS, clock: Clock = time.monotonic,
                 wall: Clock = time.time) -> None:
        self.server_id = server_id
        self.required = required
        self.max_grants = max_grants
        self.burst_seconds = burst_seconds
        self._clock = clock
        self._wall = wall
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._entries: dict[str, GrantEntry] = {}
        self._revoked: dict[str, None] = {}  # insertion-ordered: the oldest go first
        # class -> [ops, bytes] admitted since the last load(); and in all
        self._served: dict[str, list[float]] = {c: [0.0, 0.0] for c in CLASSES}
        self.totals: dict[str, list[float]] = {c: [0.0, 0.0] for c in CLASSES}
        self.throttled: dict[str, int] = {}
        self._loaded_at = clock()
        if keys:
            self.update_keys(keys)

    # -- manager keys ------------------------------------------------------------------

    def update_keys(self, keys: Mapping[str, str]) -> None:
        """Trust these manager keys too (key id -> base64). A key whose id does not
        match its bytes is refused (``GrantRefused``): ids are what tokens name."""
        for kid, b64 in keys.items():
            public = public_key_from_b64(b64)
            if key_id(public) != kid:
                raise GrantRefused(f"manager key {kid!r} does not match its id")
            self._keys[kid] = public

    def add_key(self, b64: str) -> str:
        """Trust one manager public key (raw, base64); returns its id."""
        public = public_key_from_b64(b64)
        kid = key_id(public)
        self._keys[kid] = public
        return kid

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    # -- grants ------------------------------------------------------------------------

    def verify(self, token: str, tenant: str) -> GrantClaims:
        """The claims of ``token`` if a trusted manager signed it for this server and
        ``tenant`` and it is neither expired nor revoked; else ``GrantRefused``."""
        claims = verify_grant(token, self._keys, server_id=self.server_id, tenant=tenant,
                              now=self._wall())
        if claims.grant_id in self._revoked:
            raise GrantRefused(f"grant {claims.grant_id} was revoked")
        return claims

    def enter(self, claims: GrantClaims) -> GrantEntry:
        """The entry for a verified grant, made or brought up to date (a renewal may
        change its expiry and rates; the buckets keep their tokens)."""
        entry = self._entries.get(claims.grant_id)
        if entry is None:
            if len(self._entries) >= self.max_grants:
                self.purge()
                if len(self._entries) >= self.max_grants:
                    raise GrantRefused("this server holds too many grants; try another")
            entry = GrantEntry(claims.grant_id, claims.tenant, required=self.required,
                               wall=self._wall, served=self._served,
                               throttled=self.throttled)
            self._entries[claims.grant_id] = entry
        elif entry.tenant != claims.tenant:
            raise GrantRefused("grant id reused for another tenant")
        entry.expires_at = max(entry.expires_at, claims.expires_at)
        rates = claims.rates_for(self.server_id) or {}
        for cls, (ops, nbytes) in rates.items():
            if cls == FREE:
                continue
            limit = entry.limits.get(cls)
            if limit is None:
                limit = entry.limits[cls] = Limit(ops, nbytes, clock=self._clock)
            self._configure(limit, ops, nbytes)
        for cls in set(entry.limits) - set(rates):
            del entry.limits[cls]
        return entry

    def present(self, token: str, tenant: str) -> GrantEntry:
        """``verify`` and ``enter``: what HELLO and GRANT_PRESENT do."""
        return self.enter(self.verify(token, tenant))

    def _configure(self, limit: Limit, ops: float, nbytes: float) -> None:
        # qos.RateLimits' burst, for the reasons its docstring gives: at least one op
        # (or byte), so a request bigger than the burst still runs when the bucket is
        # full (into debt) rather than never
        for bucket, rate in ((limit.ops, ops), (limit.bytes, nbytes)):
            bucket.set(rate, burst=max(1.0, rate * self.burst_seconds) if rate else None)

    def admit(self, claims: GrantClaims, cls: str, ops: int, nbytes: int) -> float:
        """0.0: go, and the request is charged to the grant's bucket for ``cls``; else
        the seconds to wait, nothing charged. The grant must have been entered."""
        entry = self._entries.get(claims.grant_id)
        if entry is None:
            raise Unauthorized(f"grant {claims.grant_id} is not held by this server")
        return entry.admit(cls, ops, nbytes)

    def revoke(self, grant_ids: Iterable[str]) -> int:
        """Stop honouring these grants at once (their connections get UNAUTHORIZED);
        returns how many were held here."""
        n = 0
        for gid in grant_ids:
            self._revoked[gid] = None
            entry = self._entries.pop(gid, None)
            if entry is not None:
                entry.revoked = True
                n += 1
        while len(self._revoked) > MAX_REVOKED:
            del self._revoked[next(iter(self._revoked))]
        return n

    def purge(self) -> int:
        """Drop the entries of expired grants (connections holding one keep refusing
        with 'expired'); returns how many went."""
        now = self._wall()
        gone = [gid for gid, e in self._entries.items() if e.expires_at <= now]
        for gid in gone:
            del self._entries[gid]
        return len(gone)

    def __len__(self) -> int:
        return len(self._entries)

    # -- load ------------------------------------------------------------------------

    def load(self) -> Rates:
        """Per class, the ops/s and bytes/s admitted under grants since the last call
        (what heartbeats tell the manager); classes with nothing served are left out."""
        now = self._clock()
        elapsed = max(now - self._loaded_at, 1e-3)
        self._loaded_at = now
        out: Rates = {}
        for cls, row in self._served.items():
            if row[0] or row[1]:
                total = self.totals[cls]
                total[0] += row[0]
                total[1] += row[1]
                out[cls] = {"ops": row[0] / elapsed, "bytes": row[1] / elapsed}
                row[0] = row[1] = 0.0
        return out

    def admitted(self) -> dict[str, tuple[float, float]]:
        """Per class, ops and bytes admitted in all (for /metrics)."""
        return {c: (t[0] + self._served[c][0], t[1] + self._served[c][1])
                for c, t in self.totals.items()}


__all__ = ["MAX_GRANTS", "NO_GRANT", "REQUIRED_MESSAGE", "GrantEntry", "GrantTable"]
