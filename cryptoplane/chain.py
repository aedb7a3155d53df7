"""Chains: several operations on one payload, each feeding the next.

    cp.Chain(cp.Encrypt(key, data, nonce=n), lambda ct: cp.Mac(mac_key, ct))

The first step is a request; every later step is a function from the previous step's
output to the next request, so a step can use any argument (a nonce, a second key) and
the plane can run each step on whichever engine suits it. The chain's result is the
tuple of every step's output (``result[-1]`` is the last). A failing step fails the chain
with that step's own typed error, annotated with the step's number.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .exceptions import InvalidRequest
from .requests import Request

Step = Callable[[Any], Request]


class Chain:
    __slots__ = ("first", "steps")

    def __init__(self, first: Request, *then: Step) -> None:
        if not isinstance(first, Request):
            raise InvalidRequest(f"a chain starts with a request, not {type(first).__name__}")
        for i, step in enumerate(then, 2):
            if not callable(step):
                raise InvalidRequest(f"chain step {i} must be a function of the previous "
                                     f"output, not {type(step).__name__}")
        self.first = first
        self.steps: tuple[Step, ...] = then

    def __len__(self) -> int:
        return 1 + len(self.steps)

    def next_request(self, index: int, previous: Any) -> Request:
        """The request of step ``index`` (0-based, >= 1) given the previous output."""
        request = self.steps[index - 1](previous)
        if not isinstance(request, Request):
            raise InvalidRequest(f"chain step {index + 1} returned "
                                 f"{type(request).__name__}, not a request")
        return request

    def __repr__(self) -> str:
        return f"<Chain of {len(self)} steps, first {self.first!r}>"


def annotate(error: BaseException, index: int, chain: Chain) -> BaseException:
    error.add_note(f"in step {index + 1} of {len(chain)} of a chain")
    return error
