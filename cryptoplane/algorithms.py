"""The algorithm catalogue: names, kinds and the size rules each algorithm obeys.

Like the kernel's ``cra_name``, an algorithm is known by a lowercase name
(``aes-256-gcm``). Each entry is data: its kind, the key and nonce sizes it accepts, the
operations it offers. Requests are checked against these rules before any engine sees
them, so a wrong size is a clear ``InvalidRequest``/``KeyRejected`` and never an engine
failure.
"""

from __future__ import annotations

import difflib
import enum
from dataclasses import dataclass

from .exceptions import NotSupported


class Kind(enum.StrEnum):
    CIPHER = "cipher"  # unauthenticated symmetric: ctr, cbc, xts
    AEAD = "aead"
    HASH = "hash"
    MAC = "mac"
    AKCIPHER = "akcipher"  # asymmetric: signatures and RSA-OAEP
    KPP = "kpp"  # key agreement
    KDF = "kdf"
    RNG = "rng"


class Op(enum.StrEnum):
    ENCRYPT = "encrypt"
    DECRYPT = "decrypt"
    SIGN = "sign"
    VERIFY = "verify"
    DIGEST = "digest"
    MAC = "mac"
    VERIFY_MAC = "verify_mac"
    DERIVE = "derive"
    RANDOM = "random"
    ENCRYPT_SECTORS = "encrypt_sectors"
    DECRYPT_SECTORS = "decrypt_sectors"
    SEAL_CHUNKS = "seal_chunks"  # a run of STREAM chunks (age's payload)
    OPEN_CHUNKS = "open_chunks"


@dataclass(frozen=True, slots=True)
class SizeRange:
    """Allowed sizes in bytes, ``{min, max, increment}`` in the manner of DPDK capabilities."""

    min: int
    max: int
    increment: int = 1

    def __contains__(self, n: object) -> bool:
        if not isinstance(n, int):
            return False
        return self.min <= n <= self.max and (n - self.min) % self.increment == 0

    def describe(self) -> str:
        if self.min == self.max:
            return f"{self.min}"
        step = "" if self.increment == 1 else f" in steps of {self.increment}"
        return f"{self.min}..{self.max}{step}"


def _sizes(*values: int) -> tuple[int, ...]:
    return tuple(values)


@dataclass(frozen=True, slots=True)
class Algorithm:
    name: str
    kind: Kind
    ops: frozenset[Op]
    key_sizes: tuple[int, ...] | SizeRange | None = None  # bytes; None: asymmetric or keyless
    nonce_sizes: SizeRange | None = None  # nonce / IV / tweak, bytes
    tag_size: int = 0  # AEAD tag appended to the ciphertext
    block_size: int = 0
    digest_size: int = 0  # hash output, MAC tag, or the hash inside a signature
    hash_name: str = ""  # the hash a MAC, signature or KDF is built on
    key_bits: SizeRange | None = None  # RSA modulus bits
    curve: str = ""

    @property
    def symmetric(self) -> bool:
        return self.kind in (Kind.CIPHER, Kind.AEAD, Kind.MAC, Kind.KDF)

    @property
    def default_key_size(self) -> int:
        ks = self.key_sizes
        if isinstance(ks, tuple):
            return ks[-1]
        if isinstance(ks, SizeRange):
            return max(ks.min, self.digest_size or 32)
        raise NotSupported(f"{self.name} has no symmetric key size")

    @property
    def mode(self) -> str:
        """For AES ciphers, the mode (``gcm``, ``ctr``, ``cbc``, ``xts``); else ``""``."""
        if self.name.startswith("aes-"):
            return self.name.rsplit("-", 1)[1]
        return ""

    def describe_key_sizes(self) -> str:
        ks = self.key_sizes
        if isinstance(ks, tuple):
            return "/".join(str(k) for k in ks) + " bytes"
        if isinstance(ks, SizeRange):
            return ks.describe() + " bytes"
        if self.key_bits is not None:
            return f"{self.key_bits.min}-{self.key_bits.max} bit modulus"
        return self.curve or "none"


_SYM_ENC = frozenset({Op.ENCRYPT, Op.DECRYPT})
_SIGN = frozenset({Op.SIGN, Op.VERIFY})
_RSA_BITS = SizeRange(2048, 4096, 8)


