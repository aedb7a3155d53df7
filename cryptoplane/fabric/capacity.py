"""Algorithm classes: the units in which servers declare capacity, clients ask for
quotas, managers grant, and servers enforce grants.

A class groups work of one cost: an RSA-2048 signature costs ~40x an ECDSA P-256 one,
so "1,000 ops/s" means nothing without the class. Symmetric work (AEAD, HMAC) is counted
in ops/s *and* bytes/s, as QEMU's cryptodev backend throttles both; the others in ops/s.

Which class a request falls in follows from its operation and its key's type (transit
operations) or its session's algorithm and key size (the remote engine's RAW_* ops).
Key management, digests and random are ``admin``/``misc``: never granted, never charged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from .codec import Op

RSA2048: Final = "rsa2048"
RSA3072: Final = "rsa3072"
RSA4096: Final = "rsa4096"
ECDSA_P256: Final = "ecdsa-p256"
ECDSA_P384: Final = "ecdsa-p384"
ED25519: Final = "ed25519"
AEAD: Final = "aead"
HMAC: Final = "hmac"
# not granted and not charged: key management, digests, random, sessions opening
FREE: Final = "free"

CLASSES: Final = (RSA2048, RSA3072, RSA4096, ECDSA_P256, ECDSA_P384, ED25519, AEAD, HMAC)
# classes whose bytes/s is measured, granted and enforced as well as ops/s
BYTE_CLASSES: Final = frozenset({AEAD, HMAC})

_BY_KEY_TYPE: Final[Mapping[str, str]] = {
    "rsa-2048": RSA2048, "rsa-3072": RSA3072, "rsa-4096": RSA4096,
    "ecdsa-p256": ECDSA_P256, "ecdsa-p384": ECDSA_P384, "ed25519": ED25519,
    "aes256-gcm96": AEAD, "chacha20-poly1305": AEAD, "hmac": HMAC,
}

# transit ops whose class is their key's (everything else is FREE)
KEYED_DATA_OPS: Final = frozenset({
    Op.ENCRYPT, Op.DECRYPT, Op.REWRAP, Op.DATAKEY, Op.SIGN, Op.VERIFY, Op.HMAC,
    Op.VERIFY_HMAC, Op.ENCRYPT_STREAM, Op.DECRYPT_STREAM})
RAW_OPS: Final = frozenset({Op.RAW_ENCRYPT, Op.RAW_DECRYPT, Op.RAW_SIGN, Op.RAW_VERIFY,
                            Op.RAW_MAC, Op.RAW_VERIFY_MAC})


def class_of_key_type(key_type: str) -> str:
    """The class of a transit key type (``keytypes.KeyType`` values)."""
    return _BY_KEY_TYPE.get(key_type, FREE)


def class_of_op(op: int, key_type: str | None) -> str:
    """The class of a transit request: ``op`` on a key of ``key_type`` (None: keyless)."""
    if op in KEYED_DATA_OPS and key_type is not None:
        return class_of_key_type(key_type)
    return FREE


def class_of_session(algorithm: str, key_bits: int = 0) -> str:
    """The class of RAW_* work on an offload session of plane ``algorithm`` (catalogue
    name) with a key of ``key_bits`` (RSA only)."""
    if algorithm.startswith("rsa-"):
        return {2048: RSA2048, 3072: RSA3072}.get(key_bits, RSA4096)
    if algorithm.startswith("ecdsa-p256"):
        return ECDSA_P256
    if algorithm.startswith("ecdsa-p384"):
        return ECDSA_P384
    if algorithm == "ed25519":
        return ED25519
    if algorithm.startswith("hmac-"):
        return HMAC
    if algorithm.startswith(("aes-", "chacha20")):
        return AEAD
    return FREE


def check_class(name: str) -> str:
    """``name`` if it is a grantable class, else ``ValueError`` naming the choices."""
    if name not in CLASSES:
        raise ValueError(f"unknown algorithm class {name!r}; one of {', '.join(CLASSES)}")
    return name


__all__ = ["AEAD", "BYTE_CLASSES", "CLASSES", "ECDSA_P256", "ECDSA_P384", "ED25519",
           "FREE", "HMAC", "RSA2048", "RSA3072", "RSA4096", "check_class",
           "class_of_key_type", "class_of_op", "class_of_session"]
