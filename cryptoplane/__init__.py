"""cryptoplane: a user-space crypto data plane.

    import cryptoplane as cp
    with cp.Plane() as plane:
        key = cp.Key.generate("aes-256-gcm")
        ct = plane.encrypt(key, b"data", nonce=nonce, aad=b"header")
"""

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from .fabric.remote import Remote


def __getattr__(name: str) -> Any:
    """``cp.Remote`` (the fabric's engine) is imported when first asked for: the fabric
    client's modules (asyncio transports, ssl) cost ~20 ms that a plane without a
    remote engine need not pay at ``import cryptoplane``."""
    if name == "Remote":
        from .fabric.remote import Remote

        return Remote
    raise AttributeError(f"module 'cryptoplane' has no attribute {name!r}")

__all__ = [
    "Algorithm", "AuthenticationFailed", "Busy", "Chain", "CryptoplaneError", "Decrypt",
    "DecryptSectors", "Derive", "Digest", "Encrypt", "EncryptSectors", "EngineFailed",
    "InvalidRequest", "InvalidSignature", "Key", "KeyRejected", "Kind", "Mac", "NotSupported",
    "Op", "Plane", "QuotaExceeded", "Random", "Remote", "Request", "SelfTestFailed", "Session",
    "Sign", "Timeout", "Verify", "VerifyMac", "__version__", "algorithms", "lookup", "stream",
    "volume",
]
