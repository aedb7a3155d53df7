"""asyncio variants: encrypt or decrypt from a ``StreamReader`` to a ``StreamWriter``.

The crypto of each block (and the scrypt of a passphrase) runs in a worker thread so the
event loop keeps serving other connections; the writer is drained after each block, so
memory stays one block whatever the stream's length.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from .api import Decryptor, Encryptor
from .recipients import DEFAULT_WORK_FACTOR, MAX_WORK_FACTOR, Identity, Recipient

BLOCK = 1 << 20


async def aencrypt(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   recipients: Iterable[Recipient | str] = (), *,
                   passphrase: str | bytes | None = None, armor: bool = False,
                   work_factor: int = DEFAULT_WORK_FACTOR) -> int:
    """Encrypt everything ``reader`` yields to EOF into ``writer``; plaintext bytes."""
    targets = list(recipients)
    enc = await asyncio.to_thread(Encryptor, targets, passphrase=passphrase, armor=armor,
                                  work_factor=work_factor)
    total = 0
    while data := await reader.read(BLOCK):
        total += len(data)
        writer.write(await asyncio.to_thread(enc.update, data))
        await writer.drain()
    writer.write(await asyncio.to_thread(enc.finish))
    await writer.drain()
    return total


async def adecrypt(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   identities: Iterable[Identity | str] = (), *,
                   passphrase: str | bytes | None = None, armor: bool | None = None,
                   max_work_factor: int = MAX_WORK_FACTOR) -> int:
    """Decrypt what ``reader`` yields into ``writer``; only authenticated plaintext is
    written. Returns the plaintext bytes."""
    dec = Decryptor(identities, passphrase=passphrase, armor=armor,
                    max_work_factor=max_work_factor)
    total = 0
    while data := await reader.read(BLOCK):
        plain = await asyncio.to_thread(dec.update, data)
        total += len(plain)
        writer.write(plain)
        await writer.drain()
    plain = await asyncio.to_thread(dec.finish)
    total += len(plain)
    writer.write(plain)
    await writer.drain()
    return total


__all__ = ["adecrypt", "aencrypt"]
