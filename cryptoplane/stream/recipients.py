"""age recipients and identities: who can unwrap a file's 16-byte file key.

- X25519: ``age1...`` recipients, ``AGE-SECRET-KEY-1...`` identities. The file key is
  wrapped with ChaCha20-Poly1305 under HKDF-SHA256(ikm=shared secret, salt=ephemeral
  share || recipient, info="age-encryption.org/v1/X25519"), zero nonce.
- scrypt: a passphrase; the wrapping key is scrypt(passphrase, salt="age-encryption.org/
  v1/scrypt" || 16-byte salt, N=2**log_n, r=8, p=1). Its stanza must be alone.
- The header MAC and the payload key are derived from the file key here too.

Hybrid post-quantum keys (``AGE-SECRET-KEY-PQ-1``, ``age1pq1``) are recognised and refused
with ``UnsupportedRecipient``. A malformed stanza of a type an identity handles is a
``HeaderError`` (not "no match"), as the spec and the test kit require.
"""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from cryptoplane.exceptions import InvalidRequest, KeyRejected, NotSupported

from . import bech32
from .errors import HeaderError, HeaderMacMismatch
from .header import Header, Stanza, b64decode, b64encode

FILE_KEY_SIZE = 16
NONCE_SIZE = 16  # the payload nonce that follows the header
_ZERO_NONCE = bytes(12)
_X25519_LABEL = b"age-encryption.org/v1/X25519"
_SCRYPT_LABEL = b"age-encryption.org/v1/scrypt"
DEFAULT_WORK_FACTOR = 18  # what age picks: about a second on a laptop
MAX_WORK_FACTOR = 22  # what age accepts by default; the test kit refuses 23
_DECIMAL = re.compile(r"[1-9][0-9]*")


class UnsupportedRecipient(NotSupported, KeyRejected):
    """A recipient or identity type cryptoplane knows of but does not implement
    (the post-quantum hybrid ``mlkem768x25519``)."""


class Recipient(Protocol):
    def wrap(self, file_key: bytes) -> list[Stanza]: ...


class Identity(Protocol):
    def unwrap(self, stanzas: Sequence[Stanza]) -> bytes | None:
        """The file key, or None when no stanza is for this identity; ``HeaderError``
        for a malformed stanza of this identity's type."""
        ...


