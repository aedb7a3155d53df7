"""Type stub for the C extension cryptoplane._native._sectors (see sectors.c)."""

from collections.abc import Sequence
from typing import Final, NoReturn, SupportsIndex, TypeVar

from typing_extensions import Buffer

_Out = TypeVar("_Out", bound=Buffer)

TWEAK_PLAIN64: Final[int]
TWEAK_PLAIN64BE: Final[int]
DISPATCH: Final[str]

def openssl_version() -> str: ...

class XtsKey:
    def __init__(self, key: Buffer) -> None: ...
    @property
    def key_size(self) -> int: ...
    def encrypt(
        self,
        src: Buffer,
        first_sector: SupportsIndex,
        sector_size: int,
        out: Buffer | None = None,
        tweak: int = 0,
    ) -> object: ...
    def decrypt(
        self,
        src: Buffer,
        first_sector: SupportsIndex,
        sector_size: int,
        out: Buffer | None = None,
        tweak: int = 0,
    ) -> object: ...
    def decrypt_gather(
        self, src: Buffer, items: Sequence[tuple[int, int, Buffer]], sector_size: int,
        tweak: int,
    ) -> int: ...
    def encrypt_scatter(
        self, fd: int, items: Sequence[tuple[int, int, Buffer]], sector_size: int,
        tweak: int, scratch: Buffer,
    ) -> tuple[int, int, int]: ...
    def __reduce__(self) -> NoReturn: ...

def guard_sigbus() -> None: ...
