"""Bulk streams (ENCRYPT_STREAM, DECRYPT_STREAM), sans-I/O: a payload of any size sealed
as a chunked, authenticated ciphertext under a fresh data key that a named key wraps, so
a server can encrypt what its clients send without any client holding a key.

``StreamEncryptJob`` and ``StreamDecryptJob`` take bytes and give bytes; the server
(``server.py``) and the client drive them. Memory per job is bounded: at most one chunk
(64 KiB, + its tag) is held between calls, whatever the stream's length.

Format, version 1 (integers big-endian, unsigned)::

    offset  size  field
    0       5     magic        b"CPFS1"
    5       1     algorithm    1: ChaCha20-Poly1305, the age STREAM (the only one)
    6       4     chunk size   plaintext bytes per chunk: 65536 (the only one)
    10      16    salt         random, fresh per stream
    26      2     L            length of the wrapped data key, 1..4096
    28      L     wrapped      the 256-bit data key, wrapped by the named key: transit's
                               ciphertext blob, which names the key version that wrapped it
    28+L    ...   chunks       the STREAM (below), to the end of the stream

The chunk key is ``HKDF-SHA256(ikm=data key, salt=salt, info=INFO || header)`` (32 bytes)
where ``header`` is bytes 0..28+L above: any change to the header, or a header moved
onto another stream's chunks, gives another chunk key and the first chunk fails.

The chunks are age's payload STREAM (``stream/payload.py``) under the chunk key: the
plaintext in chunks of 65536 bytes, chunk ``i`` sealed with ChaCha20-Poly1305 under the
nonce ``i`` (11 bytes) || final flag (1 byte), no AAD, as ``chunk || 16-byte tag``. The last
chunk, and only it, has the final flag; it may be short, and is empty only when the whole
payload is (an empty payload is one 16-byte chunk). A chunk changed, dropped, repeated or
moved, a stream cut anywhere after the header (no final chunk), or bytes after the final
chunk: the chunk where it shows fails its tag, ``AuthenticationFailed``. A header that
does not parse: ``InvalidRequest``. The whole ciphertext is ``28 + L + n + 16 *
max(1, ceil(n / 65536))`` bytes for ``n`` bytes of plaintext.

ChaCha20-Poly1305 and not AES-256-GCM: the plane's native chunk kernel (``_native/
chunks.c``: one EVP context per run, the GIL released) is ChaCha's, ~3.2 GiB/s per core
here; OpenSSL's GCM is only ~10% faster on this CPU (``openssl speed`` at 64 KiB: 4.1 vs
3.7 GB/s), not worth a second kernel. The algorithm byte leaves room for one.

Cost: a ``feed`` of a 1 MiB piece is one or two kernel calls into a fresh output buffer
plus a few Python statements: encrypt ran at ~98% of the bare ``plane.seal_chunks`` (into
a fresh buffer), decrypt of unaligned 1 MiB pieces at ~93% of ``open_chunks`` (it copies
the piece's first and last partial chunks into ``hold``). Input is read in place.

How a server drives a job: the kernel releases the GIL, so a server with more than one
core runs ``feed`` of pieces >= 256 KiB in a thread pool (``await
loop.run_in_executor(pool, job.feed, piece)``; for smaller pieces the hand-off costs
about as much as it frees), and ``start`` and the decrypt job's first ``feed`` there too
(they make or unwrap the data key, which may wait on the keystore). Calls on one job must
not overlap: await one before the next. ``kernels.chunks.releases_gil()`` says whether
the native kernel is in use (its Python twin holds the GIL: threads would only add
switching). The plane should have an inline engine (``Plane()`` does): chunks then run on
its fast path in the calling thread; without one each run is a queued request.

The jobs return fresh ``bytearray`` pieces that they never touch again: send them as they
are (``writelines`` after ``codec.header_bytes``), no copy needed. ``alloc`` makes them
(default ``bytearray``; the server's recycles buffers nothing refers to any more). An
encrypt piece is at most ``sealed_size(piece)`` bytes (1 MiB + 256 by default), a decrypt
piece at most ``piece`` bytes.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..exceptions import AuthenticationFailed, ChunkAuthenticationFailed, InvalidRequest
from ..kernels.base import Buffer
from ..plane import Plane
from ..stream.chunks import Runs
from ..stream.payload import CHUNK_SIZE, SEALED_SIZE, TAG_SIZE

__all__ = [
    "CHUNK_SIZE",
    "FIXED_SIZE",
    "MAGIC",
    "PIECE",
    "DataKeys",
    "StreamDecryptJob",
    "StreamEncryptJob",
    "decrypt_all",
    "encrypt_all",
    "header_size",
    "sealed_size",
]

MAGIC = b"CPFS1"
ALGORITHM_CHACHA = 1
SALT_SIZE = 16
MAX_WRAPPED = 4096  # a wrapped 256-bit key is 65 bytes; anything near this is garbage
DATA_KEY_BITS = 256
PIECE = 1 << 20  # plaintext bytes per kernel call and per piece returned
INFO = b"cryptoplane bulk v1 chunk key\x00"

_FIXED = struct.Struct(">5sBI16sH")  # magic, algorithm, chunk size, salt, L
FIXED_SIZE = _FIXED.size  # 28


class DataKeys(Protocol):
    """What a job needs of transit (``fabric/transit``): a fresh data key with its
    wrapped form, and the unwrapping of one. Errors (``KeyNotFound``,
    ``KeyVersionRejected``, ``AuthenticationFailed``...) propagate through the jobs."""

    def datakey(self, tenant: str, name: str, *, bits: int = 256, plaintext: bool = True,
                context: bytes | None = None,
                principal: str = "") -> tuple[bytes | None, bytes]: ...

    def decrypt(self, tenant: str, name: str, ciphertext: bytes, *,
                context: bytes | None = None, principal: str = "") -> bytes: ...


def header_size(wrapped_len: int) -> int:
    return FIXED_SIZE + wrapped_len


def sealed_size(plaintext: int) -> int:
    """The STREAM's bytes for ``plaintext`` bytes (without the header)."""
    return plaintext + TAG_SIZE * max(1, -(-plaintext // CHUNK_SIZE))


def _chunk_key(data_key: bytes, salt: bytes, header: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt, INFO + header).derive(data_key)


def _pack_header(wrapped: bytes) -> tuple[bytes, bytes]:
    if not 1 <= len(wrapped) <= MAX_WRAPPED:
        raise InvalidRequest(f"a wrapped data key of {len(wrapped)} bytes")
    salt = os.urandom(SALT_SIZE)
    return _FIXED.pack(MAGIC, ALGORITHM_CHACHA, CHUNK_SIZE, salt, len(wrapped)) + wrapped, salt


def _piece_chunks(piece: int) -> int:
    if not isinstance(piece, int) or piece < CHUNK_SIZE:
        raise InvalidRequest(f"piece must be at least {CHUNK_SIZE} bytes, got {piece!r}")
    return piece // CHUNK_SIZE


class _Chunker:
    """The hold-back loop shared by both directions: input arrives in any split; whole
    chunks of ``size`` input bytes go to ``op`` (``Runs.seal_now``/``open_now``) in runs of
    at most ``batch`` chunks, each run into a fresh output buffer; a whole chunk is held
    back until a byte follows it, because only then is it known not to be the last. Input
    is read in place where it can be: only the tail (under one chunk, or the last whole
    one) is copied, into ``hold``."""

    __slots__ = ("_hold", "_view", "alloc", "batch", "counter", "held", "op", "out_size",
                 "size")

    def __init__(self, runs: Runs, seal: bool, batch: int,
                 alloc: Callable[[int], bytearray] = bytearray) -> None:
        self.alloc = alloc  # output buffers (a server recycles them: fabric/bufpool.py)
        self.size, self.out_size = (CHUNK_SIZE, SEALED_SIZE) if seal else (SEALED_SIZE,
                                                                          CHUNK_SIZE)
        self.op = runs.seal_now if seal else runs.open_now
        self.batch = batch
        self._hold = bytearray(self.size)
        self._view = memoryview(self._hold)
        self.held = 0
        self.counter = 0  # the number of the next chunk

    def feed(self, data: memoryview) -> list[bytearray]:
        size, held = self.size, self.held
        pos = 0
        first: memoryview | None = None
        if held:
            pos = min(size - held, len(data))
            self._view[held:held + pos] = data[:pos]
            held += pos
            if held < size or pos == len(data):
                self.held = held
                return []
            first = self._view  # full, and a byte follows it: not the last chunk
        rest = len(data) - pos
        whole = (rest - 1) // size if rest else 0
        if first is None and not whole:
            self._view[:rest] = data[pos:]
            self.held = rest
            return []
        out = self._run(first, data[pos:pos + whole * size])
        tail = data[pos + whole * size:]
        self._view[:len(tail)] = tail
        self.held = len(tail)
        return out

    def _run(self, first: memoryview | None, direct: memoryview) -> list[bytearray]:
        """Chunks ``first`` (one held chunk, if any) then ``direct`` (whole chunks), none
        of them final, in buffers of at most ``batch`` chunks."""
        size, out_size, op = self.size, self.out_size, self.op
        count = (first is not None) + len(direct) // size
        pieces: list[bytearray] = []
        at = 0  # chunks of ``direct`` done
        while count:
            n = min(count, self.batch)
            buf = self.alloc(n * out_size)  # written whole below
            with memoryview(buf) as dst:
                filled = 0
                if first is not None:
                    op(first, dst[:out_size], self.counter, False)
                    self.counter += 1
                    filled, first = 1, None
                if n > filled:
                    k = n - filled
                    op(direct[at * size:(at + k) * size], dst[filled * out_size:],
                       self.counter, False)
                    self.counter += k
                    at += k
            pieces.append(buf)
            count -= n
        return pieces

    def finish(self) -> bytearray:
        """The held bytes as the final chunk (empty: an empty final chunk)."""
        held = self.held
        buf = bytearray(held + (TAG_SIZE if self.size == CHUNK_SIZE else -TAG_SIZE))
        self.op(self._view[:held], buf, self.counter, True)
        self.counter += 1
        self.held = 0
        return buf


def _view(data: Buffer) -> memoryview:
    try:
        return memoryview(data).cast("B")
    except TypeError:
        raise InvalidRequest(f"expected bytes, not {type(data).__name__}") from None


class StreamEncryptJob:
    """One ENCRYPT_STREAM: ``start()`` (the header: makes the data key), then ``feed``
    the plaintext in any split, then ``finish()``. Each returns what is ready to send.
    ``buffered``: the plaintext bytes held between calls (at most one chunk)."""

    def __init__(self, keys: DataKeys, tenant: str, key_name: str, *,
                 context: bytes | None = None, plane: Plane, piece: int = PIECE,
                 principal: str = "", alloc: Callable[[int], bytearray] = bytearray) -> None:
        self._keys, self._tenant, self._name, self._context = keys, tenant, key_name, context
        self._alloc = alloc  # of the pieces returned (a server recycles them)
        self._principal = principal  # who asked, for transit's record of key use
        self._plane = plane
        self._batch = _piece_chunks(piece)
        self._chunker: _Chunker | None = None
        self._done = False

    def __repr__(self) -> str:  # never a key
        state = "finished" if self._done else "open" if self._chunker else "new"
        return f"<StreamEncryptJob {self._name!r} {state}>"

    @property
    def buffered(self) -> int:
        return self._chunker.held if self._chunker is not None else 0

    def start(self) -> bytes:
        if self._chunker is not None or self._done:
            raise InvalidRequest("this stream has already started")
        data_key, wrapped = self._keys.datakey(self._tenant, self._name,
                                               bits=DATA_KEY_BITS, plaintext=True,
                                               context=self._context,
                                               principal=self._principal)
        if data_key is None or len(data_key) != DATA_KEY_BITS // 8:
            raise InvalidRequest("transit gave no 256-bit data key")
        header, salt = _pack_header(wrapped)
        runs = Runs(_chunk_key(data_key, salt, header), self._plane)
        self._chunker = _Chunker(runs, True, self._batch, self._alloc)
        return header

    def _open(self) -> _Chunker:
        if self._done:
            raise InvalidRequest("this stream is finished")
        if self._chunker is None:
            raise InvalidRequest("start() the stream first")
        return self._chunker

    def feed(self, data: Buffer) -> list[bytearray]:
        """Ciphertext for the plaintext so far: whole chunks, the last held back."""
        return self._open().feed(_view(data))

    def finish(self) -> list[bytearray]:
        """The final chunk; the job is then done."""
        chunker = self._open()
        self._done = True
        self._chunker = None  # the chunk key goes with it
        return [chunker.finish()]


class StreamDecryptJob:
    """One DECRYPT_STREAM: ``feed`` the ciphertext (header and chunks) in any split, then
    ``finish()``. Returns plaintext of authenticated chunks only; the first failure
    (``InvalidRequest`` for a header that does not parse, ``AuthenticationFailed`` for a
    changed, reordered, cut or extended stream, or what unwrapping the data key raises)
    ends the job: every later call raises it again. The plaintext returned before it is
    the stream's, whole chunks from the start; but a cut at a chunk boundary shows only
    at ``finish``, so a consumer holds the plaintext as unfinished until ``finish``
    returns. ``buffered``: bytes held between calls (at most the header, or one sealed
    chunk)."""

    def __init__(self, keys: DataKeys, tenant: str, key_name: str, *,
                 context: bytes | None = None, plane: Plane, piece: int = PIECE,
                 principal: str = "", alloc: Callable[[int], bytearray] = bytearray) -> None:
        self._keys, self._tenant, self._name, self._context = keys, tenant, key_name, context
        self._alloc = alloc  # of the pieces returned (a server recycles them)
        self._principal = principal  # who asked, for transit's record of key use
        self._plane = plane
        self._batch = _piece_chunks(piece)
        self._head = bytearray()
        self._chunker: _Chunker | None = None
        self._done = False
        self._error: BaseException | None = None

    def __repr__(self) -> str:
        state = "finished" if self._done else "open" if self._chunker else "header"
        return f"<StreamDecryptJob {self._name!r} {state}>"

    @property
    def buffered(self) -> int:
        return self._chunker.held if self._chunker is not None else len(self._head)

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._done:
            raise InvalidRequest("this stream is finished")

    def feed(self, data: Buffer) -> list[bytearray]:
        self._check()
        try:
            view = _view(data)
            if self._chunker is None:
                view = self._header(view)
                if self._chunker is None:
                    return []
            return self._chunker.feed(view)
        except ChunkAuthenticationFailed:
            raise self._fail(_tampered()) from None
        except Exception as e:
            self._fail(e)
            raise

    def finish(self) -> list[bytearray]:
        self._check()
        self._done = True
        try:
            if self._chunker is None:
                raise InvalidRequest(f"the stream ends inside its header "
                                     f"({len(self._head)} bytes)")
            chunker = self._chunker
            if chunker.held < TAG_SIZE or (chunker.held == TAG_SIZE and chunker.counter):
                raise AuthenticationFailed("the stream is truncated: it stops before its "
                                           "final chunk")
            self._chunker = None  # the chunk key goes with it
            return [chunker.finish()]
        except ChunkAuthenticationFailed:
            raise self._fail(AuthenticationFailed(
                "the last chunk failed authentication as the final one: the stream is "
                "truncated, or changed")) from None
        except Exception as e:
            self._fail(e)
            raise

    def _fail(self, error: BaseException) -> BaseException:
        self._error = error
        self._head = bytearray()
        self._chunker = None  # drop the held bytes and the chunk key
        return error

    def _header(self, view: memoryview) -> memoryview:
        """Collect the header from ``view``; once whole, unwrap the data key and set up
        the chunks. Returns what follows the header (empty until it is whole)."""
        head = self._head
        while True:
            need = FIXED_SIZE + (_wrapped_len(head) if len(head) >= FIXED_SIZE else 0)
            take = min(need - len(head), len(view))
            head += view[:take]
            view = view[take:]
            if len(head) < need:
                if head[:len(MAGIC)] != MAGIC[:len(head)]:  # refuse garbage at once
                    raise InvalidRequest("not a cryptoplane bulk stream (bad magic)")
                return view
            if need > FIXED_SIZE:
                break
            _check_fixed(head)  # the fixed part is whole: now the wrapped key's length
        header = bytes(head)
        data_key = self._keys.decrypt(self._tenant, self._name, header[FIXED_SIZE:],
                                      context=self._context, principal=self._principal)
        if len(data_key) != DATA_KEY_BITS // 8:
            raise InvalidRequest("the wrapped data key is not a 256-bit key")
        salt = header[10:10 + SALT_SIZE]
        runs = Runs(_chunk_key(data_key, salt, header), self._plane)
        self._chunker = _Chunker(runs, False, self._batch, self._alloc)
        self._head = bytearray()
        return view


def _tampered() -> AuthenticationFailed:
    return AuthenticationFailed("a chunk failed authentication: changed, dropped, reordered, "
                                "or bytes after the final chunk")


def _wrapped_len(head: bytearray) -> int:
    return int.from_bytes(head[FIXED_SIZE - 2:FIXED_SIZE], "big")


def _check_fixed(head: bytearray) -> None:
    """Refuse the fixed part's fields where they are not version 1's."""
    magic, algorithm, chunk, _salt, wrapped_len = _FIXED.unpack_from(head)
    if magic != MAGIC:
        raise InvalidRequest("not a cryptoplane bulk stream (bad magic)")
    if algorithm != ALGORITHM_CHACHA:
        raise InvalidRequest(f"unknown bulk stream algorithm {algorithm}")
    if chunk != CHUNK_SIZE:
        raise InvalidRequest(f"unsupported bulk chunk size {chunk}")
    if not 1 <= wrapped_len <= MAX_WRAPPED:
        raise InvalidRequest(f"a wrapped data key of {wrapped_len} bytes")


def encrypt_all(keys: DataKeys, tenant: str, key_name: str, data: Buffer, plane: Plane, *,
                context: bytes | None = None) -> bytes:
    """The whole ciphertext of ``data`` (for tests and small payloads)."""
    job = StreamEncryptJob(keys, tenant, key_name, context=context, plane=plane)
    parts: list[Buffer] = [job.start()]
    parts += job.feed(data)
    parts += job.finish()
    return b"".join(parts)


def decrypt_all(keys: DataKeys, tenant: str, key_name: str, data: Buffer, plane: Plane, *,
                context: bytes | None = None) -> bytes:
    """The whole plaintext of a bulk ciphertext, or its error."""
    job = StreamDecryptJob(keys, tenant, key_name, context=context, plane=plane)
    parts: list[Buffer] = []
    parts += job.feed(data)
    parts += job.finish()
    return b"".join(parts)
