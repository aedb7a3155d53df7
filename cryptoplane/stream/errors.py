"""The typed errors of age-format streams, one per way a file can be wrong.

They follow the age test kit's classes (``header failure``, ``armor failure``, ``no
match``, ``HMAC failure``, ``payload failure``) so that a caller, and the kit, can tell
a parsing error from a wrong key from tampering. Every one is a ``CryptoplaneError``.
"""

from __future__ import annotations

from cryptoplane.exceptions import AuthenticationFailed, InvalidRequest


class HeaderError(InvalidRequest):
    """The age header does not parse (bad version line, stanza, base64, MAC line)."""


class ArmorError(HeaderError):
    """The ASCII armor (``-----BEGIN AGE ENCRYPTED FILE-----``) does not parse."""


class NoIdentityMatched(AuthenticationFailed):
    """No identity or passphrase given unwraps any recipient stanza of the header:
    a wrong key or a wrong passphrase."""


class HeaderMacMismatch(AuthenticationFailed):
    """The file key was unwrapped but the header's MAC does not match: the header was
    changed."""


class PayloadError(AuthenticationFailed):
    """The payload does not decrypt all the way to its end. Plaintext already released
    (whole chunks that authenticated) stays valid; nothing after it is released."""


class ChunkTampered(PayloadError):
    """A chunk failed authentication: flipped bits, a dropped, duplicated or reordered
    chunk, or a wrong payload key."""


class Truncated(PayloadError):
    """The payload ended before its final chunk."""


class TrailingData(PayloadError):
    """Bytes follow the final chunk."""


class EmptyFinalChunk(PayloadError):
    """An empty final chunk after other chunks (only an empty file ends with one)."""
