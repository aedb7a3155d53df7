"""Symmetric kernels: AEAD (AES-GCM, ChaCha20-Poly1305), AES-CTR, AES-CBC, AES-XTS.

The AEAD objects of ``cryptography`` keep their key schedule, so one per key is the whole
preparation and a call is one method. Errors are translated only on the failure path:
the success path is the library call and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from .. import _native
from ..algorithms import Algorithm
from ..exceptions import AuthenticationFailed, InvalidRequest
from .base import Buffer, Kernel


def _nonce_error(kernel: Kernel, nonce: object, what: str = "nonce") -> InvalidRequest:
    alg = kernel.algorithm
    rule = alg.nonce_sizes.describe() if alg.nonce_sizes else "?"
    if nonce is None:
        return InvalidRequest(f"{alg.name} needs a {what} of {rule} bytes")
    if not isinstance(nonce, (bytes, bytearray, memoryview)):
        return InvalidRequest(f"{alg.name} {what} must be bytes, not {type(nonce).__name__}")
    return InvalidRequest(f"{alg.name} needs a {what} of {rule} bytes, got {len(nonce)}")


class AeadKernel(Kernel):
    """ciphertext || tag out of encrypt; decrypt checks the tag before returning anything."""

    __slots__ = ("_dec", "_enc", "raw")

    def __init__(self, algorithm: Algorithm, material: bytes) -> None:
        super().__init__(algorithm)
        cls = ChaCha20Poly1305 if algorithm.name == "chacha20-poly1305" else AESGCM
        aead = cls(material)
        self._enc = aead.encrypt
        self._dec = aead.decrypt
        # (encrypt, decrypt) taking (nonce, data, aad): the plane's fast path calls these
        # directly and asks this kernel to explain an exception only when one happens
        self.raw = (aead.encrypt, aead.decrypt)

    def encrypt(self, data: Buffer, nonce: bytes | None, aad: bytes | None,
                padding: bool = False) -> bytes:
        if padding:
            raise InvalidRequest(f"{self.algorithm.name} is an AEAD: padding does not apply")
        try:
            return self._enc(nonce, data, aad)  # type: ignore[arg-type]
        except (ValueError, TypeError, OverflowError) as e:
            raise self._misuse(data, nonce, aad, padding, e) from None

    def decrypt(self, data: Buffer, nonce: bytes | None, aad: bytes | None,
                padding: bool = False) -> bytes:
        if padding:
            raise InvalidRequest(f"{self.algorithm.name} is an AEAD: padding does not apply")
        try:
            return self._dec(nonce, data, aad)  # type: ignore[arg-type]
        except InvalidTag:
            raise AuthenticationFailed(
                f"{self.algorithm.name}: authentication failed (wrong key, nonce, AAD, "
                "or tampered ciphertext)"
            ) from None
        except (ValueError, TypeError, OverflowError) as e:
            raise self._misuse(data, nonce, aad, padding, e) from None

    def _misuse(self, data: object, nonce: object, aad: object, padding: bool,
                err: Exception) -> InvalidRequest:
        del data, aad, padding  # the nonce is the usual culprit; the library says the rest
        alg = self.algorithm
        if nonce is None or not isinstance(nonce, (bytes, bytearray, memoryview)) or (
            alg.nonce_sizes is not None and len(nonce) not in alg.nonce_sizes
        ):
            return _nonce_error(self, nonce)
        return InvalidRequest(f"{alg.name}: {err}")


def _check_nonce(kernel: Kernel, nonce: object, what: str) -> bytes:
    sizes = kernel.algorithm.nonce_sizes
    if not isinstance(nonce, (bytes, bytearray, memoryview)) or (
        sizes is not None and len(nonce) not in sizes
    ):
        raise _nonce_error(kernel, nonce, what)
    return bytes(nonce)


class _BlockCipherKernel(Kernel):
    __slots__ = ("_aes",)
    _iv_name = "IV"

    def __init__(self, algorithm: Algorithm, material: bytes) -> None:
        super().__init__(algorithm)
        self._aes = algorithms.AES(material)

    def _mode(self, nonce: bytes) -> Any:
        raise NotImplementedError

    def _run(self, data: Buffer, nonce: bytes | None, aad: bytes | None,
             encrypt: bool) -> bytes:
        if aad:
            raise InvalidRequest(f"{self.algorithm.name} is not an AEAD: it takes no AAD")
        mode = self._mode(_check_nonce(self, nonce, self._iv_name))
        cipher = Cipher(self._aes, mode)
        ctx = cipher.encryptor() if encrypt else cipher.decryptor()
        try:
            return ctx.update(data) + ctx.finalize()
        except ValueError as e:
            raise InvalidRequest(f"{self.algorithm.name}: {e}") from None


class CtrKernel(_BlockCipherKernel):
    __slots__ = ()
    _iv_name = "initial counter block"

    def _mode(self, nonce: bytes) -> Any:
        return modes.CTR(nonce)

    def encrypt(self, data: Buffer, nonce: bytes | None, aad: bytes | None,
                padding: bool = False) -> bytes:
        if padding:
            raise InvalidRequest("AES-CTR is a stream mode: padding does not apply")
        return self._run(data, nonce, aad, True)

    def decrypt(self, data: Buffer, nonce: bytes | None, aad: bytes | None,
                padding: bool = False) -> bytes:
        if padding:
            raise InvalidRequest("AES-CTR is a stream mode: padding does not apply")
        return self._run(data, nonce, aad, False)


class CbcKernel(_BlockCipherKernel):
    """AES-CBC; PKCS#7 padding only when asked (``padding=True``), never guessed."""

    __slots__ = ()

    def _mode(self, nonce: bytes) -> Any:
        return modes.CBC(nonce)

    def encrypt(self, data: Buffer, nonce: bytes | None, aad: bytes | None,
                padding: bool = False) -> bytes:
        if padding:
            padder = sym_padding.PKCS7(128).padder()
            data = bytes(padder.update(data)) + padder.finalize()
        elif len(data) % 16:
            raise InvalidRequest(
                f"{self.algorithm.name} without padding needs a multiple of 16 bytes, "
                f"got {len(data)}; pass padding=True for PKCS#7"
            )
        return self._run(data, nonce, aad, True)

    def decrypt(self, data: Buffer, nonce: bytes | None, aad: bytes | None,
                padding: bool = False) -> bytes:
        if len(data) % 16 or (padding and not data):
            raise InvalidRequest(
                f"{self.algorithm.name} ciphertext must be a non-empty multiple of 16 bytes, "
                f"got {len(data)}"
            )
        plain = self._run(data, nonce, aad, False)
        if not padding:
            return plain
        unpadder = sym_padding.PKCS7(128).unpadder()
        try:
            return unpadder.update(plain) + unpadder.finalize()
        except ValueError:
            # same message whatever was wrong: a padding oracle must learn nothing more
            raise AuthenticationFailed(
                f"{self.algorithm.name}: padding check failed (CBC is unauthenticated: "
                "prefer an AEAD)"
            ) from None


