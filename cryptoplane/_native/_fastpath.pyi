"""Type stub for the C extension cryptoplane._native._fastpath (see fastpath.c)."""

from collections.abc import Callable
from typing import Any, Literal, final

class FastAead:
    """``Plane.encrypt``/``decrypt``'s fast path as a method descriptor; calls that are
    not on the fast path, and argument errors, go to ``fallback`` unchanged."""

    def __new__(
        cls, op: Literal["encrypt", "decrypt"], fallback: Callable[..., Any]
    ) -> FastAead: ...
    @property
    def op(self) -> str: ...
    @property
    def __wrapped__(self) -> Callable[..., Any]: ...
    def __get__(self, obj: object, owner: type | None = None) -> Any: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

TALLY_OPS: tuple[str, ...]
"""The ops a Tally counts, in index order (``_native.TALLY_OPS`` must be the same)."""

@final
class Tally:
    """A session's fast-path counters: requests and bytes per op of ``TALLY_OPS`` as
    uint64, added to in place by ``FastAead`` (no allocation). Not subclassable."""

    def __new__(cls) -> Tally: ...
    def add(self, op: int, nbytes: int, /) -> None:
        """Count one request of ``nbytes`` for ``TALLY_OPS[op]``."""
    def snapshot(self) -> list[tuple[str, int, int]]:
        """``[(op, requests, bytes)]`` for every op counted, in ``TALLY_OPS`` order."""
