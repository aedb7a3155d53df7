"""Engines: the crypto devices the scheduler chooses between."""

from .base import Capability, Completion, Engine, Health, Job
from .inline import InlineEngine
from .pool import PoolEngine
from .threads import ThreadsEngine

REGISTRY: dict[str, type[Engine]] = {
    InlineEngine.name: InlineEngine,
    ThreadsEngine.name: ThreadsEngine,
    PoolEngine.name: PoolEngine,
}

__all__ = ["REGISTRY", "Capability", "Completion", "Engine", "Health", "InlineEngine", "Job",
           "PoolEngine", "ThreadsEngine"]
