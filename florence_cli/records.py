"""The records that pass between stages: an answer, from parsing to the journal to every writer; a
failure; and an engine's outcome for one work item.

``parse`` makes an ``Answer`` from generated text; the runner tells it which image and job it answers
and journals it (``record``); the COCO writer, ``merge`` and the JSONL stream read it back
(``from_record``, ``public``). Engines hand the runner an ``ItemResult`` per work item: its answers, or
an ``ImageFailure``. Nobody re-parses text, and nobody passes loose dicts between stages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .tasks import Output, Task, resolve_task


@dataclass
class Instance:
    """One box, polygon set or OCR quad with its label (OCR: the text) and confidence."""

    label: str
    bbox: list[float] | None = None  # x1, y1, x2, y2 in pixels
    polygons: list[list[float]] = field(default_factory=list)  # each x1, y1, x2, y2, ... in pixels
    quad: list[float] | None = None  # OCR: four corners x1, y1, ..., x4, y4
    score: float | None = None
    category: str | None = None  # the class asked for, when one query was made per class

    @property
    def category_name(self) -> str:
        """The COCO category: the class it was asked for, else its label."""
        return self.category or self.label


def _labelled(key: str, attribute: str) -> Callable[[list[Instance], dict], dict]:
    def result(instances: list[Instance], scores: dict) -> dict:
        labels = [i.label for i in instances]
        return {key: [getattr(i, attribute) for i in instances], "labels": labels, **scores}

    return result


def _boxes_or_polygons(instances: list[Instance], scores: dict) -> dict:
    boxes = [i for i in instances if i.bbox is not None and not i.polygons]
    polygons = [i for i in instances if i.polygons]
    result = {
        "bboxes": [i.bbox for i in boxes],
        "bboxes_labels": [i.label for i in boxes],
        "polygons": [i.polygons for i in polygons],
        "polygons_labels": [i.label for i in polygons],
    }
    if scores:
        result.update(bboxes_scores=[i.score for i in boxes], polygons_scores=[i.score for i in polygons])
    return result


# The structure transformers' ``post_process_generation`` gives each kind of located answer.
RESULTS: dict[Output, Callable[[list[Instance], dict], dict]] = {
    Output.BOXES: _labelled("bboxes", "bbox"),
    Output.POLYGONS: _labelled("polygons", "polygons"),
    Output.OCR_REGIONS: _labelled("quad_boxes", "quad"),
    Output.BOXES_OR_POLYGONS: _boxes_or_polygons,
}


@dataclass
class Answer:
    """A task's parsed answer for one image, and — once journaled — the image and job it answers."""

    task: Task
    width: int
    height: int
    raw: str  # generated text with special tokens
    text: str | None = None  # text tasks
    instances: list[Instance] = field(default_factory=list)
    file: str = ""  # the image's output name
    query: str | None = None  # the job's text input (a phrase, a region, a class), if it had one
    key: bytes = b""  # the work key resume is keyed on
    job: str = ""  # the job's identity (task and text input)
    job_index: int = 0  # the job's place among the image's jobs: the output order
    shard: str | None = None  # the tar shard the image is a sample of (its name is ``<shard>/<key>``)

    def result(self) -> str | dict:
        """The answer in the structure ``post_process_generation`` gives (plus ``scores``)."""
        if self.task.output is Output.TEXT:
            return self.text
        scored = self.instances and self.instances[0].score is not None
        scores = {"scores": [i.score for i in self.instances]} if scored else {}
        return RESULTS[self.task.output](self.instances, scores)

    def public(self) -> dict:
        """What ``--jsonl`` streams: the image, the task, its text input, the parsed and raw answer."""
        query = {"text": self.query} if self.query is not None else {}
        return {"file": self.file, "task": self.task.name, **query, "width": self.width,
                "height": self.height, "result": self.result(), "raw": self.raw}  # fmt: skip

    def record(self) -> dict:
        """The journal's line for this answer."""
        shard = {"shard": self.shard} if self.shard is not None else {}
        return {**self.public(), "key": self.key.hex(), "job": self.job, "job_index": self.job_index,
                **shard, "instances": [asdict(i) for i in self.instances]}  # fmt: skip

    @classmethod
    def from_record(cls, record: dict) -> Answer:
        """The answer a journal line holds."""
        task = resolve_task(record["task"])
        return cls(
            task, record["width"], record["height"], record["raw"],
            text=record["result"] if task.output is Output.TEXT else None,
            instances=[Instance(**instance) for instance in record.get("instances", [])],
            file=record["file"], query=record.get("text"), key=bytes.fromhex(record["key"]),
            job=job_identity(record),
            job_index=record.get("job_index", 0), shard=record.get("shard"),
        )  # fmt: skip


def counted(number: int, thing: str) -> str:
    """A count as a message says it: ``1 image``, ``2 images``."""
    return f"{number} {thing}" if number == 1 else f"{number} {thing}s"


def job_identity(record: dict) -> str:
    """The job a journal line answers (lines written before ``job`` was stored: task and text input)."""
    return record.get("job") or f"{record['task']}\0{record.get('text') or ''}"


@dataclass
class ImageFailure:
    """An image (or one of its tasks) that produced no answer, and why."""

    name: str
    reason: str
    task: str | None = None

    def record(self) -> dict:
        return {"file": self.name, "error": self.reason, **({"task": self.task} if self.task else {})}


@dataclass
class ItemResult:
    """One work item's outcome, as an engine gives it: an answer per job, or the reason it failed."""

    item: Any  # the ``jobs.WorkItem`` answered (jobs builds on records, so records names no type of it)
    width: int = 0
    height: int = 0
    answers: list[Answer] | None = None
    failure: ImageFailure | None = None
