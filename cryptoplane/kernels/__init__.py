"""Kernels: a key prepared for in-process work.

A kernel is what an engine calls: the ``cryptography`` objects (or the native sector
key, or ChaCha20-Poly1305's raw key for runs of STREAM chunks) built once per key, with
one method per operation. Building it is the key setup
the design says must happen once per session, not per request. Every method translates
the library's exceptions into cryptoplane's typed ones; nothing here queues or counts.
Kernels are built from data, as ``cryptography``'s primitives are (raw bytes, or a
``cryptography`` key object), so they know nothing of ``Key``: keys sit above them.
"""

from __future__ import annotations

from typing import Any

from ..algorithms import Algorithm, Kind, Op
from ..exceptions import NotSupported
from . import asymmetric, chunks, digests, symmetric
from .base import Buffer, Kernel


def prepare(algorithm: Algorithm, material: Any) -> Kernel:
    """Build the kernel for ``algorithm`` (its key schedule, its prepared objects) from
    ``material``: raw bytes for symmetric algorithms, a ``cryptography`` private or
    public key object for asymmetric ones. Checking the material is ``Key``'s work."""
    alg = algorithm
    if alg.kind is Kind.AEAD:
        if Op.SEAL_CHUNKS in alg.ops:
            return chunks.ChunkKernel(alg, material)
        return symmetric.AeadKernel(alg, material)
    if alg.kind is Kind.CIPHER:
        return symmetric.CIPHER_KERNELS[alg.mode](alg, material)
    if alg.kind is Kind.MAC:
        return digests.MacKernel(alg, material)
    if alg.kind is Kind.KDF:
        return digests.HkdfKernel(alg, material)
    if alg.kind in (Kind.AKCIPHER, Kind.KPP):
        return asymmetric.prepare(alg, material)
    raise NotSupported(f"{alg.name} keys have no kernel")


__all__ = ["Buffer", "Kernel", "prepare"]
