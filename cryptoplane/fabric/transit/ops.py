"""One item of each data operation, on a plane and a ``Ring``: what a single call and a
batch item both run. Each returns ``(result, key version used)``; auditing and finding
the key are the caller's (``service.Transit``, ``batch``).

Encryption: AES-256-GCM or ChaCha20-Poly1305 with a random 96-bit nonce per call;
derived keys (``derived=True``) use HKDF-SHA256(version material, info=context) per
request (``keyring.derive``); convergent keys (derived + ``convergent=True``) take the
nonce from HMAC-SHA256(nonce key, u64be(len(aad)) || aad || plaintext)[:12], so equal
plaintext, context and aad give equal ciphertexts, and a different aad never reuses a
nonce with a different input (GCM's nonce reuse would give up its authentication key).

HMAC: only ``hmac`` keys (Vault lets any key HMAC, with a separate HMAC key per
version; here an AES key's material is never used for a second primitive), with
sha256, sha384 or sha512, through the plane.
"""

from __future__ import annotations

import hashlib
import hmac as std_hmac
import os
import struct
from typing import Any

from cryptography.exceptions import InvalidSignature as CryptoInvalidSignature

from ...exceptions import InvalidRequest, InvalidSignature
from ...plane import Plane
from ..errors import PolicyViolation
from ..keytypes import KeyType
from . import blobs
from .keyring import Ring, Version
from .signing import HASHES, SIGNING_TYPES, check_prehashed, scheme

MAX_REQUEST = blobs.MAX_REQUEST
AEAD_TYPES = (KeyType.AES256_GCM, KeyType.CHACHA20_POLY1305)
_U64 = struct.Struct(">Q")
_BUFFERS = (bytes, bytearray, memoryview)


def check_data(data: object, what: str = "data") -> None:
    if not isinstance(data, _BUFFERS):
        raise InvalidRequest(f"{what} must be bytes, not {type(data).__name__}")
    if len(data) > MAX_REQUEST:
        raise InvalidRequest(f"{what} is over the {MAX_REQUEST >> 20} MiB request limit")


def check_aad(aad: object) -> bytes:
    if aad is None:
        return b""
    check_data(aad, "aad")
    return aad  # type: ignore[return-value]


def encrypt(plane: Plane, ring: Ring, plaintext: Any, aad: Any = b"", context: Any = None,
            nonce: Any = None, version: Any = None,
            random12: bytes | None = None) -> tuple[bytes, int]:
    """``random12``: a random nonce drawn in bulk by a batch (else ``os.urandom``)."""
    ring.needs(*AEAD_TYPES, op="encrypt")
    check_data(plaintext, "plaintext")
    aad = check_aad(aad)
    ctx = ring.context(context)
    ver = ring.for_use(version)
    key = ver.aead
    if ctx is not None:
        d = ver.derived(ctx)
        key = d.key
        if ring.policy.convergent:
            if nonce is not None:
                raise PolicyViolation("convergent keys derive their nonce: none may be given")
            mac = std_hmac.new(d.nonce_key, _U64.pack(len(aad)), hashlib.sha256)
            mac.update(aad)
            mac.update(plaintext)
            nonce = mac.digest()[:12]
    if nonce is None:
        nonce = random12 if random12 else os.urandom(12)
    elif not isinstance(nonce, (bytes, bytearray)) or len(nonce) != 12:
        # a caller-chosen nonce is the caller's promise never to repeat it
        raise InvalidRequest("nonce must be 12 bytes")
    nonce = bytes(nonce)
    sealed = plane.encrypt(key, plaintext, nonce, aad)  # type: ignore[arg-type]
    return ver.ct_header + nonce + sealed, ver.number


def decrypt(plane: Plane, ring: Ring, ciphertext: Any, aad: Any = b"",
            context: Any = None) -> tuple[bytes, int]:
    ring.needs(*AEAD_TYPES, op="decrypt")
    check_data(ciphertext, "ciphertext")
    aad = check_aad(aad)
    ctx = ring.context(context)
    v, nonce, body = blobs.parse_ciphertext(ciphertext)
    ver = ring.for_check(v)
    key = ver.aead if ctx is None else ver.derived(ctx).key
    return plane.decrypt(key, body, nonce, aad), v  # type: ignore[arg-type]


def rewrap(plane: Plane, ring: Ring, ciphertext: Any, aad: Any = b"", context: Any = None,
           random12: bytes | None = None) -> tuple[bytes, int]:
    """Decrypt and encrypt again under the current version; the plaintext stays here."""
    pt, _ = decrypt(plane, ring, ciphertext, aad, context)
    return encrypt(plane, ring, pt, aad, context, None, None, random12)


def sign(plane: Plane, ring: Ring, data: Any, version: Any = None, hash: Any = None,
         prehashed: Any = False, padding: Any = "pss") -> tuple[bytes, int]:
    ring.needs(*SIGNING_TYPES, op="sign")
    check_data(data)
    s = scheme(ring.type, hash, prehashed, padding)
    check_prehashed(data, hash, ring.type, prehashed)
    ver = ring.for_use(version)
    if s.plane_algorithm is not None:
        sig = plane.sign(ver.sign_key(s.plane_algorithm), data)
    else:
        sig = ver.private().sign(data, *s.args)  # type: ignore[call-arg]
    return ver.sig_header + sig, ver.number


def verify(plane: Plane, ring: Ring, data: Any, signature: Any, hash: Any = None,
           prehashed: Any = False, padding: Any = "pss") -> tuple[bool, int]:
    ring.needs(*SIGNING_TYPES, op="verify")
    check_data(data)
    s = scheme(ring.type, hash, prehashed, padding)
    check_prehashed(data, hash, ring.type, prehashed)
    v, sig = blobs.parse_signature(signature)
    ver = ring.for_check(v)
    try:
        if s.plane_algorithm is not None:
            plane.verify(ver.sign_key(s.plane_algorithm), data, sig)
        else:
            ver.private().public_key().verify(sig, data, *s.args)  # type: ignore[call-arg]
    except (InvalidSignature, CryptoInvalidSignature):
        return False, v
    return True, v


def _mac(plane: Plane, ver: Version, algorithm: Any, data: Any) -> bytes:
    if not isinstance(algorithm, str) or algorithm not in HASHES:
        raise InvalidRequest(f"algorithm must be one of {', '.join(HASHES)}")
    return plane.mac(ver.hmac_key(algorithm), data)


def hmac(plane: Plane, ring: Ring, data: Any, version: Any = None,
         algorithm: Any = "sha256") -> tuple[bytes, int]:
    ring.needs(KeyType.HMAC, op="hmac")
    check_data(data)
    ver = ring.for_use(version)
    return ver.tag_header + _mac(plane, ver, algorithm, data), ver.number


def verify_hmac(plane: Plane, ring: Ring, data: Any, tag: Any,
                algorithm: Any = "sha256") -> tuple[bool, int]:
    ring.needs(KeyType.HMAC, op="verify_hmac")
    check_data(data)
    v, mac = blobs.parse_tag(tag)
    ver = ring.for_check(v)
    return std_hmac.compare_digest(_mac(plane, ver, algorithm, data), mac), v
