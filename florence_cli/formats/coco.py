"""The COCO files florence-cli writes, read into validated, typed objects that viz, eval and export share."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any

Box = tuple[float, float, float, float]  # x, y, width, height in pixels
Polygon = tuple[float, ...]  # x1, y1, x2, y2, ... in pixels


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
