"""What a fabric server serves: transit over a plane and a keystore, authentication, rate
limits and metrics, assembled once and shared by every connection.

``Service`` holds the parts; ``open_service`` builds them from a keystore URL and a
master key the way ``cryptoplane server`` does: the keystore read through its
``KeyCache`` (a key created or rotated by another server sharing the database is seen
within ``cache_ttl``), tokens checked by the keystore through the ``Authenticator``'s
cache, tenant rate limits loaded from the keystore and kept in step with it.
Tests build a ``Service`` directly over a ``MemoryKeySource``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..exceptions import InvalidRequest
from ..plane import Plane
from .auth import Authenticator, TokenChecker
from .bulk import PIECE
from .grants import GrantTable
from .keystore import KeyCache, Keystore, MasterKey, open_keystore
from .keytypes import KeyPolicy, KeyRecord, KeyType
from .metrics import FabricMetrics
from .qos import RateLimits
from .transit import KeySource, Transit

log = logging.getLogger("cryptoplane.fabric")


class CachedSource:
    """The keystore as transit's ``KeySource``: reads through the ``KeyCache``, changes
    straight to the store (whose change signal then refreshes the cache)."""

    def __init__(self, store: Keystore, cache: KeyCache) -> None:
        self.store = store
        self.cache = cache

    def get_key(self, tenant: str, name: str) -> KeyRecord:
        return self.cache.get(tenant, name)

    def list_keys(self, tenant: str) -> list[str]:
        return self.store.list_keys(tenant)

    def create_key(self, tenant: str, name: str, policy: KeyPolicy,
                   material: bytes) -> KeyRecord:
        rec = self.store.create_key(tenant, name, policy, material)
        self.cache.invalidate(tenant, name)
        return rec

    def rotate_key(self, tenant: str, name: str, material: bytes) -> KeyRecord:
        rec = self.store.rotate_key(tenant, name, material)
        self.cache.invalidate(tenant, name)
        return rec

    def update_policy(self, tenant: str, name: str, **changes: Any) -> KeyRecord:
        rec = self.store.update_policy(tenant, name, **changes)
        self.cache.invalidate(tenant, name)
        return rec

    def trim_key(self, tenant: str, name: str, min_version: int) -> KeyRecord:
        rec = self.store.trim_key(tenant, name, min_version)
        self.cache.invalidate(tenant, name)
        return rec

    def delete_key(self, tenant: str, name: str) -> None:
        self.store.delete_key(tenant, name)
        self.cache.invalidate(tenant, name)

    def record_use(self, tenant: str, key: str, version: int, op: str, nbytes: int = 0,
                   principal: str = "") -> None:
        self.store.record_use(tenant, key, version, op, nbytes, principal)


class Service:
    """The parts every connection shares. ``rate_limits`` and ``metrics`` are made
    empty when not given; ``store`` (a keystore) persists TENANT_LIMITS changes and
    feeds the rate limits; ``closers`` run at ``close()``, last first; ``grants``: the
    table of manager grants this server enforces (None: it is not under a manager and
    ignores grants)."""

    def __init__(self, transit: Transit, authenticator: Authenticator, *,
                 rate_limits: RateLimits | None = None,
                 metrics: FabricMetrics | None = None, store: Keystore | None = None,
                 server_id: str = "cryptoplane", stream_piece: int = PIECE,
                 closers: Sequence[Callable[[], object]] = (),
                 grants: GrantTable | None = None) -> None:
        self.transit = transit
        self.plane: Plane = transit.plane
        self.auth = authenticator
        self.rate_limits = rate_limits if rate_limits is not None else RateLimits()
        self.metrics = metrics if metrics is not None else FabricMetrics()
        self.store = store
        self.server_id = server_id
        self.stream_piece = stream_piece
        self.key_types = [t.value for t in KeyType]
        self.grants: GrantTable | None = None
        if grants is not None:
            self.use_grants(grants)
        self._closers = list(closers)

    def use_grants(self, table: GrantTable) -> None:
        """Enforce the grants of ``table`` (before the server starts: connections read
        it when they open)."""
        self.grants = table
        self.metrics.watch_grants(table)

    # -- tenant limits ------------------------------------------------------------------

    def set_tenant_limits(self, tenant: str, ops: float | None,
                          nbytes: float | None) -> dict[str, Any]:
        """TENANT_LIMITS: change a tenant's rates (None: leave as is; 0: unlimited),
        persisted in the keystore when there is one; returns the limits in force. Runs
        on an admin worker; the live table changes on the event loop (``apply_limits``)."""
        for v in (ops, nbytes):
            if v is not None and not v >= 0:
                raise InvalidRequest("rates must be numbers >= 0")
        current = self.rate_limits.tenant_limits(tenant)
        new_ops = current["ops_per_s"] if ops is None else float(ops)
        new_bytes = current["bytes_per_s"] if nbytes is None else float(nbytes)
        if self.store is not None:
            self.store.set_tenant_limits(tenant, new_ops or None, new_bytes or None)
        return {"tenant": tenant, "ops_per_s": new_ops, "bytes_per_s": new_bytes}

    def apply_limits(self, answer: Mapping[str, Any]) -> None:
        """Make a TENANT_LIMITS answer the live limits (on the event loop's thread)."""
        self.rate_limits.set_tenant(str(answer["tenant"]), float(answer["ops_per_s"]),
                                    float(answer["bytes_per_s"]))

    def load_limits(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """The keystore's tenant limits (one tenant, or all), as ``apply_limits`` takes
        them; blocking (a database read): call from a worker or before serving."""
        if self.store is None:
            return []
        tenants = [tenant] if tenant is not None else self.store.list_tenants()
        out = []
        for t in tenants:
            lim = self.store.tenant_limits(t)
            out.append({"tenant": t, "ops_per_s": lim.ops or 0.0,
                        "bytes_per_s": lim.bytes or 0.0})
        return out

    def close(self) -> None:
        while self._closers:
            try:
                self._closers.pop()()
            except Exception:  # one failing closer must not keep the others open
                log.exception("closing the service")


def open_service(url: str | os.PathLike[str], *, master: MasterKey | None = None,
                 master_passphrase: str | bytes | None = None,
                 store_options: Mapping[str, Any] | None = None, **kw: Any) -> Service:
    """A service over the keystore at ``url`` (``sqlite:///path`` or ``postgresql://``),
    opened, migrated and keyed here (``open_keystore``); ``kw`` as ``service_over``."""
    store = open_keystore(url, master, master_passphrase=master_passphrase,
                          **dict(store_options or {}))
    try:
        return service_over(store, **kw)
    except BaseException:
        store.close()
        raise


def service_over(store: Keystore, *, engines: Sequence[str] | None = None,
                 cache_ttl: float = 1.0, cert_tenants: Mapping[str, str] | None = None,
                 server_id: str = "cryptoplane",
                 wrapping_key: bytes | None = None) -> Service:
    """A service over an open keystore, which it then owns (closed with the service):
    the plane (``engines``, default inline + threads), the keystore read through a
    ``KeyCache`` of ``cache_ttl`` seconds, transit, tokens checked by the keystore
    through the ``Authenticator``'s cache, tenant limits loaded."""
    closers: list[Callable[[], object]] = [store.close]
    try:
        plane = Plane(list(engines) if engines else None)
        closers.append(plane.close)
        cache = KeyCache(store, max_age=cache_ttl)
        closers.append(cache.close)
        transit = Transit(plane, CachedSource(store, cache), wrapping_key=wrapping_key)
        checker: TokenChecker = store
        auth = Authenticator(checker, cache_ttl=cache_ttl, cert_tenants=cert_tenants)
        service = Service(transit, auth, store=store, server_id=server_id, closers=closers)
        for limits in service.load_limits():
            service.apply_limits(limits)
    except BaseException:
        for close in reversed(closers[1:]):
            close()
        raise
    return service


def memory_service(*, engines: Sequence[str] | None = None,
                   source: KeySource | None = None, tokens: TokenChecker | None = None,
                   cert_tenants: Mapping[str, str] | None = None) -> Service:
    """A service over an in-memory key source (tests, demos): nothing persists."""
    from .transit import MemoryKeySource

    plane = Plane(list(engines) if engines else None)
    transit = Transit(plane, source if source is not None else MemoryKeySource())
    if tokens is None:
        raise InvalidRequest("memory_service needs tokens= (something with check_token)")
    auth = Authenticator(tokens, cache_ttl=1.0, cert_tenants=cert_tenants)
    return Service(transit, auth, closers=[plane.close])
