"""Who is calling, and what they may do: bearer tokens, client certificates, TLS 1.3.

A connection authenticates once (HELLO's token, or the TLS client certificate) and gets
a ``Principal``: a tenant and the scopes it holds. Every request is then checked against
it (``Principal.check``), expiry included, so a token that expires mid-connection stops
working at its expiry, not at the next reconnect.

Tokens are checked by the keystore (``TokenChecker``: anything with ``check_token``);
this module does not import it, it only caches what it answers (``Authenticator``).
"""

from __future__ import annotations

import hashlib
import os
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Protocol

from .errors import Forbidden, Unauthorized

StrPath = str | os.PathLike[str]
Clock = Callable[[], float]

ALL = ("*",)
# the cache is bounded: past this many live entries, expired ones are swept, and if
# that frees nothing it starts again (a flood of distinct valid tokens is the keystore's
# problem, not the cache's memory)
_CACHE_MAX = 65_536


class TokenGrant(Protocol):
    """What the keystore's ``check_token`` answers (its ``TokenInfo``)."""

    @property
    def token_id(self) -> str: ...
    @property
    def tenant(self) -> str: ...
    @property
    def keys(self) -> Sequence[str]: ...
    @property
    def ops(self) -> Sequence[str]: ...
    @property
    def expires_at(self) -> float | None: ...


class TokenChecker(Protocol):
    """The keystore, as far as authentication needs it."""

    def check_token(self, secret: str) -> TokenGrant:
        """The grant of a full token string; ``Unauthorized`` for an unknown, wrong,
        revoked or expired one (one message for all)."""
        ...


@dataclass(frozen=True, repr=False)
class Principal:
    """An authenticated caller: its tenant and its scopes (``fnmatch`` globs over key
    names and lowercase op names: ``encrypt``, ``key_create``, ``session``, ``admin``).

    ``token_id`` is None for a client certificate, whose ``subject`` (its serial, else
    its CN) names it instead. Holds no secret, and its repr shows only its label.
    """

    tenant: str
    token_id: str | None
    keys: tuple[str, ...]
    ops: tuple[str, ...]
    expires_at: float | None  # wall-clock (time.time()) seconds; None: never
    subject: str | None = None  # certificates: serial number (hex) or common name

    @property
    def label(self) -> str:
        """For logs and audit: ``tenant/token_id`` or ``tenant/cert:<serial or CN>``."""
        if self.token_id is not None:
            return f"{self.tenant}/{self.token_id}"
        return f"{self.tenant}/cert:{self.subject or '?'}"

    def __repr__(self) -> str:
        return f"Principal({self.label})"

    def allows(self, op: str, key: str | None) -> bool:
        """Whether ``op`` on ``key`` (None: an op on no key) is within the scopes."""
        # "*" is the common case (certificates, operator tokens): skip the matching
        if "*" not in self.ops and not any(
                fnmatchcase(op, p) for p in self.ops):
            return False
        return (key is None or "*" in self.keys
                or any(fnmatchcase(key, p) for p in self.keys))

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and (
            time.time() if now is None else now) >= self.expires_at

    def check(self, op: str, key: str | None, now: float | None = None) -> None:
        """Raise ``Unauthorized`` if the credential has expired (checked per request),
        ``Forbidden`` if ``op`` on ``key`` is outside its scopes. The messages name the
        operation but never the key: a probe learns nothing about key names."""
        if self.expired(now):
            raise Unauthorized("credential expired")
        if not self.allows(op, key):
            raise Forbidden(f"{op} on this key is outside the credential's scopes"
                            if key is not None and self.allows(op, None)
                            else f"{op} is outside the credential's scopes")


