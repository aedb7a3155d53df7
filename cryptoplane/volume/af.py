"""The LUKS anti-forensic splitter: one key spread over many stripes so that destroying
any part of the stored material destroys the key (LUKS1 spec, section 2.4).

``split`` makes ``stripes - 1`` random blocks ``s_i`` and a running value ``d`` that
starts at zero: ``d = H(d XOR s_i)`` after each; the last stripe is ``key XOR d``.
``merge`` recomputes ``d`` from the stored stripes and XORs it into the last one. ``H``
is the diffusion: the block cut into hash-sized pieces, piece ``j`` replaced by
``hash(be32(j) || piece)`` truncated to the piece's length.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes

from cryptoplane.exceptions import InvalidRequest, NotSupported

STRIPES = 4000
SECTOR = 512

HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


def hash_algorithm(name: str) -> hashes.HashAlgorithm:
    """The ``cryptography`` hash for a LUKS hash name; ``NotSupported`` for others."""
    try:
        return HASHES[name]()
    except (KeyError, TypeError):
        raise NotSupported(f"hash {name!r} is not supported "
                           f"({', '.join(sorted(HASHES))})") from None


def material_size(key_size: int, stripes: int = STRIPES) -> int:
    """Bytes of split material for a key, rounded up to whole 512-byte sectors as
    cryptsetup stores and encrypts it."""
    return -(-(key_size * stripes) // SECTOR) * SECTOR


def _diffuse(block: bytes, alg: hashes.HashAlgorithm) -> bytes:
    size = alg.digest_size
    out = bytearray()
    for j, start in enumerate(range(0, len(block), size)):
        piece = block[start:start + size]
        h = hashes.Hash(alg)
        h.update(j.to_bytes(4, "big"))
        h.update(piece)
        out += h.finalize()[:len(piece)]
    return bytes(out)


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def split(key: bytes, hash_name: str = "sha256", stripes: int = STRIPES,
          random: Callable[[int], bytes] = os.urandom) -> bytes:
    """Split ``key`` into ``stripes`` blocks, padded with zeros to whole sectors."""
    if not key or stripes < 1:
        raise InvalidRequest("AF split needs a key and at least one stripe")
    alg = hash_algorithm(hash_name)
    n = len(key)
    rand = random(n * (stripes - 1))
    d = bytes(n)
    for i in range(stripes - 1):
        d = _diffuse(_xor(d, rand[i * n:(i + 1) * n]), alg)
    material = rand + _xor(d, key)
    return material + bytes(material_size(n, stripes) - len(material))


def merge(material: bytes, key_size: int, hash_name: str = "sha256",
          stripes: int = STRIPES) -> bytes:
    """Recover the key of ``key_size`` bytes from split ``material``."""
    if key_size < 1 or stripes < 1 or len(material) < key_size * stripes:
        raise InvalidRequest(f"AF material of {len(material)} bytes is too short for "
                             f"{stripes} stripes of {key_size} bytes")
    alg = hash_algorithm(hash_name)
    n = key_size
    d = bytes(n)
    for i in range(stripes - 1):
        d = _diffuse(_xor(d, material[i * n:(i + 1) * n]), alg)
    return _xor(d, material[(stripes - 1) * n:stripes * n])


__all__ = ["HASHES", "STRIPES", "hash_algorithm", "material_size", "merge", "split"]