def _hkdf(ikm: bytes, salt: bytes | None, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def _seal_file_key(key: bytes, file_key: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(_ZERO_NONCE, file_key, None)


def _open_file_key(key: bytes, body: bytes) -> bytes | None:
    # the length is checked before decrypting: a longer body is a malformed file, not a
    # wrong key (the test kit's *_long_file_key)
    if len(body) != FILE_KEY_SIZE + 16:
        raise HeaderError("a wrapped file key is not 16 bytes")
    try:
        return ChaCha20Poly1305(key).decrypt(_ZERO_NONCE, body, None)
    except InvalidTag:
        return None


class X25519Recipient:
    """An ``age1...`` public key."""

    __slots__ = ("_public",)

    def __init__(self, public: bytes) -> None:
        if len(public) != 32:
            raise KeyRejected("an X25519 public key is 32 bytes")
        self._public = bytes(public)

    @classmethod
    def parse(cls, text: str) -> X25519Recipient:
        hrp, data = bech32.decode(text.strip())
        if hrp == "age1pq":
            raise UnsupportedRecipient("post-quantum hybrid recipients are not supported")
        if hrp != "age" or text.strip() != text.strip().lower():
            raise KeyRejected("not an age X25519 recipient (age1...)")
        return cls(data)

    @property
    def public_bytes(self) -> bytes:
        return self._public

    def wrap(self, file_key: bytes) -> list[Stanza]:
        ephemeral = X25519PrivateKey.generate()
        share = ephemeral.public_key().public_bytes_raw()
        secret = ephemeral.exchange(X25519PublicKey.from_public_bytes(self._public))
        key = _hkdf(secret, share + self._public, _X25519_LABEL)
        return [Stanza("X25519", (b64encode(share).decode(),), _seal_file_key(key, file_key))]

    def __str__(self) -> str:
        return bech32.encode("age", self._public)

    def __repr__(self) -> str:
        return f"X25519Recipient({self})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, X25519Recipient) and other._public == self._public

    def __hash__(self) -> int:
        return hash(self._public)


class X25519Identity:
    """An ``AGE-SECRET-KEY-1...`` secret key. Its repr shows the public key only."""

    __slots__ = ("_key", "_recipient")

    def __init__(self, secret: bytes) -> None:
        if len(secret) != 32:
            raise KeyRejected("an X25519 secret key is 32 bytes")
        self._key = X25519PrivateKey.from_private_bytes(bytes(secret))
        self._recipient = X25519Recipient(self._key.public_key().public_bytes_raw())

    @classmethod
    def generate(cls) -> X25519Identity:
        return cls(X25519PrivateKey.generate().private_bytes_raw())

    @classmethod
    def parse(cls, text: str) -> X25519Identity:
        text = text.strip()
        try:
            hrp, data = bech32.decode(text)
        except KeyRejected:
            raise KeyRejected("not a valid age identity (AGE-SECRET-KEY-1...)") from None
        if hrp == "age-secret-key-pq-":
            raise UnsupportedRecipient("post-quantum hybrid identities are not supported")
        if hrp != "age-secret-key-" or text != text.upper():
            raise KeyRejected("not an age X25519 identity (AGE-SECRET-KEY-1...)")
        return cls(data)

    @property
    def recipient(self) -> X25519Recipient:
        return self._recipient

    def to_string(self) -> str:
        """The secret key as age writes it: handle with care."""
        return bech32.encode("age-secret-key-", self._key.private_bytes_raw()).upper()

    def unwrap(self, stanzas: Sequence[Stanza]) -> bytes | None:
        for stanza in stanzas:
            if stanza.type != "X25519":
                continue
            if len(stanza.args) != 1:
                raise HeaderError("an X25519 stanza must have exactly one argument")
            share = b64decode(stanza.args[0].encode())
            if len(share) != 32:
                raise HeaderError("an X25519 share is not 32 bytes")
            try:
                secret = self._key.exchange(X25519PublicKey.from_public_bytes(share))
            except ValueError:  # OpenSSL refuses the all-zero result of a low-order point
                raise HeaderError("an X25519 share is a low-order point") from None
            if secret == bytes(32):
                raise HeaderError("an X25519 share is a low-order point")
            key = _hkdf(secret, share + self._recipient.public_bytes, _X25519_LABEL)
            file_key = _open_file_key(key, stanza.body)
            if file_key is not None:
                return file_key
        return None

    def __repr__(self) -> str:
        return f"X25519Identity(recipient={self._recipient})"


def _check_work_factor(log_n: int) -> None:
    if not 1 <= log_n <= 30:
        raise InvalidRequest("the scrypt work factor (log2 N) must be between 1 and 30")


class ScryptRecipient:
    """A passphrase, for encryption. ``work_factor`` is log2 of scrypt's N."""

    __slots__ = ("_passphrase", "work_factor")

    def __init__(self, passphrase: str | bytes, work_factor: int = DEFAULT_WORK_FACTOR) -> None:
        _check_work_factor(work_factor)
        self._passphrase = passphrase.encode() if isinstance(passphrase, str) else passphrase
        if not self._passphrase:
            raise InvalidRequest("the passphrase is empty")
        self.work_factor = work_factor

    def wrap(self, file_key: bytes) -> list[Stanza]:
        salt = os.urandom(16)
        key = _scrypt(self._passphrase, salt, self.work_factor)
        args = (b64encode(salt).decode(), str(self.work_factor))
        return [Stanza("scrypt", args, _seal_file_key(key, file_key))]

    def __repr__(self) -> str:
        return f"ScryptRecipient(work_factor={self.work_factor})"


class ScryptIdentity:
    """A passphrase, for decryption; refuses work factors above ``max_work_factor``
    (a file could otherwise make us compute for hours)."""

    __slots__ = ("_passphrase", "max_work_factor")

    def __init__(self, passphrase: str | bytes, max_work_factor: int = MAX_WORK_FACTOR) -> None:
        _check_work_factor(max_work_factor)
        self._passphrase = passphrase.encode() if isinstance(passphrase, str) else passphrase
        self.max_work_factor = max_work_factor

    def unwrap(self, stanzas: Sequence[Stanza]) -> bytes | None:
        for stanza in stanzas:
            if stanza.type != "scrypt":
                continue
            if len(stanza.args) != 2:
                raise HeaderError("an scrypt stanza must have exactly two arguments")
            salt = b64decode(stanza.args[0].encode())
            if len(salt) != 16:
                raise HeaderError("an scrypt salt is not 16 bytes")
            if _DECIMAL.fullmatch(stanza.args[1]) is None or len(stanza.args[1]) > 2:
                raise HeaderError("an scrypt work factor is not a plain decimal number")
            log_n = int(stanza.args[1])
            if log_n > self.max_work_factor or log_n > 30:
                raise HeaderError(
                    f"the scrypt work factor {log_n} exceeds the limit {self.max_work_factor}"
                )
            if len(stanza.body) != FILE_KEY_SIZE + 16:
                raise HeaderError("a wrapped file key is not 16 bytes")
            file_key = _open_file_key(_scrypt(self._passphrase, salt, log_n), stanza.body)
            if file_key is not None:
                return file_key
        return None

    def __repr__(self) -> str:
        return f"ScryptIdentity(max_work_factor={self.max_work_factor})"


def _scrypt(passphrase: bytes, salt: bytes, log_n: int) -> bytes:
    kdf = Scrypt(salt=_SCRYPT_LABEL + salt, length=32, n=1 << log_n, r=8, p=1)
    return kdf.derive(passphrase)


def header_mac(file_key: bytes, header: Header) -> bytes:
    key = _hkdf(file_key, None, b"header")
    return hmac.new(key, header.encode_for_mac(), "sha256").digest()


def payload_key(file_key: bytes, nonce: bytes) -> bytes:
    return _hkdf(file_key, nonce, b"payload")


def build_header(recipients: Sequence[Recipient], file_key: bytes) -> Header:
    """Wrap ``file_key`` for every recipient and MAC the result."""
    if not recipients:
        raise InvalidRequest("no recipient or passphrase to encrypt to")
    stanzas = [s for r in recipients for s in r.wrap(file_key)]
    if any(s.type == "scrypt" for s in stanzas) and len(stanzas) != 1:
        raise InvalidRequest("a passphrase cannot be combined with other recipients")
    unsigned = Header(tuple(stanzas))
    return Header(unsigned.stanzas, header_mac(file_key, unsigned))


def unwrap_file_key(header: Header, identities: Iterable[Identity]) -> bytes | None:
    """The file key if an identity unwraps a stanza and the MAC matches; None if no
    identity matches; ``HeaderMacMismatch`` if the MAC does not."""
    if any(s.type == "scrypt" for s in header.stanzas) and len(header.stanzas) != 1:
        raise HeaderError("an scrypt stanza must be alone in the header")
    for identity in identities:
        file_key = identity.unwrap(header.stanzas)
        if file_key is None:
            continue
        if not hmac.compare_digest(header_mac(file_key, header), header.mac):
            raise HeaderMacMismatch("the age header's MAC does not match: it was altered")
        return file_key
    return None


_K = TypeVar("_K")


def _parse_lines(text: str, parse: Callable[[str], _K], file: str, item: str) -> list[_K]:
    """Each line of a key file through ``parse``: ``#`` comments and blank lines
    skipped; a bad line is named by number (never by its contents: it may be a key)."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            out.append(parse(line))
        except UnsupportedRecipient:
            raise
        except KeyRejected:
            raise KeyRejected(f"line {number} of the {file} file is not {item}") from None
    return out


def parse_identities(text: str) -> list[X25519Identity]:
    """An identity file as age-keygen writes it: one key a line, ``#`` comments."""
    out = _parse_lines(text, X25519Identity.parse, "identity", "an identity")
    if not out:
        raise KeyRejected("the identity file holds no identity")
    return out


def parse_recipients(text: str) -> list[X25519Recipient]:
    """A recipients file: one ``age1...`` a line, ``#`` comments and blank lines."""
    return _parse_lines(text, X25519Recipient.parse, "recipients", "a recipient")


__all__ = [
    "DEFAULT_WORK_FACTOR",
    "FILE_KEY_SIZE",
    "MAX_WORK_FACTOR",
    "NONCE_SIZE",
    "Identity",
    "Recipient",
    "ScryptIdentity",
    "ScryptRecipient",
    "UnsupportedRecipient",
    "X25519Identity",
    "X25519Recipient",
    "build_header",
    "header_mac",
    "parse_identities",
    "parse_recipients",
    "payload_key",
    "unwrap_file_key",
]
