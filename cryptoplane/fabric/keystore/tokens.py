"""Bearer tokens: their format, their digest and what a checked token grants.

A token is ``cpt_<id>_<secret>``: the id (16 hex digits) finds the row, the secret (32
random bytes, URL-safe base64) proves possession. The store keeps SHA-256 of the secret
only. A fast hash is right here, unlike for passwords: the secret is 256 random bits,
so there is nothing to brute-force and no need for a slow KDF; the digest just keeps a
database dump from being a list of working credentials.

Scopes are ``fnmatch`` globs, case-sensitive, over key names and op names: ``["*"]``
allows everything, ``["billing-*"]`` a family of keys, ``["encrypt", "decrypt"]`` two ops.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from ..errors import Unauthorized

PREFIX = "cpt_"
ID_BYTES = 8
SECRET_BYTES = 32
# one message for unknown, malformed, revoked and expired: a caller probing tokens
# learns nothing about which ids exist
INVALID = "invalid, revoked or expired token"
# compared against when the id is unknown, so that path does the same work
_DUMMY_DIGEST = hashlib.sha256(b"cryptoplane: no such token").digest()


@dataclass(frozen=True)
class TokenInfo:
    """What a valid token grants. Holds no secret."""

    token_id: str
    tenant: str
    keys: tuple[str, ...]
    ops: tuple[str, ...]
    expires_at: float | None
    label: str = ""

    def allows(self, op: str, key: str | None) -> bool:
        """Whether ``op`` on ``key`` is in scope (``key=None``: an op on no key)."""
        if not any(fnmatchcase(op, p) for p in self.ops):
            return False
        return key is None or any(fnmatchcase(key, p) for p in self.keys)


def new_token() -> tuple[str, str, bytes]:
    """A fresh token: (id, the full token string to hand out once, digest to store)."""
    token_id = secrets.token_hex(ID_BYTES)
    secret = base64.urlsafe_b64encode(os.urandom(SECRET_BYTES)).rstrip(b"=").decode()
    return token_id, f"{PREFIX}{token_id}_{secret}", digest(secret)


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse(token: str) -> tuple[str, str]:
    """(id, secret) of a token string; ``Unauthorized`` if it is not one."""
    if not isinstance(token, str) or not token.startswith(PREFIX):
        raise Unauthorized(INVALID)
    token_id, sep, secret = token[len(PREFIX):].partition("_")
    if (not sep or len(token_id) != 2 * ID_BYTES
            or any(c not in "0123456789abcdef" for c in token_id)
            or not 40 <= len(secret) <= 64 or not secret.isascii()):
        raise Unauthorized(INVALID)
    return token_id, secret


def matches(secret: str, stored: bytes | None) -> bool:
    """Constant-time comparison of a presented secret with a stored digest (``None``:
    no such token; compared against a dummy so that path costs the same)."""
    ok = hmac.compare_digest(digest(secret), stored if stored is not None else _DUMMY_DIGEST)
    return ok and stored is not None


def check_scopes(patterns: Sequence[str], what: str) -> tuple[str, ...]:
    from ...exceptions import InvalidRequest
    if isinstance(patterns, str) or not patterns or not all(
            isinstance(p, str) and p and len(p) <= 256 for p in patterns):
        raise InvalidRequest(f"token {what} scopes must be a non-empty list of globs")
    return tuple(patterns)
