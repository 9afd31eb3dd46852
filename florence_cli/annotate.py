"""The runner: discover → decode (worker processes) → batch → generate → parse → write.

``Annotator`` is the Python API; the ``florence annotate`` command is a thin layer over it.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

from .decode import DecodedImage, DecodeFailure, decode_image, decode_stream
from .discover import ImageRef, InputError, discover
from .journal import Journal, work_key
from .model import DEFAULT_MODEL, FlorenceModel
from .parse import Answer, TokenText, parse_answer
from .postconfig import BANNED_GROUNDING_PHRASES
from .tasks import Task, resolve_task, task_prompt
from .writers import JsonlSink, write_coco, write_text


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


@dataclass(frozen=True)
class TaskRequest:
    """A task to run on every image, with its text input when it needs one."""

    task: Task
    text: str | None = None

    def prompt(self) -> str:
        return task_prompt(self.task, self.text)


@dataclass(frozen=True)
class Job:
    """One task to do on one image."""

    request: TaskRequest
    task_index: int
    prompt: str
    key: bytes


@dataclass(frozen=True)
class WorkItem(ImageRef):
    """An image with the jobs still to do on it."""

    jobs: tuple[Job, ...] = ()


@dataclass
class ImageFailure:
    """An image (or one of its tasks) that produced no answer, and why."""

    name: str
    reason: str
    task: str | None = None

    def record(self) -> dict:
        return {"file": self.name, "error": self.reason, **({"task": self.task} if self.task else {})}


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


def parse_requests(tasks: Iterable[str], text: str | None = None) -> list[TaskRequest]:
    """Task names (``OD``, ``od``, ``<OD>``) to requests; text goes to the tasks that take it.

    Raises ``TaskError`` for an unknown task or a task that needs text and has none.
    """
    requests, seen = [], set()
    for name in tasks:
        task = resolve_task(name)
        if task.name in seen:
            continue
        seen.add(task.name)
        request = TaskRequest(task, text if task.needs_text else None)
        request.prompt()  # validates the text input now, before any model is loaded
        requests.append(request)
    return requests


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
        batch_size: int = 8,
        generation: GenerationSettings | None = None,
        allow_pickle: bool = False,
    ):
        self.model = (
            model
            if isinstance(model, FlorenceModel)
            else FlorenceModel.load(model, device, dtype, allow_pickle)
        )
        self.model_name = model if isinstance(model, str) else "in-memory model"
        self.batch_size = batch_size
        self.generation = generation or GenerationSettings()
        config = getattr(self.model.processor, "post_processor_config", None) or {}
        banned = config.get("phrase_grounding", {}).get("banned_grounding_tokens", BANNED_GROUNDING_PHRASES)
        self.banned_phrases = frozenset(banned)

    # -- the core: one batch of decoded images, each with its jobs --------------------------------
    def answer_batch(self, images: list[DecodedImage]) -> list[list[Answer]]:
        """Answer every job of every image; image features are computed once per image."""
        model = self.model
        features = model.image_features(model.pixel_values([image.pixels for image in images]))
        answers: list[list[Answer]] = [[] for _ in images]
        task_order = sorted({job.task_index for image in images for job in image.ref.jobs})
        for task_index in task_order:
            rows = [
                (i, job)
                for i, image in enumerate(images)
                for job in image.ref.jobs
                if job.task_index == task_index
            ]
            generated = model.generate(
                features[[i for i, _ in rows]],
                [job.prompt for _, job in rows],
                self.generation.kwargs(),
                True,
            )
            for (i, job), output in zip(rows, generated, strict=True):
                tokens = TokenText.from_tokens(model.tokenizer, output.token_ids, output.token_logprobs)
                image = images[i]
                answers[i].append(
                    parse_answer(
                        job.request.task, output.text, image.width, image.height, tokens, self.banned_phrases
                    )
                )
        return answers

    def answer_batch_safely(self, images: list[DecodedImage]) -> list[list[Answer] | ImageFailure]:
        """``answer_batch``, but a batch that fails is split until only the guilty images fail; a CUDA
        out-of-memory error halves the batch and retries, so no image is lost or skipped."""
        try:
            return list(self.answer_batch(images))
        except Exception as exc:
            if len(images) == 1:
                return [ImageFailure(images[0].ref.name, f"generation failed: {type(exc).__name__}: {exc}")]
            _release_cuda_cache()
            half = len(images) // 2
            return self.answer_batch_safely(images[:half]) + self.answer_batch_safely(images[half:])

    # -- in-memory API ------------------------------------------------------------------------
    def annotate(
        self, images: Iterable, tasks: Iterable[str], text: str | None = None
    ) -> list[dict[str, Answer]]:
        """Annotate image paths or PIL images in memory; returns, per image, ``{task name: Answer}``."""
        requests = parse_requests(tasks, text)
        jobs = tuple(Job(r, i, r.prompt(), b"") for i, r in enumerate(requests))
        results = []
        batch: list[DecodedImage] = []
        for number, image in enumerate(images):
            batch.append(self._decode_in_memory(image, number, jobs))
            if len(batch) == self.batch_size:
                results.extend(self._answers_by_task(batch))
                batch = []
        if batch:
            results.extend(self._answers_by_task(batch))
        return results

    def _answers_by_task(self, batch: list[DecodedImage]) -> list[dict[str, Answer]]:
        return [{a.task.name: a for a in answers} for answers in self.answer_batch(batch)]

    def _decode_in_memory(self, image, number: int, jobs: tuple[Job, ...]) -> DecodedImage:
        import numpy as np
        from PIL import Image

        name = str(image) if not isinstance(image, Image.Image) else f"image-{number}"
        ref = WorkItem(path=name, name=name, order=(0, number), jobs=jobs)
        if not isinstance(image, Image.Image):
            return DecodedImage(ref, *decode_image(str(image), self.model.resize_spec))
        rgb = image.convert("RGB")
        size = self.model.resize_spec.size
        resized = (
            rgb.resize(size, resample=self.model.resize_spec.resample) if size and rgb.size != size else rgb
        )
        return DecodedImage(ref, rgb.width, rgb.height, np.asarray(resized, dtype=np.uint8))

    # -- folders to files ---------------------------------------------------------------------
    def run(
        self,
        inputs: Iterable[str],
        output: str | Path,
        tasks: Iterable[str],
        text: str | None = None,
        workers: int = 0,
        overwrite: bool = False,
        jsonl: str | None = None,
        stdin_lines: Iterable[str] = (),
        on_error: Callable[[ImageFailure], None] | None = None,
        progress: bool = False,
    ) -> RunSummary:
        """Annotate every image under ``inputs`` into ``output``, resuming earlier work there."""
        requests = parse_requests(tasks, text)
        output = Path(output)
        state = output / ".florence"
        if overwrite and state.exists():
            shutil.rmtree(state)
        self._check_settings(state / "settings.json")
        journal = Journal(state / "journal.jsonl")
        errors_file = open(output / "errors.jsonl", "w", encoding="utf-8")  # noqa: SIM115
        sink = JsonlSink(jsonl) if jsonl else None
        summary = RunSummary()
        seen: set[bytes] = set()
        started = time.perf_counter()

        def fail(failure: ImageFailure) -> None:
            summary.failed += 1
            if len(summary.failures) < 20:
                summary.failures.append(failure)
            errors_file.write(json.dumps(failure.record(), ensure_ascii=False) + "\n")
            errors_file.flush()
            if on_error:
                on_error(failure)

        def work() -> Iterator[WorkItem]:
            for found in discover(inputs, stdin_lines):
                if isinstance(found, InputError):
                    summary.images += 1
                    fail(ImageFailure(found.path, found.reason))
                    continue
                summary.images += 1
                jobs = []
                for index, request in enumerate(requests):
                    prompt = request.prompt()
                    key = work_key(found, request.task.name, prompt)
                    seen.add(key)
                    if key not in journal.done:
                        jobs.append(Job(request, index, prompt, key))
                if jobs:
                    yield WorkItem(found.path, found.name, found.order, tuple(jobs))
                else:
                    summary.skipped += 1

        bar = _progress_bar(progress)
        try:
            decoded = decode_stream(work(), self.model.resize_spec, workers=workers)
            for batch in _batches(decoded, self.batch_size):
                images = []
                for item in batch:
                    if isinstance(item, DecodeFailure):
                        fail(ImageFailure(item.ref.name, item.reason))
                    else:
                        images.append(item)
                records = []
                for image, answers in zip(
                    images, self.answer_batch_safely(images) if images else [], strict=True
                ):
                    if isinstance(answers, ImageFailure):
                        fail(answers)
                        continue
                    summary.annotated += 1
                    for job, answer in zip(image.ref.jobs, answers, strict=True):
                        records.append(_journal_record(image, job, answer))
                        if not answer.task.writes_coco:
                            write_text(output, answer.task, image.ref.name, answer.text)
                summary.answers += len(records)
                if sink:
                    sink.write(_public_record(r) for r in records)
                journal.append(records)
                if bar:
                    bar.update(len(batch))
        finally:
            if bar:
                bar.close()
            journal.close()
            errors_file.close()
            if sink:
                sink.close()
            self._write_coco_files(output, requests, journal, seen)
            summary.seconds = time.perf_counter() - started
        return summary

    def _write_coco_files(
        self, output: Path, requests: list[TaskRequest], journal: Journal, seen: set[bytes]
    ) -> None:
        for request in requests:
            task = request.task
            if not task.writes_coco:
                continue

            def records(name=task.name):
                return (r for r in journal.sorted_records(keep=seen) if r["task"] == name)

            info = {"description": f"florence-cli {task.name}", "task": task.name, "model": self.model_name}
            write_coco(output / f"{task.slug}.json", task, records, info)

    def _check_settings(self, path: Path) -> None:
        settings = {"model": self.model_name, "generation": self.generation.kwargs()}
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


def _journal_record(image: DecodedImage, job: Job, answer: Answer) -> dict:
    return {
        "file": image.ref.name,
        "task": answer.task.name,
        "width": answer.width,
        "height": answer.height,
        "result": answer.result(),
        "raw": answer.raw,
        "key": job.key.hex(),
        "order": list(image.ref.order),
        "task_index": job.task_index,
        "instances": [asdict(i) for i in answer.instances],
    }


_PUBLIC_FIELDS = ("file", "task", "width", "height", "result", "raw")


def _public_record(record: dict) -> dict:
    return {k: record[k] for k in _PUBLIC_FIELDS}


def _batches(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _progress_bar(enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(unit="img", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


def _release_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
