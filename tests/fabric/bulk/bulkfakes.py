"""A stand-in for transit's data keys (``bulk.DataKeys``): named, versioned AES-256-GCM
keys per tenant, blobs laid out as transit's (``0xC7 | u32 version | nonce | sealed``),
so the jobs are tested without a keystore."""

from __future__ import annotations

import itertools
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cryptoplane.exceptions import AuthenticationFailed, CryptoplaneError, InvalidRequest
from cryptoplane.fabric import bulk
from cryptoplane.fabric.bulk import StreamDecryptJob
from cryptoplane.fabric.errors import KeyNotFound, KeyVersionRejected
from cryptoplane.plane import Plane
from cryptoplane.stream.chunks import Runs
from cryptoplane.stream.payload import SEALED_SIZE

_HEAD = struct.Struct(">BI")


class FakeKeys:
    """``datakey`` and ``decrypt`` as transit's, with ``context`` as the AEAD's AAD (a
    wrong context fails as a wrong derived key would)."""

    def __init__(self) -> None:
        self.versions: dict[tuple[str, str], list[bytes]] = {}
        self.min_version: dict[tuple[str, str], int] = {}

    def create(self, tenant: str, name: str) -> None:
        self.versions[tenant, name] = [AESGCM.generate_key(256)]
        self.min_version[tenant, name] = 1

    def rotate(self, tenant: str, name: str) -> None:
        self.versions[tenant, name].append(AESGCM.generate_key(256))

    def _ring(self, tenant: str, name: str) -> list[bytes]:
        try:
            return self.versions[tenant, name]
        except KeyError:  # another tenant's key reads as a missing one
            raise KeyNotFound(f"no key {name!r}") from None

    def datakey(self, tenant: str, name: str, *, bits: int = 256, plaintext: bool = True,
                context: bytes | None = None,
                principal: str = "") -> tuple[bytes | None, bytes]:
        ring = self._ring(tenant, name)
        key = os.urandom(bits // 8)
        nonce = os.urandom(12)
        sealed = AESGCM(ring[-1]).encrypt(nonce, key, context)
        return (key if plaintext else None), _HEAD.pack(0xC7, len(ring)) + nonce + sealed

    def decrypt(self, tenant: str, name: str, ciphertext: bytes, *, aad: bytes = b"",
                context: bytes | None = None, principal: str = "") -> bytes:
        ring = self._ring(tenant, name)
        if len(ciphertext) < 33 or ciphertext[0] != 0xC7:
            raise InvalidRequest("not a transit ciphertext")
        _, version = _HEAD.unpack_from(ciphertext)
        if not self.min_version[tenant, name] <= version <= len(ring):
            raise KeyVersionRejected(f"key version {version} is not allowed")
        try:
            return AESGCM(ring[version - 1]).decrypt(ciphertext[5:17], ciphertext[17:],
                                                     context)
        except InvalidTag:
            raise AuthenticationFailed("the ciphertext failed authentication") from None


def make_keys() -> FakeKeys:
    """Keys ``files`` and ``other`` for tenant ``acme``, ``files`` for ``globex``."""
    k = FakeKeys()
    k.create("acme", "files")
    k.create("acme", "other")
    k.create("globex", "files")
    return k


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at ``cuts`` (any order, repeats allowed: empty pieces)."""
    points = [0, *sorted(min(max(c, 0), len(data)) for c in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def decrypt_pieces(keys: FakeKeys, ciphertext: bytes, cuts: list[int], plane: Plane, *,
                   tenant: str = "acme", name: str = "files",
                   piece: int = 1 << 20) -> tuple[bytes, BaseException | None]:
    """Feed ``ciphertext`` cut at ``cuts``, then finish: the plaintext released and the
    error that stopped it (None if none)."""
    job = StreamDecryptJob(keys, tenant, name, plane=plane, piece=piece)
    out: list[bytes] = []
    try:
        for p in pieces(ciphertext, cuts):
            got = job.feed(p)
            assert all(len(g) <= piece for g in got)
            out += map(bytes, got)
            assert job.buffered <= SEALED_SIZE
        out += map(bytes, job.finish())
    except CryptoplaneError as e:  # the caller checks its type (an assert is not caught)
        return b"".join(out), e
    return b"".join(out), None


def chunk_runs(keys: FakeKeys, header: bytes, plane: Plane, *, tenant: str = "acme",
               name: str = "files") -> Runs:
    """The chunk key of a stream with this header, to forge chunks a key holder could
    make (a wrong final flag)."""
    data_key = keys.decrypt(tenant, name, header[bulk.FIXED_SIZE:])
    salt = header[10:10 + bulk.SALT_SIZE]
    return Runs(bulk._chunk_key(data_key, salt, header), plane)
