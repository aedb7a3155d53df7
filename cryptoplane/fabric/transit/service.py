"""``Transit``: Vault transit's operations over a plane and a ``KeySource``.

Every keyed operation takes the tenant first and finds the key through ``ring()``, so
another tenant's key is as missing as a nonexistent one (``KeyNotFound``, same message).
Every data operation tells the source (``record_use``) which key version did how many
bytes of what. Requests carry at most 32 MiB, as Vault's. The operations themselves are
in ``ops`` (schemes and choices documented there); ciphertexts, signatures and HMAC tags
are framed by ``blobs``.
"""

from __future__ import annotations

import os
from typing import Any

from ...exceptions import InvalidRequest
from . import batch, blobs, ops
from .manage import KeyAdmin

MAX_REQUEST = blobs.MAX_REQUEST
MAX_RANDOM = 1024 * 1024
DIGESTS = ("sha256", "sha384", "sha512", "sha3-256", "blake2b")
DATAKEY_BITS = (128, 256, 512)


class Transit(KeyAdmin):
    """Vault-style transit over ``plane`` and ``source``; see the module docstring."""

    # -- encrypt, decrypt, rewrap, datakey ---------------------------------------------

    def encrypt(self, tenant: str, name: str, plaintext: bytes, *, aad: bytes = b"",
                context: bytes | None = None, nonce: bytes | None = None,
                version: int | None = None, principal: str = "") -> bytes:
        """A ciphertext blob (``blobs``: 0xC7, u32 version, nonce, ct || tag)."""
        ring = self.ring(tenant, name)
        ver = ring.fast
        # the hot path: a plain AEAD key, nothing per request but the data
        if ver is not None and context is None and nonce is None and version is None and (
                type(plaintext) is bytes and type(aad) is bytes
                and len(plaintext) <= MAX_REQUEST):
            n = os.urandom(12)
            out = ver.ct_header + n + self.plane.encrypt(ver.aead, plaintext, n, aad)  # type: ignore[arg-type]
            self.source.record_use(tenant, name, ver.number, "encrypt", len(plaintext), principal)
            return out
        blob, v = ops.encrypt(self.plane, ring, plaintext, aad, context, nonce, version)
        self.source.record_use(tenant, name, v, "encrypt", len(plaintext), principal)
        return blob

    def decrypt(self, tenant: str, name: str, ciphertext: bytes, *, aad: bytes = b"",
                context: bytes | None = None, principal: str = "") -> bytes:
        """The plaintext, or ``AuthenticationFailed`` (nothing unauthenticated comes
        out), ``KeyVersionRejected`` (below min_decryption_version, trimmed, unknown),
        ``InvalidRequest`` (not a transit ciphertext)."""
        ring = self.ring(tenant, name)
        ct = ciphertext
        if ring.fast is not None and context is None and type(ct) is bytes and (
                type(aad) is bytes and blobs.CIPHERTEXT_OVERHEAD <= len(ct) <= MAX_REQUEST
                and ct[0] == blobs.CIPHERTEXT_MAGIC and ct[1:5] != bytes(4)):
            # the hot path, as encrypt's: the header read in place, slices for the rest
            v = int.from_bytes(ct[1:5], "big")
            pt = self.plane.decrypt(ring.for_check(v).aead, ct[17:], ct[5:17], aad)  # type: ignore[arg-type]
        else:
            pt, v = ops.decrypt(self.plane, ring, ciphertext, aad, context)
        self.source.record_use(tenant, name, v, "decrypt", len(pt), principal)
        return pt

    def rewrap(self, tenant: str, name: str, ciphertext: bytes, *, aad: bytes = b"",
               context: bytes | None = None, principal: str = "") -> bytes:
        """Decrypt and encrypt again under the latest version, inside the server."""
        blob, v = ops.rewrap(self.plane, self.ring(tenant, name), ciphertext, aad, context)
        self.source.record_use(tenant, name, v, "rewrap",
                               len(blob) - blobs.CIPHERTEXT_OVERHEAD, principal)
        return blob

    def datakey(self, tenant: str, name: str, *, bits: int = 256, plaintext: bool = True,
                context: bytes | None = None,
                principal: str = "") -> tuple[bytes | None, bytes]:
        """A fresh random key of ``bits`` and its ciphertext under this key (Vault's
        ``datakey/plaintext`` and ``datakey/wrapped``: ``plaintext=False`` returns
        ``None`` in its place)."""
        if bits not in DATAKEY_BITS:
            raise InvalidRequest(f"bits must be one of {DATAKEY_BITS}")
        ring = self.ring(tenant, name)
        key = os.urandom(bits // 8)
        blob, v = ops.encrypt(self.plane, ring, key, b"", context)
        self.source.record_use(tenant, name, v, "datakey", len(key), principal)
        return (key if plaintext else None), blob

    # -- sign, verify ---------------------------------------------------------------------

    def sign(self, tenant: str, name: str, data: bytes, *, version: int | None = None,
             hash: str | None = None, prehashed: bool = False, padding: str = "pss",
             principal: str = "") -> bytes:
        """A signature blob (0xC5, u32 version, signature); see ``signing`` for the
        schemes. ``hash`` defaults to sha256 (sha384 for P-384 keys)."""
        sig, v = ops.sign(self.plane, self.ring(tenant, name), data, version, hash,
                          prehashed, padding)
        self.source.record_use(tenant, name, v, "sign", len(data), principal)
        return sig

    def verify(self, tenant: str, name: str, data: bytes, signature: bytes, *,
               hash: str | None = None, prehashed: bool = False,
               padding: str = "pss", principal: str = "") -> bool:
        """True or False; ``InvalidRequest`` for a blob that is not a transit
        signature, ``KeyVersionRejected`` for a version below min_decryption_version."""
        ok, v = ops.verify(self.plane, self.ring(tenant, name), data, signature, hash,
                           prehashed, padding)
        self.source.record_use(tenant, name, v, "verify", len(data), principal)
        return ok

    # -- hmac -----------------------------------------------------------------------------

    def hmac(self, tenant: str, name: str, data: bytes, *, version: int | None = None,
             algorithm: str = "sha256", principal: str = "") -> bytes:
        """An HMAC tag blob (0xC6, u32 version, tag) with an ``hmac`` key."""
        tag, v = ops.hmac(self.plane, self.ring(tenant, name), data, version, algorithm)
        self.source.record_use(tenant, name, v, "hmac", len(data), principal)
        return tag

    def verify_hmac(self, tenant: str, name: str, data: bytes, tag: bytes, *,
                    algorithm: str = "sha256", principal: str = "") -> bool:
        """Constant-time check of a tag blob: True or False."""
        ok, v = ops.verify_hmac(self.plane, self.ring(tenant, name), data, tag, algorithm)
        self.source.record_use(tenant, name, v, "verify_hmac", len(data), principal)
        return ok

    # -- keyless --------------------------------------------------------------------------

    def digest(self, algorithm: str, data: bytes) -> bytes:
        if algorithm not in DIGESTS:
            raise InvalidRequest(f"algorithm must be one of {', '.join(DIGESTS)}")
        ops.check_data(data)
        return self.plane.digest(algorithm, data)

    def random(self, n: int) -> bytes:
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_RANDOM:
            raise InvalidRequest(f"random needs 1..{MAX_RANDOM} bytes")
        return self.plane.random(n)  # type: ignore[no-any-return]

    # -- batches (batch.py) ---------------------------------------------------------------

    def batch(self, tenant: str, op: str, name: str, items: list[dict[str, Any]], *,
              principal: str = "") -> list[Any]:
        """Run ``op`` (encrypt, decrypt, rewrap, sign, verify, hmac, verify_hmac) over
        ``items`` (each a dict of that operation's keyword arguments, data included:
        ``{"plaintext": b"..", "aad": b".."}``). Returns one entry per item: its result,
        or the typed exception it raised, as Vault's ``batch_input`` (one bad item fails
        alone). A missing key fails the whole batch. ``principal``: who asked, for the
        audit (every data operation takes it)."""
        batch.check(op, items)
        return batch.run(self.plane, self.source, self.ring(tenant, name), op, items,
                         principal)

    def encrypt_batch(self, tenant: str, name: str, items: list[dict[str, Any]], *,
                      principal: str = "") -> list[Any]:
        return self.batch(tenant, "encrypt", name, items, principal=principal)

    def decrypt_batch(self, tenant: str, name: str, items: list[dict[str, Any]], *,
                      principal: str = "") -> list[Any]:
        return self.batch(tenant, "decrypt", name, items, principal=principal)

    def rewrap_batch(self, tenant: str, name: str, items: list[dict[str, Any]], *,
                     principal: str = "") -> list[Any]:
        return self.batch(tenant, "rewrap", name, items, principal=principal)

    def sign_batch(self, tenant: str, name: str, items: list[dict[str, Any]], *,
                   principal: str = "") -> list[Any]:
        return self.batch(tenant, "sign", name, items, principal=principal)

    def verify_batch(self, tenant: str, name: str, items: list[dict[str, Any]], *,
                     principal: str = "") -> list[Any]:
        return self.batch(tenant, "verify", name, items, principal=principal)

    def hmac_batch(self, tenant: str, name: str, items: list[dict[str, Any]], *,
                   principal: str = "") -> list[Any]:
        return self.batch(tenant, "hmac", name, items, principal=principal)

    def verify_hmac_batch(self, tenant: str, name: str, items: list[dict[str, Any]], *,
                          principal: str = "") -> list[Any]:
        return self.batch(tenant, "verify_hmac", name, items, principal=principal)
