"""Transit's cache of usable keys: per (tenant, name) a ``Ring`` built from one
``KeyRecord``, holding per version the plane ``Key`` objects and precomputed headers.

Why a cache: building a ``Key`` costs microseconds (and an RSA private key load,
milliseconds), while a 64-byte AES-GCM encrypt costs half a microsecond. So the hot path
is: ``source.get_key`` (one dict hit in the memory source), one more dict hit here, an
identity check of the record (a rotation or config change makes a new record, and with
it a new ring), then the cached ``Key``. A rebuilt ring keeps the ``Version`` objects of
the old one whose material did not change, so a config change does not reload RSA keys.
"""

from __future__ import annotations

import hmac
from collections import OrderedDict
from contextlib import suppress
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ...exceptions import InvalidRequest
from ...keys import Key
from ..errors import KeyVersionRejected, PolicyViolation
from ..keytypes import KeyPolicy, KeyRecord, KeyType
from . import blobs
from .material import PrivateKey, load_private

AEAD_ALGORITHM = {KeyType.AES256_GCM: "aes-256-gcm",
                  KeyType.CHACHA20_POLY1305: "chacha20-poly1305"}
DERIVED_CACHE = 256  # derived keys kept per version (contexts are per user or per row)
MAX_CONTEXT = 4096


def derive(material: bytes, context: bytes) -> tuple[bytes, bytes]:
    """(encryption key, convergent-nonce key) of a derived key for ``context``:
    HKDF-SHA256(ikm=version material, salt=none, info=context, L=64) split in two
    halves. The first half equals HKDF with L=32 (HKDF-Expand's first block), so a
    client holding the exported material derives the encryption key the usual way."""
    okm = HKDF(hashes.SHA256(), 64, None, context).derive(material)
    return okm[:32], okm[32:]


class Derived:
    __slots__ = ("key", "nonce_key")

    def __init__(self, key: Key, nonce_key: bytes) -> None:
        self.key = key
        self.nonce_key = nonce_key


class Version:
    """One key version: material, its 5-byte blob headers, and lazily the objects
    that use it (each made once, on first use)."""

    __slots__ = ("_derived", "_private", "_sign_keys", "aead", "ct_header", "hmac_keys",
                 "material", "number", "sig_header", "tag_header", "type")

    def __init__(self, kt: KeyType, number: int, material: bytes) -> None:
        self.type = kt
        self.number = number
        self.material = material
        self.ct_header = blobs.header(blobs.CIPHERTEXT_MAGIC, number)
        self.sig_header = blobs.header(blobs.SIGNATURE_MAGIC, number)
        self.tag_header = blobs.header(blobs.TAG_MAGIC, number)
        alg = AEAD_ALGORITHM.get(kt)
        self.aead: Key | None = Key(alg, material) if alg is not None else None
        self.hmac_keys: dict[str, Key] = {}
        self._sign_keys: dict[str, Key] = {}
        self._private: PrivateKey | None = None
        self._derived: OrderedDict[bytes, Derived] = OrderedDict()

    def private(self) -> PrivateKey:
        obj = self._private
        if obj is None:
            obj = self._private = load_private(self.type, self.material)
        return obj

    def sign_key(self, algorithm: str) -> Key:
        """The plane ``Key`` for a catalogue signature algorithm over this version."""
        k = self._sign_keys.get(algorithm)
        if k is None:
            k = self._sign_keys[algorithm] = Key.from_cryptography(algorithm, self.private())
        return k

    def hmac_key(self, algorithm: str) -> Key:
        k = self.hmac_keys.get(algorithm)
        if k is None:
            k = self.hmac_keys[algorithm] = Key(f"hmac-{algorithm}", self.material)
        return k

    def derived(self, context: bytes) -> Derived:
        """The derived key for ``context``, from a small LRU."""
        cache = self._derived
        d = cache.get(context)
        # threads may share a ring: another may evict between two steps here, which
        # costs a re-derivation at worst, never an error (hence the suppress)
        if d is not None:
            with suppress(KeyError):
                cache.move_to_end(context)
            return d
        enc, nonce_key = derive(self.material, context)
        alg = AEAD_ALGORITHM[self.type]
        d = cache[context] = Derived(Key(alg, enc), nonce_key)
        while len(cache) > DERIVED_CACHE:
            with suppress(KeyError):
                cache.popitem(last=False)
        return d


