"""What to do on each image: task requests from the user, planned into per-image jobs.

A request is a task with its text input: the same for every image (``--text``), one per image
(``--text-file``), one query per class (``--classes``), a region in pixels (``--region``), or the
answer of another task on the same image (``--ground-from``). Jobs carry everything a worker needs,
so the same jobs run in this process or on a cluster.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from .discover import ImageRef
from .records import ImageFailure
from .tasks import OptionError, Output, Task, TaskError, TextInput, prompt_task, resolve_task, task_prompt


@dataclass(frozen=True)
class TaskRequest:
    """A task to run on every image, with where its text input comes from."""

    task: Task
    text: str | None = None
    texts: Mapping[str, str] | None = field(default=None, compare=False)  # per image, by name or path
    classes: tuple[str, ...] = ()
    ground_from: Task | None = None
    region_pixels: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class Job:
    """One query of one task on one image."""

    task: Task
    index: int  # position among the image's jobs: the output order
    text: str | None = None  # the text input, when known before generation
    category: str | None = None  # --classes: the class this query asks for
    ground_from: str | None = None  # name of the task whose answer is the text input
    region_pixels: tuple[float, float, float, float] | None = None
    key: bytes = b""

    def identity(self) -> str:
        """What makes this job's answer: its task and its text input (resume keys are built on it)."""
        if self.ground_from:
            source = f"@{self.ground_from}"
        elif self.region_pixels:
            source = "px:" + ",".join(f"{v:g}" for v in self.region_pixels)
        else:
            source = self.text or ""
        return f"{self.task.name}\0{source}"

    def prompt(self, width: int, height: int, earlier: Mapping[str, str]) -> str:
        """The prompt for this job on an image of that size, given the image's earlier text answers."""
        if self.ground_from:  # the caption as the model wrote it, even empty (the reference runs it too)
            return self.task.token + (earlier.get(self.ground_from, self.text) or "")
        if self.region_pixels:
            return task_prompt(self.task, pixel_region_bins(self.region_pixels, width, height))
        return task_prompt(self.task, self.text)


@dataclass(frozen=True)
class WorkItem(ImageRef):
    """An image with the jobs still to do on it."""

    jobs: tuple[Job, ...] = ()


def pixel_region_bins(region: tuple[float, ...], width: int, height: int) -> str:
    """A pixel region ``x1,y1,x2,y2`` as the location bins Florence-2 reads (floor, as its quantizer)."""
    sizes = (width, height, width, height)
    bins = [min(999, max(0, math.floor(v / (s / 1000)))) for v, s in zip(region, sizes, strict=True)]
    return ",".join(str(b) for b in bins)


def parse_pixel_region(text: str) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in text.replace(" ", ",").split(",") if v)
    except ValueError:
        values = ()
    if (
        len(values) != 4
        or not all(math.isfinite(v) for v in values)
        or values[0] > values[2]
        or values[1] > values[3]
        or min(values) < 0
    ):
        raise OptionError(f"`region` is x1,y1,x2,y2 in pixels with x1<=x2 and y1<=y2; got {text!r}")
    return values  # type: ignore[return-value]


