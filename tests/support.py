"""Small helpers shared by test modules (tests/conftest.py puts this directory on the
path, so ``import support`` works under any pytest import mode)."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

# CI runs with CI=true and installs every tool and builds every extension: there, a
# missing one is a failure, never a skip (the house rule); elsewhere a skip is fine
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str) -> NoReturn:
    """Fail under CI, skip elsewhere, for something the tests need and lack."""
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


def gone(pid: int) -> bool:
    """Whether process ``pid`` no longer exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def shm_entries() -> set[str]:
    """The pool's shared-memory segments currently in /dev/shm."""
    return {n for n in os.listdir("/dev/shm") if n.startswith("cryptoplane-pool-")}
