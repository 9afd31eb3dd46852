"""florence-cli: batch annotation of image folders with Microsoft's Florence-2.

The pipeline reads as its modules: ``discover`` → ``decode`` → ``answer`` (``model``: generate) →
``parse`` → ``writers`` (+ ``journal``, ``outdir``), driven by ``runner.run``; ``annotate.Annotator`` is
the Python API over them (see ARCHITECTURE.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .tasks import TASKS, Task, resolve_task

__all__ = [
    "TASKS", "Annotator", "CaptionOptions", "GenerationSettings", "ModelConfig", "RunConfig", "RunSummary",
    "Shard", "Task", "resolve_task",
]  # fmt: skip

if TYPE_CHECKING:  # pragma: no cover
    from .annotate import Annotator
    from .config import CaptionOptions, GenerationSettings, ModelConfig, RunConfig, Shard
    from .runner import RunSummary

_LAZY = {
    "Annotator": "annotate", "CaptionOptions": "config", "GenerationSettings": "config",
    "ModelConfig": "config", "RunConfig": "config", "RunSummary": "runner", "Shard": "config",
}  # fmt: skip


def __getattr__(name: str):
    # torch is imported only when the model-facing API is first used
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
