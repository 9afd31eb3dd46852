"""The Python API: ``Annotator`` answers batches of decoded images with a loaded model, in memory or
over folders into files (``runner.Run`` drives that). The ``florence annotate`` command is a thin layer
over it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .config import GenerationSettings, auto_batch_size, output_settings
from .decode import DecodedImage, decode_image, model_pixels
from .discover import ImageRef
from .engine import Engine, LocalEngine, batches
from .jobs import ImageFailure, TaskRequest, WorkItem, as_requests, parse_requests, plan_jobs
from .model import DEFAULT_MODEL, FlorenceModel
from .outdir import OutputFolder, SettingsMismatch
from .parse import Answer, TokenText, parse_answer
from .postconfig import BANNED_GROUNDING_PHRASES
from .runner import Run, RunSummary
from .tasks import Output

if TYPE_CHECKING:
    from .shard import Shard

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
        exact: bool = True,
    ):
        """``exact`` off batches the model's matrix products and attention across images (faster,
        mostly on GPUs; a near tie may then be decided otherwise than by the one-image reference).
        It applies to a model loaded here; a ``FlorenceModel`` given keeps its own setting."""
        if isinstance(model, FlorenceModel):
            self.model, self.model_name = model, "in-memory model"
        else:
            loaded = FlorenceModel.load(model, device, dtype, allow_pickle, reference_shapes=exact)
            self.model, self.model_name = loaded, model
        self.exact = self.model.reference_shapes
        # "auto": start high on CUDA and halve on out-of-memory (kept for later batches)
        self.batch_size = auto_batch_size(batch_size, self.model.device.type == "cuda")
        self.generation = generation or GenerationSettings()
        self.min_score = min_score
        config = getattr(self.model.processor, "post_processor_config", None) or {}
        banned = config.get("phrase_grounding", {}).get("banned_grounding_tokens", BANNED_GROUNDING_PHRASES)
        self.banned_phrases = frozenset(banned)

    # -- the core: one batch of decoded images, each with its jobs --------------------------------
    def answer_batch(self, images: list[DecodedImage]) -> list[list[Answer]]:
        """Answer every job of every image, in job order. Image features are computed once per image;
        jobs at the same position run as one batch, so a chained job sees the answers before it."""
        model = self.model
        features = model.image_features(model.pixel_values([image.pixels for image in images]))
        answers: list[list[Answer]] = [[] for _ in images]
        texts: list[dict[str, str]] = [{} for _ in images]  # each image's text answers so far
        for position in range(max(len(image.ref.jobs) for image in images)):
            rows = [i for i, image in enumerate(images) if position < len(image.ref.jobs)]
            jobs = [images[i].ref.jobs[position] for i in rows]
            prompts = [
                job.prompt(images[i].width, images[i].height, texts[i])
                for i, job in zip(rows, jobs, strict=True)
            ]
            # Only located answers carry scores; a text answer would pay a scoring pass for nothing.
            located = [job.task.output is not Output.TEXT for job in jobs]
            generated = model.generate(features[rows], prompts, self.generation.kwargs(), with_scores=located)
            for i, job, output in zip(rows, jobs, generated, strict=True):
                tokens = TokenText.from_tokens(model.tokenizer, output.token_ids, output.token_logprobs)
                image = images[i]
                answer = parse_answer(
                    job.task, output.text, image.width, image.height, tokens, self.banned_phrases
                )
                for instance in answer.instances:
                    instance.category = job.category
                if self.min_score is not None:
                    answer.instances = [x for x in answer.instances if (x.score or 0.0) >= self.min_score]
                if answer.text is not None:
                    texts[i][job.task.name] = answer.text
                answers[i].append(answer)
        return answers

    def answer_batch_safely(self, images: list[DecodedImage]) -> list[list[Answer] | ImageFailure]:
        """``answer_batch``, but a batch that fails is split until only the guilty images fail; a CUDA
        out-of-memory error halves the batch and retries, so no image is lost or skipped."""
        try:
            return list(self.answer_batch(images))
        except Exception as exc:  # an error on one image must not lose the batch
            if _is_out_of_memory(exc):
                _release_cuda_cache()
                self.batch_size = max(1, min(self.batch_size, len(images) // 2))
            if len(images) == 1:
                return [ImageFailure(images[0].ref.name, f"generation failed: {type(exc).__name__}: {exc}")]
            half = len(images) // 2
            return self.answer_batch_safely(images[:half]) + self.answer_batch_safely(images[half:])

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
            results.extend({a.task.name: a for a in answers} for answers in self.answer_batch(decoded))
        return results

    def _decode_in_memory(self, image, number: int, requests: list[TaskRequest]) -> DecodedImage:
        from PIL import Image

        name = str(image) if not isinstance(image, Image.Image) else f"image-{number}"
        ref = ImageRef(path=name, name=name, order=(0, number))
        item = WorkItem(ref.path, ref.name, ref.order, tuple(plan_jobs(ref, requests)[0]))
        if isinstance(image, Image.Image):
            return DecodedImage(item, *model_pixels(image.convert("RGB"), self.model.resize_spec))
        return DecodedImage(item, *decode_image(str(image), self.model.resize_spec))

    # -- folders to files ---------------------------------------------------------------------
    def run(
        self,
        inputs: Iterable[str],
        output: str | Path | OutputFolder,
        tasks: list[str] | list[TaskRequest],
        text: str | None = None,
        workers: int = 0,
        overwrite: bool = False,
        jsonl: str | None = None,
        stdin_lines: Iterable[str] = (),
        on_error: Callable[[ImageFailure], None] | None = None,
        progress: bool = False,
        engine: Engine | None = None,
        shard: Shard | None = None,
    ) -> RunSummary:
        """Annotate every image under ``inputs`` into ``output``, resuming earlier work there.

        ``tasks`` are names (with ``text`` for those that need it) or ready ``TaskRequest``s; ``shard``
        keeps only its share of the images (``florence merge`` combines the shards' folders).
        ``output`` may be a folder already opened with ``OutputFolder(path, annotator.settings(shard))``.
        """
        requests = as_requests(tasks, text)
        if not isinstance(output, OutputFolder):
            output = OutputFolder(output, self.settings(shard), overwrite)
        run = Run(requests, output, self.model_name, jsonl, on_error, progress, shard)
        return run.execute(inputs, stdin_lines, engine or LocalEngine(self, workers))

    def settings(self, shard: Shard | None = None) -> dict:
        """What an output folder's answers depend on besides the inputs and tasks."""
        return output_settings(
            self.model_name, self.generation, self.min_score, self.exact, str(shard) if shard else None
        )


def _is_out_of_memory(exc: Exception) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)


def _release_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
