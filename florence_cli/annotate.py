"""The Python API: ``Annotator`` loads a model once and annotates images in memory (``annotate``) or
folders into files (``run``, through the one driver, ``runner.run``). The ``florence annotate``
command is a thin layer over it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from .answer import AnswererBuilder, BatchAnswerer
from .config import DEFAULT_MODEL, GenerationSettings, ModelConfig, RunConfig, Shard
from .decode import DecodedImage, decode_image, model_pixels
from .discover import ImageRef, Input
from .engine import Engine, LocalEngine, batches
from .jobs import TaskRequest, WorkItem, parse_requests, plan_jobs
from .model import FlorenceModel
from .outdir import OutputFolder, SettingsMismatch
from .records import Answer
from .runner import RunSummary, run_into

__all__ = ["Annotator", "GenerationSettings", "RunSummary", "SettingsMismatch"]


class Annotator:
    """Florence-2 over many images, batched, with answers identical to the one-image reference loop.

    >>> annotator = Annotator("path/or/hub-id", device="cpu")          # doctest: +SKIP
    >>> annotator.annotate(["a.jpg"], ["OD"])[0]["OD"].result()         # doctest: +SKIP
    >>> annotator.run(["images/"], "out", ["OD", "CAPTION"])            # doctest: +SKIP
    """

    def __init__(
        self,
        model: str | FlorenceModel = DEFAULT_MODEL,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int | str = 8,
        generation: GenerationSettings | None = None,
        allow_pickle: bool = False,
        min_score: float | None = None,
        products: str = "auto",
        cuda_graphs: bool = False,
    ):
        """``products``: how the model's matrix products and attention meet the batch (auto, per-image,
        invariant, batched; see ``config.PRODUCTS``). ``cuda_graphs``: decoding steps replay CUDA graphs
        over a static cache (see graphs.py). Both apply to a model loaded here; a ``FlorenceModel``
        given keeps its own settings."""
        loaded = model if isinstance(model, FlorenceModel) else None
        model_config = ModelConfig(
            "in-memory model" if loaded else model, device, dtype, allow_pickle,
            loaded.products if loaded else products,
            loaded.static_decoder is not None if loaded else cuda_graphs,
        )  # fmt: skip
        config = RunConfig(
            model_config, batch_size=batch_size, generation=generation or GenerationSettings(),
            min_score=min_score,
        )  # fmt: skip
        self.answerer = BatchAnswerer(loaded, config) if loaded else AnswererBuilder(config)()
        # The mode auto came to on the model's device: what a run's summary names.
        self.config = replace(config, model=replace(model_config, products=self.model.products))

    @classmethod
    def from_config(cls, config: RunConfig) -> Annotator:
        """An annotator for ``config``'s model and answer settings (its output settings go to ``run``)."""
        model = config.model
        return cls(
            model.name, device=model.device, dtype=model.dtype, batch_size=config.batch_size,
            generation=config.generation, allow_pickle=model.allow_pickle, min_score=config.min_score,
            products=model.products, cuda_graphs=model.cuda_graphs,
        )  # fmt: skip

    @property
    def model(self) -> FlorenceModel:
        return self.answerer.model

    @property
    def model_name(self) -> str:
        return self.config.model.name

    @property
    def batch_size(self) -> int:
        """Images per batch (it shrinks after a CUDA out-of-memory error)."""
        return self.answerer.batch_size

    def settings(self, shard: Shard | None = None) -> dict:
        """What an output folder's answers depend on besides the inputs and tasks."""
        return replace(self.config, shard=shard).settings()

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
        output: str | Path | OutputFolder,
        tasks: list[str] | list[TaskRequest],
        text: str | None = None,
        workers: int = 0,
        engine: Engine | None = None,
        **options,
    ) -> RunSummary:
        """Annotate every image under ``inputs`` into ``output``, resuming earlier work there.

        ``tasks`` are names (with ``text`` for those that need it) or ready ``TaskRequest``s;
        ``options``: ``stdin_lines``, ``on_error``, and ``RunConfig``'s ``overwrite``, ``jsonl``,
        ``parquet``, ``progress``, ``shard`` (which keeps only its share of the images; ``florence merge``
        combines the shards' folders) and ``captions`` (``CaptionOptions``: sidecar caption files,
        ``metadata.jsonl``). ``output`` may be a folder already opened with
        ``OutputFolder(path, annotator.settings(shard))``.
        """
        engine = engine or LocalEngine(lambda: self.answerer, workers)
        return run_into(output, inputs, tasks, self.config, engine, text, workers=workers, **options)