class Authenticator:
    """Tokens and certificates to principals.

    Token lookups are cached for ``cache_ttl`` seconds, so a busy server does not ask
    the keystore's database on every connection, while a revocation (or a changed scope)
    still takes effect within ``cache_ttl``. Only successes are cached: a token just
    created works at once, and a failure is never remembered as anything.

    The cache key is SHA-256 of the presented token, never the token itself: the cache
    holds nothing that authenticates if the process memory leaks (the keystore stores
    the same kind of digest). It also keeps timing uninformative: a wrong secret for a
    known token id hashes to an unrelated key, so it misses exactly as an unknown token
    does (no prefix of a valid token can hit), and both go to ``check_token``, which
    compares digests in constant time, against a dummy digest for an unknown id. Unknown
    token and wrong secret are thus one timing class; only a valid token (which the
    caller already holds) can be faster, by hitting the cache.
    """

    def __init__(self, tokens: TokenChecker, *, cache_ttl: float = 1.0,
                 cert_tenants: Mapping[str, str] | None = None,
                 clock: Clock = time.monotonic) -> None:
        if cache_ttl < 0:
            raise ValueError(f"cache_ttl must be >= 0, got {cache_ttl}")
        self._tokens = tokens
        self._ttl = cache_ttl
        self._cert_tenants = dict(cert_tenants or {})
        self._clock = clock
        # sha256(token) -> (monotonic time the entry stops being trusted, principal)
        self._cache: dict[bytes, tuple[float, Principal]] = {}
        # servers call from_token on worker threads (the keystore blocks): a hit is one
        # atomic dict get, lock-free; changes to the cache take the lock
        self._lock = threading.Lock()

    def from_token(self, secret: str) -> Principal:
        """The principal of a bearer token (``cpt_<id>_<secret>``); ``Unauthorized`` if
        it is unknown, wrong, revoked (past the cache TTL) or expired."""
        if not isinstance(secret, str):
            raise Unauthorized("invalid, revoked or expired token")
        key = hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()
        # read before the keystore is asked: an entry's TTL runs from before the answer
        # it caches, so a revocation committed during the lookup is still seen in time
        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None:
            until, principal = hit
            if now < until:
                if principal.expired():
                    raise Unauthorized("invalid, revoked or expired token")
                return principal
            with self._lock:
                self._cache.pop(key, None)
        grant = self._tokens.check_token(secret)  # raises Unauthorized; not cached
        principal = Principal(tenant=grant.tenant, token_id=grant.token_id,
                              keys=tuple(grant.keys), ops=tuple(grant.ops),
                              expires_at=grant.expires_at)
        if principal.expired():  # a keystore that left expiry to us
            raise Unauthorized("invalid, revoked or expired token")
        if self._ttl > 0:
            with self._lock:
                if len(self._cache) >= _CACHE_MAX:
                    self._sweep(now)
                self._cache[key] = (now + self._ttl, principal)
        return principal

    def _sweep(self, now: float) -> None:  # under the lock
        for k in [k for k, (until, _) in self._cache.items() if until <= now]:
            del self._cache[k]
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()

    def forget(self) -> None:
        """Drop every cached lookup: a revocation takes effect at once, not within the
        TTL (for an operator's "revoke now", or tests)."""
        self._cache.clear()

    def from_certificate(self, peercert: Mapping[str, Any] | None) -> Principal:
        """The principal of a verified TLS client certificate (``getpeercert()``'s dict):
        tenant = the subject's common name, or what ``cert_tenants`` maps that CN to;
        all scopes; expires with the certificate. ``Unauthorized`` when there is no
        certificate or it has no CN."""
        if not peercert:
            raise Unauthorized("no client certificate")
        cn = _common_name(peercert)
        if not cn:
            raise Unauthorized("client certificate has no subject common name")
        tenant = self._cert_tenants.get(cn, cn)
        serial = peercert.get("serialNumber")
        expires_at: float | None = None
        not_after = peercert.get("notAfter")
        if isinstance(not_after, str):
            try:
                expires_at = float(ssl.cert_time_to_seconds(not_after))
            except ValueError:
                expires_at = None  # OpenSSL verified it; an odd format is no reason to fail
        return Principal(tenant=tenant, token_id=None, keys=ALL, ops=ALL,
                         expires_at=expires_at,
                         subject=str(serial) if serial else cn)


def _common_name(peercert: Mapping[str, Any]) -> str | None:
    """The subject's (last) commonName in ``getpeercert()``'s nested-tuple layout."""
    cn: str | None = None
    for rdn in peercert.get("subject", ()):
        for attr in rdn:
            if len(attr) == 2 and attr[0] == "commonName":
                cn = str(attr[1])
    return cn


# -- TLS ------------------------------------------------------------------------------


def _tls13_only(ctx: ssl.SSLContext) -> None:
    # TLS 1.3 only: no downgrade to 1.2's cipher suites and renegotiation to reason about
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3


def server_ssl_context(certfile: StrPath, keyfile: StrPath | None, *,
                       client_ca: StrPath | None = None,
                       require_client_cert: bool = False) -> ssl.SSLContext:
    """The server's TLS 1.3 context. With ``client_ca``, client certificates signed by
    it are verified: required (``CERT_REQUIRED``) when ``require_client_cert``, else
    optional (``CERT_OPTIONAL``: a client may authenticate with a token instead, but a
    certificate it does present must verify)."""
    if require_client_cert and client_ca is None:
        raise ValueError("require_client_cert needs client_ca to verify them against")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _tls13_only(ctx)
    ctx.load_cert_chain(certfile, keyfile)
    if client_ca is not None:
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_ssl_context(cafile: StrPath | None, *, certfile: StrPath | None = None,
                       keyfile: StrPath | None = None) -> ssl.SSLContext:
    """A client's TLS 1.3 context: the server's certificate is verified against
    ``cafile`` (None: the system's trust store) and its host name checked; ``certfile``
    (and ``keyfile``) present a client certificate (mutual TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname on
    _tls13_only(ctx)
    if cafile is None:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        ctx.load_verify_locations(cafile=cafile)
    if certfile is not None:
        ctx.load_cert_chain(certfile, keyfile)
    elif keyfile is not None:
        raise ValueError("keyfile without certfile")
    return ctx


__all__ = [
    "Authenticator",
    "Principal",
    "TokenChecker",
    "TokenGrant",
    "client_ssl_context",
    "server_ssl_context",
]
