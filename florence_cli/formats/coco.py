"""The COCO files florence-cli writes: streamed from answers (``write_coco``, for a run's final files and
for ``merge``), and read back into validated, typed objects that viz, eval and export share."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any

from ..records import Answer, Instance
from ..tasks import TASKS, Task
from ..writers import atomic_writer

Box = tuple[float, float, float, float]  # x, y, width, height in pixels
Polygon = tuple[float, ...]  # x1, y1, x2, y2, ... in pixels
UNNAMED_CLASS = "object"  # the class of an unnamed category when the file names no task


class FormatError(ValueError):
    """An input that does not hold what its format promises; the message is one line."""


@dataclass(frozen=True)
class Category:
    id: int
    name: str


@dataclass(frozen=True)
class ImageRecord:
    id: int
    file_name: str  # POSIX path relative to the annotated folder
    width: int
    height: int


@dataclass(frozen=True)
class Annotation:
    id: int
    image_id: int
    category_id: int
    bbox: Box
    label: str  # free text: the category name, a grounded phrase or the OCR text
    score: float | None = None
    segmentation: tuple[Polygon, ...] = ()

    @property
    def outlines(self) -> tuple[Polygon, ...]:
        """The polygons, or else the box's four corners as one polygon."""
        if self.segmentation:
            return self.segmentation
        x, y, w, h = self.bbox
        return ((x, y, x + w, y, x + w, y + h, x, y + h),)


@dataclass(frozen=True)
class CocoDataset:
    images: tuple[ImageRecord, ...]
    annotations: tuple[Annotation, ...]
    categories: tuple[Category, ...]
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _unique("image id", (image.id for image in self.images))
        _unique("image file_name", (image.file_name for image in self.images))
        _unique("category id", (category.id for category in self.categories))
        _unique("annotation id", (annotation.id for annotation in self.annotations))
        image_ids = {image.id for image in self.images}
        for annotation in self.annotations:
            if annotation.image_id not in image_ids:
                raise FormatError(f"annotation {annotation.id} names unknown image_id {annotation.image_id}")
            if annotation.category_id not in self.categories_by_id:
                raise FormatError(
                    f"annotation {annotation.id} names unknown category_id {annotation.category_id}"
                )

    @cached_property
    def categories_by_id(self) -> dict[int, Category]:
        return {category.id: category for category in self.categories}

    @cached_property
    def named_categories(self) -> dict[int, Category]:
        """Each category by id, named for formats whose classes need a name (VOC, Label Studio, YOLO).

        Segmentation and region-proposal files have one category named ``''``; it takes the slug of
        the file's task (``info.task``, e.g. ``referring_expression_segmentation``), or ``object``
        when the file names no known task. Other names are kept.
        """
        task = TASKS.get(str(self.info.get("task", "")))
        fallback = task.slug if task else UNNAMED_CLASS
        return {
            category.id: category if category.name else Category(category.id, fallback)
            for category in self.categories
        }

    @cached_property
    def has_polygons(self) -> bool:
        """Whether any annotation has a segmentation (formats that hold one kind then write polygons)."""
        return any(annotation.segmentation for annotation in self.annotations)

    @cached_property
    def annotations_by_image(self) -> dict[int, list[Annotation]]:
        """Every image id, with its annotations in file order (an empty list when it has none)."""
        by_image: dict[int, list[Annotation]] = {image.id: [] for image in self.images}
        for annotation in self.annotations:
            by_image[annotation.image_id].append(annotation)
        return by_image


def _unique(what: str, values: Iterable[object]) -> None:
    seen: set[object] = set()
    for value in values:
        if value in seen:
            raise FormatError(f"duplicate {what} {value!r}")
        seen.add(value)


_TYPE_NAMES = {int: "an integer", str: "a string", list: "a list", dict: "an object"}


def _get(record: Any, key: str, kind: type, where: str, optional: bool = False) -> Any:
    """``record[key]`` checked to be of ``kind`` (a float accepts ints; bools are never numbers)."""
    if not isinstance(record, dict):
        raise FormatError(f"{where}: expected an object")
    value = record.get(key)
    if value is None and optional:
        return None
    kinds = (int, float) if kind is float else kind
    if value is None or isinstance(value, bool) or not isinstance(value, kinds):
        expected = _TYPE_NAMES.get(kind, "a number")
        raise FormatError(f"{where}: {key!r} should be {expected}, not {json.dumps(value)[:40]}")
    return float(value) if kind is float else value


