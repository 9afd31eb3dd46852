"""Pascal VOC XML: one ``Annotations/<image path>.xml`` per image, boxes as 1-based inclusive pixels.

``<name>`` is the category's name; segmentation and region-proposal files, whose one category has no
name, use their task's slug (``CocoDataset.named_categories``). ``<truncated>`` is 1 when the box
reaches the image's border: an edge within one pixel of it, or within 1/1000 of the side on images
over 1000 pixels (one Florence-2 location step: a box the model closes at the border ends half a
step inside it).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath

from .coco import Annotation, Category, CocoDataset, FormatError, ImageRecord, output_paths


def _element(parent: ET.Element, tag: str, text: object = None) -> ET.Element:
    child = ET.SubElement(parent, tag)
    if text is not None:
        child.text = str(text)
    return child


def truncated(annotation: Annotation, image: ImageRecord) -> bool:
    """Whether the box reaches the border of ``image`` (the module docstring gives the rule)."""
    x, y, w, h = annotation.bbox
    near_x, near_y = max(1.0, image.width / 1000), max(1.0, image.height / 1000)
    return x <= near_x or y <= near_y or x + w >= image.width - near_x or y + h >= image.height - near_y


def to_voc(
    image: ImageRecord,
    annotations: Sequence[Annotation],
    categories: Mapping[int, Category],
    image_root: str = "",
) -> str:
    """One image's VOC XML; ``<path>`` is ``image_root + file_name`` and ``<name>`` the category's name.

    ``categories`` should name every category (``CocoDataset.named_categories``): VOC readers refuse
    an object without a name.
    """
    path = PurePosixPath(image.file_name)
    root = ET.Element("annotation")
    _element(root, "folder", path.parent.as_posix() if path.parent.name else "")
    _element(root, "filename", path.name)
    _element(root, "path", image_root + image.file_name)
    _element(_element(root, "source"), "database", "florence-cli")
    size = _element(root, "size")
    for tag, value in (("width", image.width), ("height", image.height), ("depth", 3)):
        _element(size, tag, value)
    _element(root, "segmented", 0)
    for annotation in annotations:
        x, y, w, h = annotation.bbox
        xmin, ymin = min(max(round(x) + 1, 1), image.width), min(max(round(y) + 1, 1), image.height)
        xmax, ymax = max(min(round(x + w), image.width), xmin), max(min(round(y + h), image.height), ymin)
        obj = _element(root, "object")
        for tag, value in (("name", categories[annotation.category_id].name), ("pose", "Unspecified")):
            _element(obj, tag, value)
        _element(obj, "truncated", int(truncated(annotation, image)))
        _element(obj, "difficult", 0)
        box = _element(obj, "bndbox")
        for tag, value in (("xmin", xmin), ("ymin", ymin), ("xmax", xmax), ("ymax", ymax)):
            _element(box, tag, value)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def from_voc(xml_text: str, image: ImageRecord, categories: Sequence[Category]) -> list[Annotation]:
    """Annotations in pixels (0-based ``x, y, w, h``) from one VOC XML; object names name categories."""
    by_name = {category.name: category for category in categories}
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as error:
        raise FormatError(f"not valid XML: {error}") from None
    annotations = []
    for obj in root.iter("object"):
        name = obj.findtext("name", "")
        if name not in by_name:
            raise FormatError(f"object {len(annotations) + 1}: unknown name {name!r}")
        try:
            xmin, ymin, xmax, ymax = (
                float(obj.findtext(f"bndbox/{tag}", "")) for tag in ("xmin", "ymin", "xmax", "ymax")
            )
        except ValueError:
            raise FormatError(
                f"object {len(annotations) + 1}: bndbox needs numeric xmin, ymin, xmax, ymax"
            ) from None
        bbox = (xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1)
        annotations.append(Annotation(len(annotations) + 1, image.id, by_name[name].id, bbox, name))
    return annotations


def dataset_files(dataset: CocoDataset, image_root: str = "") -> dict[str, str]:
    """``Annotations/<image path>.xml`` for every image."""
    paths = output_paths(dataset.images, "Annotations", ".xml")
    return {
        paths[image.id]: to_voc(
            image, dataset.annotations_by_image[image.id], dataset.named_categories, image_root
        )
        for image in dataset.images
    }
