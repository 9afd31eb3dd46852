"""Engines turn planned work items into answers. The local engine runs decode workers and the model
in this process; others (Ray) plug in behind the same interface, so the driver — discovery, journal,
writers, errors — is one piece of code whatever runs the model."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Protocol

from .decode import DecodeFailure, decode_stream
from .jobs import ImageFailure, WorkItem

if TYPE_CHECKING:
    import torch

    from .annotate import Annotator
    from .parse import Answer


@dataclass
class ItemResult:
    """One work item's outcome: an answer per job, or the reason it failed."""

    item: WorkItem
    width: int = 0
    height: int = 0
    answers: list[Answer] | None = None
    failure: ImageFailure | None = None


class Engine(Protocol):
    def results(self, items: Iterable[WorkItem]) -> Iterator[list[ItemResult]]:
        """Answer ``items``, yielding results a batch at a time (a batch is journaled at once)."""
        ...


def batches(items: Iterable, size: int | Callable[[], int]) -> Iterator[list]:
    """Lists of ``size`` items; a callable size is asked again before each batch."""
    iterator = iter(items)
    while batch := list(islice(iterator, size() if callable(size) else size)):
        yield batch


def default_workers(device: torch.device) -> int:
    """Decode processes for a model on ``device``: on CUDA, CPUs − 1 (at most 8) keep the GPU fed; on
    CPU none, as the model's threads use every core and a decode process only competes with them (on
    2 cores, `<OD>` ran 3 to 20 % faster without one)."""
    if device.type == "cpu":
        return 0
    return max(0, min(8, (os.cpu_count() or 1) - 1))


class LocalEngine:
    """Decode in worker processes, generate in batches on this process's device."""

    def __init__(self, annotator: Annotator, workers: int = 0):
        self.annotator = annotator
        self.workers = workers

    def results(self, items: Iterable[WorkItem]) -> Iterator[list[ItemResult]]:
        decoded = decode_stream(items, self.annotator.model.resize_spec, workers=self.workers)
        for batch in batches(decoded, lambda: self.annotator.batch_size):  # it shrinks on out-of-memory
            failed = [
                ItemResult(d.ref, failure=ImageFailure(d.ref.name, d.reason))
                for d in batch
                if isinstance(d, DecodeFailure)
            ]
            images = [d for d in batch if not isinstance(d, DecodeFailure)]
            answered = self.annotator.answer_batch_safely(images) if images else []
            results = [
                ItemResult(image.ref, image.width, image.height, failure=outcome)
                if isinstance(outcome, ImageFailure)
                else ItemResult(image.ref, image.width, image.height, answers=outcome)
                for image, outcome in zip(images, answered, strict=True)
            ]
            yield failed + results
