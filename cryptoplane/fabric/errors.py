"""The fabric's typed errors.

Every error a server can answer is one wire status (``codec.Status``) and one exception
class, both ways, so a remote failure raises on the client exactly what the same failure
raises locally (``AuthenticationFailed`` for a bad tag, ``QuotaExceeded`` for a limit...).
Messages never carry key material, tokens or payloads.
"""

from __future__ import annotations

from ..exceptions import (
    CryptoplaneError,
    EngineFailed,
    InvalidRequest,
    KeyRejected,
    QuotaExceeded,
)


class Unauthorized(CryptoplaneError):
    """No valid credential: an unknown, wrong or expired token, or no client certificate."""


class Forbidden(CryptoplaneError):
    """The credential is valid but its scopes do not cover this key or operation."""


class KeyNotFound(CryptoplaneError, KeyError):
    """No such key for this tenant. Another tenant's key is indistinguishable from a
    missing one: the same error, the same message, the same code path."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else "key not found"


class KeyExists(CryptoplaneError):
    """A key of that name already exists for this tenant."""


class KeyVersionRejected(KeyRejected):
    """The ciphertext or operation names a key version the key's policy no longer allows
    (below ``min_decryption_version``, trimmed, or above the latest)."""


class PolicyViolation(InvalidRequest):
    """The key's policy forbids the operation: export of a non-exportable key, deletion of
    a key not marked deletable, a derived key without context..."""


class Throttled(QuotaExceeded):
    """Over the tenant's or token's rate; retry after ``retry_after`` seconds."""

    def __init__(self, message: str = "rate limit exceeded", *,
                 retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QuotaRefused(QuotaExceeded):
    """A manager refused a quota: granting it would pass the pool's capacity (times its
    overcommit factor). ``left`` is what it could still grant, per algorithm class:
    ``{class: {"ops": ops/s, "bytes": bytes/s}}``."""

    def __init__(self, message: str, *, left: dict[str, dict[str, float]] | None = None
                 ) -> None:
        super().__init__(message)
        self.left = left or {}


class ProtocolError(InvalidRequest):
    """The peer broke the wire protocol; the connection cannot continue."""


class ShuttingDown(CryptoplaneError):
    """The server is draining and takes no new requests; retry on another server."""


class ServerError(EngineFailed):
    """The server failed in a way it did not mean to (a bug): the request did not run to a
    result; the message says no more than that, to leak nothing."""


class ConnectionLost(EngineFailed):
    """The connection died while the request was in flight and the request is not safe
    to repeat (an encrypt under a server-chosen nonce may have run): the caller decides."""


__all__ = [
    "ConnectionLost",
    "Forbidden",
    "KeyExists",
    "KeyNotFound",
    "KeyVersionRejected",
    "PolicyViolation",
    "ProtocolError",
    "QuotaRefused",
    "ServerError",
    "ShuttingDown",
    "Throttled",
    "Unauthorized",
]
