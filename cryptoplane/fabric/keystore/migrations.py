"""The keystore's schema, as numbered migrations applied in order.

Each migration is a list of statements run in one transaction together with the bump
of ``schema_version``, so a store is always at exactly one version. DDL is transactional
in both SQLite and PostgreSQL, so a failed step leaves the previous version intact.
Never edit a released step: append a new one. Types differ between the two dialects
only in spelling; ``{blob}`` and friends are filled in per dialect.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


TYPES: dict[str, dict[str, str]] = {
    "sqlite": {"blob": "BLOB", "float": "REAL", "bigint": "INTEGER",
               "serial": "INTEGER PRIMARY KEY AUTOINCREMENT"},
    "postgresql": {"blob": "BYTEA", "float": "DOUBLE PRECISION", "bigint": "BIGINT",
                   "serial": "BIGSERIAL PRIMARY KEY"},
}

# made before any migration, so the version can be read
BOOTSTRAP = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "metadata, tenants, keys and wrapped key versions", (
        """CREATE TABLE metadata (
             name TEXT PRIMARY KEY,
             value TEXT NOT NULL)""",
        """CREATE TABLE tenants (
             name TEXT PRIMARY KEY,
             ops_limit {float},
             bytes_limit {float},
             created_at {float} NOT NULL)""",
        """CREATE TABLE keys (
             tenant TEXT NOT NULL REFERENCES tenants(name),
             name TEXT NOT NULL,
             policy TEXT NOT NULL,
             latest_version INTEGER NOT NULL,
             min_available_version INTEGER NOT NULL,
             created_at {float} NOT NULL,
             updated_at {float} NOT NULL,
             PRIMARY KEY (tenant, name))""",
        """CREATE TABLE key_versions (
             tenant TEXT NOT NULL,
             name TEXT NOT NULL,
             version INTEGER NOT NULL,
             master_id TEXT NOT NULL,
             wrapped {blob} NOT NULL,
             created_at {float} NOT NULL,
             PRIMARY KEY (tenant, name, version),
             FOREIGN KEY (tenant, name) REFERENCES keys(tenant, name) ON DELETE CASCADE)""",
        # master-key rotation and the open-time check look rows up by master id
        "CREATE INDEX key_versions_master ON key_versions (master_id)",
    )),
    Migration(2, "bearer tokens", (
        """CREATE TABLE tokens (
             token_id TEXT PRIMARY KEY,
             tenant TEXT NOT NULL REFERENCES tenants(name),
             digest {blob} NOT NULL,
             keys TEXT NOT NULL,
             ops TEXT NOT NULL,
             expires_at {float},
             label TEXT NOT NULL,
             created_at {float} NOT NULL,
             revoked_at {float})""",
        "CREATE INDEX tokens_tenant ON tokens (tenant)",
    )),
    Migration(3, "audit trail and the change generation", (
        """CREATE TABLE audit (
             id {serial},
             ts {float} NOT NULL,
             kind TEXT NOT NULL,
             tenant TEXT NOT NULL,
             key_name TEXT NOT NULL,
             version INTEGER NOT NULL,
             op TEXT NOT NULL,
             count {bigint} NOT NULL,
             nbytes {bigint} NOT NULL,
             principal TEXT NOT NULL,
             detail TEXT NOT NULL)""",
        "CREATE INDEX audit_tenant ON audit (tenant, ts)",
        # one row, bumped by every key change: caches poll it as a cheap version check
        """CREATE TABLE generation (
             id INTEGER PRIMARY KEY CHECK (id = 1),
             value {bigint} NOT NULL)""",
        "INSERT INTO generation (id, value) VALUES (1, 0)",
    )),
    Migration(4, "fabric: servers, leases, grants", (
        # the manager's pool (manager/state.py); rates and placements are JSON text. No
        # index on lease_expires: a pool's servers are read whole anyway, and an indexed
        # column would make every heartbeat a non-HOT update (PostgreSQL), bloating the
        # table that every admission reads
        """CREATE TABLE fabric_servers (
             server_id TEXT PRIMARY KEY,
             address TEXT NOT NULL,
             capacity TEXT NOT NULL,
             load TEXT NOT NULL,
             inflight INTEGER NOT NULL,
             registered_at {float} NOT NULL,
             heartbeat_at {float} NOT NULL,
             lease_expires {float} NOT NULL,
             manager TEXT NOT NULL)""",
        # capacity and what grants placed on each server, per class: admission and
        # placement read these numbers in SQL rather than parse every server's JSON
        """CREATE TABLE fabric_capacity (
             server_id TEXT NOT NULL REFERENCES fabric_servers(server_id) ON DELETE CASCADE,
             class TEXT NOT NULL,
             cap_ops {float} NOT NULL,
             cap_bytes {float} NOT NULL,
             placed_ops {float} NOT NULL,
             placed_bytes {float} NOT NULL,
             PRIMARY KEY (server_id, class))""",
        # counted: the grant's quota is in fabric_pool.granted and its shares in
        # fabric_capacity (cleared when it is released, revoked, or found expired)
        """CREATE TABLE fabric_grants (
             grant_id TEXT PRIMARY KEY,
             tenant TEXT NOT NULL,
             label TEXT NOT NULL,
             quota TEXT NOT NULL,
             priority INTEGER NOT NULL,
             mode TEXT NOT NULL,
             spread INTEGER NOT NULL,
             ttl {float} NOT NULL,
             issued_at {float} NOT NULL,
             expires_at {float} NOT NULL,
             released_at {float},
             revoked_at {float},
             counted INTEGER NOT NULL,
             placement TEXT NOT NULL)""",
        "CREATE INDEX fabric_grants_tenant ON fabric_grants (tenant)",
        # partial: the sweep looks only at counted grants, revoked_for() (at every
        # heartbeat) only at revoked ones, and each is a small part of the table
        "CREATE INDEX fabric_grants_expiry ON fabric_grants (expires_at) WHERE counted = 1",
        "CREATE INDEX fabric_grants_revoked ON fabric_grants (revoked_at) "
        "WHERE revoked_at IS NOT NULL",
        """CREATE TABLE fabric_grant_servers (
             grant_id TEXT NOT NULL REFERENCES fabric_grants(grant_id) ON DELETE CASCADE,
             server_id TEXT NOT NULL,
             class TEXT NOT NULL,
             ops {float} NOT NULL,
             bytes {float} NOT NULL,
             PRIMARY KEY (grant_id, server_id, class))""",
        "CREATE INDEX fabric_grant_servers_server ON fabric_grant_servers (server_id)",
        """CREATE TABLE fabric_signing_keys (
             key_id TEXT PRIMARY KEY,
             public_b64 TEXT NOT NULL,
             created_at {float} NOT NULL)""",
        # one row: admission's lock (SELECT ... FOR UPDATE), the pool's granted total,
        # and a count of server removals (admission reads servers before the lock and
        # reads them again if one was removed meanwhile)
        """CREATE TABLE fabric_pool (
             id INTEGER PRIMARY KEY CHECK (id = 1),
             granted TEXT NOT NULL,
             removals {bigint} NOT NULL)""",
        "INSERT INTO fabric_pool (id, granted, removals) VALUES (1, '{{}}', 0)",
    )),
    Migration(5, "fabric: per-tenant load", (
        # what each server served per tenant over its last heartbeat interval (JSON:
        # tenant -> class -> rates); not indexed, so heartbeats stay HOT updates
        "ALTER TABLE fabric_servers ADD COLUMN tenant_load TEXT NOT NULL DEFAULT '{{}}'",
    )),
)

LATEST = MIGRATIONS[-1].version


def statements(migration: Migration, dialect: str) -> list[str]:
    return [s.format(**TYPES[dialect]) for s in migration.statements]
