"""cryptoplane: a user-space crypto data plane.

    import cryptoplane as cp
    with cp.Plane() as plane:
        key = cp.Key.generate("aes-256-gcm")
        ct = plane.encrypt(key, b"data", nonce=nonce, aad=b"header")
"""

from . import algorithms, stream, volume
from ._version import __version__
from .algorithms import Algorithm, Kind, Op, lookup
from .chain import Chain
from .exceptions import (
    AuthenticationFailed,
    Busy,
    CryptoplaneError,
    EngineFailed,
    InvalidRequest,
    InvalidSignature,
    KeyRejected,
    NotSupported,
    QuotaExceeded,
    SelfTestFailed,
    Timeout,
)
from .fabric.remote import Remote
from .keys import Key
from .plane import Plane
from .requests import (
    Decrypt,
    DecryptSectors,
    Derive,
    Digest,
    Encrypt,
    EncryptSectors,
    Mac,
    Random,
    Request,
    Sign,
    Verify,
    VerifyMac,
)
from .session import Session

__all__ = [
    "Algorithm", "AuthenticationFailed", "Busy", "Chain", "CryptoplaneError", "Decrypt",
    "DecryptSectors", "Derive", "Digest", "Encrypt", "EncryptSectors", "EngineFailed",
    "InvalidRequest", "InvalidSignature", "Key", "KeyRejected", "Kind", "Mac", "NotSupported",
    "Op", "Plane", "QuotaExceeded", "Random", "Remote", "Request", "SelfTestFailed", "Session",
    "Sign", "Timeout", "Verify", "VerifyMac", "__version__", "algorithms", "lookup", "stream",
    "volume",
]
