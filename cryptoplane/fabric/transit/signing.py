"""Signature schemes per key type, hash and padding, and which of them the plane runs.

RSA keys sign with RSA-PSS (MGF1 with the same hash, salt length = the digest length:
32/48/64 bytes for SHA-256/384/512, as TLS 1.3 and JOSE use) or RSA PKCS#1 v1.5. ECDSA
signatures are DER (``SEQUENCE { r, s }``). Ed25519 hashes internally: ``hash`` is
ignored and ``prehashed`` refused. With ``prehashed=True`` the data is the digest itself
(``cryptography``'s ``Prehashed``), and must be exactly the digest's length.

The combinations the plane's catalogue has (RSA PSS/PKCS#1 v1.5 with SHA-256, ECDSA
P-256/SHA-256, P-384/SHA-384, Ed25519; never prehashed) go through ``plane.sign`` and
``plane.verify``, so engines and their counters serve them; the rest call
``cryptography`` here.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from ...exceptions import InvalidRequest
from ..keytypes import KeyType
from .material import CURVES, RSA_BITS

HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
PADDINGS = ("pss", "pkcs1v15")
_CURVE_HASH = {KeyType.ECDSA_P256: "sha256", KeyType.ECDSA_P384: "sha384"}
SIGNING_TYPES = (*RSA_BITS, *CURVES, KeyType.ED25519)


class Scheme:
    """How one (key type, hash, prehashed, padding) signs: the plane algorithm that does
    it, or the ``cryptography`` arguments to ``sign``/``verify``."""

    __slots__ = ("args", "plane_algorithm")

    def __init__(self, plane_algorithm: str | None, args: tuple[Any, ...]) -> None:
        self.plane_algorithm = plane_algorithm
        self.args = args


def scheme(kt: KeyType, hash: str | None, prehashed: bool, pad: str) -> Scheme:
    if not isinstance(prehashed, bool):
        raise InvalidRequest("prehashed must be true or false")
    if kt is KeyType.ED25519:
        if prehashed:
            raise InvalidRequest("ed25519 signs the message itself: prehashed does not apply")
        return Scheme("ed25519", ())
    name = hash if hash is not None else _CURVE_HASH.get(kt, "sha256")
    if not isinstance(name, str) or name not in HASHES:
        raise InvalidRequest(f"hash must be one of {', '.join(HASHES)}, not {name!r}")
    h = HASHES[name]()
    alg: Any = Prehashed(h) if prehashed else h
    if kt in RSA_BITS:
        if pad not in PADDINGS:
            raise InvalidRequest(f"padding must be one of {', '.join(PADDINGS)}, not {pad!r}")
        p: padding.AsymmetricPadding = (
            padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size) if pad == "pss"
            else padding.PKCS1v15())
        plane = f"rsa-{pad}-sha256" if name == "sha256" and not prehashed else None
        return Scheme(plane, (p, alg))
    curve = "p256" if kt is KeyType.ECDSA_P256 else "p384"
    plane = (f"ecdsa-{curve}-{name}" if name == _CURVE_HASH[kt] and not prehashed
             else None)
    return Scheme(plane, (ec.ECDSA(alg),))


def check_prehashed(data: Any, hash: str | None, kt: KeyType, prehashed: bool) -> None:
    """A prehashed input must be exactly one digest long (``cryptography`` would say so
    with a ValueError; transit says it with ``InvalidRequest``)."""
    if prehashed:
        name = hash if hash is not None else _CURVE_HASH.get(kt, "sha256")
        size = HASHES[name]().digest_size
        if len(data) != size:
            raise InvalidRequest(f"prehashed {name} input must be {size} bytes, "
                                 f"got {len(data)}")

