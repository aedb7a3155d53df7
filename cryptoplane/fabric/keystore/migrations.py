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
)

LATEST = MIGRATIONS[-1].version


def statements(migration: Migration, dialect: str) -> list[str]:
    return [s.format(**TYPES[dialect]) for s in migration.statements]
