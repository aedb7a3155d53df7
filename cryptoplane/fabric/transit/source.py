"""Where transit finds keys: the ``KeySource`` protocol, the rules every source enforces,
and ``MemoryKeySource`` (tests, and a server without a database).

The keystore (``fabric/keystore/``) implements the same protocol over SQLite or
PostgreSQL; both apply the checks below (``check_create``, ``check_policy_change``,
``check_trim``, ``check_delete``) so a key behaves the same whichever holds it.

Tenant isolation: every method takes the tenant and looks keys up by (tenant, name)
only; another tenant's key raises exactly what a missing key raises (``not_found``), on
the same code path, so neither the error nor its message tells them apart.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, NamedTuple, Protocol

from ...exceptions import InvalidRequest
from ..errors import KeyExists, KeyNotFound, PolicyViolation
from ..keytypes import KeyPolicy, KeyRecord, check_name


class KeySource(Protocol):
    """What transit needs from a keystore. ``KeyRecord`` objects are immutable: a change
    returns a new record, which is how transit's caches notice it (identity check)."""

    def get_key(self, tenant: str, name: str) -> KeyRecord: ...  # KeyNotFound
    def list_keys(self, tenant: str) -> list[str]: ...
    def create_key(self, tenant: str, name: str, policy: KeyPolicy,
                   material: bytes) -> KeyRecord: ...  # KeyExists
    def rotate_key(self, tenant: str, name: str, material: bytes) -> KeyRecord: ...
    def update_policy(self, tenant: str, name: str, **changes: Any) -> KeyRecord: ...
    def trim_key(self, tenant: str, name: str, min_version: int) -> KeyRecord: ...
    def delete_key(self, tenant: str, name: str) -> None: ...  # PolicyViolation
    def record_use(self, tenant: str, key: str, version: int, op: str, nbytes: int = 0,
                   principal: str = "") -> None: ...  # audit, ~1 µs


def not_found(name: str) -> KeyNotFound:
    """The one error for a missing key and for another tenant's key."""
    return KeyNotFound(f"key {name!r} not found")


# -- the rules, shared by every source ----------------------------------------------------

# what config() may change; type, derived and convergent are fixed at creation
CHANGEABLE = frozenset({"min_decryption_version", "min_encryption_version",
                        "deletion_allowed", "exportable", "auto_rotate_period"})


def check_create(tenant: str, name: str, policy: KeyPolicy) -> None:
    check_name(tenant, "tenant")
    check_name(name)
    _check_types(policy.to_json())
    if not policy.auto_rotate_period >= 0:  # also refuses NaN
        raise InvalidRequest("auto_rotate_period must be >= 0 seconds")
    if policy.convergent and not policy.derived:
        raise PolicyViolation("convergent encryption needs a derived key (derived=True)")
    if (policy.derived or policy.convergent) and not policy.type.aead:
        raise PolicyViolation(f"{policy.type.value} keys cannot be derived")


_FLAGS = ("exportable", "deletion_allowed", "derived", "convergent")
_VERSIONS = ("min_decryption_version", "min_encryption_version")


def _check_types(fields: dict[str, Any]) -> None:
    """Flags are booleans and versions integers: "false" must not read as true."""
    for f in _FLAGS:
        if f in fields and not isinstance(fields[f], bool):
            raise InvalidRequest(f"{f} must be true or false")
    for f in _VERSIONS:
        if f in fields and (not isinstance(fields[f], int) or isinstance(fields[f], bool)):
            raise InvalidRequest(f"{f} must be an integer")
    period = fields.get("auto_rotate_period", 0.0)
    if not isinstance(period, (int, float)) or isinstance(period, bool):
        raise InvalidRequest("auto_rotate_period must be a number of seconds")


def check_policy_change(record: KeyRecord, changes: dict[str, Any]) -> KeyPolicy:
    """The policy after ``changes``, or the typed error saying why not (Vault's rules)."""
    unknown = sorted(set(changes) - CHANGEABLE)
    if unknown:
        raise PolicyViolation(f"cannot change {', '.join(unknown)} after creation")
    _check_types(changes)
    old = record.policy
    new = old.updated(**changes)
    if old.exportable and not new.exportable:
        # once exported, material may be anywhere: taking the flag back would be a lie
        raise PolicyViolation("exportable cannot be turned off once on")
    if not 1 <= new.min_decryption_version <= record.latest_version:
        raise InvalidRequest(f"min_decryption_version must be 1..{record.latest_version}")
    if new.min_decryption_version < record.min_available_version:
        raise InvalidRequest("min_decryption_version cannot go below trimmed versions "
                             f"(min available: {record.min_available_version})")
    mev = new.min_encryption_version
    if mev != 0 and not new.min_decryption_version <= mev <= record.latest_version:
        raise InvalidRequest("min_encryption_version must be 0 (latest) or "
                             f"{new.min_decryption_version}..{record.latest_version}")
    if not new.auto_rotate_period >= 0:  # also refuses NaN
        raise InvalidRequest("auto_rotate_period must be >= 0 seconds")
    return new


