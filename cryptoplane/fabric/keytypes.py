"""Key types, policies and key records: what the keystore stores and transit uses.

A named key is a keyring of versions (Vault transit's model): version 1 on creation, one
more per rotation; ciphertexts and signatures name the version that made them. The
keystore keeps each version's material wrapped under the master key and never interprets
it; transit generates and uses it. ``KeyRecord`` is the unwrapped view a server holds in
memory: it never reaches a log, an error or a ``repr``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any


class KeyType(enum.StrEnum):
    AES256_GCM = "aes256-gcm96"
    CHACHA20_POLY1305 = "chacha20-poly1305"
    HMAC = "hmac"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"
    ECDSA_P256 = "ecdsa-p256"
    ECDSA_P384 = "ecdsa-p384"
    ED25519 = "ed25519"

    @property
    def symmetric(self) -> bool:
        return self in (KeyType.AES256_GCM, KeyType.CHACHA20_POLY1305, KeyType.HMAC)

    @property
    def aead(self) -> bool:
        return self in (KeyType.AES256_GCM, KeyType.CHACHA20_POLY1305)


@dataclass(frozen=True)
class KeyPolicy:
    """What a key may be used for; every field but ``type`` can change after creation
    except where noted."""

    type: KeyType
    exportable: bool = False          # fixed at creation
    deletion_allowed: bool = False
    derived: bool = False             # fixed at creation: needs a context per request
    convergent: bool = False          # fixed at creation: needs derived
    min_decryption_version: int = 1
    min_encryption_version: int = 0   # 0: the latest version
    auto_rotate_period: float = 0.0   # seconds; 0: never

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type.value, "exportable": self.exportable,
                "deletion_allowed": self.deletion_allowed, "derived": self.derived,
                "convergent": self.convergent,
                "min_decryption_version": self.min_decryption_version,
                "min_encryption_version": self.min_encryption_version,
                "auto_rotate_period": self.auto_rotate_period}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KeyPolicy:
        return cls(type=KeyType(d["type"]), exportable=bool(d.get("exportable", False)),
                   deletion_allowed=bool(d.get("deletion_allowed", False)),
                   derived=bool(d.get("derived", False)),
                   convergent=bool(d.get("convergent", False)),
                   min_decryption_version=int(d.get("min_decryption_version", 1)),
                   min_encryption_version=int(d.get("min_encryption_version", 0)),
                   auto_rotate_period=float(d.get("auto_rotate_period", 0.0)))

    def updated(self, **changes: Any) -> KeyPolicy:
        return replace(self, **changes)


@dataclass(frozen=True, repr=False)
class KeyRecord:
    """One tenant's named key as the server uses it: policy plus unwrapped versions.

    ``versions`` maps version number -> material (the keystore's opaque bytes: raw
    symmetric keys, PKCS#8 DER private keys). Versions below ``min_available_version``
    were trimmed and are absent."""

    tenant: str
    name: str
    policy: KeyPolicy
    latest_version: int
    min_available_version: int
    versions: dict[int, bytes] = field(compare=False)
    created_at: float = 0.0
    updated_at: float = 0.0

    def __repr__(self) -> str:
        return (f"KeyRecord(tenant={self.tenant!r}, name={self.name!r}, "
                f"type={self.policy.type.value}, latest_version={self.latest_version}, "
                f"versions={sorted(self.versions)})")

    __str__ = __repr__

    def describe(self) -> dict[str, Any]:
        """What ``keys list``/``read`` show: policy and version numbers, no material."""
        return {"name": self.name, **self.policy.to_json(),
                "latest_version": self.latest_version,
                "min_available_version": self.min_available_version,
                "versions": sorted(self.versions),
                "created_at": self.created_at, "updated_at": self.updated_at}


# names: what a key or tenant may be called (also bounds what reaches logs and the wire)
NAME_MAX = 128


def check_name(name: str, what: str = "key name") -> str:
    from ..exceptions import InvalidRequest
    if not name or len(name) > NAME_MAX or not all(
            c.isalnum() or c in "-_." for c in name) or name[0] == ".":
        raise InvalidRequest(f"{what} must be 1-{NAME_MAX} characters of letters, digits,"
                             " '-', '_' or '.', not starting with '.'")
    return name
