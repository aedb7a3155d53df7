"""The tenant keystore: named, versioned keys per tenant, wrapped under a master key.

    master.py      the master key: constructors, wrapping (AES-256-GCM), its id
    migrations.py  the schema as numbered migrations
    core.py        transactions, migrations, master keys, change signals, audit plumbing
    base.py        the key, tenant and token API, written once for both backends
    sqlite.py      the embedded backend (default)
    postgres.py    the shared backend, with LISTEN/NOTIFY for other servers' changes
    tokens.py      bearer tokens: format, digest, scopes
    audit.py       use records, aggregated in memory and flushed in batches
    cache.py       a server's cache of unwrapped keys and how it stays fresh

``open_keystore(url, master)`` opens either backend, migrates it and checks the master
key::

    store = open_keystore("sqlite:///var/lib/cryptoplane/keys.db", MasterKey.from_file(p))
    store = open_keystore("postgresql:///keys?host=/run/postgresql", master=new,
                          previous=[old])  # during or after an interrupted rotation

Rotating the master key without stopping: restart each server with ``master=new,
previous=[old]`` (it unwraps under both and wraps new versions under ``new``), then on
one of them call ``store.rotate_master()``: it rewraps every version in short
transactions and can be interrupted at any point (run it again to finish;
``master_usage()`` shows the progress). Once it returns, ``previous`` can go. A store
refuses to open (``MasterKeyRejected``, naming key ids only) with a wrong key, or
without a key that some row still needs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..transit.source import not_found
from .base import Keystore, TenantLimits, check_policy
from .cache import KeyCache
from .master import MasterKey, MasterKeyRejected, UnwrapFailed
from .migrations import LATEST as SCHEMA_VERSION
from .tokens import TokenInfo


def backend(url: str | os.PathLike[str], **kwargs: Any) -> Keystore:
    """The store at ``url``, connected, neither migrated nor keyed: ``sqlite:///path``
    or a plain path for SQLite, ``postgresql://`` or ``postgres://`` (any libpq URI) for
    PostgreSQL."""
    text = os.fspath(url)
    if text.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresKeystore
        return PostgresKeystore(text, **kwargs)
    from .sqlite import SqliteKeystore
    if text.startswith("sqlite://"):
        text = text[len("sqlite://"):]
    elif "://" in text:
        from ...exceptions import InvalidRequest
        raise InvalidRequest("keystore url must be sqlite:///path, a path, or "
                             "postgresql://...")
    return SqliteKeystore(text, **kwargs)


def open_keystore(url: str | os.PathLike[str], master: MasterKey | None = None, *,
                  previous: Sequence[MasterKey] = (),
                  master_passphrase: str | bytes | None = None,
                  **kwargs: Any) -> Keystore:
    """Opens, migrates and keys the store. ``master``: the key that wraps new versions;
    or ``master_passphrase``: derive it with argon2id and the store's own salt (made on
    first use). ``previous``: keys that only unwrap, for a rotation not yet finished.
    ``kwargs`` go to the backend (``audit="requests"``, ``audit_interval``,
    ``pool_size`` for PostgreSQL). Raises ``MasterKeyRejected`` for a wrong key."""
    if (master is None) == (master_passphrase is None):
        raise MasterKeyRejected("give exactly one of master and master_passphrase")
    store = backend(url, **kwargs)
    try:
        store.migrate()
        if master is None:
            assert master_passphrase is not None
            master = MasterKey.from_passphrase(master_passphrase, store.kdf_salt())
        store.attach_masters(master, previous)
    except BaseException:
        store.close()
        raise
    return store


__all__ = [
    "SCHEMA_VERSION",
    "KeyCache",
    "Keystore",
    "MasterKey",
    "MasterKeyRejected",
    "TenantLimits",
    "TokenInfo",
    "UnwrapFailed",
    "backend",
    "check_policy",
    "not_found",
    "open_keystore",
]
