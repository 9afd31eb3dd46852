"""The table of Florence-2 tasks: one row per task, everything else reads it."""

from __future__ import annotations

import difflib
import functools
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum


class Output(str, Enum):
    """What a task's answer is, and so which writer takes it."""

    TEXT = "text"  # a string -> OUT/<task>/<image>.txt
    BOXES = "boxes"  # labelled boxes -> COCO bbox
    POLYGONS = "polygons"  # labelled polygons -> COCO segm
    OCR_REGIONS = "ocr_regions"  # text with quadrilaterals -> COCO segm, label = text
    BOXES_OR_POLYGONS = "boxes_or_polygons"  # open-vocabulary detection answers either


class TextInput(str, Enum):
    """What the ``--text`` of a task means."""

    NONE = "none"
    PHRASE = "phrase"
    REGION = "region"


@dataclass(frozen=True)
class Task:
    """One Florence-2 task: its prompt token, its answer and the text it needs."""

    name: str  # e.g. "OD"
    output: Output
    text_input: TextInput
    parse_type: str  # transformers' post-processing type for this task (parse.PARSERS)
    summary: str
    per_class: bool = False  # takes --classes: one query per class name
    prompt: str | None = None  # a free prompt (--prompt): sent as written, answered as text

    @property
    def token(self) -> str:
        """What the model is prompted with: the task token, e.g. ``<OD>``, or the free prompt."""
        return self.prompt if self.prompt is not None else f"<{self.name}>"

    @property
    def slug(self) -> str:
        """The lowercase name used for output files, e.g. ``od``, or ``prompt-<slug>`` for a free prompt."""
        return prompt_slug(self.prompt) if self.prompt is not None else self.name.lower()

    @property
    def needs_text(self) -> bool:
        return self.text_input is not TextInput.NONE

    @property
    def writes_coco(self) -> bool:
        return self.output is not Output.TEXT


_T, _B, _P, _O, _BP = Output.TEXT, Output.BOXES, Output.POLYGONS, Output.OCR_REGIONS, Output.BOXES_OR_POLYGONS
_NO, _PH, _RE = TextInput.NONE, TextInput.PHRASE, TextInput.REGION

TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("CAPTION", _T, _NO, "pure_text", "one-sentence caption"),
        Task("DETAILED_CAPTION", _T, _NO, "pure_text", "a few sentences"),
        Task("MORE_DETAILED_CAPTION", _T, _NO, "pure_text", "a paragraph"),
        Task("OD", _B, _NO, "description_with_bboxes", "object detection: labelled boxes"),
        Task("DENSE_REGION_CAPTION", _B, _NO, "description_with_bboxes", "boxes with short captions"),
        Task("REGION_PROPOSAL", _B, _NO, "bboxes", "unlabelled box proposals"),
        Task(
            "CAPTION_TO_PHRASE_GROUNDING", _B, _PH, "phrase_grounding", "boxes for the phrases of a caption"
        ),
        Task("REFERRING_EXPRESSION_SEGMENTATION", _P, _PH, "polygons", "polygon mask of an expression"),
        Task("REGION_TO_SEGMENTATION", _P, _RE, "polygons", "polygon mask of a region"),
        Task(
            "OPEN_VOCABULARY_DETECTION",
            _BP,
            _PH,
            "description_with_bboxes_or_polygons",
            "boxes or polygons for a class name",
            per_class=True,
        ),
        Task("REGION_TO_CATEGORY", _T, _RE, "pure_text", "category of a region"),
        Task("REGION_TO_DESCRIPTION", _T, _RE, "pure_text", "description of a region"),
        Task("REGION_TO_OCR", _T, _RE, "pure_text", "text inside a region"),
        Task("OCR", _T, _NO, "pure_text", "all text in the image"),
        Task("OCR_WITH_REGION", _O, _NO, "ocr", "text lines with quadrilaterals"),
    ]
}


class TaskError(ValueError):
    """A task name or task text that cannot be used."""


class OptionError(TaskError):
    """Options of a run that cannot be used as given. The message names each option in backquotes by
    its name in the Python API (`captions.task`, `region`); a front end words it in its own names
    (``worded``: the CLI's flags)."""

    def worded(self, names: Mapping[str, str]) -> str:
        """The message with each quoted option given its name in ``names`` (others keep theirs)."""
        return worded(str(self), names)


