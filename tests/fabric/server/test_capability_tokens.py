"""Grant tokens as a server checks them: ``capability.verify_grant`` and ``GrantTable``
refuse everything but a good token with ``GrantRefused``, whatever the input (fuzzed),
and the table's buckets hold a grant to its rates."""

from __future__ import annotations

import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryptoplane.fabric.capability import (
    GrantClaims,
    GrantExpired,
    GrantRefused,
    key_id,
    public_key_b64,
    sign_grant,
    verify_grant,
)
from cryptoplane.fabric.errors import Forbidden, Unauthorized
from cryptoplane.fabric.grants import NO_GRANT, GrantTable

KEY = Ed25519PrivateKey.generate()
KEYS = {key_id(KEY.public_key()): KEY.public_key()}
NOW = 1_800_000_000.0


def claims(**kw: object) -> GrantClaims:
    base: dict[str, object] = {
        "grant_id": "g1", "tenant": "acme", "expires_at": NOW + 60, "issued_at": NOW,
        "servers": {"s1": {"rsa2048": (100.0, 0.0), "aead": (0.0, 1000.0)}}}
    base.update(kw)
    return GrantClaims(**base)  # type: ignore[arg-type]


GOOD = sign_grant(KEY, claims())


def test_a_good_token_verifies() -> None:
    c = verify_grant(GOOD, KEYS, server_id="s1", tenant="acme", now=NOW)
    assert (c.grant_id, c.tenant, c.rates_for("s1")) == (
        "g1", "acme", {"rsa2048": (100.0, 0.0), "aead": (0.0, 1000.0)})


@pytest.mark.parametrize("kw,message", [
    ({"server_id": "s2"}, "does not name this server"),
    ({"tenant": "other"}, "another tenant"),
    ({"now": NOW + 61}, "expired"),
    ({"now": NOW - 100}, "future"),
])
def test_refusals_say_why(kw: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"server_id": "s1", "tenant": "acme", "now": NOW, **kw}
    with pytest.raises(GrantRefused, match=message) as e:
        verify_grant(GOOD, KEYS, **args)  # type: ignore[arg-type]
    assert GOOD not in str(e.value)


def test_unknown_key_and_tampering() -> None:
    other = Ed25519PrivateKey.generate()
    with pytest.raises(GrantRefused, match="does not know"):
        verify_grant(sign_grant(other, claims()), KEYS, now=NOW)
    head, body, sig = GOOD.split(".")
    flipped = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1]
    with pytest.raises(GrantRefused):
        verify_grant(f"{head}.{flipped}.{sig}", KEYS, now=NOW)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=300),
                 st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
                 st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEF-_0123456789",
                                  max_size=80), min_size=1, max_size=4).map(
                     lambda parts: "cpg1." + ".".join(parts))))
def test_fuzz_arbitrary_text_only_refused(token: str) -> None:
    with pytest.raises(GrantRefused):
        verify_grant(token, KEYS, server_id="s1", tenant="acme", now=NOW)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_fuzz_mutated_tokens_only_refused(data: st.DataObject) -> None:
    raw = bytearray(GOOD.encode("ascii"))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "dup"]))
        i = data.draw(st.integers(0, len(raw) - 1))
        if op == "flip":
            raw[i] = data.draw(st.integers(0, 127))
        elif op == "cut":
            del raw[i:i + data.draw(st.integers(1, 20))]
        elif op == "insert":
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            raw[i:i] = raw[i:i + 10]
        if not raw:
            raw = bytearray(b"x")
    token = raw.decode("latin-1")
    try:
        c = verify_grant(token, KEYS, server_id="s1", tenant="acme", now=NOW)
    except GrantRefused:
        return
    # a mutation that verifies can only be one that changed no signed byte
    assert c == verify_grant(GOOD, KEYS, server_id="s1", tenant="acme", now=NOW)


def _table(**kw: object) -> tuple[GrantTable, list[float]]:
    t = [100.0]
    wall = [NOW]
    table = GrantTable("s1", keys={key_id(KEY.public_key()): public_key_b64(
        KEY.public_key())}, clock=lambda: t[0], wall=lambda: wall[0], **kw)  # type: ignore[arg-type]
    return table, t


