"""Authenticated file and pipe encryption in the age v1 format.

    import cryptoplane.stream as cps
    me = cps.X25519Identity.generate()
    cps.encrypt("plain.bin", "secret.age", recipients=[str(me.recipient)])
    cps.decrypt("secret.age", "plain.out", identities=[me])

Files interoperate with age, rage and pyrage (X25519 and passphrase recipients, ASCII
armor); the payload is sealed and opened on every core.
"""

from .aio import adecrypt, aencrypt
from .api import Decryptor, Encryptor, decrypt, encrypt
from .errors import (
    ArmorError,
    ChunkTampered,
    EmptyFinalChunk,
    HeaderError,
    HeaderMacMismatch,
    NoIdentityMatched,
    PayloadError,
    TrailingData,
    Truncated,
)
from .reader import SeekableReader
from .recipients import (
    ScryptIdentity,
    ScryptRecipient,
    UnsupportedRecipient,
    X25519Identity,
    X25519Recipient,
    parse_identities,
    parse_recipients,
)

__all__ = [
    "ArmorError",
    "ChunkTampered",
    "Decryptor",
    "EmptyFinalChunk",
    "Encryptor",
    "HeaderError",
    "HeaderMacMismatch",
    "NoIdentityMatched",
    "PayloadError",
    "ScryptIdentity",
    "ScryptRecipient",
    "SeekableReader",
    "TrailingData",
    "Truncated",
    "UnsupportedRecipient",
    "X25519Identity",
    "X25519Recipient",
    "adecrypt",
    "aencrypt",
    "decrypt",
    "encrypt",
    "parse_identities",
    "parse_recipients",
]