def _build() -> dict[str, Algorithm]:
    algs: list[Algorithm] = []
    for bits in (128, 192, 256):
        n = bits // 8
        algs.append(
            Algorithm(
                f"aes-{bits}-gcm", Kind.AEAD, _SYM_ENC, _sizes(n),
                # cryptography's AESGCM accepts 8..128 byte nonces; 12 is the norm
                nonce_sizes=SizeRange(8, 128), tag_size=16, block_size=16,
            )
        )
        algs.append(
            Algorithm(
                f"aes-{bits}-ctr", Kind.CIPHER, _SYM_ENC, _sizes(n),
                nonce_sizes=SizeRange(16, 16), block_size=1,
            )
        )
        algs.append(
            Algorithm(
                f"aes-{bits}-cbc", Kind.CIPHER, _SYM_ENC, _sizes(n),
                nonce_sizes=SizeRange(16, 16), block_size=16,
            )
        )
    for bits in (128, 256):
        algs.append(
            Algorithm(
                f"aes-{bits}-xts", Kind.CIPHER,
                _SYM_ENC | {Op.ENCRYPT_SECTORS, Op.DECRYPT_SECTORS},
                _sizes(bits // 4),  # two AES keys: data key and tweak key
                nonce_sizes=SizeRange(16, 16), block_size=16,
            )
        )
    algs.append(
        Algorithm(
            "chacha20-poly1305", Kind.AEAD,
            _SYM_ENC | {Op.SEAL_CHUNKS, Op.OPEN_CHUNKS}, _sizes(32),
            nonce_sizes=SizeRange(12, 12), tag_size=16, block_size=1,
        )
    )
    for name, size in (("sha256", 32), ("sha384", 48), ("sha512", 64), ("sha3-256", 32),
                       ("sha3-512", 64), ("blake2b", 64)):
        algs.append(Algorithm(name, Kind.HASH, frozenset({Op.DIGEST}), digest_size=size))
    for h, size in (("sha256", 32), ("sha384", 48), ("sha512", 64)):
        algs.append(
            Algorithm(
                f"hmac-{h}", Kind.MAC, frozenset({Op.MAC, Op.VERIFY_MAC}),
                SizeRange(1, 1024), digest_size=size, hash_name=h,
            )
        )
    algs.append(
        Algorithm(
            "hkdf-sha256", Kind.KDF, frozenset({Op.DERIVE}), SizeRange(1, 1024),
            digest_size=32, hash_name="sha256",
        )
    )
    for pad in ("pss", "pkcs1v15"):
        algs.append(
            Algorithm(f"rsa-{pad}-sha256", Kind.AKCIPHER, _SIGN, key_bits=_RSA_BITS,
                      digest_size=32, hash_name="sha256")
        )
    algs.append(
        Algorithm("rsa-oaep-sha256", Kind.AKCIPHER, _SYM_ENC, key_bits=_RSA_BITS,
                  digest_size=32, hash_name="sha256")
    )
    algs.append(Algorithm("ecdsa-p256-sha256", Kind.AKCIPHER, _SIGN, digest_size=32,
                          hash_name="sha256", curve="secp256r1"))
    algs.append(Algorithm("ecdsa-p384-sha384", Kind.AKCIPHER, _SIGN, digest_size=48,
                          hash_name="sha384", curve="secp384r1"))
    algs.append(Algorithm("ed25519", Kind.AKCIPHER, _SIGN, curve="ed25519"))
    algs.append(Algorithm("x25519", Kind.KPP, frozenset({Op.DERIVE}), curve="x25519"))
    algs.append(Algorithm("random", Kind.RNG, frozenset({Op.RANDOM})))
    return {a.name: a for a in algs}


CATALOGUE: dict[str, Algorithm] = _build()


def lookup(name: str | Algorithm) -> Algorithm:
    """The catalogue entry for ``name``; ``NotSupported`` naming close matches otherwise."""
    if isinstance(name, Algorithm):
        return name
    try:
        return CATALOGUE[name]
    except (KeyError, TypeError):
        pass
    if isinstance(name, str):
        alg = CATALOGUE.get(name.lower().replace("_", "-"))
        if alg is not None:
            return alg
        near = difflib.get_close_matches(name.lower(), CATALOGUE, n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise NotSupported(f"unknown algorithm {name!r}{hint}")
    raise NotSupported(f"algorithm must be a name, not {type(name).__name__}")


def names(kind: Kind | None = None) -> list[str]:
    return [a.name for a in CATALOGUE.values() if kind is None or a.kind == kind]