class Ring:
    """A usable view of one ``KeyRecord``: version checks per operation kind."""

    __slots__ = ("fast", "name", "policy", "record", "tenant", "type", "versions")

    def __init__(self, record: KeyRecord, old: Ring | None = None) -> None:
        self.record = record
        self.tenant = record.tenant
        self.name = record.name
        self.policy: KeyPolicy = record.policy
        self.type = record.policy.type
        self.versions: dict[int, Version] = {}
        if old is not None:  # keep what did not change: loaded keys, plane sessions
            for v, ver in old.versions.items():
                m = record.versions.get(v)
                if m is not None and ver.type is self.type and (
                        m is ver.material or hmac.compare_digest(m, ver.material)):
                    self.versions[v] = ver
        # the version a plain encrypt uses, when nothing per request (derivation, an
        # explicit version or nonce) changes it: the hot path reads this one slot
        self.fast: Version | None = None
        if self.type.aead and not self.policy.derived:
            self.fast = self._get(record.latest_version)

    def _get(self, v: int) -> Version:
        ver = self.versions.get(v)
        if ver is None:
            material = self.record.versions.get(v)
            if material is None:
                raise KeyVersionRejected(f"key {self.name!r} version {v} was trimmed")
            ver = self.versions[v] = Version(self.type, v, material)
        return ver

    def _check_number(self, v: Any) -> int:
        if not isinstance(v, int) or isinstance(v, bool):
            raise InvalidRequest("a key version must be an integer")
        if not 1 <= v <= self.record.latest_version:
            raise KeyVersionRejected(
                f"key {self.name!r} has no version {v} (latest: {self.record.latest_version})")
        return v

    def for_use(self, v: int | str | None) -> Version:
        """The version that encrypts, signs or MACs: the latest unless ``v`` names one
        (an int, or "latest"); at least ``min_encryption_version`` (Vault's meaning:
        a floor, not a pin)."""
        if v is None or v == "latest" or (type(v) is int and v == 0):
            return self._get(self.record.latest_version)
        n = self._check_number(v)
        floor = self.policy.min_encryption_version
        if n < floor:
            raise KeyVersionRejected(
                f"key {self.name!r} version {n} is below min_encryption_version {floor}")
        return self._get(n)

    def for_check(self, v: int) -> Version:
        """The version that decrypts or verifies: ``min_decryption_version`` and up."""
        n = self._check_number(v)
        floor = self.policy.min_decryption_version
        if n < floor or n < self.record.min_available_version:
            raise KeyVersionRejected(
                f"key {self.name!r} version {n} is below min_decryption_version {floor}")
        return self._get(n)

    def for_any(self, v: int) -> Version:
        """Any version still held (export, public keys)."""
        return self._get(self._check_number(v))

    def needs(self, *types: KeyType, op: str) -> None:
        if self.type not in types:
            raise InvalidRequest(f"key {self.name!r} ({self.type.value}) does not support {op}")

    def context(self, context: object) -> bytes | None:
        """The checked derivation context: required for derived keys, refused for the
        others (a caller who thinks a context binds the ciphertext should hear it does
        not)."""
        if self.policy.derived:
            if not isinstance(context, (bytes, bytearray, memoryview)) or not context:
                raise PolicyViolation(f"key {self.name!r} is derived: a context is required")
            if len(context) > MAX_CONTEXT:
                raise InvalidRequest(f"context must be at most {MAX_CONTEXT} bytes")
            return bytes(context)
        if context is not None:
            raise InvalidRequest(f"key {self.name!r} is not derived: context does not apply")
        return None
