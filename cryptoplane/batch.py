"""Moved to ``cryptoplane.scheduler.batch`` (issue 15). This alias goes when
tests/unit/test_burst.py imports it from there; it is the same module object, so a test
that monkeypatches a name here patches the one the plane uses."""

import sys

from .scheduler import batch as moved

sys.modules[__name__] = moved
