"""The binary framing of what transit hands out: ciphertexts, signatures and HMAC tags.

Each names the key version that made it, as Vault's ``vault:vN:...`` strings do, but in
binary (the fabric's wire is binary; base64 would cost a third more bytes and time).

Ciphertext (``pack_ciphertext``/``parse_ciphertext``)::

    offset  size  field
    0       1     magic 0xC7 (transit ciphertext, layout 1)
    1       4     key version, unsigned big-endian, >= 1
    5       12    nonce (96 bits; random, or derived for convergent keys)
    17      n+16  AEAD output: ciphertext (n bytes, n >= 0) || 16-byte tag

so a blob is exactly 33 + len(plaintext) bytes. The AEAD (AES-256-GCM or
ChaCha20-Poly1305, as the key's type says) runs with the caller's ``aad`` only: the
header is not authenticated as AAD, and needs not be: a changed version or nonce selects
another key or nonce and the tag fails, and a changed magic byte is refused. That keeps
a blob decryptable by any AEAD library given the exported key, the nonce at [5:17] and
the bytes from 17 on.

Signature (``pack_signature``)::

    0       1     magic 0xC5
    1       4     key version, unsigned big-endian, >= 1
    5       ...   the signature as the scheme gives it: RSA (modulus-sized), ECDSA (DER
                  SEQUENCE of r and s), Ed25519 (64 bytes)

HMAC tag (``pack_tag``)::

    0       1     magic 0xC6
    1       4     key version, unsigned big-endian, >= 1
    5       ...   the HMAC output (32, 48 or 64 bytes for SHA-256/384/512)

Parsers accept any bytes-like object and raise only ``InvalidRequest`` (wrong type,
too short, wrong magic, version 0).
"""

from __future__ import annotations

import struct

from ...exceptions import InvalidRequest

CIPHERTEXT_MAGIC = 0xC7
SIGNATURE_MAGIC = 0xC5
TAG_MAGIC = 0xC6
HEADER = 5  # magic + u32 version
NONCE_SIZE = 12
AEAD_TAG = 16
CIPHERTEXT_OVERHEAD = HEADER + NONCE_SIZE + AEAD_TAG  # 33
MAX_VERSION = 0xFFFF_FFFF
MAX_REQUEST = 32 * 1024 * 1024  # bytes of data per request or item, as Vault's cap

_U32 = struct.Struct(">I")


def header(magic: int, version: int) -> bytes:
    """The 5-byte prefix; transit keeps one per (key, version) so a blob is one concat."""
    if not 1 <= version <= MAX_VERSION:
        raise InvalidRequest(f"key version must be 1..{MAX_VERSION}")
    return bytes((magic,)) + _U32.pack(version)


def pack_ciphertext(version: int, nonce: bytes, sealed: bytes) -> bytes:
    if len(nonce) != NONCE_SIZE:
        raise InvalidRequest(f"nonce must be {NONCE_SIZE} bytes")
    return header(CIPHERTEXT_MAGIC, version) + nonce + sealed


def _view(blob: object, what: str) -> memoryview:
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise InvalidRequest(f"{what} must be bytes, not {type(blob).__name__}")
    try:
        return memoryview(blob).cast("B")
    except TypeError:  # a memoryview of another shape that cannot be flattened
        raise InvalidRequest(f"{what} must be contiguous bytes") from None


def _version(view: memoryview, magic: int, what: str, minimum: int) -> int:
    if len(view) < minimum:
        raise InvalidRequest(f"{what} is too short ({len(view)} bytes; at least {minimum})")
    if view[0] != magic:
        raise InvalidRequest(f"not a transit {what} (magic byte {view[0]:#04x})")
    version: int = _U32.unpack_from(view, 1)[0]
    if version == 0:
        raise InvalidRequest(f"{what} names key version 0")
    return version


def parse_ciphertext(blob: object) -> tuple[int, bytes, memoryview]:
    """(version, nonce, ciphertext || tag) of a transit ciphertext; the last is a view
    into ``blob`` (no copy of a large payload)."""
    view = _view(blob, "ciphertext")
    version = _version(view, CIPHERTEXT_MAGIC, "ciphertext", CIPHERTEXT_OVERHEAD)
    return version, bytes(view[HEADER:HEADER + NONCE_SIZE]), view[HEADER + NONCE_SIZE:]


def ciphertext_version(blob: object) -> int:
    """The key version a ciphertext names (for ``rewrap`` planning and audits)."""
    return parse_ciphertext(blob)[0]


def pack_signature(version: int, signature: bytes) -> bytes:
    return header(SIGNATURE_MAGIC, version) + signature


def parse_signature(blob: object) -> tuple[int, bytes]:
    view = _view(blob, "signature")
    version = _version(view, SIGNATURE_MAGIC, "signature", HEADER + 1)
    return version, bytes(view[HEADER:])


def pack_tag(version: int, tag: bytes) -> bytes:
    return header(TAG_MAGIC, version) + tag


def parse_tag(blob: object) -> tuple[int, bytes]:
    view = _view(blob, "hmac")
    version = _version(view, TAG_MAGIC, "hmac", HEADER + 1)
    return version, bytes(view[HEADER:])
