"""The keystore's interface and semantics, written once for both backends.

Tenant isolation is structural: every statement about a key names its tenant in the
WHERE clause, and a key of another tenant takes exactly the path a missing key takes
(``not_found``: same type, same message). Every change runs in one transaction with
its admin audit row and the generation bump, so the trail and the caches never see a
half-made change.

The policy rules (what may change, how far a key may be trimmed) and the missing-key
error are transit's ``source`` module's, which every ``KeySource`` applies, so a key
behaves the same in the keystore as in ``MemoryKeySource``; ``check_policy`` adds what
only a store that serialises the policy needs (types, ranges at creation).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...exceptions import InvalidRequest
from ..errors import KeyExists, PolicyViolation, Unauthorized
from ..keytypes import KeyPolicy, KeyRecord, KeyType, check_name
from ..transit.source import (
    check_create,
    check_delete,
    check_policy_change,
    check_trim,
    not_found,
)
from . import tokens
from .core import StoreCore, Tx
from .tokens import TokenInfo

MATERIAL_MAX = 64 * 1024
LABEL_MAX = 200


@dataclass(frozen=True)
class TenantLimits:
    """A tenant's rates; ``None``: unlimited."""

    ops: float | None = None
    bytes: float | None = None


def _check_limit(value: float | None, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            value >= 0 and math.isfinite(value)):
        raise InvalidRequest(f"{what} limit must be a finite number >= 0 or None")
    return float(value)


def _check_material(material: bytes) -> bytes:
    if not isinstance(material, bytes | bytearray) or not 0 < len(material) <= MATERIAL_MAX:
        raise InvalidRequest(f"key material must be 1-{MATERIAL_MAX} bytes")
    return bytes(material)


def check_policy(policy: KeyPolicy, latest: int, min_available: int) -> KeyPolicy:
    """Whether ``policy`` is consistent with a key whose versions run from
    ``min_available`` to ``latest``."""
    if not isinstance(policy, KeyPolicy) or not isinstance(policy.type, KeyType):
        raise InvalidRequest("policy must be a KeyPolicy with a KeyType")
    for f in ("exportable", "deletion_allowed", "derived", "convergent"):
        if not isinstance(getattr(policy, f), bool):
            raise InvalidRequest(f"policy {f} must be true or false")
    for f in ("min_decryption_version", "min_encryption_version"):
        if isinstance(getattr(policy, f), bool) or not isinstance(getattr(policy, f), int):
            raise InvalidRequest(f"policy {f} must be an integer")
    if policy.convergent and not policy.derived:
        raise InvalidRequest("a convergent key must be derived")
    if not min_available <= policy.min_decryption_version <= latest:
        raise InvalidRequest(f"min_decryption_version must be between {min_available} "
                             f"and {latest}")
    if policy.min_encryption_version != 0 and not (
            policy.min_decryption_version <= policy.min_encryption_version <= latest):
        raise InvalidRequest("min_encryption_version must be 0 (latest) or between "
                             f"min_decryption_version and {latest}")
    p = policy.auto_rotate_period
    if isinstance(p, bool) or not isinstance(p, int | float) or not (
            p >= 0 and math.isfinite(p)):
        raise InvalidRequest("auto_rotate_period must be a finite number of seconds >= 0")
    return policy


