"""Stage 6: write answers — text files and JSONL as they finish, COCO files from the journal.

Every final file is written to a temporary name and renamed into place, so a reader never sees a
half-written file and a crash never leaves one.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

from .tasks import Task


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give: the user's umask applies (mkstemp's 0600 would not)


@contextmanager
def atomic_writer(path: Path, mode: str = "w"):
    """Open a temporary file beside ``path``; on success rename it over ``path``.

    The temporary name is short (an image name near the file system's 255-byte limit still fits), and
    the file gets the mode a plain ``open`` would give under the user's umask.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".florence-", suffix=".tmp")
    try:
        os.fchmod(handle, FILE_MODE)
        with os.fdopen(handle, mode, encoding="utf-8" if "b" not in mode else None) as file:
            yield file
        os.replace(temporary, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(temporary)
        raise


def text_path(output: Path, task: Task, name: str) -> Path:
    """Where a text task's answer for image ``name`` goes: ``OUT/<task>/<name>.txt``."""
    return output / task.slug / f"{name}.txt"


def write_text(output: Path, task: Task, name: str, text: str) -> None:
    with atomic_writer(text_path(output, task, name)) as file:
        file.write(text)


class StdoutClosed(Exception):
    """Standard output was closed by its reader (``florence annotate … --jsonl - | head``)."""


class JsonlSink:
    """One JSON object per line, flushed as each answer finishes; ``-`` is standard output."""

    def __init__(self, target: str):
        self.target = target
        self._own = target != "-"
        self._file: IO[str] = open(target, "a", encoding="utf-8") if self._own else sys.stdout  # noqa: SIM115

    def write(self, records: Iterable[dict]) -> None:
        """Write and flush; a reader that closed standard output raises ``StdoutClosed``."""
        try:
            for record in records:
                self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._file.flush()
        except BrokenPipeError:
            if self._own:
                raise
            raise StdoutClosed from None

    def close(self) -> None:
        if self._own:
            self._file.close()


def coco_annotation(instance: dict) -> dict:
    """COCO fields for one parsed instance: ``bbox`` [x, y, w, h], ``area``, ``segmentation``."""
    shapes = instance.get("polygons") or ([instance["quad"]] if instance.get("quad") else [])
    polygons = [p for p in shapes if len(p) >= 6]  # COCO polygons need three points
    if instance.get("bbox"):
        x1, y1, x2, y2 = instance["bbox"]
    else:
        points = [c for p in shapes for c in p]
        xs, ys = points[0::2] or [0.0], points[1::2] or [0.0]
        x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    annotation = {"bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
    if polygons:
        annotation["segmentation"] = polygons
        annotation["area"] = sum(_polygon_area(p) for p in polygons)
    return annotation


def _by_image(records: Iterable[dict]) -> Iterator[tuple[int, list[dict]]]:
    """Consecutive records of the same image, numbered from 1."""
    grouped = itertools.groupby(records, key=lambda record: record["file"])
    for image_id, (_, group) in enumerate(grouped, start=1):
        yield image_id, list(group)


def _category(instance: dict) -> str:
    """An instance's category: the class it was asked for, else its label."""
    return instance.get("category") or instance["label"]


def _polygon_area(flat: list[float]) -> float:
    xs, ys = flat[0::2], flat[1::2]
    n = len(xs)
    return abs(sum(xs[i] * ys[(i + 1) % n] - xs[(i + 1) % n] * ys[i] for i in range(n))) / 2


def write_coco(
    path: Path,
    task: Task,
    records: Callable[[], Iterable[dict]],
    info: dict,
    categories: list[str] | None = None,
) -> None:
    """Write the COCO file of ``task`` atomically from ``records()``, which yields its records in input
    order each time it is called (it is read twice, so nothing is held in memory).

    Categories are the given names in that order, or else every label seen, sorted, so their ids do
    not depend on the order in which answers arrived. Several records of one image (one query per
    class) make one image entry.
    """
    if categories is None:
        categories = sorted({_category(i) for r in records() for i in r["instances"]})
    category_ids = {name: number for number, name in enumerate(categories, start=1)}
    annotation_id = 0
    with atomic_writer(path) as file:
        file.write('{"info": ' + json.dumps(info, ensure_ascii=False) + ', "images": [')
        for image_id, group in _by_image(records()):
            first = group[0]
            image = {
                "id": image_id,
                "file_name": first["file"],
                "width": first["width"],
                "height": first["height"],
            }
            file.write((", " if image_id > 1 else "") + json.dumps(image, ensure_ascii=False))
        file.write('], "annotations": [')
        for image_id, group in _by_image(records()):
            for instance in (i for record in group for i in record["instances"]):
                if _category(instance) not in category_ids:
                    continue
                annotation_id += 1
                annotation = {
                    "id": annotation_id,
                    "image_id": image_id,
                    "category_id": category_ids[_category(instance)],
                    **coco_annotation(instance),
                    "label": instance["label"],
                }
                if instance.get("score") is not None:
                    annotation["score"] = instance["score"]
                file.write((", " if annotation_id > 1 else "") + json.dumps(annotation, ensure_ascii=False))
        category_list = [{"id": i, "name": n, "supercategory": task.slug} for n, i in category_ids.items()]
        file.write('], "categories": ' + json.dumps(category_list, ensure_ascii=False) + "}\n")
