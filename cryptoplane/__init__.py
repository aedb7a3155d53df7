"""cryptoplane: a user-space crypto data plane.

    import cryptoplane as cp
    with cp.Plane() as plane:
        key = cp.Key.generate("aes-256-gcm")
        ct = plane.encrypt(key, b"data", nonce=nonce, aad=b"header")
"""

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import algorithms, stream, volume
from . import plane as _plane
from ._version import __version__
from .algorithms import Algorithm, Kind, Op, lookup
from .chain import Chain
from .engines.base import Engine
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


class Plane(_plane.Plane):
    """The plane (``plane.Plane``), and with ``remote=`` an engine on fabric servers as
    well: ``"tcp://host:port"`` (or a list of URLs), or ``"manager://host:port"`` with
    ``quota`` (``{"rsa2048": {"ops": 500}}``) for the servers a manager grants it on;
    ``token`` (default: env ``CRYPTOPLANE_TOKEN``) authenticates there. The fabric's
    modules load only when ``remote`` is given."""

    def __init__(self, engines: Sequence[str | Engine] | None = None, *,
                 remote: str | Sequence[str] | None = None,
                 quota: Mapping[str, Mapping[str, float]] | None = None,
                 token: str | None = None, **options: Any) -> None:
        if remote is None:
            if quota is not None:
                raise InvalidRequest("quota= goes with remote='manager://...'")
        else:
            from .fabric.remote import remote_engine

            engines = [*(engines if engines is not None else _plane.DEFAULT_ENGINES),
                       remote_engine(remote, quota, token)]
        super().__init__(engines, **options)


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
