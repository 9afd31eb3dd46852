"""Score a florence-cli COCO prediction file against COCO ground truth with pycocotools.

Images match by ``file_name`` (or by base name when that is unique in the ground truth);
predictions match categories by name: the annotation's ``label``, then its category's name,
compared case-insensitively after ``synonyms`` (prediction name -> ground-truth name).
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .formats.coco import CocoDataset, read_json


class EvalError(ValueError):
    """Ground truth and predictions that cannot be scored together; the message is one line."""


@dataclass(frozen=True)
class Metric:
    key: str
    kind: str  # "AP" or "AR"
    iou: str
    area: str
    max_dets: int


# The 12 numbers of ``COCOeval.summarize``, in its order.
METRICS = (
    Metric("AP", "AP", "0.50:0.95", "all", 100),
    Metric("AP50", "AP", "0.50", "all", 100),
    Metric("AP75", "AP", "0.75", "all", 100),
    Metric("APs", "AP", "0.50:0.95", "small", 100),
    Metric("APm", "AP", "0.50:0.95", "medium", 100),
    Metric("APl", "AP", "0.50:0.95", "large", 100),
    Metric("AR1", "AR", "0.50:0.95", "all", 1),
    Metric("AR10", "AR", "0.50:0.95", "all", 10),
    Metric("AR100", "AR", "0.50:0.95", "all", 100),
    Metric("ARs", "AR", "0.50:0.95", "small", 100),
    Metric("ARm", "AR", "0.50:0.95", "medium", 100),
    Metric("ARl", "AR", "0.50:0.95", "large", 100),
)


@dataclass(frozen=True)
class EvalReport:
    scores: dict[str, dict[str, float]]  # iou type ("bbox", "segm") -> metric key -> value (-1: no GT)
    images: int  # ground-truth images scored: those the prediction file lists
    predictions: int  # predictions scored
    unmatched_labels: Counter[str]  # dropped predictions by label: no ground-truth category
    unmatched_images: tuple[str, ...]  # prediction file names absent from the ground truth

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.scores,
            "images": self.images,
            "predictions": self.predictions,
            "dropped_unmatched_label": sum(self.unmatched_labels.values()),
            "dropped_images": list(self.unmatched_images),
        }


def normalise_name(name: str) -> str:
    """Category names compare case-insensitively with runs of white space as one space."""
    return " ".join(name.casefold().split())


def format_table(scores: Mapping[str, float]) -> str:
    """The 12-line table ``COCOeval.summarize`` prints, from a metric-key -> value dict."""
    titles = {"AP": "Average Precision  (AP)", "AR": "Average Recall     (AR)"}
    return "\n".join(
        f" {titles[m.kind]} @[ IoU={m.iou:<9} | area={m.area:>6s} | maxDets={m.max_dets:>3d} ]"
        f" = {scores[m.key]:0.3f}"
        for m in METRICS
    )


def load_ground_truth(path: Path) -> dict[str, Any]:
    """A COCO ground-truth file, checked for what matching and scoring need; errors name the file."""
    data = read_json(path)
    try:
        if not isinstance(data, dict) or not all(
            isinstance(data.get(key), list) for key in ("images", "annotations", "categories")
        ):
            raise EvalError("expected a JSON object with images, annotations and categories lists")
        for key, fields in (
            ("images", ("id", "file_name", "width", "height")),
            ("categories", ("id", "name")),
            ("annotations", ("id", "image_id", "category_id", "bbox")),
        ):
            for index, record in enumerate(data[key]):
                missing = [field for field in fields if not isinstance(record, dict) or field not in record]
                if missing:
                    raise EvalError(f"{key}[{index}] lacks {', '.join(missing)}")
        names = Counter(normalise_name(category["name"]) for category in data["categories"])
        duplicates = [name for name, count in names.items() if count > 1]
        if duplicates:
            raise EvalError(f"category names must be unique to match by name: {duplicates[0]!r} repeats")
    except EvalError as error:
        raise EvalError(f"{path}: {error}") from None
    return data


def _image_matches(predictions: CocoDataset, ground_truth: Mapping[str, Any]) -> dict[int, int]:
    """Prediction image id -> ground-truth image id, by file name, else by a unique base name."""
    exact = {image["file_name"]: image["id"] for image in ground_truth["images"]}
    base_names = Counter(PurePosixPath(name).name for name in exact)
    by_base = {
        PurePosixPath(name).name: id_
        for name, id_ in exact.items()
        if base_names[PurePosixPath(name).name] == 1
    }
    matches = {}
    for image in predictions.images:
        gt_id = exact.get(image.file_name, by_base.get(PurePosixPath(image.file_name).name))
        if gt_id is not None:
            matches[image.id] = gt_id
    return matches


def _category_id(
    names: Iterable[str], categories: Mapping[str, int], synonyms: Mapping[str, str]
) -> int | None:
    """The ground-truth category of the first of ``names`` that names one, through ``synonyms``."""
    for name in map(normalise_name, names):
        name = synonyms.get(name, name)
        if name in categories:
            return categories[name]
    return None


def _detections(
    predictions: CocoDataset,
    images: Mapping[int, int],
    categories: Mapping[str, int],
    synonyms: Mapping[str, str],
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """pycocotools result records for the predictions on matched images, and the unmatched labels."""
    detections, unmatched = [], Counter[str]()
    for annotation in predictions.annotations:
        if annotation.image_id not in images:
            continue
        names = (annotation.label, predictions.categories_by_id[annotation.category_id].name)
        category_id = _category_id(names, categories, synonyms)
        if category_id is None:
            unmatched[annotation.label] += 1
            continue
        x, y, w, h = annotation.bbox
        polygons = [list(polygon) for polygon in annotation.segmentation]
        detections.append(
            {
                "id": len(detections) + 1,
                "image_id": images[annotation.image_id],
                "category_id": category_id,
                "bbox": [x, y, w, h],
                "score": 1.0 if annotation.score is None else annotation.score,
                "segmentation": polygons or [[x, y, x + w, y, x + w, y + h, x, y + h]],
                "iscrowd": 0,
            }
        )
    return detections, unmatched


def _score(
    ground_truth: Mapping[str, Any], detections: list[dict[str, Any]], iou_type: str, image_ids: set[int]
) -> dict[str, float]:
    """The 12 summary numbers for one iou type, pycocotools' chatter silenced."""
    from pycocotools import mask
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_annotations = [
        {"iscrowd": 0, "area": record["bbox"][2] * record["bbox"][3]} | record
        for record in ground_truth["annotations"]
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        gt, dt = COCO(), COCO()
        gt.dataset = {key: ground_truth[key] for key in ("images", "categories")} | {
            "annotations": gt_annotations
        }
        gt.createIndex()
        dt.dataset = {key: ground_truth[key] for key in ("images", "categories")}
        dt.dataset["annotations"] = [dict(detection) for detection in detections]
        dt.createIndex()
        for detection in dt.dataset["annotations"]:
            _, _, w, h = detection["bbox"]
            detection["area"] = float(mask.area(dt.annToRLE(detection))) if iou_type == "segm" else w * h
        evaluation = COCOeval(gt, dt, iou_type)
        evaluation.params.imgIds = sorted(image_ids)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {metric.key: float(value) for metric, value in zip(METRICS, evaluation.stats, strict=True)}


def evaluate(
    predictions: CocoDataset, ground_truth: Mapping[str, Any], synonyms: Mapping[str, str] | None = None
) -> EvalReport:
    """Score ``predictions`` on the ground-truth images they list: bbox, and segm when they carry polygons.

    Predictions without a score count as 1.0; those whose label matches no ground-truth category
    are dropped and counted. ``segm`` needs segmentations on every ground-truth annotation.
    """
    images = _image_matches(predictions, ground_truth)
    if not images:
        raise EvalError("no image of the predictions matches a ground-truth file_name")
    categories = {normalise_name(category["name"]): category["id"] for category in ground_truth["categories"]}
    mapped = {normalise_name(pred): normalise_name(gt) for pred, gt in (synonyms or {}).items()}
    detections, unmatched = _detections(predictions, images, categories, mapped)
    iou_types = ["bbox"]
    if any(a.segmentation for a in predictions.annotations) and all(
        "segmentation" in record for record in ground_truth["annotations"]
    ):
        iou_types.append("segm")
    image_ids = set(images.values())
    scores = {iou_type: _score(ground_truth, detections, iou_type, image_ids) for iou_type in iou_types}
    absent = tuple(image.file_name for image in predictions.images if image.id not in images)
    return EvalReport(scores, len(image_ids), len(detections), unmatched, absent)