TWEAKS = {"plain64": _native.TWEAK_PLAIN64, "plain64be": _native.TWEAK_PLAIN64BE}


class XtsKernel(_BlockCipherKernel):
    """AES-XTS: ``encrypt`` takes one data unit and its 16-byte tweak; ``encrypt_sectors``
    a whole run of sectors in one native call (key schedule prepared once here)."""

    __slots__ = ("_sectors",)
    _iv_name = "tweak"

    def __init__(self, algorithm: Algorithm, material: bytes) -> None:
        super().__init__(algorithm, material)
        self._sectors = _native.XtsKey(material)

    def _mode(self, nonce: bytes) -> Any:
        return modes.XTS(nonce)

    def encrypt(self, data: Buffer, nonce: bytes | None, aad: bytes | None,
                padding: bool = False) -> bytes:
        if padding:
            raise InvalidRequest("AES-XTS steals ciphertext: padding does not apply")
        return self._run(data, nonce, aad, True)

    def decrypt(self, data: Buffer, nonce: bytes | None, aad: bytes | None,
                padding: bool = False) -> bytes:
        if padding:
            raise InvalidRequest("AES-XTS steals ciphertext: padding does not apply")
        return self._run(data, nonce, aad, False)

    def encrypt_sectors(self, data: Buffer, sector: int, sector_size: int,
                        out: Any = None, tweak: int = 0) -> Any:
        try:
            return self._sectors.encrypt(data, sector, sector_size, out, tweak)
        except (ValueError, TypeError, OverflowError) as e:
            raise InvalidRequest(f"{self.algorithm.name} sectors: {e}") from None

    def decrypt_sectors(self, data: Buffer, sector: int, sector_size: int,
                        out: Any = None, tweak: int = 0) -> Any:
        try:
            return self._sectors.decrypt(data, sector, sector_size, out, tweak)
        except (ValueError, TypeError, OverflowError) as e:
            raise InvalidRequest(f"{self.algorithm.name} sectors: {e}") from None

    def decrypt_gather(self, src: Buffer, items: Sequence[tuple[int, int, Any]],
                       sector_size: int, tweak: int = 0) -> int:
        """Many runs in one native call: each item ``(offset in src, first sector,
        out)`` fills ``out`` with the plaintext of ``src[offset:offset + len(out)]``
        (an NBD server's reads of one receive, from the image mapping). Every item is
        checked before any runs; returns the bytes decrypted."""
        try:
            return self._sectors.decrypt_gather(src, items, sector_size, tweak)
        except (ValueError, TypeError, OverflowError) as e:
            raise InvalidRequest(f"{self.algorithm.name} sectors: {e}") from None

    def encrypt_scatter(self, fd: int, items: Sequence[tuple[int, int, Any]],
                        sector_size: int, tweak: int,
                        scratch: Any) -> tuple[int, int, int]:
        """Each item ``(file offset, first sector, plaintext)`` encrypted into
        ``scratch`` and written to ``fd``, in order, in one native call; every item is
        checked before any runs. Returns (items written, errno of the first that failed
        or 0, bytes written)."""
        try:
            return self._sectors.encrypt_scatter(fd, items, sector_size, tweak, scratch)
        except (ValueError, TypeError, OverflowError) as e:
            raise InvalidRequest(f"{self.algorithm.name} sectors: {e}") from None


CIPHER_KERNELS: dict[str, type[_BlockCipherKernel]] = {
    "ctr": CtrKernel,
    "cbc": CbcKernel,
    "xts": XtsKernel,
}
