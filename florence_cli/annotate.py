"""The Python API: ``Annotator`` loads the model a ``RunConfig`` names once and annotates images in
memory (``annotate``) or folders into files (``run``, through the one driver, ``runner.run``, as the
``florence annotate`` command does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

from . import runner
from .answer import AnswererBuilder, BatchAnswerer
from .config import CaptionOptions, GenerationSettings, ModelConfig, RunConfig, Shard
from .decode import DecodedImage, decode_image, model_pixels
from .discover import ImageRef, Input
from .engine import LocalEngine, batches
from .jobs import TaskRequest, WorkItem, as_requests, parse_requests, plan_jobs
from .model import FlorenceModel
from .outdir import SettingsMismatch
from .records import Answer, ImageFailure
from .runner import RunSummary

__all__ = [
    "Annotator", "CaptionOptions", "GenerationSettings", "ModelConfig", "RunConfig", "RunSummary",
    "SettingsMismatch", "Shard",
]  # fmt: skip


class Annotator:
    """Florence-2 over many images, batched, with answers identical to the one-image reference loop.

    >>> annotator = Annotator(RunConfig(ModelConfig("path/or/hub-id", device="cpu")))  # doctest: +SKIP
    >>> annotator.annotate(["a.jpg"], ["OD"])[0]["OD"].result()                      # doctest: +SKIP
    >>> annotator.run(["images/"], "out", ["OD", "CAPTION"])                         # doctest: +SKIP
    """

    def __init__(self, config: RunConfig | None = None, model: FlorenceModel | None = None):
        """The model ``config`` names, loaded here; or ``model``, already loaded (``config.model`` then
        describes it: its settings are the model's own)."""
        config = config or RunConfig()
        if model is not None:
            described = ModelConfig(
                IN_MEMORY, products=model.products, cuda_graphs=model.static_decoder is not None
            )
            config = replace(config, model=described)
        self.answerer = BatchAnswerer(model, config) if model else AnswererBuilder(config)()
        # The mode auto came to on the model's device: what a run's summary names.
        self.config = replace(config, model=replace(config.model, products=self.model.products))

    @property
    def model(self) -> FlorenceModel:
        return self.answerer.model

    @property
    def batch_size(self) -> int:
        """Images per batch (it shrinks after a CUDA out-of-memory error)."""
        return self.answerer.batch_size

    # -- in-memory API ------------------------------------------------------------------------
    def annotate(
        self, images: Iterable, tasks: list[str], text: str | None = None
    ) -> list[dict[str, Answer]]:
        """Annotate image paths or PIL images in memory; returns, per image, ``{task name: Answer}``
        (tasks with one query per class give the last; use ``run`` for those)."""
        requests = parse_requests(list(tasks), text)
        results = []
        for batch in batches(enumerate(images), self.batch_size):
            decoded = [self._decode_in_memory(image, number, requests) for number, image in batch]
            results.extend({a.task.name: a for a in answers} for answers in self.answerer.answer(decoded))
        return results

    def _decode_in_memory(self, image, number: int, requests: list[TaskRequest]) -> DecodedImage:
        from PIL import Image

        name = str(image) if not isinstance(image, Image.Image) else f"image-{number}"
        ref = ImageRef(path=name, name=name, order=(name,))
        item = WorkItem(ref.path, ref.name, ref.order, tuple(plan_jobs(ref, requests)[0]))
        if isinstance(image, Image.Image):
            return DecodedImage(item, *model_pixels(image.convert("RGB"), self.model.resize_spec))
        return DecodedImage(item, *decode_image(str(image), self.model.resize_spec))

    # -- folders to files ---------------------------------------------------------------------
    def run(
        self,
        inputs: Iterable[Input],
        output: str | Path,
        tasks: list[str] | list[TaskRequest],
        text: str | None = None,
        stdin_lines: Iterable[str] = (),
        on_error: Callable[[ImageFailure], None] | None = None,
        **options,
    ) -> RunSummary:
        """Annotate every image under ``inputs`` into the folder ``output``, resuming earlier work there
        (``runner.run``, with this annotator's model and ``config``).

        ``tasks`` are names (with ``text`` for those that need one) or ready ``TaskRequest``s. ``options``
        set this run's fields of ``RunConfig`` that do not touch the model (``overwrite``, ``jsonl``,
        ``parquet``, ``progress``, ``shard``, ``workers``, ``captions``, ``per_shard``, ``upload``,
        ``storage_options``), e.g.
        ``annotator.run(["images/"], "out", ["OD"], shard=Shard(0, 4))``.
        """
        unknown = set(options) - RUN_FIELDS
        if unknown:
            fields = ", ".join(sorted(RUN_FIELDS))
            raise TypeError(f"run() sets {fields}; not {', '.join(sorted(unknown))}")
        config = replace(self.config, output=Path(output), **options)
        engine = LocalEngine(config, self.answerer)
        return runner.run(inputs, as_requests(tasks, text), config, engine, stdin_lines, on_error)


IN_MEMORY = "in-memory model"  # the name an output folder records for a model handed in loaded
# What a run may set besides the annotator's own model and answer settings.
RUN_FIELDS = frozenset({
    "overwrite", "jsonl", "jsonl_all", "parquet", "progress", "shard", "workers", "captions", "per_shard",
    "upload", "storage_options",
})  # fmt: skip
