"""The kernel interface: one method per operation; what a kernel lacks says so."""

from __future__ import annotations

from typing import Any

from ..algorithms import Algorithm
from ..exceptions import NotSupported

Buffer = bytes | bytearray | memoryview


class Kernel:
    """A key prepared for in-process use. Subclasses override the operations they offer."""

    __slots__ = ("algorithm",)

    algorithm: Algorithm

    def __init__(self, algorithm: Algorithm) -> None:
        self.algorithm = algorithm

    def _refuse(self, op: str) -> NotSupported:
        return NotSupported(f"{self.algorithm.name} does not offer {op}")

    def encrypt(self, data: Buffer, nonce: bytes | None, aad: bytes | None,
                padding: bool = False) -> bytes:
        raise self._refuse("encrypt")

    def decrypt(self, data: Buffer, nonce: bytes | None, aad: bytes | None,
                padding: bool = False) -> bytes:
        raise self._refuse("decrypt")

    def sign(self, data: Buffer) -> bytes:
        raise self._refuse("sign")

    def verify(self, data: Buffer, signature: bytes) -> None:
        raise self._refuse("verify")

    def mac(self, data: Buffer, tag_size: int | None = None) -> bytes:
        raise self._refuse("mac")

    def verify_mac(self, data: Buffer, tag: bytes) -> None:
        raise self._refuse("verify_mac")

    def derive(self, peer: Any = None, length: int | None = None, salt: bytes | None = None,
               info: bytes | None = None) -> bytes:
        raise self._refuse("derive")

    def encrypt_sectors(self, data: Buffer, sector: int, sector_size: int,
                        out: Any = None, tweak: int = 0) -> Any:
        raise self._refuse("encrypt_sectors")

    def decrypt_sectors(self, data: Buffer, sector: int, sector_size: int,
                        out: Any = None, tweak: int = 0) -> Any:
        raise self._refuse("decrypt_sectors")

    def seal_chunks(self, data: Buffer, out: Any, counter: int, final: bool) -> int:
        raise self._refuse("seal_chunks")

    def open_chunks(self, data: Buffer, out: Any, counter: int, final: bool) -> int:
        raise self._refuse("open_chunks")
