"""Transit's key management: create, import (BYOK), read, rotate, config, trim, delete,
export, public keys, and the ring cache every operation goes through.

``KeyAdmin`` is the half of ``Transit`` that changes keys; ``service.Transit`` adds the
data operations. Changes go to the ``KeySource`` (which enforces the rules atomically);
the same rules are checked here first (``source.check_*``) so a lax source cannot make
transit hand out what Vault would refuse.
"""

from __future__ import annotations

import threading
from contextlib import suppress
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ...exceptions import InvalidRequest
from ...plane import Plane
from ..errors import KeyNotFound, PolicyViolation
from ..keytypes import KeyPolicy, KeyType, check_name
from . import material as mat
from .keyring import Ring
from .source import KeySource, check_create, check_policy_change, check_trim


class KeyAdmin:
    """``plane``: runs the hot operations. ``source``: the keystore. ``wrapping_key``:
    the server's RSA-4096 BYOK private key as PKCS#8 DER (servers that share a keystore
    should share it); made on first use when not given."""

    def __init__(self, plane: Plane, source: KeySource, *,
                 wrapping_key: bytes | None = None) -> None:
        self.plane = plane
        self.source = source
        self._rings: dict[tuple[str, str], Ring] = {}
        self._wrapping: rsa.RSAPrivateKey | None = None
        self._wrapping_lock = threading.Lock()
        # loaded on first BYOK use: checking an RSA-4096 key costs half a second
        self._wrapping_der = wrapping_key

    # -- the cache ----------------------------------------------------------------------

    def ring(self, tenant: str, name: str) -> Ring:
        """The usable key; ``KeyNotFound`` (the source's) for a missing key and for
        another tenant's, alike. Rebuilt when the source hands out a new record."""
        try:
            rec = self.source.get_key(tenant, name)
        except KeyNotFound:
            # deleted, maybe by another server: drop what was cached of it
            with suppress(TypeError):  # an unhashable name was never cached
                self._rings.pop((tenant, name), None)
            raise
        ring = self._rings.get((tenant, name))
        if ring is None or ring.record is not rec:
            ring = self._rings[tenant, name] = Ring(rec, ring)
        return ring

    def forget(self, tenant: str, name: str | None = None) -> None:
        """Drop cached keys of one key (or every key of a tenant): the server calls it
        when another server changed the key, or when a tenant goes away."""
        if name is not None:
            self._rings.pop((tenant, name), None)
            return
        for k in [k for k in list(self._rings) if k[0] == tenant]:
            self._rings.pop(k, None)

    # -- create and import ----------------------------------------------------------------

    def create_key(self, tenant: str, name: str, type: KeyType | str, *,
                   exportable: bool = False, deletion_allowed: bool = False,
                   derived: bool = False, convergent: bool = False,
                   auto_rotate_period: float = 0.0) -> dict[str, Any]:
        """A new key, version 1, with material generated here (``KeyExists`` if taken)."""
        policy = self._policy(type, exportable=exportable, deletion_allowed=deletion_allowed,
                              derived=derived, convergent=convergent,
                              auto_rotate_period=auto_rotate_period)
        check_create(tenant, name, policy)  # before an RSA key is spent on a bad name
        self.source.create_key(tenant, name, policy, mat.generate(policy.type))
        self.forget(tenant, name)
        return self.read_key(tenant, name)

    def wrapping_key(self, tenant: str) -> bytes:
        """The PEM public key to wrap BYOK imports with (RSA-4096, OAEP-SHA256). One per
        server, shared by tenants: it only protects material on its way in."""
        check_name(tenant, "tenant")
        return mat.public_pem(self._wrapping_private())

    def _wrapping_private(self) -> rsa.RSAPrivateKey:
        with self._wrapping_lock:  # one RSA-4096 generation, not one per racing caller
            if self._wrapping is None and self._wrapping_der is not None:
                obj = serialization.load_der_private_key(self._wrapping_der, password=None)
                if not isinstance(obj, rsa.RSAPrivateKey) or (
                        obj.key_size != mat.WRAPPING_BITS):
                    raise InvalidRequest("the wrapping key must be an RSA-4096 private key")
                self._wrapping = obj
            if self._wrapping is None:
                self._wrapping = mat.new_wrapping_key()
            return self._wrapping

    def import_key(self, tenant: str, name: str, type: KeyType | str, wrapped: bytes,
                   **policy: Any) -> dict[str, Any]:
        """BYOK: ``wrapped`` is ``RSA-OAEP(ephemeral) || AES-KWP(ephemeral, material)``
        (``material.wrap_for_import``); the material in the stored format. ``policy``:
        exportable, deletion_allowed, derived, convergent, auto_rotate_period."""
        allowed = {"exportable", "deletion_allowed", "derived", "convergent",
                   "auto_rotate_period"}
        if set(policy) - allowed:
            raise InvalidRequest(f"unknown import options: {sorted(set(policy) - allowed)}")
        pol = self._policy(type, **policy)
        check_create(tenant, name, pol)
        material = mat.check_material(pol.type,
                                      mat.unwrap_import(self._wrapping_private(), wrapped))
        self.source.create_key(tenant, name, pol, material)
        self.forget(tenant, name)
        return self.read_key(tenant, name)

    def import_version(self, tenant: str, name: str, wrapped: bytes) -> dict[str, Any]:
        """BYOK for a new latest version of an existing key (Vault's
        ``import_version``): ``wrapped`` as for ``import_key``, material of the key's
        type."""
        ring = self.ring(tenant, name)
        material = mat.check_material(ring.type,
                                      mat.unwrap_import(self._wrapping_private(), wrapped))
        self.source.rotate_key(tenant, name, material)
        return self.read_key(tenant, name)

    @staticmethod
    def _policy(type: KeyType | str, **flags: Any) -> KeyPolicy:
        for flag in ("exportable", "deletion_allowed", "derived", "convergent"):
            if not isinstance(flags.get(flag, False), bool):
                raise InvalidRequest(f"{flag} must be true or false")
        return KeyPolicy(type=mat.key_type(type), **flags)

    # -- read ---------------------------------------------------------------------------

    def list_keys(self, tenant: str) -> list[str]:
        return self.source.list_keys(tenant)

    def read_key(self, tenant: str, name: str) -> dict[str, Any]:
        """Policy, versions and, for key pairs, each version's public key (PEM text);
        never private material."""
        ring = self.ring(tenant, name)
        out = ring.record.describe()
        if not ring.type.symmetric:
            out["public_keys"] = {v: self.public_key(tenant, name, v).decode()
                                  for v in sorted(ring.record.versions)}
        return out

    def public_key(self, tenant: str, name: str, version: int | str | None = None) -> bytes:
        """The PEM public key of a version (default: the latest)."""
        ring = self.ring(tenant, name)
        if ring.type.symmetric:
            raise InvalidRequest(f"key {name!r} ({ring.type.value}) has no public key")
        v = ring.record.latest_version if version in (None, "latest") else version
        return mat.public_pem(ring.for_any(v).private())  # type: ignore[arg-type]

    def export(self, tenant: str, name: str, version: int | str | None = None, *,
               principal: str = "") -> dict[str, Any]:
        """The material of every held version (``version=None``), one, or "latest", in
        the stored format; ``PolicyViolation`` unless the key was made exportable."""
        ring = self.ring(tenant, name)
        if not ring.policy.exportable:
            raise PolicyViolation(f"key {name!r} is not exportable")
        if version is None:
            numbers = sorted(ring.record.versions)
        elif version == "latest":
            numbers = [ring.record.latest_version]
        else:
            numbers = [ring.for_any(version).number]  # type: ignore[arg-type]
        keys = {v: ring.for_any(v).material for v in numbers}
        for v in numbers:
            self.source.record_use(tenant, name, v, "export", 0, principal)
        return {"name": name, "type": ring.type.value, "keys": keys}

    # -- change ---------------------------------------------------------------------------

    def rotate(self, tenant: str, name: str) -> dict[str, Any]:
        """A new latest version; older ones keep decrypting and verifying."""
        ring = self.ring(tenant, name)
        self.source.rotate_key(tenant, name, mat.generate(ring.type))
        return self.read_key(tenant, name)

    def config(self, tenant: str, name: str, **changes: Any) -> dict[str, Any]:
        """Change min_decryption_version, min_encryption_version, deletion_allowed,
        exportable (off to on only) or auto_rotate_period."""
        ring = self.ring(tenant, name)
        check_policy_change(ring.record, changes)
        self.source.update_policy(tenant, name, **changes)
        return self.read_key(tenant, name)

    def trim(self, tenant: str, name: str, min_version: int) -> dict[str, Any]:
        """Delete versions below ``min_version`` for good (at most the
        min_decryption_version); their ciphertexts become undecryptable."""
        ring = self.ring(tenant, name)
        check_trim(ring.record, min_version)
        self.source.trim_key(tenant, name, min_version)
        return self.read_key(tenant, name)

    def delete(self, tenant: str, name: str) -> None:
        """``PolicyViolation`` unless the key is marked deletion_allowed."""
        self.source.delete_key(tenant, name)
        self.forget(tenant, name)

    def rotate_due(self, tenant: str, now: float) -> list[str]:
        """Rotate each of the tenant's keys whose ``auto_rotate_period`` has passed since
        its last change (``updated_at``); the server calls this periodically. Returns the
        names rotated."""
        done = []
        for name in self.list_keys(tenant):
            rec = self.ring(tenant, name).record
            period = rec.policy.auto_rotate_period
            if period > 0 and now - rec.updated_at >= period:
                self.rotate(tenant, name)
                done.append(name)
        return done
