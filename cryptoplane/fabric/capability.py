"""Grant tokens: the manager's signed statement of what a client may ask of which servers.

A manager answers a quota request with a *grant* and a capability token that carries it.
Servers check the token themselves, with the manager's Ed25519 public keys learnt at
registration, and never call the manager per connection (a macaroon without caveats; a
JWT without its algorithm confusion: one algorithm, fixed). Sans-I/O: strings in, claims
out.

Format: ``cpg1.<claims>.<signature>``, both parts base64url without padding; the claims
are compact JSON; the signature is Ed25519 over the ASCII of ``cpg1.<claims>``.

Claims: ``gid`` grant id, ``ten`` tenant, ``kid`` the signing key's id, ``iat`` and
``exp`` (Unix seconds), ``pri`` priority, ``srv``: per server id, per algorithm class,
``[ops/s, bytes/s]`` that server enforces for this grant (0: no limit on that measure).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from .errors import Unauthorized

PREFIX: Final = "cpg1"
MAX_TOKEN: Final = 8192  # characters; a grant names a handful of servers
# a server accepts a grant issued this far in its future (clock skew between machines)
SKEW: Final = 30.0


class GrantRefused(Unauthorized):
    """A grant token that is malformed, not signed by a known manager key, not for this
    server or tenant, or expired. The text says which, and never holds the token."""


class GrantExpired(GrantRefused):
    """A well-signed grant whose ``exp`` has passed: renew it at the manager."""


@dataclass(frozen=True)
class GrantClaims:
    grant_id: str
    tenant: str
    expires_at: float
    issued_at: float
    priority: int = 0
    # server id -> algorithm class -> (ops/s, bytes/s); 0 means that measure is free
    servers: Mapping[str, Mapping[str, tuple[float, float]]] = field(default_factory=dict)
    key_id: str = ""

    def rates_for(self, server_id: str) -> Mapping[str, tuple[float, float]] | None:
        """What ``server_id`` enforces for this grant; None if it is not one of its
        servers."""
        return self.servers.get(server_id)

    def to_json(self) -> dict[str, Any]:
        return {"gid": self.grant_id, "ten": self.tenant, "kid": self.key_id,
                "iat": self.issued_at, "exp": self.expires_at, "pri": self.priority,
                "srv": {s: {c: [r[0], r[1]] for c, r in rates.items()}
                        for s, rates in self.servers.items()}}


def key_id(public_key: Ed25519PublicKey) -> str:
    """A signing key's id: the first 16 hex digits of SHA-256 over its raw public bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw,
                                  serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_b64(public_key: Ed25519PublicKey) -> str:
    """The raw public key, base64: how managers publish their keys to servers."""
    return base64.b64encode(public_key.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode("ascii")


def public_key_from_b64(text: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (ValueError, binascii.Error):
        raise GrantRefused("malformed manager public key") from None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if len(text) % 4 == 1 or not all(c.isalnum() or c in "-_" for c in text):
        raise GrantRefused("malformed grant token")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, binascii.Error):
        raise GrantRefused("malformed grant token") from None


def sign_grant(private_key: Ed25519PrivateKey, claims: GrantClaims) -> str:
    """The token for ``claims`` (``key_id`` is filled from ``private_key``)."""
    body = claims.to_json()
    body["kid"] = key_id(private_key.public_key())
    signed = f"{PREFIX}.{_b64(json.dumps(body, separators=(',', ':')).encode())}"
    return f"{signed}.{_b64(private_key.sign(signed.encode('ascii')))}"


def _rate(value: Any) -> tuple[float, float]:
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                       and math.isfinite(x) and x >= 0 for x in value)):
        raise GrantRefused("malformed grant: a rate is not [ops, bytes] >= 0")
    return float(value[0]), float(value[1])


def _claims(body: Any) -> GrantClaims:
    try:
        if not isinstance(body, dict):
            raise TypeError
        srv = body["srv"]
        if not isinstance(srv, dict):
            raise TypeError
        servers = {str(s): {str(c): _rate(r) for c, r in rates.items()}
                   for s, rates in srv.items()}
        gid, ten, kid = body["gid"], body["ten"], body["kid"]
        if not all(isinstance(x, str) for x in (gid, ten, kid)):
            raise TypeError
        exp, iat, pri = float(body["exp"]), float(body["iat"]), int(body["pri"])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise GrantRefused("malformed grant token") from None
    if not (math.isfinite(exp) and math.isfinite(iat)):
        raise GrantRefused("malformed grant token")
    return GrantClaims(grant_id=gid, tenant=ten, expires_at=exp, issued_at=iat,
                       priority=pri, servers=servers, key_id=kid)


def verify_grant(token: str, public_keys: Mapping[str, Ed25519PublicKey], *,
                 server_id: str | None = None, tenant: str | None = None,
                 now: float | None = None) -> GrantClaims:
    """The claims of a token signed by one of ``public_keys`` (by key id), for
    ``server_id`` and ``tenant`` when given, and not expired; else ``GrantRefused``
    (``GrantExpired`` for a good token past its expiry)."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN:
        raise GrantRefused("malformed grant token")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise GrantRefused("malformed grant token")
    raw = _unb64(parts[1])
    signature = _unb64(parts[2])
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise GrantRefused("malformed grant token") from None
    claims = _claims(body)
    public = public_keys.get(claims.key_id)
    if public is None:
        raise GrantRefused("grant signed by a key this server does not know")
    try:
        public.verify(signature, f"{parts[0]}.{parts[1]}".encode("ascii"))
    except InvalidSignature:
        raise GrantRefused("grant signature does not verify") from None
    now = time.time() if now is None else now
    if claims.issued_at > now + SKEW:
        raise GrantRefused("grant issued in the future (clock skew?)")
    if claims.expires_at <= now:
        raise GrantExpired(f"grant {claims.grant_id} expired; renew it at the manager")
    if tenant is not None and claims.tenant != tenant:
        raise GrantRefused("grant is for another tenant")
    if server_id is not None and server_id not in claims.servers:
        raise GrantRefused(f"grant {claims.grant_id} does not name this server")
    return claims


def load_signing_key(pem: bytes) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the manager's signing key must be an Ed25519 private key")
    return key


def new_signing_key_pem() -> bytes:
    """A fresh Ed25519 key, PKCS#8 PEM, for ``cryptoplane manager --signing-key``."""
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())


__all__ = ["GrantClaims", "GrantExpired", "GrantRefused", "key_id", "load_signing_key",
           "new_signing_key_pem", "public_key_b64", "public_key_from_b64", "sign_grant",
           "verify_grant"]
