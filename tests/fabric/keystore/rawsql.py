"""Reaching under the keystore, for tests that tamper with or inspect its tables."""

from __future__ import annotations

import sqlite3
from typing import Any


def execute(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Runs ``sql`` (``?`` placeholders) on the store's database, committed."""
    if url.startswith(("postgresql://", "postgres://")):
        import psycopg
        with psycopg.connect(url, autocommit=True) as conn:
            cur = conn.execute(sql.replace("?", "%s").encode(), params)
            return [tuple(r) for r in cur.fetchall()] if cur.description else []
    db = sqlite3.connect(url.removeprefix("sqlite://"), isolation_level=None)
    try:
        return [tuple(r) for r in db.execute(sql, params).fetchall()]
    finally:
        db.close()
