"""florence-cli: batch annotation of image folders with Microsoft's Florence-2.

The pipeline reads as its modules: ``discover`` → ``decode`` → ``model`` (batch, generate) →
``parse`` → ``writers`` (+ ``journal``), composed by ``annotate.Annotator``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .tasks import TASKS, Task, resolve_task

__all__ = ["TASKS", "Annotator", "GenerationSettings", "RunSummary", "Task", "resolve_task"]

if TYPE_CHECKING:  # pragma: no cover
    from .annotate import Annotator, GenerationSettings, RunSummary


def __getattr__(name: str):
    # torch is imported only when the model-facing API is first used
    if name in {"Annotator", "GenerationSettings", "RunSummary"}:
        from . import annotate

        return getattr(annotate, name)
    raise AttributeError(name)
