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

What each grant admitted is counted twice: per class for the server (``load``) and per
tenant and class (``tenant_load``), into a table shared by the tenant's entries (made
with its first one), so the hot path pays one more list update, not a dict lookup.

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

from .capability import GrantClaims, GrantRefused, key_id, public_key_from_b64, verify_grant
from .capacity import CLASSES
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
# tenants a heartbeat reports (the busiest; the manager takes at most 1,024)
MAX_TENANTS_REPORTED: Final = 256


# A wait shorter than this is no wait (``scheduler.bucket``'s slack, for its reasons)
_SLACK_S: Final = 1e-6


def _wait(rate: float, burst: float, tokens: float, amount: float) -> float:
    """Seconds until ``amount`` may be taken from a bucket holding ``tokens`` (0: now);
    ``TokenBucket.wait_for``'s rule: more than the burst goes when the bucket is full."""
    if tokens + rate * _SLACK_S >= amount:
        return 0.0
    if amount > burst:
        return 0.0 if tokens + rate * _SLACK_S >= burst else (burst - tokens) / rate
    return (amount - tokens) / rate


class GrantEntry:
    """One grant as this server enforces it: its expiry, whether it was revoked, and an
    ops/s and a bytes/s token bucket per algorithm class it covers.

    The buckets are ``scheduler.bucket.TokenBucket``'s arithmetic, inlined: one clock
    read per request for the expiry and both buckets, check and charge in one call, and
    ``refund`` for a request that another limit then refused (it ran not: it costs
    nothing). ``Limit`` would cost six clock reads and a dozen calls per request, a
    third of the hot ENCRYPT path's time."""

    __slots__ = ("_clock", "buckets", "by_tenant", "deadline", "expires_at", "grant_id",
                 "required", "revoked", "served", "tenant", "throttled")

    def __init__(self, grant_id: str, tenant: str, *, required: bool, clock: Clock,
                 served: dict[str, list[float]], throttled: dict[str, int],
                 by_tenant: dict[str, list[float]]) -> None:
        self.grant_id = grant_id
        self.tenant = tenant
        self.expires_at = 0.0  # wall clock, as the token says
        self.deadline = 0.0  # the same instant on ``clock`` (monotonic)
        self.revoked = False
        self.required = required  # a class the grant does not cover is refused
        # class -> [ops/s, ops burst, ops tokens, bytes/s, bytes burst, bytes tokens,
        # last refill]; a rate of 0 is no limit on that measure
        self.buckets: dict[str, list[float]] = {}
        self._clock = clock
        # the table's: class -> [ops, bytes] admitted since its last load()
        self.served = served
        # the tenant's, shared by its entries: class -> [ops, bytes] since tenant_load()
        self.by_tenant = by_tenant
        self.throttled = throttled

    def admit(self, cls: str, ops: int, nbytes: int) -> float:
        """0.0: ``ops``/``nbytes`` of ``cls`` are charged and may run; else the seconds
        to wait, nothing charged. Raises ``Unauthorized`` for an expired or revoked
        grant, ``Forbidden`` for a class it does not cover (grants required)."""
        # the hot ENCRYPT path runs this per request: locals, no min/max calls, the
        # slow rule (``_wait``) only when the tokens are short
        if self.revoked:
            raise Unauthorized(f"grant {self.grant_id} was revoked; ask the manager again")
        now = self._clock()
        if now >= self.deadline:
            raise Unauthorized(f"grant {self.grant_id} expired; renew it")
        b = self.buckets.get(cls)
        if b is None:
            if self.required:
                raise Forbidden(f"grant {self.grant_id} does not cover {cls} on this "
                                "server; ask the manager for a quota")
            return 0.0
        elapsed = now - b[6]
        b[6] = now
        ops_rate, bytes_rate = b[0], b[3]
        ops_tokens = bytes_tokens = 0.0
        wait = 0.0
        if ops_rate:
            ops_tokens = b[2] + elapsed * ops_rate
            if ops_tokens > b[1]:
                ops_tokens = b[1]
            b[2] = ops_tokens
            if ops_tokens < ops:
                wait = _wait(ops_rate, b[1], ops_tokens, ops)
        if bytes_rate:
            bytes_tokens = b[5] + elapsed * bytes_rate
            if bytes_tokens > b[4]:
                bytes_tokens = b[4]
            b[5] = bytes_tokens
            if bytes_tokens < nbytes:
                w = _wait(bytes_rate, b[4], bytes_tokens, nbytes)
                if w > wait:
                    wait = w
        if wait:
            self.throttled[cls] = self.throttled.get(cls, 0) + 1
            return wait
        if ops_rate:
            b[2] = ops_tokens - ops
        if bytes_rate:
            b[5] = bytes_tokens - nbytes
        row = self.served[cls]
        row[0] += ops
        row[1] += nbytes
        row = self.by_tenant[cls]
        row[0] += ops
        row[1] += nbytes
        return 0.0

    def refund(self, cls: str, ops: int, nbytes: int) -> None:
        """Give back what ``admit`` just charged (no time has passed: exact)."""
        b = self.buckets.get(cls)
        if b is None:
            return
        if b[0]:
            b[2] += ops
        if b[3]:
            b[5] += nbytes
        row = self.served[cls]
        row[0] -= ops
        row[1] -= nbytes
        row = self.by_tenant[cls]
        row[0] -= ops
        row[1] -= nbytes

    def configure(self, cls: str, ops: float, nbytes: float, burst_seconds: float) -> None:
        """Set a class's rates; a new bucket starts full, a changed one keeps its tokens
        up to the new burst. The burst is ``qos.RateLimits``'s, for the reasons its
        docstring gives: at least one op (or byte), so a request bigger than the burst
        still runs when the bucket is full (into debt) rather than never."""
        ops_burst = max(1.0, ops * burst_seconds)
        bytes_burst = max(1.0, nbytes * burst_seconds)
        b = self.buckets.get(cls)
        if b is None:
            self.buckets[cls] = [ops, ops_burst, ops_burst, nbytes, bytes_burst,
                                 bytes_burst, self._clock()]
            return
        b[0], b[1], b[2] = ops, ops_burst, min(b[2], ops_burst)
        b[3], b[4], b[5] = nbytes, bytes_burst, min(b[5], bytes_burst)