def _numbers(values: list, where: str) -> tuple[float, ...]:
    if not all(isinstance(value, int | float) and not isinstance(value, bool) for value in values):
        raise FormatError(f"{where}: expected numbers only")
    return tuple(float(value) for value in values)


def _image(record: Any, where: str) -> ImageRecord:
    file_name = _get(record, "file_name", str, where)
    path = PurePosixPath(file_name)
    if not file_name or path.is_absolute() or ".." in path.parts:
        raise FormatError(
            f"{where}: file_name {file_name!r} should be a relative path inside the image folder"
        )
    width, height = _get(record, "width", int, where), _get(record, "height", int, where)
    if width <= 0 or height <= 0:
        raise FormatError(f"{where}: width and height should be positive, not {width}x{height}")
    return ImageRecord(_get(record, "id", int, where), file_name, width, height)


def _polygon(value: Any, where: str) -> Polygon:
    if not isinstance(value, list):
        raise FormatError(f"{where}: expected a list of polygons (RLE masks are not supported)")
    polygon = _numbers(value, where)
    if len(polygon) < 6 or len(polygon) % 2:
        raise FormatError(f"{where}: each polygon should hold 3 or more x, y pairs")
    return polygon


def _category(record: Any, where: str) -> Category:
    return Category(_get(record, "id", int, where), _get(record, "name", str, where))


def _annotation(record: Any, where: str, categories: Mapping[int, Category]) -> Annotation:
    bbox = _numbers(_get(record, "bbox", list, where), f"{where}.bbox")
    if len(bbox) != 4 or bbox[2] < 0 or bbox[3] < 0:
        raise FormatError(f"{where}: bbox should be [x, y, width, height] with width, height >= 0")
    polygons = tuple(
        _polygon(polygon, f"{where}.segmentation")
        for polygon in _get(record, "segmentation", list, where, optional=True) or ()
    )
    category_id = _get(record, "category_id", int, where)
    label = _get(record, "label", str, where, optional=True)
    if label is None:
        label = categories[category_id].name if category_id in categories else ""
    return Annotation(
        id=_get(record, "id", int, where),
        image_id=_get(record, "image_id", int, where),
        category_id=category_id,
        bbox=bbox,  # type: ignore[arg-type]  # length checked above
        label=label,
        score=_get(record, "score", float, where, optional=True),
        segmentation=polygons,
    )


def from_coco(data: Any) -> CocoDataset:
    """Validate a parsed COCO file (polygon segmentations only) into a :class:`CocoDataset`.

    An annotation without ``label`` takes its category's name.
    """
    if not isinstance(data, dict):
        raise FormatError("expected a JSON object with images, annotations and categories")
    records = {key: _get(data, key, list, "top level") for key in ("images", "annotations", "categories")}
    categories = tuple(
        _category(record, f"categories[{index}]") for index, record in enumerate(records["categories"])
    )
    by_id = {category.id: category for category in categories}
    return CocoDataset(
        images=tuple(_image(record, f"images[{index}]") for index, record in enumerate(records["images"])),
        annotations=tuple(
            _annotation(record, f"annotations[{index}]", by_id)
            for index, record in enumerate(records["annotations"])
        ),
        categories=categories,
        info=_get(data, "info", dict, "top level", optional=True) or {},
    )


