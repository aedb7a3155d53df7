"""STREAM chunks (age's payload) in pure Python: many ChaCha20-Poly1305 chunks per call.

The contract that the native ``_chunks`` module gives the same bytes and errors for:

* a chunk's nonce is its counter, 11 bytes big-endian, then one flag byte: 1 for the
  stream's final chunk, else 0 (age-encryption.org/v1, the STREAM construction);
* ``seal_chunks`` encrypts ``src`` as chunks of ``chunk_size`` bytes starting at
  ``counter``; with ``final`` the last chunk is ``src``'s tail (0 to ``chunk_size``
  bytes: an empty ``src`` seals one empty final chunk) and carries the final flag;
  without it ``src`` must be a positive multiple of ``chunk_size``. Each chunk becomes
  chunk || 16-byte tag in ``dst``;
* ``open_chunks`` is the inverse over chunks of ``chunk_size + 16`` bytes; with
  ``final`` the last chunk is ``src``'s tail (16 to ``chunk_size + 16`` bytes).
  A chunk that fails authentication raises ``ChunkAuthenticationFailed`` with its index
  in the call; what ``dst`` holds then is undefined and must not be released.

Both return the number of bytes written to ``dst`` (a writable buffer, large enough).
"""

from __future__ import annotations

from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

# the native module raises this very class, looked up here by name
from cryptoplane.exceptions import ChunkAuthenticationFailed, InvalidRequest

__all__ = ["ChunkAuthenticationFailed", "nonce", "open_chunks", "seal_chunks"]

TAG = 16
MAX_COUNTER = 1 << 88


def nonce(counter: int, final: bool) -> bytes:
    """The 12-byte nonce of chunk number ``counter``."""
    return counter.to_bytes(11, "big") + (b"\x01" if final else b"\x00")


def _spans(total: int, unit: int, final: bool, least: int) -> list[tuple[int, int]]:
    """(start, length) of each chunk of a ``total``-byte input cut in ``unit``s."""
    if final:
        if total < least:
            raise InvalidRequest(f"a final batch needs at least {least} bytes, got {total}")
        # ceil: a full last chunk is the final one (only an empty stream ends empty)
        count = max(1, -(-total // unit))
        spans = [(i * unit, unit) for i in range(count - 1)]
        tail = total - (count - 1) * unit
        if tail < least:
            raise InvalidRequest(f"the final chunk needs at least {least} bytes, got {tail}")
        spans.append((total - tail, tail))
        return spans
    if total == 0 or total % unit:
        raise InvalidRequest(f"a non-final batch must be whole chunks of {unit} bytes, "
                             f"got {total}")
    return [(i * unit, unit) for i in range(total // unit)]


def _check(key: bytes, counter: int, chunks: int, chunk_size: int) -> None:
    if len(key) != 32:
        raise InvalidRequest("a STREAM key is 32 bytes")
    if chunk_size <= 0:
        raise InvalidRequest("chunk_size must be positive")
    if counter < 0 or counter + chunks > MAX_COUNTER:
        raise InvalidRequest("STREAM chunk counter out of range (2**88 chunks)")


def seal_chunks(key: bytes, src: Any, dst: Any, *, counter: int, final: bool,
                chunk_size: int = 65536) -> int:
    if chunk_size <= 0:
        raise InvalidRequest("chunk_size must be positive")
    source = memoryview(src).cast("B")
    out = memoryview(dst).cast("B")
    spans = _spans(len(source), chunk_size, final, 0)
    _check(key, counter, len(spans), chunk_size)
    if out.readonly or len(out) < len(source) + TAG * len(spans):
        raise InvalidRequest("dst must be writable and hold every chunk and its tag")
    aead = ChaCha20Poly1305(bytes(key))
    pos = 0
    last = len(spans) - 1
    for i, (start, length) in enumerate(spans):
        sealed = aead.encrypt(nonce(counter + i, final and i == last),
                              source[start:start + length], None)
        out[pos:pos + len(sealed)] = sealed
        pos += len(sealed)
    return pos


def open_chunks(key: bytes, src: Any, dst: Any, *, counter: int, final: bool,
                chunk_size: int = 65536) -> int:
    if chunk_size <= 0:
        raise InvalidRequest("chunk_size must be positive")
    source = memoryview(src).cast("B")
    out = memoryview(dst).cast("B")
    spans = _spans(len(source), chunk_size + TAG, final, TAG)
    _check(key, counter, len(spans), chunk_size)
    if out.readonly or len(out) < len(source) - TAG * len(spans):
        raise InvalidRequest("dst must be writable and hold every chunk's plaintext")
    aead = ChaCha20Poly1305(bytes(key))
    pos = 0
    last = len(spans) - 1
    for i, (start, length) in enumerate(spans):
        try:
            plain = aead.decrypt(nonce(counter + i, final and i == last),
                                 source[start:start + length], None)
        except InvalidTag:
            raise ChunkAuthenticationFailed(i) from None
        out[pos:pos + len(plain)] = plain
        pos += len(plain)
    return pos
