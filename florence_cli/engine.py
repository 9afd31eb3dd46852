"""Engines turn planned work items into answers. The local engine decodes in worker processes and
answers in this process; others (Ray) plug in behind the same interface, so the driver — discovery,
journal, writers, errors — is one piece of code whatever runs the model. Each engine is handed a
builder of its ``BatchAnswerer`` and builds it where the model runs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Protocol

from .decode import DecodeFailure, decode_stream
from .jobs import ImageFailure, WorkItem

if TYPE_CHECKING:
    from .answer import BatchAnswerer
    from .records import Answer


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


class LocalEngine:
    """Decode in ``workers`` processes (0: in this one), answer in batches on this process's device."""

    def __init__(self, build: Callable[[], BatchAnswerer], workers: int = 0):
        self.build = build
        self.workers = workers

    def results(self, items: Iterable[WorkItem]) -> Iterator[list[ItemResult]]:
        answerer = self.build()
        decoded = decode_stream(items, answerer.resize_spec, workers=self.workers)
        for batch in batches(decoded, lambda: answerer.batch_size):  # it shrinks on out-of-memory
            failed = [
                ItemResult(d.ref, failure=ImageFailure(d.ref.name, d.reason))
                for d in batch
                if isinstance(d, DecodeFailure)
            ]
            images = [d for d in batch if not isinstance(d, DecodeFailure)]
            answered = answerer.answer_safely(images) if images else []
            results = [
                ItemResult(image.ref, image.width, image.height, failure=outcome)
                if isinstance(outcome, ImageFailure)
                else ItemResult(image.ref, image.width, image.height, answers=outcome)
                for image, outcome in zip(images, answered, strict=True)
            ]
            yield failed + results