def read_text_file(path: str | Path) -> dict[str, str]:
    """Per-image text inputs from JSONL (``{"file": ..., "text": ...}``) or CSV (``file,text``)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as file:
            if path.suffix.lower() in {".jsonl", ".json"}:
                rows = [json.loads(line) for line in file if line.strip()]
                pairs = [(row["file"], row["text"]) for row in rows]
            else:
                rows = [row for row in csv.reader(file) if row]
                if rows and [c.strip().lower() for c in rows[0][:2]] == ["file", "text"]:
                    rows = rows[1:]
                pairs = [(row[0], row[1]) for row in rows]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise TaskError(f"cannot read text file {path}: {exc}") from None
    return {_normal(name): text for name, text in pairs}


def _normal(name: str) -> str:
    return os.path.normpath(name).replace(os.sep, "/")


def lookup_text(texts: Mapping[str, str], ref: ImageRef) -> str | None:
    """The text given for ``ref`` by its output name, its path, or its absolute path."""
    for candidate in (ref.name, ref.path, os.path.abspath(ref.path)):
        text = texts.get(_normal(candidate))
        if text is not None:
            return text
    return None


def split_texts(values: list[str]) -> str | dict[str, str] | None:
    """``--text`` values: one plain text, or ``TASK=TEXT`` for each task (by its name, as ``-t`` takes it).

    Several plain texts, or plain and named ones mixed, are refused: which task gets which would be
    a guess.
    """
    named: dict[str, str] = {}
    plain: list[str] = []
    for value in values:
        head, equals, tail = value.partition("=")
        task = _task_or_none(head) if equals else None
        if task is None:
            plain.append(value)
        elif task.name in named:
            raise OptionError(f"`text` gives {task.name} two texts; give it one")
        else:
            named[task.name] = tail
    if (named and plain) or len(plain) > 1:
        raise OptionError(
            f"`text` is given {len(values)} times: name the task of each, e.g. `text` "
            "CAPTION_TO_PHRASE_GROUNDING='a red house' `text` REGION_TO_DESCRIPTION=100,100,500,600"
        )
    return named or (plain[0] if plain else None)


def _task_or_none(name: str) -> Task | None:
    try:
        return resolve_task(name)
    except TaskError:
        return None


def parse_requests(
    tasks: list[str],
    text: str | Mapping[str, str] | None = None,
    text_file: str | Path | None = None,
    classes: str | None = None,
    ground_from: str | None = None,
    region: str | None = None,
    prompts: list[str] = (),
) -> list[TaskRequest]:
    """Turn task names, free prompts (after them) and text options into requests, validating everything
    a model is not needed for.

    ``text`` goes to the tasks no other option feeds: one text for all of them (they must take the same
    kind: phrases or regions), or a text per task name. Raises ``TaskError`` with a message for the user.
    """
    names = [resolve_task(name) for name in tasks] + [prompt_task(prompt) for prompt in prompts]
    if not names:
        raise OptionError("nothing to ask: give a task (`tasks`) or a prompt (`prompts`)")
    source = resolve_task(ground_from) if ground_from else None
    if source and source not in names:
        names.insert(0, source)
    if source and source.output is not Output.TEXT:
        raise OptionError(f"`ground_from` needs a text task (a caption); {source.name} writes boxes")
    texts = read_text_file(text_file) if text_file else None
    class_list = tuple(c.strip() for c in (classes or "").split(",") if c.strip())
    pixels = parse_pixel_region(region) if region else None
    requests: list[TaskRequest] = []
    takers: list[Task] = []  # the tasks whose text is --text
    for task in dict.fromkeys(names):  # dedupe, keep order
        if not task.needs_text:
            requests.append(TaskRequest(task))
        elif task.per_class and class_list:
            requests.append(TaskRequest(task, classes=class_list))
        elif source and task.text_input is TextInput.PHRASE and task is not source:
            requests.append(TaskRequest(task, ground_from=source))
        elif task.text_input is TextInput.REGION and pixels:
            requests.append(TaskRequest(task, region_pixels=pixels))
        elif texts is not None:
            requests.append(TaskRequest(task, texts=texts))
        else:
            takers.append(task)
            requests.append(TaskRequest(task))
    by_task = _texts_by_task(takers, [t for t in names if t.needs_text], text)
    for number, request in enumerate(requests):
        if request.task in takers:
            task_text = by_task.get(request.task.name)
            task_prompt(request.task, task_text)  # raises when the text is missing or malformed
            requests[number] = TaskRequest(request.task, text=task_text)
    if source:
        fed = [i for i, t in enumerate(names) if t.text_input is TextInput.PHRASE]
        if not fed:
            raise OptionError(
                "`ground_from` needs a task that takes a phrase, e.g. CAPTION_TO_PHRASE_GROUNDING"
            )
        if names.index(source) > min(fed):
            raise OptionError(f"`ground_from` {source.name} must come before the tasks it feeds")
    return requests


def _texts_by_task(
    takers: list[Task], text_tasks: list[Task], text: str | Mapping[str, str] | None
) -> dict[str, str]:
    """Each taker's ``--text``: a plain text serves every taker if they take one kind of text; named
    texts must name a task that takes text."""
    if text is None:
        return {}
    if isinstance(text, str):
        if not takers:
            raise OptionError("`text` is given, but none of the tasks takes it")
        if len({task.text_input for task in takers}) > 1:
            names = ", ".join(task.name for task in takers)
            raise OptionError(
                f"one `text` for tasks that take different kinds of text ({names}): give each its own "
                "with `text` TASK=TEXT"
            )
        return {task.name: text for task in takers}
    named = {resolve_task(name): value for name, value in text.items()}
    for task in named:
        if task not in text_tasks:
            why = "takes no text" if not task.needs_text else "is not among the tasks (-t)"
            raise OptionError(f"`text` names {task.name}, which {why}")
        if task not in takers:
            raise OptionError(f"`text` names {task.name}, whose text another option gives")
    return {task.name: value for task, value in named.items()}


def as_requests(tasks: list[str] | list[TaskRequest], text: str | None = None) -> list[TaskRequest]:
    """Requests as given, or parsed from task names (with ``text`` for the tasks that need one)."""
    if tasks and isinstance(tasks[0], TaskRequest):
        return list(tasks)
    return parse_requests(list(tasks), text)


def requests_identity(requests: list[TaskRequest]) -> str:
    """Everything the requests ask of each image, as one string (per-image texts as a digest): a tar
    shard finished with requests of one identity is finished for any others of the same."""

    def value(request: TaskRequest, name: str) -> object:
        value = getattr(request, name)
        if name == "texts" and value is not None:
            return hashlib.blake2b(json.dumps(list(value.items())).encode(), digest_size=16).hexdigest()
        return value.name if isinstance(value, Task) else value

    return repr([[value(r, f.name) for f in fields(r)] for r in requests])


def plan_jobs(ref: ImageRef, requests: list[TaskRequest]) -> tuple[list[Job], list[ImageFailure]]:
    """The jobs of every request on ``ref`` (keys not yet set), and the failures known before decoding."""
    jobs: list[Job] = []
    failures: list[ImageFailure] = []
    for request in requests:
        task = request.task
        if request.classes:
            for name in request.classes:
                jobs.append(Job(task, len(jobs), text=name, category=name))
        elif request.texts is not None:
            text = lookup_text(request.texts, ref)
            if text is None:
                failures.append(ImageFailure(ref.name, "no entry in the text file", task.name))
                continue
            try:
                task_prompt(task, text)
            except TaskError as exc:
                failures.append(ImageFailure(ref.name, str(exc), task.name))
                continue
            jobs.append(Job(task, len(jobs), text=text))
        elif request.ground_from:
            jobs.append(Job(task, len(jobs), ground_from=request.ground_from.name))
        else:
            jobs.append(Job(task, len(jobs), text=request.text, region_pixels=request.region_pixels))
    return jobs, failures
