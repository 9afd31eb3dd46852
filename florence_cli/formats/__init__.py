"""Annotation formats: the COCO files florence-cli writes, and pure converters to YOLO, Label Studio, VOC."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from . import labelstudio, voc, yolo
from .coco import Annotation, Category, CocoDataset, FormatError, ImageRecord, load_coco

__all__ = [
    "EXPORTERS",
    "Annotation",
    "Category",
    "CocoDataset",
    "FormatError",
    "ImageRecord",
    "export_files",
    "load_coco",
    "write_files",
]

# Each format's dataset-level writer: (dataset, image_root) -> {relative path: text}.
EXPORTERS: dict[str, Callable[[CocoDataset, str], dict[str, str]]] = {
    "yolo": lambda dataset, _image_root: yolo.dataset_files(dataset),
    "labelstudio": labelstudio.dataset_files,
    "voc": voc.dataset_files,
}


def export_files(dataset: CocoDataset, to: str, image_root: str = "") -> dict[str, str]:
    """The files (relative path -> text) that export ``dataset`` to format ``to``.

    ``image_root`` prefixes image references (Label Studio ``data.image``, VOC ``<path>``).
    """
    if to not in EXPORTERS:
        raise FormatError(f"unknown export format {to!r}; choose from {', '.join(EXPORTERS)}")
    return EXPORTERS[to](dataset, image_root)


def write_files(files: Mapping[str, str], out_dir: Path) -> None:
    """Write each UTF-8 text under ``out_dir``, creating folders as needed."""
    for relative, text in files.items():
        path = out_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
