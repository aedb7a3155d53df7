"""``Transit``: Vault transit's operations over a plane and a ``KeySource``.

Every keyed operation takes the tenant first and finds the key through ``ring()``, so
another tenant's key is as missing as a nonexistent one (``KeyNotFound``, same message).
Every data operation tells the source (``record_use``) which key version did how many
bytes of what. Requests carry at most 32 MiB, as Vault's.

Encryption keys: AES-256-GCM and ChaCha20-Poly1305 with a random 96-bit nonce per call;
derived keys (``derived=True``) use HKDF-SHA256(version material, info=context) per
request (``keyring.derive``); convergent keys (derived + ``convergent=True``) take the
nonce from HMAC-SHA256(nonce key, u64be(len(aad)) || aad || plaintext)[:12], so equal
plaintext, context and aad give equal ciphertexts, and a different aad never reuses a
nonce with different input (GCM's nonce reuse would give up its authentication key).
Ciphertexts, signatures and HMAC tags are framed by ``blobs``.

HMAC: only ``hmac`` keys (Vault lets any key HMAC with a separate HMAC key per version;
here an AES key's material is never used for a second primitive). Algorithms sha256,
sha384, sha512, all through the plane.
"""

from __future__ import annotations

import hashlib
import hmac as _hmac
import os
import struct
from typing import Any

from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature

from ...exceptions import InvalidRequest, InvalidSignature
from ..errors import PolicyViolation
from ..keytypes import KeyType
from . import blobs
from .keyring import Ring, Version
from .manage import KeyAdmin
from .signing import HASHES, SIGNING_TYPES, check_prehashed, scheme

MAX_REQUEST = blobs.MAX_REQUEST
MAX_RANDOM = 1024 * 1024
DIGESTS = ("sha256", "sha384", "sha512", "sha3-256", "blake2b")
DATAKEY_BITS = (128, 256, 512)
AEAD_TYPES = (KeyType.AES256_GCM, KeyType.CHACHA20_POLY1305)
_U64 = struct.Struct(">Q")
_BUFFERS = (bytes, bytearray, memoryview)


def check_data(data: object, what: str = "data") -> None:
    if not isinstance(data, _BUFFERS):
        raise InvalidRequest(f"{what} must be bytes, not {type(data).__name__}")
    if len(data) > MAX_REQUEST:
        raise InvalidRequest(f"{what} is over the {MAX_REQUEST >> 20} MiB request limit")


def _aad(aad: object) -> bytes:
    if aad is None:
        return b""
    check_data(aad, "aad")
    return aad  # type: ignore[return-value]


