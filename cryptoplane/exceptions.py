"""The few exceptions of cryptoplane, named after the outcome.

Every request ends in a value or one of these. Argument misuse is also a ``ValueError``
(``InvalidRequest``, ``KeyRejected``) so callers used to pyca/cryptography's conventions
can keep catching what they already catch. Messages never carry key material.
"""

from __future__ import annotations


class CryptoplaneError(Exception):
    """Base of every error the plane raises on purpose."""


class InvalidRequest(CryptoplaneError, ValueError):
    """The request is malformed: wrong nonce size, odd sector run, missing argument..."""


class KeyRejected(CryptoplaneError, ValueError):
    """The key does not fit its algorithm (size, equal XTS halves, wrong kind, bad encoding)."""


class NotSupported(CryptoplaneError):
    """Unknown algorithm, or an operation no available engine can perform."""


class AuthenticationFailed(CryptoplaneError):
    """An AEAD tag, a MAC or a padding check failed: no plaintext is returned."""


class ChunkAuthenticationFailed(AuthenticationFailed):
    """A STREAM chunk's tag did not verify; ``index`` is its position in the run (the
    stream tells a cut or a reordering from a change by opening that chunk again)."""

    def __init__(self, index: int) -> None:
        super().__init__(f"chunk {index} of the batch failed authentication")
        self.index = index


class InvalidSignature(CryptoplaneError):
    """A signature did not verify."""


class QuotaExceeded(CryptoplaneError):
    """A client or session went over its ops/s or bytes/s allowance."""


class Busy(CryptoplaneError):
    """The plane's queues are full and the caller asked not to wait."""


class EngineFailed(CryptoplaneError):
    """The engine running the request broke and the request could not be retried safely."""


class Timeout(CryptoplaneError):
    """The request did not complete within its deadline."""


class SelfTestFailed(CryptoplaneError):
    """An engine's known-answer test failed at start-up; it will not serve that algorithm."""


__all__ = [
    "AuthenticationFailed",
    "Busy",
    "ChunkAuthenticationFailed",
    "CryptoplaneError",
    "EngineFailed",
    "InvalidRequest",
    "InvalidSignature",
    "KeyRejected",
    "NotSupported",
    "QuotaExceeded",
    "SelfTestFailed",
    "Timeout",
]
