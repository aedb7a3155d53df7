"""Fixtures for the fabric's tests: a PostgreSQL cluster for the session, a fresh
database per test, and ``keystore_url``, which runs a test once per keystore backend."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # for ``from pg import PostgresCluster`` in any fabric test
    sys.path.insert(0, _HERE)

from pg import PostgresCluster, available  # noqa: E402
from support import unavailable  # noqa: E402

_databases = itertools.count()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """One cluster for the whole session (startup costs about a second)."""
    reason = available()
    if reason:
        unavailable(reason)
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture
def pg_dsn(pg_cluster: PostgresCluster) -> Iterator[str]:
    """A fresh, empty database for this test."""
    name = f"t{next(_databases)}"
    yield pg_cluster.create_database(name)
    pg_cluster.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def keystore_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A keystore url for an empty store, once per backend."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'keystore.db'}"  # sqlite:///abs/path
    return str(request.getfixturevalue("pg_dsn"))
