"""Hashes, HMAC and HKDF, all from ``cryptography`` (OpenSSL)."""

from __future__ import annotations

import hmac as _stdlib_hmac
from typing import Any

from cryptography.exceptions import InvalidSignature as _InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..algorithms import Algorithm, Kind, lookup
from ..exceptions import AuthenticationFailed, InvalidRequest, NotSupported
from .base import Buffer, Kernel

HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
    "sha3-256": hashes.SHA3_256,
    "sha3-512": hashes.SHA3_512,
}

# Shortest MAC tag accepted when truncation is asked for: 80 bits, as SP 800-107 advises
# against anything shorter for general use.
MIN_TAG_BYTES = 10


def hash_algorithm(name: str) -> hashes.HashAlgorithm:
    if name == "blake2b":
        return hashes.BLAKE2b(64)
    try:
        return HASHES[name]()
    except KeyError:
        raise NotSupported(f"unknown hash {name!r}") from None


class HashKernel(Kernel):
    """Keyless: one per hash algorithm, shared by everyone."""

    __slots__ = ("_hash",)

    def __init__(self, algorithm: Algorithm) -> None:
        super().__init__(algorithm)
        self._hash = hash_algorithm(algorithm.name)

    def digest(self, data: Buffer) -> bytes:
        h = hashes.Hash(self._hash)
        try:
            h.update(data)
        except TypeError as e:
            raise InvalidRequest(f"{self.algorithm.name}: {e}") from None
        return h.finalize()


_HASH_KERNELS: dict[str, HashKernel] = {}


def hash_kernel(name: str) -> HashKernel:
    """The shared kernel for a hash name (``NotSupported``/``InvalidRequest`` otherwise)."""
    k = _HASH_KERNELS.get(name)
    if k is None:
        alg = lookup(name)
        if alg.kind is not Kind.HASH:
            raise InvalidRequest(f"{alg.name} is not a hash")
        k = _HASH_KERNELS[alg.name] = _HASH_KERNELS[name] = HashKernel(alg)
    return k


def _tag_size(alg: Algorithm, tag_size: int | None) -> int:
    if tag_size is None:
        return alg.digest_size
    if not MIN_TAG_BYTES <= tag_size <= alg.digest_size:
        raise InvalidRequest(
            f"{alg.name} tag size must be {MIN_TAG_BYTES}..{alg.digest_size} bytes, "
            f"got {tag_size}"
        )
    return tag_size


class MacKernel(Kernel):
    __slots__ = ("_hash", "_key")

    def __init__(self, algorithm: Algorithm, material: bytes) -> None:
        super().__init__(algorithm)
        self._key = material
        self._hash = hash_algorithm(algorithm.hash_name)

    def mac(self, data: Buffer, tag_size: int | None = None) -> bytes:
        size = _tag_size(self.algorithm, tag_size)
        h = crypto_hmac.HMAC(self._key, self._hash)
        h.update(data)
        tag = h.finalize()
        return tag if size == len(tag) else tag[:size]

    def verify_mac(self, data: Buffer, tag: bytes) -> None:
        if not isinstance(tag, (bytes, bytearray, memoryview)):
            raise InvalidRequest(f"{self.algorithm.name} tag must be bytes")
        h = crypto_hmac.HMAC(self._key, self._hash)
        h.update(data)
        if len(tag) == self.algorithm.digest_size:
            try:
                h.verify(bytes(tag))  # OpenSSL's constant-time comparison
                return
            except _InvalidSignature:
                pass
        else:
            _tag_size(self.algorithm, len(tag))  # refuses tags too short to mean anything
            # truncated tag: the stdlib's constant-time compare over the prefix
            if _stdlib_hmac.compare_digest(h.finalize()[: len(tag)], bytes(tag)):
                return
        raise AuthenticationFailed(f"{self.algorithm.name}: MAC does not match")


class HkdfKernel(Kernel):
    __slots__ = ("_hash", "_ikm")

    def __init__(self, algorithm: Algorithm, material: bytes) -> None:
        super().__init__(algorithm)
        self._ikm = material
        self._hash = hash_algorithm(algorithm.hash_name)

    def derive(self, peer: Any = None, length: int | None = None, salt: bytes | None = None,
               info: bytes | None = None) -> bytes:
        if peer is not None:
            raise InvalidRequest(f"{self.algorithm.name} derives from its key: no peer")
        limit = 255 * self.algorithm.digest_size
        if length is None or not 1 <= length <= limit:
            raise InvalidRequest(
                f"{self.algorithm.name} output length must be 1..{limit} bytes, got {length}"
            )
        return HKDF(self._hash, length, salt, info).derive(self._ikm)
