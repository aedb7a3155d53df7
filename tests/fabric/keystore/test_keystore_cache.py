"""KeyCache: a change made through another store object (another server) is seen
within a second, on both backends; missing keys are not remembered for long."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from cryptoplane.fabric.errors import KeyNotFound
from cryptoplane.fabric.keystore import KeyCache, Keystore, MasterKey, open_keystore
from cryptoplane.fabric.keytypes import KeyPolicy, KeyRecord, KeyType

Opener = Callable[..., Keystore]
AES = KeyPolicy(KeyType.AES256_GCM)


def eventually(check: Callable[[], bool], within: float) -> float:
    """Seconds until ``check()`` held; fails after ``within``."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > within:
            pytest.fail(f"not within {within} s")
        time.sleep(0.01)
    return time.monotonic() - t0


def test_hits_come_from_memory(store: Keystore) -> None:
    store.create_key("a", "k", AES, b"1" * 32)
    with KeyCache(store, max_age=60) as cache:
        first = cache.get("a", "k")
        assert cache.get("a", "k") is first and len(cache) == 1
        store.rotate_key("a", "k", b"2" * 32)  # through the same store: at once
        assert cache.get("a", "k").latest_version == 2


def test_another_servers_rotation_is_seen_within_a_second(open_store: Opener) -> None:
    mine, theirs = open_store(), open_store()
    theirs.create_key("a", "k", AES, b"1" * 32)
    with KeyCache(mine, max_age=1.0) as cache:
        assert cache.get("a", "k").latest_version == 1
        theirs.rotate_key("a", "k", b"2" * 32)
        assert eventually(lambda: cache.get("a", "k").latest_version == 2, 1.5) <= 1.1
        assert cache.get("a", "k").versions[2] == b"2" * 32
        theirs.create_key("a", "new", AES, b"3" * 32)  # a negative entry expires too
        eventually(lambda: _has(cache, "a", "new"), 1.5)


def _has(cache: KeyCache, tenant: str, name: str) -> bool:
    try:
        cache.get(tenant, name)
    except KeyNotFound:
        return False
    return True


def test_notify_is_faster_than_polling(pg_dsn: str, master: MasterKey) -> None:
    """With a long max_age only a notification can refresh the cache: PostgreSQL's
    NOTIFY reaches it in milliseconds (SQLite has no cross-store signal: polling)."""
    with open_keystore(pg_dsn, master) as mine, open_keystore(pg_dsn, master) as theirs:
        theirs.create_key("a", "k", AES, b"1" * 32)
        with KeyCache(mine, max_age=300) as cache:
            cache.get("a", "k")
            time.sleep(0.3)  # the listener is connected and LISTENing
            theirs.rotate_key("a", "k", b"2" * 32)
            assert eventually(lambda: cache.get("a", "k").latest_version == 2, 2.0) < 0.5


def test_missing_and_foreign_keys_fail_like_the_store(store: Keystore) -> None:
    store.create_key("b", "k", AES, b"1" * 32)
    with KeyCache(store, max_age=0.2) as cache:
        for _ in range(2):  # the second answer comes from the negative entry
            with pytest.raises(KeyNotFound) as e:
                cache.get("a", "k")
            with pytest.raises(KeyNotFound) as direct:
                store.get_key("a", "k")
            assert str(e.value) == str(direct.value)


def test_a_fetch_that_raced_an_invalidation_is_not_kept(store: Keystore) -> None:
    store.create_key("a", "k", AES, b"1" * 32)
    cache = KeyCache(store, max_age=60, listen=False)
    real = store.get_key

    def slow_get(tenant: str, name: str) -> KeyRecord:
        rec = real(tenant, name)
        cache.invalidate(tenant, name)  # a notification lands mid-fetch
        return rec

    store.get_key = slow_get  # type: ignore[method-assign]
    try:
        cache.get("a", "k")
    finally:
        del store.get_key  # type: ignore[method-assign]
    assert len(cache) == 0
    cache.close()


def test_a_database_restart_is_survived(pg_cluster: Any, pg_dsn: str,
                                        master: MasterKey) -> None:
    """After PostgreSQL restarts, pooled connections reconnect on their next use and the
    listener reconnects and drops the cache (it may have missed notifications)."""
    with open_keystore(pg_dsn, master) as mine, open_keystore(pg_dsn, master) as theirs:
        theirs.create_key("a", "k", AES, b"1" * 32)
        with KeyCache(mine, max_age=300) as cache:
            assert cache.get("a", "k").latest_version == 1
            pg_cluster.restart()
            theirs.rotate_key("a", "k", b"2" * 32)  # while mine's listener is away
            assert eventually(lambda: cache.get("a", "k").latest_version == 2, 3.0) < 2.5
            assert mine.get_key("a", "k").versions[2] == b"2" * 32