class Transit(KeyAdmin):
    """Vault-style transit over ``plane`` and ``source``; see the module docstring."""

    # -- encrypt, decrypt, rewrap, datakey ---------------------------------------------

    def encrypt(self, tenant: str, name: str, plaintext: bytes, *, aad: bytes = b"",
                context: bytes | None = None, nonce: bytes | None = None,
                version: int | None = None) -> bytes:
        """A ciphertext blob (``blobs``: 0xC7, u32 version, nonce, ct || tag)."""
        ring = self.ring(tenant, name)
        ver = ring.fast
        # the hot path: a plain AEAD key, nothing per request but the data
        if ver is not None and context is None and nonce is None and version is None and (
                type(plaintext) is bytes and type(aad) is bytes
                and len(plaintext) <= MAX_REQUEST):
            n = os.urandom(12)
            out = ver.ct_header + n + self.plane.encrypt(ver.aead, plaintext, n, aad)  # type: ignore[arg-type]
            self.source.record_use(tenant, name, ver.number, "encrypt", len(plaintext))
            return out
        blob, v = self._encrypt(ring, plaintext, aad, context, nonce, version, None)
        self.source.record_use(tenant, name, v, "encrypt", len(plaintext))
        return blob

    def _encrypt(self, ring: Ring, plaintext: Any, aad: Any, context: Any, nonce: Any,
                 version: Any, random12: bytes | None) -> tuple[bytes, int]:
        """The general encrypt; ``random12``: a nonce the batch path drew in bulk."""
        ring.needs(*AEAD_TYPES, op="encrypt")
        check_data(plaintext, "plaintext")
        aad = _aad(aad)
        ctx = ring.context(context)
        ver = ring.for_use(version)
        key = ver.aead
        if ctx is not None:
            d = ver.derived(ctx)
            key = d.key
            if ring.policy.convergent:
                if nonce is not None:
                    raise PolicyViolation("convergent keys derive their nonce: "
                                          "none may be given")
                mac = _hmac.new(d.nonce_key, _U64.pack(len(aad)), hashlib.sha256)
                mac.update(aad)
                mac.update(plaintext)
                nonce = mac.digest()[:12]
        if nonce is None:
            nonce = random12 if random12 is not None else os.urandom(12)
        elif not isinstance(nonce, (bytes, bytearray)) or len(nonce) != 12:
            # a caller-chosen nonce is the caller's promise never to repeat it
            raise InvalidRequest("nonce must be 12 bytes")
        nonce = bytes(nonce)
        sealed = self.plane.encrypt(key, plaintext, nonce, aad)  # type: ignore[arg-type]
        return ver.ct_header + nonce + sealed, ver.number

    def decrypt(self, tenant: str, name: str, ciphertext: bytes, *, aad: bytes = b"",
                context: bytes | None = None) -> bytes:
        """The plaintext, or ``AuthenticationFailed`` (nothing unauthenticated comes
        out), ``KeyVersionRejected`` (below min_decryption_version, trimmed, unknown),
        ``InvalidRequest`` (not a transit ciphertext)."""
        ring = self.ring(tenant, name)
        pt, v = self._decrypt(ring, ciphertext, aad, context)
        self.source.record_use(tenant, name, v, "decrypt", len(pt))
        return pt

    def _decrypt(self, ring: Ring, ciphertext: Any, aad: Any,
                 context: Any) -> tuple[bytes, int]:
        ring.needs(*AEAD_TYPES, op="decrypt")
        check_data(ciphertext, "ciphertext")
        aad = _aad(aad)
        ctx = ring.context(context)
        v, nonce, body = blobs.parse_ciphertext(ciphertext)
        ver = ring.for_check(v)
        key = ver.aead if ctx is None else ver.derived(ctx).key
        return self.plane.decrypt(key, body, nonce, aad), v  # type: ignore[arg-type]

    def rewrap(self, tenant: str, name: str, ciphertext: bytes, *, aad: bytes = b"",
               context: bytes | None = None) -> bytes:
        """Decrypt and encrypt again under the latest version, inside the server."""
        ring = self.ring(tenant, name)
        blob, v = self._rewrap(ring, ciphertext, aad, context)
        self.source.record_use(tenant, name, v, "rewrap", len(blob) - blobs.CIPHERTEXT_OVERHEAD)
        return blob

    def _rewrap(self, ring: Ring, ciphertext: Any, aad: Any, context: Any,
                random12: bytes | None = None) -> tuple[bytes, int]:
        pt, _ = self._decrypt(ring, ciphertext, aad, context)
        return self._encrypt(ring, pt, aad, context, None, None, random12)

    def datakey(self, tenant: str, name: str, *, bits: int = 256, plaintext: bool = True,
                context: bytes | None = None) -> tuple[bytes | None, bytes]:
        """A fresh random key of ``bits`` and its ciphertext under this key (Vault's
        ``datakey/plaintext`` and ``datakey/wrapped``: ``plaintext=False`` returns
        ``None`` in its place)."""
        if bits not in DATAKEY_BITS:
            raise InvalidRequest(f"bits must be one of {DATAKEY_BITS}")
        ring = self.ring(tenant, name)
        key = os.urandom(bits // 8)
        blob, v = self._encrypt(ring, key, b"", context, None, None, None)
        self.source.record_use(tenant, name, v, "datakey", len(key))
        return (key if plaintext else None), blob

    # -- sign, verify ---------------------------------------------------------------------

    def sign(self, tenant: str, name: str, data: bytes, *, version: int | None = None,
             hash: str | None = None, prehashed: bool = False, padding: str = "pss") -> bytes:
        """A signature blob (0xC5, u32 version, signature); see ``signing`` for the
        schemes. ``hash`` defaults to sha256 (sha384 for P-384 keys)."""
        ring = self.ring(tenant, name)
        sig, v = self._sign(ring, data, version, hash, prehashed, padding)
        self.source.record_use(tenant, name, v, "sign", len(data))
        return sig

    def _sign(self, ring: Ring, data: Any, version: Any, hash: Any, prehashed: Any,
              padding: Any) -> tuple[bytes, int]:
        ring.needs(*SIGNING_TYPES, op="sign")
        check_data(data)
        s = scheme(ring.type, hash, prehashed, padding)
        check_prehashed(data, hash, ring.type, prehashed)
        ver = ring.for_use(version)
        if s.plane_algorithm is not None:
            sig = self.plane.sign(ver.sign_key(s.plane_algorithm), data)
        else:
            sig = ver.private().sign(data, *s.args)  # type: ignore[call-arg]
        return ver.sig_header + sig, ver.number

    def verify(self, tenant: str, name: str, data: bytes, signature: bytes, *,
               hash: str | None = None, prehashed: bool = False,
               padding: str = "pss") -> bool:
        """True or False; ``InvalidRequest`` for a blob that is not a transit
        signature, ``KeyVersionRejected`` for a version below min_decryption_version."""
        ring = self.ring(tenant, name)
        ok, v = self._verify(ring, data, signature, hash, prehashed, padding)
        self.source.record_use(tenant, name, v, "verify", len(data))
        return ok

    def _verify(self, ring: Ring, data: Any, signature: Any, hash: Any, prehashed: Any,
                padding: Any) -> tuple[bool, int]:
        ring.needs(*SIGNING_TYPES, op="verify")
        check_data(data)
        s = scheme(ring.type, hash, prehashed, padding)
        check_prehashed(data, hash, ring.type, prehashed)
        v, sig = blobs.parse_signature(signature)
        ver = ring.for_check(v)
        try:
            if s.plane_algorithm is not None:
                self.plane.verify(ver.sign_key(s.plane_algorithm), data, sig)
            else:
                ver.private().public_key().verify(sig, data, *s.args)  # type: ignore[call-arg]
        except (InvalidSignature, _CryptoInvalidSignature):
            return False, v
        return True, v

    # -- hmac -----------------------------------------------------------------------------

    def hmac(self, tenant: str, name: str, data: bytes, *, version: int | None = None,
             algorithm: str = "sha256") -> bytes:
        """An HMAC tag blob (0xC6, u32 version, tag) with an ``hmac`` key."""
        ring = self.ring(tenant, name)
        tag, v = self._hmac(ring, data, version, algorithm)
        self.source.record_use(tenant, name, v, "hmac", len(data))
        return tag

    def _hmac(self, ring: Ring, data: Any, version: Any, algorithm: Any) -> tuple[bytes, int]:
        ring.needs(KeyType.HMAC, op="hmac")
        check_data(data)
        ver = ring.for_use(version)
        return ver.tag_header + self._mac(ver, algorithm, data), ver.number

    def _mac(self, ver: Version, algorithm: Any, data: Any) -> bytes:
        if algorithm not in HASHES:
            raise InvalidRequest(f"algorithm must be one of {', '.join(HASHES)}")
        return self.plane.mac(ver.hmac_key(algorithm), data)

    def verify_hmac(self, tenant: str, name: str, data: bytes, tag: bytes, *,
                    algorithm: str = "sha256") -> bool:
        """Constant-time check of a tag blob: True or False."""
        ring = self.ring(tenant, name)
        ok, v = self._verify_hmac(ring, data, tag, algorithm)
        self.source.record_use(tenant, name, v, "verify_hmac", len(data))
        return ok

    def _verify_hmac(self, ring: Ring, data: Any, tag: Any,
                     algorithm: Any) -> tuple[bool, int]:
        ring.needs(KeyType.HMAC, op="verify_hmac")
        check_data(data)
        v, mac = blobs.parse_tag(tag)
        ver = ring.for_check(v)
        return _hmac.compare_digest(self._mac(ver, algorithm, data), mac), v

    # -- keyless --------------------------------------------------------------------------

    def digest(self, algorithm: str, data: bytes) -> bytes:
        if algorithm not in DIGESTS:
            raise InvalidRequest(f"algorithm must be one of {', '.join(DIGESTS)}")
        check_data(data)
        return self.plane.digest(algorithm, data)

    def random(self, n: int) -> bytes:
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_RANDOM:
            raise InvalidRequest(f"random needs 1..{MAX_RANDOM} bytes")
        return self.plane.random(n)  # type: ignore[no-any-return]

    # -- batches (batch.py) ---------------------------------------------------------------

    def batch(self, tenant: str, op: str, name: str,
              items: list[dict[str, Any]]) -> list[Any]:
        """Run ``op`` (encrypt, decrypt, rewrap, sign, verify, hmac, verify_hmac) over
        ``items`` (each a dict of that operation's keyword arguments, data included:
        ``{"plaintext": b"..", "aad": b".."}``). Returns one entry per item: its result,
        or the typed exception it raised, as Vault's ``batch_input`` (one bad item fails
        alone). A missing key fails the whole batch."""
        from .batch import run
        return run(self, tenant, op, name, items)

    def encrypt_batch(self, tenant: str, name: str, items: list[dict[str, Any]]) -> list[Any]:
        return self.batch(tenant, "encrypt", name, items)

    def decrypt_batch(self, tenant: str, name: str, items: list[dict[str, Any]]) -> list[Any]:
        return self.batch(tenant, "decrypt", name, items)

    def rewrap_batch(self, tenant: str, name: str, items: list[dict[str, Any]]) -> list[Any]:
        return self.batch(tenant, "rewrap", name, items)

    def sign_batch(self, tenant: str, name: str, items: list[dict[str, Any]]) -> list[Any]:
        return self.batch(tenant, "sign", name, items)

    def verify_batch(self, tenant: str, name: str, items: list[dict[str, Any]]) -> list[Any]:
        return self.batch(tenant, "verify", name, items)

    def hmac_batch(self, tenant: str, name: str, items: list[dict[str, Any]]) -> list[Any]:
        return self.batch(tenant, "hmac", name, items)

    def verify_hmac_batch(self, tenant: str, name: str,
                          items: list[dict[str, Any]]) -> list[Any]:
        return self.batch(tenant, "verify_hmac", name, items)
