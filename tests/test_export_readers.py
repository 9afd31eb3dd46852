"""Exports read back by the tools they are for: supervision's VOC and YOLO loaders, label-studio-sdk's
prediction validator (against the stock image templates) and its local-files URL resolver."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import supervision as sv
from label_studio_sdk._extensions.label_studio_tools.core.utils.io import (
    local_files_resolver,
    resolve_local_storage_file,
)
from label_studio_sdk.converter.utils import join_input_url
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from florence_cli.formats import export_files, write_files
from florence_cli.formats.coco import from_coco

IMAGES = [
    {"id": 1, "file_name": "a.png", "width": 200, "height": 100},
    {"id": 2, "file_name": "b.png", "width": 64, "height": 48},
]
TRIANGLE = [10, 10, 50, 10, 30, 50]
# What a REFERRING_EXPRESSION_SEGMENTATION run writes: one category and labels without a name; the
# second object's polygon had under three points, so it kept only its box.
SEGMENTATION = {
    "info": {"task": "REFERRING_EXPRESSION_SEGMENTATION"},
    "images": IMAGES,
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "label": "",
         "segmentation": [TRIANGLE]},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 60, 30, 40], "label": ""},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [4, 4, 8, 8], "label": "",
         "segmentation": [[4, 4, 12, 4, 12, 12, 4, 12]]},
    ],
    "categories": [{"id": 1, "name": "", "supercategory": "referring_expression_segmentation"}],
}  # fmt: skip
CLASS = "referring_expression_segmentation"
# Boxes and an OCR-like region whose text differs from its category, with a foreign-made category name.
DETECTION = {
    "images": IMAGES,
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 20, 50, 30], "label": "car", "score": 0.9},
        {"id": 2, "image_id": 1, "category_id": 9, "bbox": [20, 30, 60, 20], "label": "東京 st"},
        {"id": 3, "image_id": 2, "category_id": 7, "bbox": [0, 0, 64, 48], "label": "car", "score": 0.5},
    ],
    "categories": [{"id": 7, "name": "car"}, {"id": 9, "name": "text"}],
}

# Label Studio's stock templates ("Semantic Segmentation with Polygons", "Object Detection with
# Bounding Boxes"), their example labels replaced by the export's; the OCR template's per-region
# TextArea is added where regions carry a transcription.
POLYGON_TEMPLATE = """<View>
  <Header value="Select label and click the image to start"/>
  <Image name="image" value="$image" zoom="true"/>
  <PolygonLabels name="label" toName="image" strokeWidth="3" pointSize="small" opacity="0.9">
    {labels}
  </PolygonLabels>{extra}
</View>"""
RECTANGLE_TEMPLATE = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    {labels}
  </RectangleLabels>{extra}
</View>"""
TRANSCRIPTION = """
  <TextArea name="transcription" toName="image" editable="true" perRegion="true" required="true"
            maxSubmissions="1" rows="5" placeholder="Recognized Text" displayMode="region-list"/>"""


def label_config(template, names, transcription=False):
    labels = "\n    ".join(f'<Label value="{name}" background="blue"/>' for name in names)
    return template.format(labels=labels, extra=TRANSCRIPTION if transcription else "")


def prediction_errors(config, tasks):
    interface = LabelInterface(config)
    return [error for task in tasks for error in interface.validate_prediction(task["predictions"][0], True)]


def write_images(folder):
    folder.mkdir()
    for image in IMAGES:
        Image.new("RGB", (image["width"], image["height"]), "grey").save(folder / image["file_name"])
    return folder


def test_supervision_reads_voc_of_a_segmentation_file(tmp_path):
    images = write_images(tmp_path / "images")
    files = export_files(from_coco(SEGMENTATION), "voc")
    write_files(files, tmp_path / "voc")
    read = sv.DetectionDataset.from_pascal_voc(str(images), str(tmp_path / "voc" / "Annotations"))
    assert read.classes == [CLASS]  # the task names the class its file leaves unnamed
    boxes = read.annotations[str(images / "a.png")]
    assert boxes.xyxy.tolist() == [[10, 10, 50, 50], [0, 60, 30, 100]]
    assert boxes.class_id.tolist() == [0, 0]
    # the second box reaches the left and bottom border, the first none
    objects = ET.fromstring(files["Annotations/a.xml"]).findall("object")
    assert [obj.findtext("truncated") for obj in objects] == ["0", "1"]


def test_supervision_reads_yolo_of_a_segmentation_file(tmp_path):
    images = write_images(tmp_path / "images")
    write_files(export_files(from_coco(SEGMENTATION), "yolo"), tmp_path / "yolo")
    read = sv.DetectionDataset.from_yolo(
        str(images), str(tmp_path / "yolo" / "labels"), str(tmp_path / "yolo" / "data.yaml")
    )
    assert read.classes == [CLASS]
    polygons = read.annotations[str(images / "a.png")]
    assert polygons.xyxy == pytest.approx(np.array([[10, 10, 50, 50], [0, 60, 30, 100]]), abs=1)


@pytest.mark.parametrize(
    ("coco", "template", "kind", "names", "transcription"),
    [
        (SEGMENTATION, POLYGON_TEMPLATE, "polygonlabels", [CLASS], False),
        (DETECTION, RECTANGLE_TEMPLATE, "rectanglelabels", ["car", "text"], True),
        (  # boxes in a file that also has polygons become polygons
            {**DETECTION, "annotations": [*DETECTION["annotations"], {**SEGMENTATION["annotations"][0],
             "id": 4, "category_id": 7}]},
            POLYGON_TEMPLATE, "polygonlabels", ["car", "text"], True,
        ),
    ],
)  # fmt: skip
def test_labelstudio_tasks_validate_against_the_stock_template(coco, template, kind, names, transcription):
    tasks = json.loads(export_files(from_coco(coco), "labelstudio")["tasks.json"])
    assert prediction_errors(label_config(template, names, transcription), tasks) == []
    kinds = {result["type"] for task in tasks for result in task["predictions"][0]["result"]}
    assert kinds == ({kind, "textarea"} if transcription else {kind})
    other = RECTANGLE_TEMPLATE if template is POLYGON_TEMPLATE else POLYGON_TEMPLATE
    errors = prediction_errors(label_config(other, names, transcription), tasks)
    assert errors and all("does not match expected type" in e or "Invalid value" in e for e in errors)


def test_labelstudio_image_urls_resolve_to_the_files():
    names = ["a b+c&d#e.jpg", "東京/写真 100%.png", "plain/x.png"]
    images = [{"id": i, "file_name": name, "width": 8, "height": 8} for i, name in enumerate(names, 1)]
    data = from_coco({"images": images, "annotations": [], "categories": []})
    root = "/data/local-files/?d=photos/"
    tasks = json.loads(export_files(data, "labelstudio", image_root=root)["tasks.json"])
    urls = [task["data"]["image"] for task in tasks]
    with local_files_resolver(lambda path: path):  # the storage's ?d= path, as Label Studio decodes it
        assert [resolve_local_storage_file(url) for url in urls] == [f"photos/{name}" for name in names]
    assert urls == [join_input_url(root, name) for name in names]  # as the SDK's converters write them
    assert urls[2] == "/data/local-files/?d=photos/plain/x.png"
