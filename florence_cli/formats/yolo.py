"""YOLO labels: a text file per image (normalised boxes, or polygons for segmentation) plus ``data.yaml``."""

from __future__ import annotations

import json
from collections.abc import Sequence

from .coco import (
    Annotation,
    Category,
    CocoDataset,
    FormatError,
    ImageRecord,
    Polygon,
    output_paths,
    polygon_area,
    polygon_bbox,
)


def _normalised(points: Polygon, image: ImageRecord) -> list[float]:
    """Flat ``x, y, ...`` pixel points as fractions of the image size, clipped to [0, 1]."""
    return [
        min(max(v / (image.width if i % 2 == 0 else image.height), 0.0), 1.0) for i, v in enumerate(points)
    ]


def _pixels(points: Sequence[float], image: ImageRecord) -> Polygon:
    """Flat ``x, y, ...`` fractions of the image size in pixels."""
    return tuple(v * (image.width if i % 2 == 0 else image.height) for i, v in enumerate(points))


def to_yolo(
    image: ImageRecord, annotations: Sequence[Annotation], class_ids: dict[int, int], segments: bool
) -> str:
    """One image's label file: ``class cx cy w h`` lines, or ``class x1 y1 x2 y2 ...`` when ``segments``.

    Coordinates are normalised to the image size and clipped to [0, 1]; ``class_ids`` maps COCO
    category ids to YOLO class indices.
    """
    lines = []
    for annotation in annotations:
        if segments:
            # YOLO holds one polygon per object: the largest
            values = _normalised(max(annotation.outlines, key=polygon_area), image)
        else:
            x, y, w, h = annotation.bbox
            x0, y0, x1, y1 = _normalised((x, y, x + w, y + h), image)
            values = [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]
        lines.append(" ".join([str(class_ids[annotation.category_id]), *(f"{v:.6f}" for v in values)]))
    return "".join(f"{line}\n" for line in lines)


def from_yolo(text: str, image: ImageRecord, categories: Sequence[Category]) -> list[Annotation]:
    """Annotations in pixels from one YOLO label file; class ``i`` is ``categories[i]``."""
    annotations = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            class_id, values = int(fields[0]), [float(field) for field in fields[1:]]
        except ValueError:
            raise FormatError(f"line {number}: expected a class index and numbers") from None
        if not 0 <= class_id < len(categories):
            raise FormatError(f"line {number}: class {class_id} is not in the {len(categories)} classes")
        if len(values) == 4:
            cx, cy, w, h = values
            bbox = _pixels((cx - w / 2, cy - h / 2, w, h), image)
            segmentation: tuple[Polygon, ...] = ()
        elif len(values) >= 6 and len(values) % 2 == 0:
            polygon = _pixels(values, image)
            bbox, segmentation = polygon_bbox(polygon), (polygon,)
        else:
            raise FormatError(f"line {number}: expected 4 box values or 3 or more x, y pairs")
        category = categories[class_id]
        annotations.append(
            Annotation(len(annotations) + 1, image.id, category.id, bbox, category.name, None, segmentation)
        )
    return annotations


def data_yaml(categories: Sequence[Category]) -> str:
    """The dataset file naming the classes in order (names as a JSON list, which is valid YAML)."""
    names = json.dumps([category.name for category in categories], ensure_ascii=False)
    return (
        "# Exported by florence-cli: put each image under images/ at the path of its labels/ file.\n"
        f"train: images\nval: images\nnc: {len(categories)}\nnames: {names}\n"
    )


def dataset_files(dataset: CocoDataset) -> dict[str, str]:
    """``labels/<image path>.txt`` for every image plus ``data.yaml``.

    Every object is written as a polygon when any annotation has a segmentation (YOLO wants one
    kind per dataset), otherwise as a box. Classes are named by ``CocoDataset.named_categories``.
    """
    class_ids = {category.id: index for index, category in enumerate(dataset.categories)}
    paths = output_paths(dataset.images, "labels", ".txt")
    files = {
        paths[image.id]: to_yolo(
            image, dataset.annotations_by_image[image.id], class_ids, dataset.has_polygons
        )
        for image in dataset.images
    }
    return files | {"data.yaml": data_yaml(list(dataset.named_categories.values()))}
