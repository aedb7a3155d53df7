"""The STREAM chunk kernel: ChaCha20-Poly1305 as single AEAD calls and as runs of age's
payload chunks.

A run of chunks is one call into ``_native`` (one EVP context for the whole run, the GIL
released), or into its pure-Python twin where the extension is missing; both take the
key as raw bytes, so the kernel keeps the material beside the AEAD object. The rules of
a run (nonces, the final flag, sizes) are ``_native/chunks_fallback.py``'s contract;
what a stream makes of a failed chunk is the consumer's business (``stream/payload.py``).
"""

from __future__ import annotations

from typing import Any

from .. import _native
from ..algorithms import Algorithm
from ..exceptions import InvalidRequest
from .base import Buffer
from .symmetric import AeadKernel

CHUNK_SIZE = 65536  # plaintext bytes per chunk (age v1)
TAG_SIZE = 16


def releases_gil() -> bool:
    """Whether chunk runs release the GIL here (the native kernel): only then do threads
    spread one stream over several cores; the Python twin holds it."""
    return _native.CHUNKS_BACKEND == "native"


def backend() -> tuple[str, str]:
    """("native" or "python", why not native)."""
    return _native.CHUNKS_BACKEND, _native.CHUNKS_BACKEND_REASON


class ChunkKernel(AeadKernel):
    """``AeadKernel`` plus ``seal_chunks``/``open_chunks``: chunk ``i`` of a run is number
    ``counter + i``; with ``final`` the run ends the stream. Both write into ``out`` and
    return the bytes written; a chunk that fails raises ``ChunkAuthenticationFailed``
    with its index in the run (``out`` is then undefined)."""

    __slots__ = ("material",)

    def __init__(self, algorithm: Algorithm, material: bytes) -> None:
        super().__init__(algorithm, material)
        self.material = bytes(material)

    # _native's functions are looked up per call: tests swap the backend at run time
    def seal_chunks(self, data: Buffer, out: Any, counter: int, final: bool) -> int:
        try:
            return _native.seal_chunks(self.material, data, out, counter=counter,
                                       final=final)
        except (ValueError, TypeError, OverflowError, BufferError) as e:
            if isinstance(e, InvalidRequest):
                raise
            raise InvalidRequest(f"{self.algorithm.name} chunks: {e}") from None

    def open_chunks(self, data: Buffer, out: Any, counter: int, final: bool) -> int:
        try:
            return _native.open_chunks(self.material, data, out, counter=counter,
                                       final=final)
        except (ValueError, TypeError, OverflowError, BufferError) as e:
            if isinstance(e, InvalidRequest):
                raise
            raise InvalidRequest(f"{self.algorithm.name} chunks: {e}") from None


__all__ = ["CHUNK_SIZE", "TAG_SIZE", "ChunkKernel", "backend", "releases_gil"]