def test_table_buckets_never_charge_a_refusal() -> None:
    table, t = _table()
    c = table.verify(GOOD, "acme")
    entry = table.enter(c)
    # burst of 20 ms: 2 signatures at once, then one per 10 ms
    assert table.admit(c, "rsa2048", 1, 0) == 0.0
    assert table.admit(c, "rsa2048", 1, 0) == 0.0
    wait = table.admit(c, "rsa2048", 1, 0)
    assert wait == pytest.approx(0.01)
    for _ in range(5):  # refusals cost nothing
        assert table.admit(c, "rsa2048", 1, 0) == pytest.approx(0.01)
    t[0] += 0.01
    assert table.admit(c, "rsa2048", 1, 0) == 0.0
    # a refund (another limit refused the request after the grant said yes) is exact
    assert table.admit(c, "rsa2048", 1, 0) == pytest.approx(0.01)
    t[0] += 0.01
    assert table.admit(c, "rsa2048", 1, 0) == 0.0
    entry.refund("rsa2048", 1, 0)
    assert table.admit(c, "rsa2048", 1, 0) == 0.0
    assert table.admit(c, "rsa2048", 1, 0) > 0
    # a class the grant does not name: free when grants are optional
    assert entry.admit("ed25519", 1, 0) == 0.0
    # load: what was admitted per class since the last call
    t[0] += 1.0
    load = table.load()
    assert load["rsa2048"]["ops"] == pytest.approx(4 / 1.02)
    assert table.load() == {}
    assert table.admitted()["rsa2048"] == (4.0, 0.0)


def test_long_run_rate_exact_in_simulated_time() -> None:
    """Unpaced requests over 2 s of a fake clock: the grant's rate plus its burst."""
    table, t = _table()
    entry = table.present(sign_grant(KEY, claims(
        servers={"s1": {"rsa2048": (1000.0, 0.0), "aead": (0.0, 1e6)}})), "acme")
    ops = nbytes = 0
    start = t[0]
    while t[0] < start + 2.0:
        ops += entry.admit("rsa2048", 1, 0) == 0.0
        nbytes += 1000 * (entry.admit("aead", 1, 1000) == 0.0)
        t[0] += 0.0001
    assert 2000 <= ops <= 2000 + 20 + 1
    assert 2e6 <= nbytes <= 2e6 + 2e4 + 1000


def test_table_required_revoked_expired_cap() -> None:
    table, _ = _table(required=True, max_grants=1)
    entry = table.present(GOOD, "acme")
    with pytest.raises(Forbidden, match="does not cover ed25519"):
        entry.admit("ed25519", 1, 0)
    with pytest.raises(Forbidden, match="granted clients"):
        NO_GRANT.admit("aead", 1, 10)
    with pytest.raises(GrantRefused, match="too many"):
        table.present(sign_grant(KEY, claims(grant_id="g2")), "acme")
    assert table.revoke(["g1"]) == 1
    with pytest.raises(Unauthorized, match="revoked"):
        entry.admit("rsa2048", 1, 0)
    with pytest.raises(GrantRefused, match="revoked"):
        table.present(GOOD, "acme")
    # an expired grant: refused at verify, and per request on an entry already held
    short = GrantTable("s1", keys={key_id(KEY.public_key()): public_key_b64(
        KEY.public_key())})
    real = sign_grant(KEY, claims(issued_at=time.time(), expires_at=time.time() + 0.2))
    held = short.present(real, "acme")
    time.sleep(0.25)
    with pytest.raises(Unauthorized, match="expired; renew it"):
        held.admit("rsa2048", 1, 0)
    with pytest.raises(GrantExpired):
        short.verify(real, "acme")


def test_update_keys_checks_ids() -> None:
    table = GrantTable("s1")
    with pytest.raises(GrantRefused):
        table.update_keys({"0" * 16: public_key_b64(KEY.public_key())})
    with pytest.raises(GrantRefused):
        table.update_keys({"x": "not base64!"})
    table.update_keys({key_id(KEY.public_key()): public_key_b64(KEY.public_key())})
    assert table.key_ids == [key_id(KEY.public_key())]
