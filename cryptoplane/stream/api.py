"""Encrypt and decrypt age v1 files: whole streams (``encrypt``/``decrypt``) and
incremental objects (``Encryptor``/``Decryptor``).

A file is ``header || 16-byte nonce || STREAM``, maybe armored. This module does the
header side (recipients, file key, MAC, payload key) and hands the payload to
``payload.py``, which seals and opens it on every core. Nothing reads a whole file:
the header is read in small blocks, the payload streams through.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from cryptoplane.exceptions import InvalidRequest
from cryptoplane.plane import Plane

from . import payload as _payload
from ._io import (
    ArmorReader,
    ArmorWriter,
    Prefixed,
    is_path,
    opened,
    read_some,
    refuse_existing,
)
from .armor import ArmorDecoder, ArmorEncoder, looks_armored
from .errors import HeaderError, NoIdentityMatched
from .header import Header, HeaderDecoder
from .recipients import (
    DEFAULT_WORK_FACTOR,
    FILE_KEY_SIZE,
    MAX_WORK_FACTOR,
    NONCE_SIZE,
    Identity,
    Recipient,
    ScryptIdentity,
    ScryptRecipient,
    X25519Identity,
    X25519Recipient,
    build_header,
    payload_key,
    unwrap_file_key,
)

_HEADER_BLOCK = 4096
_MAX_LEAD = 64 * 1024  # whitespace held while telling armor from binary
Progress = Callable[[int], None]


def as_recipients(recipients: Iterable[Recipient | str], passphrase: str | bytes | None,
                  work_factor: int = DEFAULT_WORK_FACTOR) -> list[Recipient]:
    """Recipient objects from objects or ``age1...`` strings, plus the passphrase."""
    out: list[Recipient] = [
        X25519Recipient.parse(r) if isinstance(r, str) else r for r in recipients
    ]
    for r in out:
        if not callable(getattr(r, "wrap", None)):
            raise InvalidRequest(f"{type(r).__name__} is not a recipient "
                                 "(for an identity, pass its .recipient)")
    if passphrase is not None:
        if out:
            raise InvalidRequest("a passphrase cannot be combined with other recipients")
        out.append(ScryptRecipient(passphrase, work_factor))
    if not out:
        raise InvalidRequest("give at least one recipient or a passphrase")
    return out


def as_identities(identities: Iterable[Identity | str], passphrase: str | bytes | None,
                  max_work_factor: int = MAX_WORK_FACTOR) -> list[Identity]:
    """Identity objects from objects or ``AGE-SECRET-KEY-1...`` strings, plus the
    passphrase."""
    out: list[Identity] = [
        X25519Identity.parse(i) if isinstance(i, str) else i for i in identities
    ]
    for i in out:
        if not callable(getattr(i, "unwrap", None)):
            raise InvalidRequest(f"{type(i).__name__} is not an identity")
    if passphrase is not None:
        out.append(ScryptIdentity(passphrase, max_work_factor))
    if not out:
        raise InvalidRequest("give at least one identity or a passphrase")
    return out


def new_file(recipients: Sequence[Recipient]) -> tuple[bytes, bytes]:
    """A fresh file: its header and nonce (the file's first bytes) and payload key."""
    file_key = os.urandom(FILE_KEY_SIZE)
    nonce = os.urandom(NONCE_SIZE)
    header = build_header(recipients, file_key)
    return header.encode() + nonce, payload_key(file_key, nonce)


def open_file_key(header: Header, identities: Sequence[Identity]) -> bytes:
    file_key = unwrap_file_key(header, identities)
    if file_key is None:
        raise NoIdentityMatched(
            "no identity or passphrase matches any recipient of this file "
            "(wrong key or wrong passphrase)")
    return file_key


def _short_nonce() -> HeaderError:
    return HeaderError("the file ends before the 16-byte payload nonce")


def encrypt(src: Any, dst: Any, recipients: Iterable[Recipient | str] = (), *,
            passphrase: str | bytes | None = None, armor: bool = False,
            work_factor: int = DEFAULT_WORK_FACTOR, workers: int | None = None,
            progress: Progress | None = None, overwrite: bool = True,
            plane: Plane | None = None) -> int:
    """Encrypt ``src`` (a path or binary file object) to ``dst`` (a path, written
    atomically, or a binary file object) for ``recipients`` (``age1...`` strings or
    recipient objects) or a ``passphrase``; returns the plaintext bytes. An existing
    ``dst`` file is replaced, keeping its permission bits, unless ``overwrite`` is False
    (then it is a ``FileExistsError``). ``plane``: the plane whose engines seal the
    chunks, and whose limits and statistics cover them (None: the streams' own)."""
    targets = as_recipients(recipients, passphrase, work_factor)
    with opened(src, "rb") as source, opened(dst, "wb", overwrite=overwrite) as sink:
        prefix, key = new_file(targets)
        out: Any = ArmorWriter(sink) if armor else sink
        out.write(prefix)
        size = _payload.seal_payload(key, source, out, workers=workers, progress=progress,
                                     plane=plane)
        if armor:
            out.close()
        return size


def read_header(reader: Any) -> tuple[Header, bytes]:
    """Read a header from ``reader`` in small blocks; the header and the bytes read
    past it."""
    decoder = HeaderDecoder()
    while True:
        data = read_some(reader, _HEADER_BLOCK)
        if not data:
            decoder.eof()
        header = decoder.feed(data)
        if header is not None:
            return header, decoder.rest


def _detect(source: Any, armor: bool | None) -> tuple[bool, bytes]:
    """Whether ``source`` is armored, and the bytes read to tell."""
    lead = b""
    while armor is None:
        data = read_some(source, _HEADER_BLOCK)
        lead += data
        armor = looks_armored(lead)
        if armor is None and len(lead) > _MAX_LEAD:
            armor = True  # only armor may start with whitespace; its decoder drops it
        if not data:
            armor = bool(armor)
    return armor, lead


def open_reader(source: Any, identities: Sequence[Identity],
                armor: bool | None) -> tuple[Any, bytes]:
    """Read up to the payload: a reader positioned at its first chunk, and its key."""
    armored, lead = _detect(source, armor)
    reader: Any = Prefixed(lead, source)
    if armored:
        reader = ArmorReader(reader)
    header, rest = read_header(reader)
    file_key = open_file_key(header, identities)
    while len(rest) < NONCE_SIZE:
        data = read_some(reader, NONCE_SIZE - len(rest))
        if not data:
            raise _short_nonce()
        rest += data
    key = payload_key(file_key, rest[:NONCE_SIZE])
    return Prefixed(rest[NONCE_SIZE:], reader), key


def decrypt(src: Any, dst: Any, identities: Iterable[Identity | str] = (), *,
            passphrase: str | bytes | None = None, armor: bool | None = None,
            max_work_factor: int = MAX_WORK_FACTOR, workers: int | None = None,
            progress: Progress | None = None, overwrite: bool = True,
            plane: Plane | None = None) -> int:
    """Decrypt ``src`` (a path or binary file object; armor detected unless ``armor``
    says) to ``dst``; returns the plaintext bytes. To a path, the file appears only when
    everything authenticated (``overwrite`` as for ``encrypt``); to a file object, only
    authenticated plaintext is written, and a ``PayloadError`` says where it stopped.
    ``plane`` as for ``encrypt``."""
    keys = as_identities(identities, passphrase, max_work_factor)
    if not overwrite and is_path(dst):
        refuse_existing(dst)  # before the header's work (scrypt) is spent
    with opened(src, "rb") as source:
        reader, key = open_reader(source, keys, armor)
        with opened(dst, "wb", overwrite=overwrite) as sink:
            return _payload.open_payload(key, reader, sink, workers=workers,
                                         progress=progress, plane=plane)


class Encryptor:
    """Incremental encryption: ``update(plaintext) -> bytes`` of the file, then
    ``finish() -> bytes``. The header comes out with the first call."""

    def __init__(self, recipients: Iterable[Recipient | str] = (), *,
                 passphrase: str | bytes | None = None, armor: bool = False,
                 work_factor: int = DEFAULT_WORK_FACTOR) -> None:
        prefix, key = new_file(as_recipients(recipients, passphrase, work_factor))
        self._prefix = prefix
        self._sealer = _payload.PayloadSealer(key)
        self._armor = ArmorEncoder() if armor else None

    def _out(self, data: bytes) -> bytes:
        data, self._prefix = self._prefix + data, b""
        return self._armor.update(data) if self._armor is not None else data

    def update(self, data: bytes) -> bytes:
        return self._out(self._sealer.update(data))

    def finish(self) -> bytes:
        out = self._out(self._sealer.finish())
        return out + self._armor.finish() if self._armor is not None else out

    def __repr__(self) -> str:
        return f"<Encryptor armor={self._armor is not None}>"


class Decryptor:
    """Incremental decryption: ``update(file bytes) -> plaintext`` (only authenticated
    plaintext, whole chunks), then ``finish()``, which raises if the file is incomplete
    (the plaintext of a last chunk that authenticated before such an error is dropped).
    Errors: ``HeaderError``/``ArmorError``, ``NoIdentityMatched``,
    ``HeaderMacMismatch``, ``PayloadError`` subclasses."""

    def __init__(self, identities: Iterable[Identity | str] = (), *,
                 passphrase: str | bytes | None = None, armor: bool | None = None,
                 max_work_factor: int = MAX_WORK_FACTOR) -> None:
        self._identities = as_identities(identities, passphrase, max_work_factor)
        self._armor_mode = armor
        self._armor = ArmorDecoder() if armor else None
        self._lead = b""
        self._header = HeaderDecoder()
        self._file_key: bytes | None = None
        self._nonce = b""
        self._opener: _payload.PayloadOpener | None = None

    def __repr__(self) -> str:
        return f"<Decryptor header={'read' if self._file_key else 'pending'}>"

    def update(self, data: bytes) -> bytes:
        data = bytes(data)
        if self._armor_mode is None:
            self._lead += data
            armored = looks_armored(self._lead)
            if armored is None and len(self._lead) > _MAX_LEAD:
                armored = True  # only armor may start with whitespace; its decoder drops it
            if armored is None:
                return b""
            data, self._lead = self._lead, b""
            self._decide(armored)
        if self._armor is not None:
            data = self._armor.feed(data)
        return self._inner(data)

    def _decide(self, armored: bool) -> None:
        self._armor_mode = armored
        self._armor = ArmorDecoder() if armored else None

    def _inner(self, data: bytes) -> bytes:
        if self._opener is None:
            if self._file_key is None:
                header = self._header.feed(data)
                if header is None:
                    return b""
                data, self._header.rest = self._header.rest, b""
                self._file_key = open_file_key(header, self._identities)
            need = NONCE_SIZE - len(self._nonce)
            self._nonce += data[:need]
            data = data[need:]
            if len(self._nonce) < NONCE_SIZE:
                return b""
            self._opener = _payload.PayloadOpener(payload_key(self._file_key, self._nonce))
        return self._opener.update(data)

    def finish(self) -> bytes:
        out = b""
        if self._armor_mode is None:
            data, self._lead = self._lead, b""
            self._decide(False)
            out += self._inner(data)
        if self._armor is not None:
            out += self._inner(self._armor.finish())
        if self._file_key is None:
            self._header.eof()
        if self._opener is None:
            raise _short_nonce()
        out += self._opener.finish()
        # the opener releases authenticated plaintext first and defers its error to the
        # next call; a finish must not look like success, so ask again: it raises the
        # deferred error, or says it is finished
        with contextlib.suppress(InvalidRequest):
            self._opener.finish()
        return out


__all__ = ["Decryptor", "Encryptor", "as_identities", "as_recipients", "decrypt", "encrypt"]
