"""Requests: one small object per operation.

A request is checked when it is made (the key's algorithm offers the operation, sizes
are right), so a malformed one never reaches an engine. Engines run it with
``request.apply(kernel)``; everything an engine needs to route it (algorithm, operation,
payload size) is a plain attribute.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from ._native import tweak_step
from .algorithms import Algorithm, Kind, Op, lookup
from .exceptions import InvalidRequest, KeyRejected
from .kernels import Buffer, Kernel
from .kernels.digests import hash_kernel
from .kernels.symmetric import TWEAKS
from .keys import Key

# The largest random request: bigger asks are almost always a bug (a size in bits?).
MAX_RANDOM_BYTES = 1 << 24


def _need_key(key: object, op: Op) -> Key:
    if not isinstance(key, Key):
        raise InvalidRequest(f"{op.value} needs a cryptoplane Key, not {type(key).__name__}")
    if op not in key.algorithm.ops:
        offered = ", ".join(sorted(o.value for o in key.algorithm.ops))
        raise InvalidRequest(f"{key.algorithm.name} does not offer {op.value} (it offers "
                             f"{offered})")
    return key


def _need_bytes(value: object, what: str) -> None:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise InvalidRequest(f"{what} must be bytes-like, not {type(value).__name__}")


class Request:
    """Base of all requests. ``nbytes`` is the payload size the scheduler balances on."""

    __slots__ = ("key",)
    op: ClassVar[Op]
    key: Key | None

    @property
    def algorithm(self) -> Algorithm:
        assert self.key is not None
        return self.key.algorithm

    @property
    def nbytes(self) -> int:
        return 0

    @property
    def retry_safe(self) -> bool:
        """Whether running it again after an engine failed part-way is harmless: true for
        pure functions of their inputs, false when the output overwrites the input."""
        return True

    def kernel(self) -> Kernel:
        assert self.key is not None
        return self.key.kernel()

    def apply(self, kernel: Kernel) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:  # never the payload, never the key material
        return f"<{type(self).__name__} {self.algorithm.name} {self.nbytes} bytes>"


class _Cipher(Request):
    __slots__ = ("aad", "data", "nonce", "padding")

    def __init__(self, key: Key, data: Buffer, *, nonce: bytes | None = None,
                 aad: bytes | None = None, padding: bool = False) -> None:
        self.key = _need_key(key, self.op)
        _need_bytes(data, "data")
        alg = key.algorithm
        sizes = alg.nonce_sizes
        if sizes is not None and (nonce is None or len(nonce) not in sizes):
            got = "none" if nonce is None else f"{len(nonce)} bytes"
            raise InvalidRequest(f"{alg.name} needs a nonce of {sizes.describe()} bytes, "
                                 f"got {got}")
        self.data, self.nonce, self.aad, self.padding = data, nonce, aad, padding

    @property
    def nbytes(self) -> int:
        return len(self.data)


class Encrypt(_Cipher):
    """AEAD: returns ciphertext || tag. CTR/CBC/XTS: ciphertext. OAEP: ``aad`` = label."""

    __slots__ = ()
    op = Op.ENCRYPT

    def apply(self, kernel: Kernel) -> bytes:
        return kernel.encrypt(self.data, self.nonce, self.aad, self.padding)


class Decrypt(_Cipher):
    __slots__ = ()
    op = Op.DECRYPT

    def apply(self, kernel: Kernel) -> bytes:
        return kernel.decrypt(self.data, self.nonce, self.aad, self.padding)


class Sign(Request):
    __slots__ = ("data",)
    op = Op.SIGN

    def __init__(self, key: Key, data: Buffer) -> None:
        self.key = _need_key(key, self.op)
        if not key.is_private:
            raise KeyRejected(f"{key.algorithm.name}: signing needs the private key")
        _need_bytes(data, "message")
        self.data = data

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def apply(self, kernel: Kernel) -> bytes:
        return kernel.sign(self.data)


class Verify(Request):
    """Completes with ``None`` or fails with ``InvalidSignature``."""

    __slots__ = ("data", "signature")
    op = Op.VERIFY

    def __init__(self, key: Key, data: Buffer, signature: bytes) -> None:
        self.key = _need_key(key, self.op)
        _need_bytes(data, "message")
        _need_bytes(signature, "signature")
        self.data, self.signature = data, signature

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def apply(self, kernel: Kernel) -> None:
        kernel.verify(self.data, self.signature)


class Digest(Request):
    __slots__ = ("_alg", "data")
    op = Op.DIGEST

    def __init__(self, algorithm: str | Algorithm, data: Buffer) -> None:
        alg = lookup(algorithm)
        if alg.kind is not Kind.HASH:
            raise InvalidRequest(f"{alg.name} is not a hash")
        _need_bytes(data, "data")
        self.key = None
        self._alg, self.data = alg, data

    @property
    def algorithm(self) -> Algorithm:
        return self._alg

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def kernel(self) -> Kernel:
        return hash_kernel(self._alg.name)

    def apply(self, kernel: Kernel) -> bytes:
        return kernel.digest(self.data)  # type: ignore[attr-defined,no-any-return]


class Mac(Request):
    __slots__ = ("data", "tag_size")
    op = Op.MAC

    def __init__(self, key: Key, data: Buffer, *, tag_size: int | None = None) -> None:
        self.key = _need_key(key, self.op)
        _need_bytes(data, "data")
        self.data, self.tag_size = data, tag_size

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def apply(self, kernel: Kernel) -> bytes:
        return kernel.mac(self.data, self.tag_size)


class VerifyMac(Request):
    """Completes with ``None`` or fails with ``AuthenticationFailed`` (constant time)."""

    __slots__ = ("data", "tag")
    op = Op.VERIFY_MAC

    def __init__(self, key: Key, data: Buffer, tag: bytes) -> None:
        self.key = _need_key(key, self.op)
        _need_bytes(data, "data")
        _need_bytes(tag, "tag")
        self.data, self.tag = data, tag

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def apply(self, kernel: Kernel) -> None:
        kernel.verify_mac(self.data, self.tag)


class Derive(Request):
    """Key agreement (x25519: ``peer`` public key) or KDF (hkdf: ``length``, salt, info)."""

    __slots__ = ("info", "length", "peer", "salt")
    op = Op.DERIVE

    def __init__(self, key: Key, peer: Key | bytes | None = None, *,
                 length: int | None = None, salt: bytes | None = None,
                 info: bytes | None = None) -> None:
        self.key = _need_key(key, self.op)
        self.peer, self.length, self.salt, self.info = peer, length, salt, info

    def apply(self, kernel: Kernel) -> bytes:
        peer: Any = self.peer
        # kernels know no Key: an asymmetric peer goes as its cryptography object, and
        # anything else as it is, for the kernel to refuse. Unwrapped here, not when made:
        # the pool engine ships the Key itself (as its raw public bytes).
        if isinstance(peer, Key) and not peer.algorithm.symmetric:
            peer = peer.cryptography_key()
        return kernel.derive(peer, self.length, self.salt, self.info)


class Random(Request):
    __slots__ = ("n",)
    op = Op.RANDOM
    _ALG = lookup("random")

    def __init__(self, n: int) -> None:
        if not isinstance(n, int) or not 0 <= n <= MAX_RANDOM_BYTES:
            raise InvalidRequest(f"random needs 0..{MAX_RANDOM_BYTES} bytes, got {n!r}")
        self.key = None
        self.n = n

    @property
    def algorithm(self) -> Algorithm:
        return self._ALG

    @property
    def nbytes(self) -> int:
        return self.n

    def kernel(self) -> Kernel:
        return _RANDOM_KERNEL

    def apply(self, kernel: Kernel) -> bytes:
        return os.urandom(self.n)  # the OS CSPRNG, as cryptography itself recommends


_RANDOM_KERNEL = Kernel(lookup("random"))

SECTOR_SIZES = (512, 1024, 2048, 4096)
TWEAK_LAYOUTS = ("plain64", "plain64be")


class _Sectors(Request):
    """A run of sectors under XTS; sector ``i`` of the run uses tweak ``sector + i``, or
    ``sector + i * sector_size // tweak_unit`` where the tweak counts smaller units
    (``tweak_unit=512``: dm-crypt's numbering for LUKS2 at every sector size)."""

    __slots__ = ("data", "out", "sector", "sector_size", "tweak")

    @property
    def retry_safe(self) -> bool:
        # in place, a half-done run has already destroyed part of its input
        return self.out is None or self.out is not self.data

    def __init__(self, key: Key, data: Buffer, *, sector: int = 0, sector_size: int = 4096,
                 out: Any = None, tweak: str = "plain64",
                 tweak_unit: int | None = None) -> None:
        self.key = _need_key(key, self.op)
        self.data, self.out = data, out
        self.sector, self.sector_size = sector, sector_size
        self.tweak = check_sectors(data, sector, sector_size, tweak, tweak_unit)

    @property
    def nbytes(self) -> int:
        return len(self.data)


def check_sectors(data: object, sector: object, sector_size: object, tweak: str,
                  tweak_unit: int | None = None) -> int:
    """Validate a sector run; returns the native tweak code (layout and step)."""
    try:  # every volume read and write passes here: one lookup, not tweak_code's checks
        code = _TWEAK_CODES[tweak, sector_size, tweak_unit]  # type: ignore[index]
    except (KeyError, TypeError):
        code = tweak_code(sector_size, tweak, tweak_unit)
    if not isinstance(sector, int) or not 0 <= sector < 1 << 64:
        raise InvalidRequest(f"sector must be an integer in 0..2**64-1, got {sector!r}")
    n = len(data)  # type: ignore[arg-type]
    if n == 0 or n % sector_size:  # type: ignore[operator]
        raise InvalidRequest(
            f"a sector run must be a non-zero multiple of {sector_size} bytes, got {n}"
        )
    return code


def tweak_code(sector_size: object, tweak: str, tweak_unit: int | None = None) -> int:
    """Validate a sector size and tweak (layout, and the unit the tweak counts); returns
    the native tweak code. Apart from ``check_sectors`` because a batch of runs (the
    plane's ``decrypt_sectors_gather``) shares one code but has no one run to check."""
    if sector_size not in SECTOR_SIZES:
        raise InvalidRequest(f"sector_size must be one of {SECTOR_SIZES}, got {sector_size!r}")
    assert isinstance(sector_size, int)
    try:
        return _TWEAK_CODES[tweak, sector_size, tweak_unit]
    except (KeyError, TypeError):
        pass
    try:
        code = TWEAKS[tweak]
    except (KeyError, TypeError):
        raise InvalidRequest(f"tweak layout must be one of {TWEAK_LAYOUTS}, "
                             f"got {tweak!r}") from None
    if tweak_unit is not None and tweak_unit != sector_size:
        if tweak_unit not in SECTOR_SIZES or tweak_unit > sector_size:
            raise InvalidRequest(f"tweak_unit must be 512, 1024, 2048 or 4096 and at most "
                                 f"the sector size {sector_size}, got {tweak_unit!r}")
        code |= tweak_step(sector_size // tweak_unit)
    _TWEAK_CODES[tweak, sector_size, tweak_unit] = code
    return code


_TWEAK_CODES: dict[tuple[str, int, int | None], int] = {}  # the valid ones seen so far


class EncryptSectors(_Sectors):
    __slots__ = ()
    op = Op.ENCRYPT_SECTORS

    def apply(self, kernel: Kernel) -> Any:
        return kernel.encrypt_sectors(self.data, self.sector, self.sector_size, self.out,
                                      self.tweak)


class DecryptSectors(_Sectors):
    __slots__ = ()
    op = Op.DECRYPT_SECTORS

    def apply(self, kernel: Kernel) -> Any:
        return kernel.decrypt_sectors(self.data, self.sector, self.sector_size, self.out,
                                      self.tweak)


__all__ = [
    "Decrypt", "DecryptSectors", "Derive", "Digest", "Encrypt", "EncryptSectors", "Mac",
    "Random", "Request", "Sign", "Verify", "VerifyMac", "check_sectors", "tweak_code",
]


class _Chunks(Request):
    """A run of STREAM chunks (age's payload) on a ChaCha20-Poly1305 key: chunk ``i`` of
    the run is number ``counter + i``; with ``final`` the run ends the stream (its last
    chunk carries the flag and may be short). Completes with the bytes written to
    ``out``; a chunk that fails raises ``ChunkAuthenticationFailed`` naming it."""

    __slots__ = ("counter", "data", "final", "out")

    def __init__(self, key: Key, data: Buffer, out: Any, *, counter: int,
                 final: bool) -> None:
        self.key = _need_key(key, self.op)
        check_chunks(data, counter)
        self.data, self.out, self.counter, self.final = data, out, counter, bool(final)

    @property
    def nbytes(self) -> int:
        return len(self.data)


def check_chunks(data: object, counter: object) -> None:
    """Validate a chunk run's input (the kernel checks ``out`` against it)."""
    _need_bytes(data, "data")
    if not isinstance(counter, int) or counter < 0:
        raise InvalidRequest(f"counter must be a chunk number >= 0, got {counter!r}")


class SealChunks(_Chunks):
    __slots__ = ()
    op = Op.SEAL_CHUNKS

    def apply(self, kernel: Kernel) -> int:
        return kernel.seal_chunks(self.data, self.out, self.counter, self.final)


class OpenChunks(_Chunks):
    __slots__ = ()
    op = Op.OPEN_CHUNKS

    def apply(self, kernel: Kernel) -> int:
        return kernel.open_chunks(self.data, self.out, self.counter, self.final)


__all__ += ["OpenChunks", "SealChunks", "check_chunks"]