def worded(message: str, names: Mapping[str, str]) -> str:
    """``message`` (an ``OptionError``'s, or an image's failure made of one) with each option quoted in it
    given its name in ``names``."""
    return re.sub(r"`([\w.]+)`", lambda m: names.get(m[1], m[0]), message)


PROMPT_PREFIX = "prompt:"  # a free prompt's task name: the prefix, then the prompt as written
_SLUG_LENGTH = 48
_PROMPT_TOKEN = re.compile(r"<[A-Z0-9_]+>")


@functools.lru_cache(maxsize=64)  # each journal line names its task: one check per prompt, not per line
def prompt_task(prompt: str) -> Task:
    """The task that sends ``prompt`` to the model as written, as fine-tuned captioners are prompted
    (e.g. PromptGen's ``<GENERATE_TAGS>``), and answers text: what the processor does with a prompt
    outside Microsoft's table (passed through, answer post-processed as ``pure_text``)."""
    if not prompt.strip():
        raise TaskError("--prompt needs a prompt, got an empty one")
    for task in TASKS.values():
        if task.token in prompt:
            raise TaskError(
                f"--prompt {prompt!r} holds the task token {task.token}, which the processor rewrites: "
                f"use -t {task.name}"
            )
    name = PROMPT_PREFIX + prompt
    return Task(name, Output.TEXT, TextInput.NONE, "pure_text", "free prompt", prompt=prompt)


@functools.lru_cache(maxsize=64)
def prompt_slug(prompt: str) -> str:
    """A free prompt's folder name: a prompt token such as ``<GENERATE_TAGS>`` gives
    ``prompt-generate_tags``; any other prompt its words, lowercase and cut short, and a digest of the
    whole prompt, so that two prompts never share a folder."""
    if _PROMPT_TOKEN.fullmatch(prompt):
        return f"prompt-{prompt[1:-1].lower()}"
    words = re.sub(r"[^0-9a-z_]+", "-", prompt.lower()).strip("-")[:_SLUG_LENGTH].rstrip("-")
    digest = hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:8]
    return f"prompt-{words}-{digest}" if words else f"prompt-{digest}"


def resolve_task(name: str) -> Task:
    """Find a task by name, accepting ``OD``, ``od`` and ``<OD>`` (and ``prompt:TEXT``, a free prompt)."""
    if name.startswith(PROMPT_PREFIX):
        return prompt_task(name[len(PROMPT_PREFIX) :])
    key = name.strip().strip("<>").upper()
    if key not in TASKS:
        close = difflib.get_close_matches(key, TASKS, n=1, cutoff=0.75)
        guess = f"; did you mean {close[0]}?" if close else ""
        raise TaskError(f"unknown task {name!r}{guess} (`florence tasks` lists the {len(TASKS)} tasks)")
    return TASKS[key]


def region_text(text: str) -> str:
    """Turn ``x1,y1,x2,y2`` location bins (0-999) into the ``<loc_..>`` text region tasks expect."""
    parts = [p.strip() for p in text.replace(" ", ",").split(",") if p.strip()]
    try:
        bins = [int(p) for p in parts]
    except ValueError:
        bins = []
    if len(bins) != 4 or not all(0 <= b <= 999 for b in bins):
        raise TaskError(f"a region is four location bins 0-999 as x1,y1,x2,y2; got {text!r}")
    return "".join(f"<loc_{b}>" for b in bins)


_LOCATION_REGION = re.compile(r"(?:<loc_\d{1,3}>){4}")


def task_prompt(task: Task, text: str | None) -> str:
    """The prompt string for ``task``, as the model card writes it (``<TASK>`` + text input)."""
    if not task.needs_text:
        return task.token
    if not text or not text.strip():
        raise TaskError(f"task {task.name} needs a text input (--text)")
    if task.text_input is TextInput.REGION:
        text = text.strip()
        if "<loc_" not in text:
            text = region_text(text)
        elif not _LOCATION_REGION.fullmatch(text):
            raise TaskError(f"a region is four location tokens <loc_0>..<loc_999>; got {text!r}")
    return task.token + text
