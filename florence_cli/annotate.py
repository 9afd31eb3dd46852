"""The runner: discover → decode (worker processes) → batch → generate → parse → write.

``Annotator`` is the Python API; the ``florence annotate`` command is a thin layer over it.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .decode import DecodedImage, decode_image, model_pixels
from .discover import ImageRef, InputError, discover
from .engine import Engine, ItemResult, LocalEngine, batches
from .jobs import ImageFailure, Job, TaskRequest, WorkItem, as_requests, parse_requests, plan_jobs
from .journal import Journal, work_key
from .model import DEFAULT_MODEL, FlorenceModel
from .parse import Answer, TokenText, parse_answer
from .postconfig import BANNED_GROUNDING_PHRASES
from .tasks import Output, resolve_task
from .writers import JsonlSink, text_path, write_coco, write_text

if TYPE_CHECKING:
    from .shard import Shard


@dataclass(frozen=True)
class GenerationSettings:
    """Generation flags; ``None`` leaves the checkpoint's own generation config in charge."""

    num_beams: int | None = 3
    max_new_tokens: int | None = 1024
    no_repeat_ngram_size: int | None = None
    min_new_tokens: int | None = None  # benchmarks pin generation lengths with it

    def kwargs(self) -> dict:
        flags = {k: v for k, v in asdict(self).items() if v is not None}
        return {"do_sample": False, **flags}


@dataclass
class RunSummary:
    """What a run did."""

    images: int = 0  # images seen
    annotated: int = 0  # images answered in this run
    skipped: int = 0  # images whose tasks were all done already
    failed: int = 0  # images (or named inputs) with an error
    answers: int = 0  # (image, task) answers written in this run
    seconds: float = 0.0
    failures: list[ImageFailure] = field(default_factory=list)  # the first few, for display

    @property
    def images_per_second(self) -> float:
        return self.annotated / self.seconds if self.seconds else 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def line(self) -> str:
        return (
            f"{self.images} images: {self.annotated} annotated, {self.skipped} already done, "
            f"{self.failed} failed, {self.answers} answers in {self.seconds:.1f} s "
            f"({self.images_per_second:.2f} images/s)"
        )


class SettingsMismatch(Exception):
    """The output folder holds results made with other settings."""


AUTO_CUDA_BATCH = 64  # --batch-size auto starts here on CUDA, halving on out-of-memory


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
        self.batch_size = (
            (AUTO_CUDA_BATCH if self.model.device.type == "cuda" else 8)
            if batch_size == "auto"
            else int(batch_size)
        )
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
        output: str | Path,
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
        """
        requests = as_requests(tasks, text)
        return Run(self, requests, Path(output), overwrite, jsonl, on_error, progress, shard).execute(
            inputs, stdin_lines, engine or LocalEngine(self, workers)
        )

    def settings(self) -> dict:
        """What an output folder's answers depend on besides the inputs and tasks."""
        settings = {
            "model": self.model_name,
            "generation": self.generation.kwargs(),
            "min_score": self.min_score,
        }
        return settings if self.exact else {**settings, "exact": False}


