"""Bearer tokens: issue once, check, expire, revoke, scope."""

from __future__ import annotations

import time
from typing import Any

import pytest

from cryptoplane.exceptions import InvalidRequest
from cryptoplane.fabric.errors import Unauthorized
from cryptoplane.fabric.keystore import Keystore, TokenInfo
from cryptoplane.fabric.keystore.tokens import INVALID


def refused(store: Keystore, token: str) -> None:
    with pytest.raises(Unauthorized) as e:
        store.check_token(token)
    assert str(e.value) == INVALID  # one message, whatever the reason
    assert token[4:] not in str(e.value) or len(token) < 8


def test_issue_and_check(store: Keystore) -> None:
    token = store.create_token("acme", keys=["orders-*"], ops=["encrypt", "decrypt"],
                               label="web frontend")
    assert token.startswith("cpt_")
    info = store.check_token(token)
    assert info == TokenInfo(info.token_id, "acme", ("orders-*",), ("encrypt", "decrypt"),
                             None, "web frontend")
    assert token.startswith(f"cpt_{info.token_id}_")
    assert store.list_tokens("acme") == [info]
    assert store.list_tokens("other") == []
    assert "acme" in store.list_tenants()  # made on the fly


def test_wrong_malformed_and_unknown_tokens_are_refused(store: Keystore) -> None:
    token = store.create_token("acme")
    prefix, secret = token.rsplit("_", 1) if token.count("_") == 2 else (
        token[:21], token[22:])
    flipped = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    for bad in (f"{prefix}_{flipped}", token[:-1], token + "x", "", "cpt_", "cpt_x_y",
                "Bearer " + token, token.replace("cpt_", "cpx_"),
                "cpt_0000000000000000_" + secret, token.upper(), "cpt_" + "é" * 60):
        refused(store, bad)
    store.check_token(token)  # the real one still works


def test_expiry_and_revocation(store: Keystore) -> None:
    soon = store.create_token("acme", expires_at=time.time() + 0.3)
    past = store.create_token("acme", expires_at=time.time() - 1)
    keep = store.create_token("acme")
    assert store.check_token(soon).expires_at is not None
    refused(store, past)
    time.sleep(0.35)
    refused(store, soon)
    info = store.check_token(keep)
    assert not store.revoke_token(info.token_id, tenant="other")  # not theirs
    store.check_token(keep)
    assert store.revoke_token(info.token_id)
    assert not store.revoke_token(info.token_id)  # already
    refused(store, keep)
    assert info.token_id not in {t.token_id for t in store.list_tokens("acme")}
    ops = [r["op"] for r in store.audit_rows("acme") if r["kind"] == "admin"]
    assert ops.count("token-create") == 3 and ops.count("token-revoke") == 1
    assert all(keep.split("_", 2)[2] not in str(r) for r in store.audit_rows())


def test_scopes_are_globs() -> None:
    t = TokenInfo("id", "acme", ("orders-*", "billing"), ("encrypt", "sign*"), None)
    assert t.allows("encrypt", "orders-eu")
    assert t.allows("sign", "billing") and t.allows("sign-batch", "billing")
    assert not t.allows("decrypt", "orders-eu")
    assert not t.allows("encrypt", "billing-2") and not t.allows("encrypt", "Orders-eu")
    assert t.allows("encrypt", None)  # an op that names no key
    assert TokenInfo("id", "acme", ("*",), ("*",), None).allows("anything", "any-key")
    assert not TokenInfo("id", "acme", ("k?",), ("*",), None).allows("encrypt", "k10")


def test_bad_token_requests(store: Keystore) -> None:
    bad: list[dict[str, Any]] = [{"keys": []}, {"ops": "encrypt"}, {"keys": [""]},
                                 {"label": "x\n"}, {"label": "x" * 201},
                                 {"expires_at": float("nan")}]
    for kw in bad:
        with pytest.raises(InvalidRequest):
            store.create_token("acme", **kw)
    with pytest.raises(InvalidRequest):
        store.create_token("bad tenant")