class _NoGrant(GrantEntry):
    """A connection without a grant on a server that requires one."""

    def admit(self, cls: str, ops: int, nbytes: int) -> float:
        raise Forbidden(REQUIRED_MESSAGE)


NO_GRANT: Final[GrantEntry] = _NoGrant("", "", required=True, clock=time.monotonic,
                                       served={}, throttled={}, by_tenant={})


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
        # tenant -> class -> [ops, bytes] admitted since the last tenant_load()
        self._tenants: dict[str, dict[str, list[float]]] = {}
        self._tenants_loaded_at = clock()
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
            by_tenant = self._tenants.get(claims.tenant)
            if by_tenant is None:
                by_tenant = self._tenants[claims.tenant] = {c: [0.0, 0.0] for c in CLASSES}
            entry = GrantEntry(claims.grant_id, claims.tenant, required=self.required,
                               clock=self._clock, served=self._served,
                               throttled=self.throttled, by_tenant=by_tenant)
            self._entries[claims.grant_id] = entry
        elif entry.tenant != claims.tenant:
            raise GrantRefused("grant id reused for another tenant")
        if claims.expires_at > entry.expires_at:
            entry.expires_at = claims.expires_at
            entry.deadline = self._clock() + (claims.expires_at - self._wall())
        rates = claims.rates_for(self.server_id) or {}
        for cls, (ops, nbytes) in rates.items():
            if cls in self._served:  # a class no request can be of is left out
                entry.configure(cls, ops, nbytes, self.burst_seconds)
        for cls in set(entry.buckets) - set(rates):
            del entry.buckets[cls]
        return entry

    def present(self, token: str, tenant: str) -> GrantEntry:
        """``verify`` and ``enter``: what HELLO and GRANT_PRESENT do."""
        return self.enter(self.verify(token, tenant))

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

    def tenant_load(self, limit: int = MAX_TENANTS_REPORTED) -> dict[str, Rates]:
        """Per tenant, ``load()``'s rates for what its grants admitted since the last
        call: the ``limit`` busiest tenants (by ops, then bytes), those with nothing
        served left out. A tenant idle over a whole interval with no grant held here is
        forgotten (its table is made again with its next grant)."""
        now = self._clock()
        elapsed = max(now - self._tenants_loaded_at, 1e-3)
        self._tenants_loaded_at = now
        busy: list[tuple[float, float, str, Rates]] = []
        idle: list[str] = []
        for tenant, table in self._tenants.items():
            rates: Rates = {}
            ops = nbytes = 0.0
            for cls, row in table.items():
                if row[0] or row[1]:
                    rates[cls] = {"ops": row[0] / elapsed, "bytes": row[1] / elapsed}
                    ops += row[0]
                    nbytes += row[1]
                    row[0] = row[1] = 0.0
            if rates:
                busy.append((ops, nbytes, tenant, rates))
            else:
                idle.append(tenant)
        if idle:
            held = {e.tenant for e in self._entries.values()}
            for tenant in idle:
                if tenant not in held:
                    del self._tenants[tenant]
        if len(busy) > limit:
            busy.sort(key=lambda b: (b[0], b[1]), reverse=True)
            del busy[limit:]
        return {tenant: rates for _, _, tenant, rates in busy}

    def admitted(self) -> dict[str, tuple[float, float]]:
        """Per class, ops and bytes admitted in all (for /metrics)."""
        return {c: (t[0] + self._served[c][0], t[1] + self._served[c][1])
                for c, t in self.totals.items()}


__all__ = ["MAX_GRANTS", "MAX_TENANTS_REPORTED", "NO_GRANT", "REQUIRED_MESSAGE", "GrantEntry",
           "GrantTable"]
