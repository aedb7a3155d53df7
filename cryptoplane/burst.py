"""Moved to ``cryptoplane.scheduler.lanes`` (issue 15). This alias goes when
tests/unit/test_burst.py imports it from there; it is the same module object."""

import sys

from .scheduler import lanes as moved

sys.modules[__name__] = moved
