"""Engines turn planned work items into answers. The local engine decodes in worker processes and
answers in this process; others (Ray) plug in behind the same interface, so the driver — preflight,
discovery, journal, writers, errors — is one piece of code whatever runs the model.

The driver calls an engine in this order: ``check`` (refusals that need the checkpoint but no weights),
``start`` (the model loads, or the cluster is joined), ``results`` (the work), ``close``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Protocol

from .answer import AnswererBuilder, BatchAnswerer
from .checkpoint import checkpoint_layout, locate_model, model_identity
from .config import RunConfig
from .decode import DecodeFailure, decode_stream, unguarded_main_script
from .records import ImageFailure, ItemResult
from .tasks import OptionError

if TYPE_CHECKING:
    from .jobs import TaskRequest, WorkItem


@dataclass(frozen=True)
class Started:
    """How a started engine answers: its products mode (``config.PRODUCTS``, ``auto`` resolved) and, where
    that is not the mode asked for, why (``auto``'s fallback from kernels that failed their check); and
    how many helper processes the driver may start to read shards by URL ahead (``discover``)."""

    products: str
    fallback: str | None = None
    listers: int = 0


MAX_LISTERS = 4  # helper processes reading shards ahead: a few hide a store's latency


class EngineError(Exception):
    """An engine that cannot run as asked (a cluster it cannot join, say); the message is one line."""


class Engine(Protocol):
    def check(self, requests: list[TaskRequest], max_new_tokens: int | None) -> str | None:
        """Refuse, before any image is read and without loading weights, a checkpoint that cannot be used
        (``ModelLoadError``) or requests it cannot hold (``TaskError``). Returns the checkpoint's id
        (``checkpoint.model_identity``), None for a model handed in loaded."""
        ...

    def start(self) -> Started:
        """Load the model (or join the cluster) and say how its products meet the batch; a model that
        cannot load is a ``ModelLoadError``."""
        ...

    def results(self, items: Iterable[WorkItem]) -> Iterator[list[ItemResult]]:
        """Answer ``items``, yielding results a batch at a time (a batch is journaled at once)."""
        ...

    def close(self) -> None:
        """Release what ``start`` took (a cluster this engine started, say)."""
        ...


def batches(items: Iterable, size: int | Callable[[], int]) -> Iterator[list]:
    """Lists of ``size`` items; a callable size is asked again before each batch."""
    iterator = iter(items)
    while batch := list(islice(iterator, size() if callable(size) else size)):
        yield batch


class LocalEngine:
    """Decode in worker processes (``config.decode_workers``), answer in batches on this process's
    device, with the answerer given or built from ``config`` at ``start``."""

    def __init__(self, config: RunConfig, answerer: BatchAnswerer | None = None):
        self.config = config
        self.answerer = answerer

    def check(self, requests: list[TaskRequest], max_new_tokens: int | None) -> str | None:
        if self.answerer is not None:
            self._check_workers(self.answerer.model.device.type)
            self.answerer.model.preprocessing.check(requests, max_new_tokens)
            return None
        model = self.config.model
        folder = locate_model(model.name, model.allow_pickle)
        checkpoint_layout(folder)  # refused before torch is imported
        from .model import Preprocessing, resolve_device

        # a device this machine lacks, before the output folder is touched
        self._check_workers(resolve_device(model.device).type)
        Preprocessing.load(folder).check(requests, max_new_tokens)
        return model_identity(folder)

    def _check_workers(self, device_type: str) -> None:
        """Refuse decode processes that would run the calling script again (``unguarded_main_script``)."""
        script = unguarded_main_script() if self.config.decode_workers(device_type) else None
        if script:
            raise OptionError(
                f"`workers` start decode processes, which run {script} again from its top: put the run under "
                'if __name__ == "__main__": (or set `workers` to 0)'
            )

    def start(self) -> Started:
        if self.answerer is None:
            self.answerer = AnswererBuilder(self.config)()
        model = self.answerer.model
        # as many as decode processes, at most MAX_LISTERS: none where the run asked for none
        listers = min(MAX_LISTERS, self.config.decode_workers(model.device.type))
        return Started(model.products, model.fallback, listers)

    def close(self) -> None:
        """The model stays loaded: an ``Annotator`` runs again with it."""

    def results(self, items: Iterable[WorkItem]) -> Iterator[list[ItemResult]]:
        if self.answerer is None:
            self.start()
        answerer = self.answerer
        workers = self.config.decode_workers(answerer.model.device.type)
        decoded = decode_stream(items, answerer.resize_spec, workers=workers)
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