def read_json(path: Path) -> Any:
    """The parsed JSON in ``path``; unreadable or malformed files raise FormatError naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise FormatError(f"{path}: cannot read: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise FormatError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise FormatError(f"{path}: not valid JSON: {error}") from None


def load_coco(path: Path) -> CocoDataset:
    """Read and validate the COCO file at ``path``; errors name the file."""
    data = read_json(path)
    try:
        return from_coco(data)
    except FormatError as error:
        raise FormatError(f"{path}: {error}") from None


def polygon_bbox(polygon: Polygon) -> Box:
    """The axis-aligned box around a flat ``x1, y1, x2, y2, ...`` polygon."""
    xs, ys = polygon[0::2], polygon[1::2]
    return (min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys))


def polygon_area(polygon: Polygon) -> float:
    """The area inside a flat ``x1, y1, x2, y2, ...`` polygon (the shoelace formula)."""
    xs, ys = polygon[0::2], polygon[1::2]
    n = len(xs)
    return abs(sum(xs[i] * ys[(i + 1) % n] - xs[(i + 1) % n] * ys[i] for i in range(n))) / 2


# -- writing ------------------------------------------------------------------------------------------


def coco_annotation(instance: Instance) -> dict:
    """COCO fields for one parsed instance: ``bbox`` [x, y, w, h], ``area``, ``segmentation``."""
    shapes = instance.polygons or ([instance.quad] if instance.quad else [])
    polygons = [p for p in shapes if len(p) >= 6]  # COCO polygons need three points
    if instance.bbox:
        x1, y1, x2, y2 = instance.bbox
        x1, x2 = sorted((x1, x2))
        y1, y2 = sorted((y1, y2))
        box = (x1, y1, x2 - x1, y2 - y1)
    else:
        box = polygon_bbox(tuple(c for p in shapes for c in p) or (0.0, 0.0))
    annotation = {"bbox": list(box), "area": box[2] * box[3], "iscrowd": 0}
    if polygons:
        annotation["segmentation"] = polygons
        annotation["area"] = sum(polygon_area(p) for p in polygons)
    return annotation


def _by_image(answers: Iterable[Answer]) -> Iterator[tuple[int, list[Answer]]]:
    """Consecutive answers of the same image, numbered from 1."""
    for image_id, (_, group) in enumerate(itertools.groupby(answers, key=lambda a: a.file), start=1):
        yield image_id, list(group)


def write_coco(
    path: Path,
    task: Task,
    answers: Callable[[], Iterable[Answer]],
    info: dict,
    categories: list[str] | None = None,
) -> int:
    """Write the COCO file of ``task`` atomically from ``answers()``, which yields the task's answers
    in name order each time it is called (it is read twice, so nothing is held in memory); returns
    the number of images.

    Categories are the given names in that order, or else every label seen, sorted, so their ids do
    not depend on the order in which answers arrived. Several answers of one image (one query per
    class) make one image entry.
    """
    if categories is None:
        categories = sorted({i.category_name for a in answers() for i in a.instances})
    category_ids = {name: number for number, name in enumerate(categories, start=1)}
    annotation_id = images = 0
    with atomic_writer(path) as file:
        file.write('{"info": ' + json.dumps(info, ensure_ascii=False) + ', "images": [')
        for images, group in _by_image(answers()):
            first = group[0]
            image = {"id": images, "file_name": first.file, "width": first.width, "height": first.height}
            file.write((", " if images > 1 else "") + json.dumps(image, ensure_ascii=False))
        file.write('], "annotations": [')
        for image_id, group in _by_image(answers()):
            for instance in (i for answer in group for i in answer.instances):
                if instance.category_name not in category_ids:
                    continue
                annotation_id += 1
                annotation = {
                    "id": annotation_id,
                    "image_id": image_id,
                    "category_id": category_ids[instance.category_name],
                    **coco_annotation(instance),
                    "label": instance.label,
                }
                if instance.score is not None:
                    annotation["score"] = instance.score
                file.write((", " if annotation_id > 1 else "") + json.dumps(annotation, ensure_ascii=False))
        category_list = [{"id": i, "name": n, "supercategory": task.slug} for n, i in category_ids.items()]
        file.write('], "categories": ' + json.dumps(category_list, ensure_ascii=False) + "}\n")
    return images


def output_paths(images: Iterable[ImageRecord], folder: str, suffix: str) -> dict[int, str]:
    """Each image's per-image output file: its ``file_name`` under ``folder`` with ``suffix`` as extension.

    Two images that would share a file (``a.jpg`` and ``a.png``) raise FormatError.
    """
    paths: dict[int, str] = {}
    owners: dict[str, str] = {}
    for image in images:
        path = str(PurePosixPath(folder, image.file_name).with_suffix(suffix))
        if path in owners:
            raise FormatError(f"{owners[path]} and {image.file_name} would both be written to {path}")
        owners[path] = image.file_name
        paths[image.id] = path
    return paths
