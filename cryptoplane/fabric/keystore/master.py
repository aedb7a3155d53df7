"""The master key: what every stored key version is wrapped under.

Wrapping is AES-256-GCM with a random 96-bit nonce; the AAD binds the tenant, key name,
version and master key id, so a wrapped blob copied into another row (another tenant's,
another version's) fails to unwrap instead of handing out the wrong key. A random nonce
is safe here: a master key wraps far fewer than the 2^32 blobs where collisions start
to matter for GCM.

The id names a master key in rows and errors without revealing anything about it: the
first 8 hex digits of SHA-256 over a fixed label and the key. The store also keeps a
full-length check value (HMAC of another label) per master id, so a wrong key is refused
with ``MasterKeyRejected`` at open instead of failing later, key by key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ...exceptions import CryptoplaneError

KEY_SIZE = 32
NONCE_SIZE = 12
_ID_LABEL = b"cryptoplane keystore master key id v1\0"
_CHECK_LABEL = b"cryptoplane keystore master key check v1\0"
_AAD_LABEL = b"cryptoplane keystore wrap v1\0"

# argon2id costs for a passphrase-derived master key: RFC 9106's second recommended
# option (t=3, 64 MiB, p=4 there; p=1 here so the cost does not depend on core count).
# Derivation happens once per process start, so a quarter second is affordable.
KDF_TIME_COST = 3
KDF_MEMORY_KIB = 64 * 1024
KDF_PARALLELISM = 1
KDF_SALT_SIZE = 16


class MasterKeyRejected(CryptoplaneError):
    """The master key given does not open this store (wrong key, or a key the store
    still needs was not given, e.g. the old key during an unfinished rotation)."""


class UnwrapFailed(CryptoplaneError):
    """A stored key version did not authenticate under its master key: the row was
    tampered with or moved, or the master key is not the one that wrapped it."""


class MasterKey:
    """32 secret bytes and their public id. ``repr`` shows the id only."""

    __slots__ = ("_aead", "_key", "id")

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes | bytearray) or len(key) != KEY_SIZE:
            raise MasterKeyRejected(f"a master key is exactly {KEY_SIZE} bytes")
        self._key = bytes(key)
        self._aead = AESGCM(self._key)
        self.id: str = hashlib.sha256(_ID_LABEL + self._key).hexdigest()[:8]

    def __repr__(self) -> str:
        return f"MasterKey(id={self.id})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MasterKey) and hmac.compare_digest(self._key, other._key)

    def __hash__(self) -> int:
        return hash(self.id)

    # -- constructors ---------------------------------------------------------------

    @classmethod
    def generate(cls) -> MasterKey:
        return cls(os.urandom(KEY_SIZE))

    @classmethod
    def from_text(cls, text: str | bytes, what: str = "master key") -> MasterKey:
        """64 hex digits or base64 (standard or URL-safe) of 32 bytes."""
        raw = text.strip() if isinstance(text, bytes) else text.strip().encode("ascii",
                                                                               "replace")
        if len(raw) == 2 * KEY_SIZE:
            try:
                return cls(binascii.unhexlify(raw))
            except (binascii.Error, ValueError):
                pass
        try:
            key = base64.b64decode(raw.replace(b"-", b"+").replace(b"_", b"/")
                                   + b"=" * (-len(raw) % 4), validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if len(key) != KEY_SIZE:  # never echo the text: it may be (nearly) the key
            raise MasterKeyRejected(f"{what}: expected {KEY_SIZE} bytes as 64 hex digits "
                                    "or base64")
        return cls(key)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> MasterKey:
        """A file of 32 raw bytes, or of 64 hex digits (a trailing newline is fine)."""
        data = Path(path).read_bytes()
        if len(data) == KEY_SIZE:
            return cls(data)
        return cls.from_text(data, f"master key file {os.fspath(path)}")

    @classmethod
    def ring_from_file(cls, path: str | os.PathLike[str]) -> tuple[MasterKey,
                                                                   list[MasterKey]]:
        """A master-key file that may hold several keys, one per line (hex or base64;
        blank lines and ``#`` comments skipped): the first wraps, the others only unwrap.
        That is how a rotation runs without a restart: put the new key on top, reload
        the servers (SIGHUP), run ``cryptoplane keystore rotate-master``, then drop the
        old line and reload again. A file of exactly 32 raw bytes is one key."""
        data = Path(path).read_bytes()
        if len(data) == KEY_SIZE and b"\n" not in data.strip():
            return cls(data), []
        what = f"master key file {os.fspath(path)}"
        keys = [cls.from_text(line, what) for line in data.splitlines()
                if line.strip() and not line.lstrip().startswith(b"#")]
        if not keys:
            raise MasterKeyRejected(f"{what}: no key in it")
        return keys[0], keys[1:]

    @classmethod
    def from_env(cls, var: str = "CRYPTOPLANE_MASTER_KEY") -> MasterKey:
        """An environment variable holding hex or base64."""
        text = os.environ.get(var)
        if not text:
            raise MasterKeyRejected(f"environment variable {var} is not set")
        return cls.from_text(text, f"environment variable {var}")

    @classmethod
    def from_passphrase(cls, passphrase: str | bytes, salt: bytes) -> MasterKey:
        """argon2id over the passphrase (costs above); the store keeps the salt."""
        from argon2.low_level import Type, hash_secret_raw
        secret = passphrase.encode() if isinstance(passphrase, str) else passphrase
        if not secret:
            raise MasterKeyRejected("empty passphrase")
        return cls(hash_secret_raw(secret, salt, time_cost=KDF_TIME_COST,
                                   memory_cost=KDF_MEMORY_KIB, parallelism=KDF_PARALLELISM,
                                   hash_len=KEY_SIZE, type=Type.ID))

    # -- what the store uses ----------------------------------------------------------

    def check_value(self) -> str:
        """What the store keeps to recognise this key: reveals nothing about it."""
        return hmac.new(self._key, _CHECK_LABEL, hashlib.sha256).hexdigest()

    def _aad(self, tenant: str, name: str, version: int) -> bytes:
        return b"".join((_AAD_LABEL, tenant.encode(), b"\0", name.encode(), b"\0",
                         struct.pack(">Q", version), self.id.encode()))

    def wrap(self, tenant: str, name: str, version: int, material: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, material, self._aad(tenant, name, version))

    def unwrap(self, tenant: str, name: str, version: int, blob: bytes) -> bytes:
        try:
            return self._aead.decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:],
                                      self._aad(tenant, name, version))
        except (InvalidTag, ValueError):
            raise UnwrapFailed(f"key {name!r} version {version} of tenant {tenant!r} does "
                               f"not unwrap under master key {self.id}") from None


def new_salt() -> bytes:
    return os.urandom(KDF_SALT_SIZE)
