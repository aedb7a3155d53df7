"""Key material per key type: generating it, checking imported material, and BYOK.

Stored format (what the keystore keeps wrapped, what ``export`` returns, what an import
must carry): 32 random bytes for AES-256-GCM, ChaCha20-Poly1305 and HMAC keys (HMAC
imports may be 16..1024 bytes); an unencrypted PKCS#8 DER private key for RSA
(2048/3072/4096 bits, e = 65537 when generated), ECDSA P-256/P-384 and Ed25519.

BYOK, as Vault's ``import``: the caller makes a random AES-256 ephemeral key, wraps the
material with it by AES key wrap with padding (RFC 5649, ``aes_key_wrap_with_padding``),
wraps the ephemeral key with the server's RSA-4096 wrapping key by RSA-OAEP (SHA-256,
MGF1-SHA-256, no label), and sends ``RSA-OAEP(ephemeral) || KWP(material)`` (the first
512 bytes are the OAEP part). ``wrap_for_import`` does the caller's half.
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)

from ...exceptions import InvalidRequest, KeyRejected
from ..keytypes import KeyType

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

RSA_BITS = {KeyType.RSA_2048: 2048, KeyType.RSA_3072: 3072, KeyType.RSA_4096: 4096}
CURVES: dict[KeyType, type[ec.EllipticCurve]] = {
    KeyType.ECDSA_P256: ec.SECP256R1, KeyType.ECDSA_P384: ec.SECP384R1}
SYMMETRIC_SIZE = 32
WRAPPING_BITS = 4096
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(),
                     label=None)


def key_type(value: KeyType | str) -> KeyType:
    try:
        return KeyType(value)
    except ValueError:
        known = ", ".join(t.value for t in KeyType)
        raise InvalidRequest(f"unknown key type {value!r} (known: {known})") from None


def _der(obj: PrivateKey) -> bytes:
    return obj.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def generate(kt: KeyType) -> bytes:
    """Fresh material for a key type, in the stored format."""
    if kt.symmetric:
        return os.urandom(SYMMETRIC_SIZE)
    obj: PrivateKey
    if kt in RSA_BITS:
        obj = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS[kt])
    elif kt in CURVES:
        obj = ec.generate_private_key(CURVES[kt]())
    else:
        obj = ed25519.Ed25519PrivateKey.generate()
    return _der(obj)


def load_private(kt: KeyType, material: bytes) -> PrivateKey:
    """The ``cryptography`` private key of stored asymmetric material, checked against
    the type (family, modulus size, curve); ``KeyRejected`` otherwise."""
    try:
        obj = serialization.load_der_private_key(material, password=None)
    except Exception:  # ValueError, TypeError, UnsupportedAlgorithm: all "not a key"
        raise KeyRejected(f"{kt.value} material is not an unencrypted PKCS#8 DER "
                          "private key") from None
    if kt in RSA_BITS:
        if isinstance(obj, rsa.RSAPrivateKey) and obj.key_size == RSA_BITS[kt]:
            return obj
    elif kt in CURVES:
        if isinstance(obj, ec.EllipticCurvePrivateKey) and isinstance(obj.curve, CURVES[kt]):
            return obj
    elif kt is KeyType.ED25519 and isinstance(obj, ed25519.Ed25519PrivateKey):
        return obj
    raise KeyRejected(f"the material is not a {kt.value} private key")


def check_material(kt: KeyType, material: bytes) -> bytes:
    """Imported material in the stored format, or ``KeyRejected``. Asymmetric keys are
    re-encoded, so what is stored is canonical PKCS#8 whatever DER variant came in."""
    if kt.symmetric:
        ok = (16 <= len(material) <= 1024 if kt is KeyType.HMAC
              else len(material) == SYMMETRIC_SIZE)
        if not ok:
            need = "16..1024" if kt is KeyType.HMAC else str(SYMMETRIC_SIZE)
            raise KeyRejected(f"{kt.value} material must be {need} bytes, "
                              f"got {len(material)}")
        return bytes(material)
    return _der(load_private(kt, material))


def public_pem(obj: PrivateKey) -> bytes:
    return obj.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


# -- BYOK ----------------------------------------------------------------------------------

def new_wrapping_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=WRAPPING_BITS)


def wrap_for_import(wrapping_public_pem: bytes, material: bytes) -> bytes:
    """The caller's side of BYOK: ``RSA-OAEP(ephemeral) || KWP_ephemeral(material)``."""
    pub = serialization.load_pem_public_key(wrapping_public_pem)
    if not isinstance(pub, rsa.RSAPublicKey):
        raise KeyRejected("the wrapping key must be an RSA public key")
    ephemeral = os.urandom(32)
    return pub.encrypt(ephemeral, _OAEP) + aes_key_wrap_with_padding(ephemeral, material)


def unwrap_import(wrapping: rsa.RSAPrivateKey, blob: bytes) -> bytes:
    """The server's side; ``InvalidRequest`` for any blob that does not unwrap (one
    message for every cause, so the answer is no padding oracle)."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise InvalidRequest("the wrapped key must be bytes")
    n = wrapping.key_size // 8
    blob = bytes(blob)
    if len(blob) < n + 24:  # the OAEP block, then at least two KWP semiblocks + IV
        raise InvalidRequest("the wrapped key is too short")
    try:
        ephemeral = wrapping.decrypt(blob[:n], _OAEP)
        if len(ephemeral) != 32:
            raise ValueError
        return aes_key_unwrap_with_padding(ephemeral, blob[n:])
    except (ValueError, InvalidUnwrap):
        raise InvalidRequest("the wrapped key does not unwrap with this server's "
                             "wrapping key") from None