class Run:
    """One run of the driver: plans work, feeds an engine, journals and writes what comes back."""

    def __init__(self, annotator, requests, output: Path, overwrite, jsonl, on_error, progress, shard=None):
        self.annotator = annotator
        self.requests = requests
        self.output = output
        self.on_error = on_error
        self.shard = shard
        self.summary = RunSummary()
        self.seen: set[bytes] = set()
        state = output / ".florence"
        if overwrite and state.exists():
            shutil.rmtree(state)
        shard_setting = {"shard": str(shard)} if shard else {}  # another shard's folder is refused
        _check_settings(state / "settings.json", {**annotator.settings(), **shard_setting})
        self.journal = Journal(state / "journal.jsonl")
        self.errors = open(output / "errors.jsonl", "w", encoding="utf-8")  # noqa: SIM115
        self.sink = JsonlSink(jsonl) if jsonl else None
        self.bar = _progress_bar(progress)

    def execute(self, inputs, stdin_lines, engine: Engine) -> RunSummary:
        started = time.perf_counter()
        try:
            for results in engine.results(self.work(inputs, stdin_lines)):
                self.write(results)
        finally:
            self.close()
            self.summary.seconds = time.perf_counter() - started
        return self.summary

    def fail(self, failure: ImageFailure) -> None:
        self.summary.failed += 1
        if len(self.summary.failures) < 20:
            self.summary.failures.append(failure)
        self.errors.write(json.dumps(failure.record(), ensure_ascii=False) + "\n")
        self.errors.flush()
        if self.on_error:
            self.on_error(failure)

    def work(self, inputs, stdin_lines) -> Iterator[WorkItem]:
        """Images with the jobs not yet done on them; images with nothing to do are counted, not sent."""
        for found in discover(inputs, stdin_lines):
            if self.shard and not self.shard.takes(found.name if isinstance(found, ImageRef) else found.path):
                continue
            self.summary.images += 1
            if isinstance(found, InputError):
                self.fail(ImageFailure(found.path, found.reason))
                continue
            planned, failures = plan_jobs(found, self.requests)
            for failure in failures:
                self.fail(failure)
            jobs = []
            for job in planned:
                key = work_key(found, job.identity())
                self.seen.add(key)
                if key not in self.journal.done:
                    jobs.append(replace(job, key=key, text=self._chained_text(found.name, job)))
            if jobs:
                yield WorkItem(found.path, found.name, found.order, tuple(jobs))
            elif not failures:
                self.summary.skipped += 1

    def _chained_text(self, name: str, job: Job) -> str | None:
        """A chained job's text when its source answer was written by an earlier run."""
        if not job.ground_from:
            return job.text
        source = text_path(self.output, resolve_task(job.ground_from), name)
        return source.read_text(encoding="utf-8") if source.exists() else None

    def write(self, results: list[ItemResult]) -> None:
        records = []
        for result in results:
            if result.failure:
                self.fail(result.failure)
                continue
            self.summary.annotated += 1
            for job, answer in zip(result.item.jobs, result.answers, strict=True):
                records.append(_journal_record(result.item, job, answer))
                if not answer.task.writes_coco:
                    write_text(self.output, answer.task, result.item.name, answer.text)
        self.summary.answers += len(records)
        if self.sink:
            self.sink.write(_public_record(r) for r in records)
        self.journal.append(records)
        if self.bar:
            self.bar.update(len(results))

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        self.journal.close()
        self.errors.close()
        if self.sink:
            self.sink.close()
        for request in self.requests:
            task = request.task
            if task.writes_coco:

                def records(name=task.name):
                    return (r for r in self.journal.sorted_records(keep=self.seen) if r["task"] == name)

                info = {
                    "description": f"florence-cli {task.name}",
                    "task": task.name,
                    "model": self.annotator.model_name,
                }
                write_coco(
                    self.output / f"{task.slug}.json", task, records, info, list(request.classes) or None
                )


def _check_settings(path: Path, settings: dict) -> None:
    if path.exists():
        earlier = json.loads(path.read_text())
        if earlier != settings:
            raise SettingsMismatch(
                f"{path.parent.parent} holds results made with other settings ({earlier}); "
                "use --overwrite or another output folder"
            )
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=1))


def _journal_record(item: WorkItem, job: Job, answer: Answer) -> dict:
    return {
        "file": item.name,
        "task": answer.task.name,
        **({"text": job.text} if job.text is not None else {}),
        "width": answer.width,
        "height": answer.height,
        "result": answer.result(),
        "raw": answer.raw,
        "key": job.key.hex(),
        "order": list(item.order),
        "job_index": job.index,
        "instances": [asdict(i) for i in answer.instances],
    }


_PUBLIC_FIELDS = ("file", "task", "text", "width", "height", "result", "raw")


def _public_record(record: dict) -> dict:
    return {k: record[k] for k in _PUBLIC_FIELDS if k in record}


def _progress_bar(enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(unit="img", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


def _is_out_of_memory(exc: Exception) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)


def _release_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
