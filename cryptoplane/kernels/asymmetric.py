"""Signatures (RSA-PSS, RSA PKCS#1 v1.5, ECDSA, Ed25519), RSA-OAEP and X25519."""

from __future__ import annotations

from typing import Any

from cryptography.exceptions import InvalidSignature as _InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, x25519

from ..algorithms import Algorithm
from ..exceptions import AuthenticationFailed, InvalidRequest, InvalidSignature, KeyRejected
from .base import Buffer, Kernel
from .digests import hash_algorithm

_PUBLIC = (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey,
           x25519.X25519PublicKey)


def _split(obj: Any) -> tuple[Any, Any]:
    """(private object or None, public object) of a ``cryptography`` key object."""
    if isinstance(obj, _PUBLIC):
        return None, obj
    return obj, obj.public_key()


class SignatureKernel(Kernel):
    """Sign with the private half, verify with either; the padding/hash is fixed by the
    algorithm name, so a caller cannot mix PSS and PKCS#1 v1.5 by accident."""

    __slots__ = ("_args", "_priv", "_pub")

    def __init__(self, algorithm: Algorithm, obj: Any) -> None:
        super().__init__(algorithm)
        self._priv, self._pub = _split(obj)
        alg = algorithm
        h = hash_algorithm(alg.hash_name) if alg.hash_name else None
        args: tuple[Any, ...]
        if alg.name.startswith("rsa-pss"):
            assert h is not None
            # salt = digest length: what TLS 1.3, JOSE and Wycheproof's *_32 files use
            args = (padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size), h)
        elif alg.name.startswith("rsa-pkcs1v15"):
            args = (padding.PKCS1v15(), h)
        elif alg.name.startswith("ecdsa"):
            args = (ec.ECDSA(h),)  # type: ignore[arg-type]
        else:
            args = ()  # ed25519: the hash is part of the scheme
        self._args = args

    def sign(self, data: Buffer) -> bytes:
        if self._priv is None:
            raise KeyRejected(f"{self.algorithm.name}: signing needs the private key")
        try:
            sig: bytes = self._priv.sign(data, *self._args)
        except TypeError as e:
            raise InvalidRequest(f"{self.algorithm.name}: {e}") from None
        return sig

    def verify(self, data: Buffer, signature: bytes) -> None:
        try:
            self._pub.verify(signature, data, *self._args)
        except _InvalidSignature:
            raise InvalidSignature(f"{self.algorithm.name}: signature does not verify") from None
        except TypeError as e:
            raise InvalidRequest(f"{self.algorithm.name}: {e}") from None


class OaepKernel(Kernel):
    """RSA-OAEP with SHA-256 and MGF1-SHA-256; ``aad`` carries the OAEP label."""

    __slots__ = ("_hash", "_priv", "_pub")

    def __init__(self, algorithm: Algorithm, obj: Any) -> None:
        super().__init__(algorithm)
        self._priv, self._pub = _split(obj)
        self._hash = hash_algorithm(algorithm.hash_name)

    def _padding(self, label: bytes | None) -> padding.OAEP:
        return padding.OAEP(mgf=padding.MGF1(self._hash), algorithm=self._hash,
                            label=label or None)

    def encrypt(self, data: Buffer, nonce: bytes | None, aad: bytes | None,
                padding: bool = False) -> bytes:
        if nonce is not None:
            raise InvalidRequest("RSA-OAEP takes no nonce (its randomness is internal)")
        pub: rsa.RSAPublicKey = self._pub
        limit = pub.key_size // 8 - 2 * self._hash.digest_size - 2
        if len(data) > limit:
            raise InvalidRequest(
                f"{self.algorithm.name}: at most {limit} bytes fit this key, got {len(data)}"
            )
        return pub.encrypt(bytes(data), self._padding(aad))

    def decrypt(self, data: Buffer, nonce: bytes | None, aad: bytes | None,
                padding: bool = False) -> bytes:
        if self._priv is None:
            raise KeyRejected(f"{self.algorithm.name}: decryption needs the private key")
        try:
            plain: bytes = self._priv.decrypt(bytes(data), self._padding(aad))
        except ValueError:
            # one message for every failure: OAEP decoding errors must not be told apart
            raise AuthenticationFailed(f"{self.algorithm.name}: decryption failed") from None
        return plain


class X25519Kernel(Kernel):
    __slots__ = ("_priv",)

    def __init__(self, algorithm: Algorithm, obj: Any) -> None:
        super().__init__(algorithm)
        self._priv, _ = _split(obj)

    def derive(self, peer: Any = None, length: int | None = None, salt: bytes | None = None,
               info: bytes | None = None) -> bytes:
        if self._priv is None:
            raise KeyRejected("x25519: key agreement needs the private key")
        if length is not None or salt is not None or info is not None:
            raise InvalidRequest("x25519 returns the raw shared secret: feed it to hkdf")
        # a Key peer arrives as its cryptography object (requests.Derive unwraps it)
        if isinstance(peer, (bytes, bytearray, memoryview)):
            if len(peer) != 32:
                raise KeyRejected(f"x25519 public keys are 32 bytes, got {len(peer)}")
            peer = x25519.X25519PublicKey.from_public_bytes(bytes(peer))
        if not isinstance(peer, x25519.X25519PublicKey):
            raise KeyRejected("x25519 needs the peer's x25519 public key")
        try:
            secret: bytes = self._priv.exchange(peer)
        except ValueError:
            # an all-zero secret: the peer sent a low-order point (RFC 7748, section 6.1)
            raise KeyRejected("x25519: peer public key is of low order") from None
        return secret


def prepare(algorithm: Algorithm, obj: Any) -> Kernel:
    name = algorithm.name
    if name == "x25519":
        return X25519Kernel(algorithm, obj)
    if name.startswith("rsa-oaep"):
        return OaepKernel(algorithm, obj)
    return SignatureKernel(algorithm, obj)


__all__ = ["OaepKernel", "SignatureKernel", "X25519Kernel", "prepare"]
