"""Kernels: a key prepared for in-process work.

A kernel is what an engine calls: the ``cryptography`` objects (or the native sector
key) built once per key, with one method per operation. Building it is the key setup
the design says must happen once per session, not per request. Every method translates
the library's exceptions into cryptoplane's typed ones; nothing here queues or counts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..algorithms import Kind
from ..exceptions import NotSupported
from .base import Buffer, Kernel

if TYPE_CHECKING:
    from ..keys import Key


def prepare(key: Key) -> Kernel:
    """Build the kernel for ``key`` (its key schedule, its prepared objects)."""
    from . import asymmetric, digests, symmetric

    alg = key.algorithm
    if alg.kind is Kind.AEAD:
        return symmetric.AeadKernel(key)
    if alg.kind is Kind.CIPHER:
        return symmetric.CIPHER_KERNELS[alg.mode](key)
    if alg.kind is Kind.MAC:
        return digests.MacKernel(key)
    if alg.kind is Kind.KDF:
        return digests.HkdfKernel(key)
    if alg.kind in (Kind.AKCIPHER, Kind.KPP):
        return asymmetric.prepare(key)
    raise NotSupported(f"{alg.name} keys have no kernel")


__all__ = ["Buffer", "Kernel", "prepare"]
