"""Type stub for the C extension cryptoplane._native._chunks (see chunks.c)."""

from typing import Final, SupportsIndex

from typing_extensions import Buffer

TAG: Final[int]

def openssl_version() -> str: ...
def seal_chunks(
    key: Buffer,
    src: Buffer,
    dst: Buffer,
    *,
    counter: SupportsIndex,
    final: bool,
    chunk_size: int = 65536,
) -> int: ...
def open_chunks(
    key: Buffer,
    src: Buffer,
    dst: Buffer,
    *,
    counter: SupportsIndex,
    final: bool,
    chunk_size: int = 65536,
) -> int: ...