class Keystore(StoreCore):
    """Tenants, their named and versioned keys, bearer tokens and the audit trail."""

    # -- tenants ----------------------------------------------------------------------

    def _ensure_tenant(self, tx: Tx, tenant: str, principal: str = "") -> bool:
        created = tx.run("INSERT INTO tenants (name, ops_limit, bytes_limit, created_at) "
                         "VALUES (?, NULL, NULL, ?) ON CONFLICT (name) DO NOTHING",
                         tenant, time.time()) > 0
        if created:
            self._admin(tx, tenant, "", "tenant-create", principal=principal)
        return created

    def create_tenant(self, tenant: str, *, ops: float | None = None,
                      bytes: float | None = None, principal: str = "") -> bool:
        """Creates ``tenant`` with the given limits; ``False`` (and no change) if it
        already exists."""
        check_name(tenant, "tenant name")
        ops, nbytes = _check_limit(ops, "ops/s"), _check_limit(bytes, "bytes/s")
        with self._change(tenant, "") as tx:
            created = self._ensure_tenant(tx, tenant, principal)
            if created:
                tx.run("UPDATE tenants SET ops_limit = ?, bytes_limit = ? WHERE name = ?",
                       ops, nbytes, tenant)
        return created

    def list_tenants(self) -> list[str]:
        with self._transaction(write=False) as tx:
            return [str(r[0]) for r in tx.all("SELECT name FROM tenants ORDER BY name")]

    def set_tenant_limits(self, tenant: str, ops: float | None, bytes: float | None, *,
                          principal: str = "") -> TenantLimits:
        """Sets the tenant's ops/s and bytes/s (``None``: unlimited), creating it if
        new; servers see the change like a key change."""
        check_name(tenant, "tenant name")
        limits = TenantLimits(_check_limit(ops, "ops/s"), _check_limit(bytes, "bytes/s"))
        with self._change(tenant, "") as tx:
            self._ensure_tenant(tx, tenant, principal)
            tx.run("UPDATE tenants SET ops_limit = ?, bytes_limit = ? WHERE name = ?",
                   limits.ops, limits.bytes, tenant)
            self._admin(tx, tenant, "", "config", principal=principal,
                        detail=f"limits ops={limits.ops} bytes={limits.bytes}")
        return limits

    def tenant_limits(self, tenant: str) -> TenantLimits:
        """The tenant's limits (an unknown tenant has none)."""
        with self._transaction(write=False) as tx:
            row = tx.one("SELECT ops_limit, bytes_limit FROM tenants WHERE name = ?", tenant)
        if row is None:
            return TenantLimits()
        return TenantLimits(None if row[0] is None else float(row[0]),
                            None if row[1] is None else float(row[1]))

    # -- keys: reading ----------------------------------------------------------------

    def _load(self, tx: Tx, tenant: str, name: str) -> KeyRecord:
        # one statement, so READ COMMITTED sees the key row and its versions together
        rows = tx.all(
            "SELECT k.policy, k.latest_version, k.min_available_version, k.created_at, "
            "k.updated_at, v.version, v.master_id, v.wrapped FROM keys k LEFT JOIN "
            "key_versions v ON v.tenant = k.tenant AND v.name = k.name WHERE k.tenant = ? "
            "AND k.name = ? ORDER BY v.version", tenant, name)
        if not rows:
            raise not_found(name)
        policy, latest, min_avail, created, updated = rows[0][:5]
        versions = {int(r[5]): self._unwrap(tenant, name, int(r[5]), str(r[6]), r[7])
                    for r in rows if r[5] is not None}
        return KeyRecord(tenant, name, KeyPolicy.from_json(json.loads(policy)), int(latest),
                         int(min_avail), versions, float(created), float(updated))

    def _locked(self, tx: Tx, tenant: str, name: str) -> KeyRecord:
        """The key without its versions, its row locked until the transaction ends
        (concurrent rotations queue here instead of colliding)."""
        row = tx.one("SELECT policy, latest_version, min_available_version, created_at, "
                     "updated_at FROM keys WHERE tenant = ? AND name = ?" + self.for_update,
                     tenant, name)
        if row is None:
            raise not_found(name)
        return KeyRecord(tenant, name, KeyPolicy.from_json(json.loads(row[0])), int(row[1]),
                         int(row[2]), {}, float(row[3]), float(row[4]))

    def get_key(self, tenant: str, name: str) -> KeyRecord:
        """The key with its unwrapped versions; ``KeyNotFound`` if this tenant has none
        of that name."""
        with self._transaction(write=False) as tx:
            return self._load(tx, tenant, name)

    def list_keys(self, tenant: str) -> list[str]:
        with self._transaction(write=False) as tx:
            return [str(r[0]) for r in tx.all(
                "SELECT name FROM keys WHERE tenant = ? ORDER BY name", tenant)]

    def export_key(self, tenant: str, name: str, *, principal: str = "") -> KeyRecord:
        """The key, for handing out: ``PolicyViolation`` unless exportable; audited.
        Not a change (no generation bump): caches stay warm."""
        with self._transaction(write=True) as tx:
            if not self._locked(tx, tenant, name).policy.exportable:
                raise PolicyViolation(f"key {name!r} is not exportable")
            self._admin(tx, tenant, name, "export", principal=principal)
            return self._load(tx, tenant, name)

    # -- keys: changing ---------------------------------------------------------------

    def _add_version(self, tx: Tx, tenant: str, name: str, version: int,
                     material: bytes, now: float) -> None:
        master_id, blob = self._wrap(tenant, name, version, material)
        tx.run("INSERT INTO key_versions (tenant, name, version, master_id, wrapped, "
               "created_at) VALUES (?, ?, ?, ?, ?, ?)", tenant, name, version, master_id,
               blob, now)

    def create_key(self, tenant: str, name: str, policy: KeyPolicy, material: bytes, *,
                   principal: str = "") -> KeyRecord:
        """A new key at version 1; ``KeyExists`` if the tenant has one of that name.
        Creates the tenant if it is new."""
        check_create(tenant, name, policy)
        material = _check_material(material)
        check_policy(policy, 1, 1)
        now = time.time()
        with self._change(tenant, name) as tx:
            self._ensure_tenant(tx, tenant, principal)
            if tx.run("INSERT INTO keys (tenant, name, policy, latest_version, "
                      "min_available_version, created_at, updated_at) VALUES "
                      "(?, ?, ?, 1, 1, ?, ?) ON CONFLICT (tenant, name) DO NOTHING",
                      tenant, name, json.dumps(policy.to_json()), now, now) == 0:
                raise KeyExists(f"key {name!r} already exists")
            self._add_version(tx, tenant, name, 1, material, now)
            self._admin(tx, tenant, name, "create", version=1, principal=principal,
                        detail=policy.type.value)
            return self._load(tx, tenant, name)

    def rotate_key(self, tenant: str, name: str, material: bytes, *,
                   principal: str = "") -> KeyRecord:
        """Adds version latest+1 atomically: concurrent rotations (from any number of
        servers) each get their own version."""
        material = _check_material(material)
        with self._change(tenant, name) as tx:
            latest = self._locked(tx, tenant, name).latest_version
            now = time.time()
            self._add_version(tx, tenant, name, latest + 1, material, now)
            tx.run("UPDATE keys SET latest_version = ?, updated_at = ? WHERE tenant = ? "
                   "AND name = ?", latest + 1, now, tenant, name)
            self._admin(tx, tenant, name, "rotate", version=latest + 1, principal=principal)
            return self._load(tx, tenant, name)

    def update_policy(self, tenant: str, name: str, *, principal: str = "",
                      **changes: Any) -> KeyRecord:
        """Changes the mutable policy fields (transit's ``CHANGEABLE``);
        ``PolicyViolation`` for the others and for making an exportable key
        unexportable, ``InvalidRequest`` for values out of range."""
        with self._change(tenant, name) as tx:
            old = self._locked(tx, tenant, name)
            new = check_policy(check_policy_change(old, changes), old.latest_version,
                               old.min_available_version)
            tx.run("UPDATE keys SET policy = ?, updated_at = ? WHERE tenant = ? AND "
                   "name = ?", json.dumps(new.to_json()), time.time(), tenant, name)
            self._admin(tx, tenant, name, "config", principal=principal,
                        detail=json.dumps(changes, sort_keys=True))
            return self._load(tx, tenant, name)

    def trim_key(self, tenant: str, name: str, min_version: int, *,
                 principal: str = "") -> KeyRecord:
        """Deletes the versions below ``min_version`` for good; it may not pass the
        policy's ``min_decryption_version`` (data under those versions must be dead).
        Trimming to where the key already is changes nothing."""
        with self._change(tenant, name) as tx:
            old = self._locked(tx, tenant, name)
            check_trim(old, min_version)
            if min_version <= old.min_available_version:
                return self._load(tx, tenant, name)
            tx.run("DELETE FROM key_versions WHERE tenant = ? AND name = ? AND version < ?",
                   tenant, name, min_version)
            tx.run("UPDATE keys SET min_available_version = ?, updated_at = ? WHERE "
                   "tenant = ? AND name = ?", min_version, time.time(), tenant, name)
            self._admin(tx, tenant, name, "trim", version=min_version, principal=principal)
            return self._load(tx, tenant, name)

    def delete_key(self, tenant: str, name: str, *, principal: str = "") -> None:
        """Deletes the key and every version; ``PolicyViolation`` unless the policy
        allows deletion."""
        with self._change(tenant, name) as tx:
            check_delete(self._locked(tx, tenant, name))
            tx.run("DELETE FROM key_versions WHERE tenant = ? AND name = ?", tenant, name)
            tx.run("DELETE FROM keys WHERE tenant = ? AND name = ?", tenant, name)
            self._admin(tx, tenant, name, "delete", principal=principal)

    # -- tokens -----------------------------------------------------------------------

    def create_token(self, tenant: str, *, keys: Sequence[str] = ("*",),
                     ops: Sequence[str] = ("*",), expires_at: float | None = None,
                     label: str = "", principal: str = "") -> str:
        """A new bearer token for ``tenant``. The returned string is the only copy of
        its secret: the store keeps a digest."""
        check_name(tenant, "tenant name")
        key_scopes = tokens.check_scopes(keys, "key")
        op_scopes = tokens.check_scopes(ops, "op")
        if not isinstance(label, str) or len(label) > LABEL_MAX or not label.isprintable():
            raise InvalidRequest(f"token label must be at most {LABEL_MAX} printable "
                                 "characters")
        if expires_at is not None and not math.isfinite(expires_at):
            raise InvalidRequest("expires_at must be a finite time or None")
        token_id, token, digest = tokens.new_token()
        with self._transaction(write=True) as tx:
            self._ensure_tenant(tx, tenant, principal)
            tx.run("INSERT INTO tokens (token_id, tenant, digest, keys, ops, expires_at, "
                   "label, created_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                   token_id, tenant, digest, json.dumps(key_scopes), json.dumps(op_scopes),
                   expires_at, label, time.time())
            self._admin(tx, tenant, "", "token-create", principal=principal,
                        detail=f"{token_id} {label}".strip())
        return token

    @staticmethod
    def _token_info(row: Sequence[Any]) -> TokenInfo:
        token_id, tenant, key_scopes, op_scopes, expires_at, label = row
        return TokenInfo(str(token_id), str(tenant), tuple(json.loads(key_scopes)),
                         tuple(json.loads(op_scopes)),
                         None if expires_at is None else float(expires_at), str(label))

    def check_token(self, secret: str) -> TokenInfo:
        """What ``token`` grants; ``Unauthorized`` (one message for every reason) if it
        is malformed, unknown, revoked or expired."""
        token_id, secret = tokens.parse(secret)  # the full token string, then its secret
        with self._transaction(write=False) as tx:
            row = tx.one("SELECT token_id, tenant, keys, ops, expires_at, label, digest, "
                         "revoked_at FROM tokens WHERE token_id = ?", token_id)
        stored = bytes(row[6]) if row is not None else None
        if not tokens.matches(secret, stored) or row is None or row[7] is not None:
            raise Unauthorized(tokens.INVALID)
        info = self._token_info(row[:6])
        if info.expires_at is not None and info.expires_at <= time.time():
            raise Unauthorized(tokens.INVALID)
        return info

    def revoke_token(self, token_id: str, *, tenant: str | None = None,
                     principal: str = "") -> bool:
        """Revokes a token (only if it is ``tenant``'s, when given); whether it was
        live."""
        with self._transaction(write=True) as tx:
            row = tx.one("SELECT tenant FROM tokens WHERE token_id = ? AND revoked_at IS "
                         "NULL" + self.for_update, token_id)
            if row is None or (tenant is not None and row[0] != tenant):
                return False
            tx.run("UPDATE tokens SET revoked_at = ? WHERE token_id = ?", time.time(),
                   token_id)
            self._admin(tx, str(row[0]), "", "token-revoke", principal=principal,
                        detail=token_id)
        return True

    def list_tokens(self, tenant: str) -> list[TokenInfo]:
        """The tenant's unrevoked tokens (expired ones included: they show when)."""
        with self._transaction(write=False) as tx:
            rows = tx.all("SELECT token_id, tenant, keys, ops, expires_at, label FROM "
                          "tokens WHERE tenant = ? AND revoked_at IS NULL ORDER BY "
                          "created_at, token_id", tenant)
        return [self._token_info(r) for r in rows]