def check_trim(record: KeyRecord, min_version: int) -> None:
    """Trimming deletes versions below ``min_version`` for good: only versions the policy
    already refuses may go."""
    p = record.policy
    if not isinstance(min_version, int) or isinstance(min_version, bool) or min_version < 1:
        raise InvalidRequest("trim needs min_version >= 1")
    if min_version > p.min_decryption_version:
        raise PolicyViolation(f"cannot trim above min_decryption_version "
                              f"({p.min_decryption_version})")
    if p.min_encryption_version and min_version > p.min_encryption_version:
        raise PolicyViolation(f"cannot trim above min_encryption_version "
                              f"({p.min_encryption_version})")


def check_delete(record: KeyRecord) -> None:
    if not record.policy.deletion_allowed:
        raise PolicyViolation(f"key {record.name!r} is not marked deletion_allowed")


# -- the in-memory source -------------------------------------------------------------------

class Use(NamedTuple):
    """One audited use of a key (what ``record_use`` was told)."""

    tenant: str
    key: str
    version: int
    op: str
    nbytes: int
    principal: str


_new = tuple.__new__


class MemoryKeySource:
    """Keys in a dict keyed by (tenant, name); a lock makes every change atomic (a reader
    sees the old record or the new one, never half a rotation). ``uses`` keeps the last
    ``audit_limit`` ``record_use`` calls, newest last."""

    def __init__(self, *, audit_limit: int = 100_000,
                 clock: Any = time.time) -> None:
        self._keys: dict[tuple[str, str], KeyRecord] = {}
        self._lock = threading.Lock()
        self._clock = clock
        self.uses: deque[Use] = deque(maxlen=audit_limit)

    def get_key(self, tenant: str, name: str) -> KeyRecord:
        try:
            return self._keys[tenant, name]
        except (KeyError, TypeError):  # TypeError: an unhashable name is as missing
            raise not_found(name) from None

    def list_keys(self, tenant: str) -> list[str]:
        return sorted(n for t, n in list(self._keys) if t == tenant)

    def create_key(self, tenant: str, name: str, policy: KeyPolicy,
                   material: bytes) -> KeyRecord:
        check_create(tenant, name, policy)
        now = self._clock()
        rec = KeyRecord(tenant, name, policy, 1, 1, {1: bytes(material)}, now, now)
        with self._lock:
            if (tenant, name) in self._keys:
                raise KeyExists(f"key {name!r} already exists")
            self._keys[tenant, name] = rec
        return rec

    def rotate_key(self, tenant: str, name: str, material: bytes) -> KeyRecord:
        with self._lock:
            old = self.get_key(tenant, name)
            v = old.latest_version + 1
            rec = KeyRecord(tenant, name, old.policy, v, old.min_available_version,
                            {**old.versions, v: bytes(material)}, old.created_at,
                            self._clock())
            self._keys[tenant, name] = rec
        return rec

    def update_policy(self, tenant: str, name: str, **changes: Any) -> KeyRecord:
        with self._lock:
            old = self.get_key(tenant, name)
            policy = check_policy_change(old, changes)
            rec = KeyRecord(tenant, name, policy, old.latest_version,
                            old.min_available_version, old.versions, old.created_at,
                            self._clock())
            self._keys[tenant, name] = rec
        return rec

    def trim_key(self, tenant: str, name: str, min_version: int) -> KeyRecord:
        with self._lock:
            old = self.get_key(tenant, name)
            check_trim(old, min_version)
            if min_version <= old.min_available_version:
                return old  # already trimmed that far: nothing to do
            versions = {v: m for v, m in old.versions.items() if v >= min_version}
            rec = KeyRecord(tenant, name, old.policy, old.latest_version, min_version,
                            versions, old.created_at, self._clock())
            self._keys[tenant, name] = rec
        return rec

    def delete_key(self, tenant: str, name: str) -> None:
        with self._lock:
            check_delete(self.get_key(tenant, name))
            del self._keys[tenant, name]

    def record_use(self, tenant: str, key: str, version: int, op: str, nbytes: int = 0,
                   principal: str = "") -> None:
        # tuple.__new__: the same Use, without NamedTuple's Python-level __new__ (half
        # the cost of this call, which every data operation pays)
        self.uses.append(_new(Use, (tenant, key, version, op, nbytes, principal)))
