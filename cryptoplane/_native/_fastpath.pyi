"""Type stub for the C extension cryptoplane._native._fastpath (see fastpath.c)."""

from collections.abc import Callable
from typing import Any, Literal

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
