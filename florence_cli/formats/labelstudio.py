"""Label Studio pre-annotation tasks: one task per image, its objects as a prediction in percent coordinates.

The results fit the stock image templates (``<RectangleLabels>``/``<PolygonLabels name="label"
toName="image">``), one region type per file as a control holds one: polygons when any annotation
has a segmentation (boxes then become their four corners), else rectangles. An annotation whose
text differs from its category (OCR) also gets a per-region ``<TextArea name="transcription">``
result, as in the OCR template. Labels are category names (``CocoDataset.named_categories``).
``data.image`` is ``image_root`` followed by the percent-encoded file name, as Label Studio's own
converters write it (local-files storage decodes ``?d=``, so ``+``, ``&``, ``#`` and spaces must be
encoded).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from statistics import fmean
from typing import Any
from urllib.parse import quote

from .coco import Annotation, Box, Category, CocoDataset, FormatError, ImageRecord, Polygon, polygon_bbox

FROM_NAME = "label"
TEXT_FROM_NAME = "transcription"
TO_NAME = "image"


def _percent(value: float, size: int) -> float:
    return min(max(100.0 * value / size, 0.0), 100.0)


def _geometries(
    annotation: Annotation, image: ImageRecord, polygons: bool
) -> list[tuple[str, dict[str, Any]]]:
    """``(type, value)`` per region: with ``polygons``, one per outline (segmentation part or box
    corners), else the box."""
    if polygons:
        return [
            (
                "polygonlabels",
                {
                    "points": [
                        [_percent(x, image.width), _percent(y, image.height)]
                        for x, y in zip(polygon[0::2], polygon[1::2], strict=True)
                    ]
                },
            )
            for polygon in annotation.outlines
        ]
    x, y, w, h = annotation.bbox
    x0, y0 = _percent(x, image.width), _percent(y, image.height)
    box = {
        "x": x0,
        "y": y0,
        "width": _percent(x + w, image.width) - x0,
        "height": _percent(y + h, image.height) - y0,
        "rotation": 0,
    }
    return [("rectanglelabels", box)]


def _results(
    annotation: Annotation, category: Category, image: ImageRecord, polygons: bool
) -> list[dict[str, Any]]:
    results = []
    for part, (kind, geometry) in enumerate(_geometries(annotation, image, polygons)):
        common: dict[str, Any] = {
            "id": f"r{annotation.id}" + (f"-{part}" if part else ""),
            "to_name": TO_NAME,
            "original_width": image.width,
            "original_height": image.height,
            "image_rotation": 0,
        }
        if annotation.score is not None:
            common["score"] = annotation.score
        results.append(
            common | {"from_name": FROM_NAME, "type": kind, "value": geometry | {kind: [category.name]}}
        )
        if annotation.label and annotation.label != category.name:
            text = geometry | {"text": [annotation.label]}
            results.append(common | {"from_name": TEXT_FROM_NAME, "type": "textarea", "value": text})
    return results


def to_labelstudio(
    image: ImageRecord,
    annotations: Sequence[Annotation],
    categories: Mapping[int, Category],
    image_root: str = "",
    model_version: str = "florence-cli",
    polygons: bool = False,
) -> dict[str, Any]:
    """One task: ``data.image`` is ``image_root`` + the percent-encoded ``file_name``; the prediction's
    score is the mean score. Regions are polygons when ``polygons``, else rectangles."""
    results = [
        result
        for annotation in annotations
        for result in _results(annotation, categories[annotation.category_id], image, polygons)
    ]
    prediction: dict[str, Any] = {"model_version": model_version, "result": results}
    scores = [annotation.score for annotation in annotations if annotation.score is not None]
    if scores:
        prediction["score"] = fmean(scores)
    return {"data": {"image": image_root + quote(image.file_name)}, "predictions": [prediction]}


def _pixels(value: Mapping[str, Any], result: Mapping[str, Any]) -> tuple[Box, tuple[Polygon, ...]]:
    """``(bbox, segmentation)`` in pixels from a result's percent geometry."""
    width, height = result["original_width"] / 100, result["original_height"] / 100
    if "points" in value:
        polygon = tuple(v for x, y in value["points"] for v in (x * width, y * height))
        return polygon_bbox(polygon), (polygon,)
    return (value["x"] * width, value["y"] * height, value["width"] * width, value["height"] * height), ()


def from_labelstudio(
    task: Mapping[str, Any], image: ImageRecord, categories: Sequence[Category]
) -> list[Annotation]:
    """Annotations in pixels from a task's first prediction; labels name categories."""
    by_name = {category.name: category for category in categories}
    try:
        results = task["predictions"][0]["result"] if task.get("predictions") else []
        texts = {r["id"]: r["value"]["text"][0] for r in results if r["type"] == "textarea"}
        annotations = []
        for result in results:
            kind = result["type"]
            if kind == "textarea":
                continue
            if kind not in ("rectanglelabels", "polygonlabels"):
                raise FormatError(f"result {result['id']}: unsupported type {kind!r}")
            name = result["value"][kind][0]
            if name not in by_name:
                raise FormatError(f"result {result['id']}: unknown label {name!r}")
            bbox, segmentation = _pixels(result["value"], result)
            label, score = texts.get(result["id"], name), result.get("score")
            annotations.append(
                Annotation(len(annotations) + 1, image.id, by_name[name].id, bbox, label, score, segmentation)
            )
    except (KeyError, IndexError, TypeError) as error:
        raise FormatError(f"malformed Label Studio task: missing or wrong {error}") from None
    return annotations


def dataset_files(dataset: CocoDataset, image_root: str = "") -> dict[str, str]:
    """``tasks.json``: every image's task, for Label Studio's import."""
    model_version = str(dataset.info.get("model") or "florence-cli")
    tasks = [
        to_labelstudio(
            image,
            dataset.annotations_by_image[image.id],
            dataset.named_categories,
            image_root,
            model_version,
            dataset.has_polygons,
        )
        for image in dataset.images
    ]
    return {"tasks.json": json.dumps(tasks, ensure_ascii=False, indent=1) + "\n"}
