"""Properties: any name the rules accept round-trips through the store, any other is
refused before it reaches SQL; any valid policy survives its JSON form and the store."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryptoplane.exceptions import InvalidRequest
from cryptoplane.fabric.errors import KeyExists
from cryptoplane.fabric.keystore import Keystore
from cryptoplane.fabric.keytypes import KeyPolicy, KeyType

# the store is shared by a test's examples on purpose: names differ or KeyExists says so
SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

names = st.one_of(
    st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,20}\Z"),
    st.text(min_size=0, max_size=12),  # anything: quotes, NULs, '%', '?', unicode
    st.text(alphabet="a_.-'\"%?;\0 /", max_size=8))

policies = st.builds(
    KeyPolicy, type=st.sampled_from(list(KeyType)), exportable=st.booleans(),
    deletion_allowed=st.booleans(), derived=st.just(False), convergent=st.just(False),
    min_decryption_version=st.just(1), min_encryption_version=st.sampled_from([0, 1]),
    auto_rotate_period=st.floats(min_value=0, max_value=1e9))


@SETTINGS
@given(name=names)
def test_names_accepted_or_refused_before_sql(store: Keystore, name: str) -> None:
    def ok(n: str) -> bool:
        return (0 < len(n) <= 128 and n[0] != "." and
                all(c.isalnum() or c in "-_." for c in n))
    if not ok(name):
        with pytest.raises(InvalidRequest):
            store.create_key("t", name, KeyPolicy(KeyType.HMAC), b"m")
        with pytest.raises(InvalidRequest):
            store.create_key(name, "k", KeyPolicy(KeyType.HMAC), b"m")
        return
    try:
        store.create_key(name, name, KeyPolicy(KeyType.HMAC), name.encode())
    except KeyExists:
        return
    rec = store.get_key(name, name)
    assert (rec.tenant, rec.name, rec.versions) == (name, name, {1: name.encode()})
    assert name in store.list_keys(name)


@given(policy=policies)
def test_policy_json_round_trip(policy: KeyPolicy) -> None:
    assert KeyPolicy.from_json(json.loads(json.dumps(policy.to_json()))) == policy


@SETTINGS
@given(policy=policies, n=st.integers(0, 10**9))
def test_policies_survive_the_store(store: Keystore, policy: KeyPolicy, n: int) -> None:
    try:
        store.create_key("t", f"k{n}", policy, b"m")
    except KeyExists:
        return
    assert store.get_key("t", f"k{n}").policy == policy
