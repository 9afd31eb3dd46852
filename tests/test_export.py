"""Exports to YOLO, Label Studio and VOC: shapes checked field by field, then read back and compared."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
from click.testing import CliRunner

from florence_cli.cli.tools import export
from florence_cli.formats import FormatError, export_files
from florence_cli.formats.coco import Annotation, ImageRecord, from_coco
from florence_cli.formats.labelstudio import from_labelstudio
from florence_cli.formats.voc import from_voc, truncated
from florence_cli.formats.yolo import from_yolo

CATEGORIES = [{"id": 7, "name": "car"}, {"id": 3, "name": "café"}, {"id": 9, "name": "text"}]
IMAGES = [
    {"id": 1, "file_name": "a.jpg", "width": 200, "height": 100},
    {"id": 2, "file_name": "sub/b.png", "width": 64, "height": 48},
]
BOXES = [
    {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 20, 50, 30], "label": "car", "score": 0.9},
    {"id": 2, "image_id": 1, "category_id": 3, "bbox": [100.5, 10.25, 40, 60], "label": "café"},
    {"id": 3, "image_id": 2, "category_id": 7, "bbox": [0, 0, 64, 48], "label": "car", "score": 0.5},
]
QUAD = [20, 30, 80, 30, 80, 50, 20, 50]
POLYGONS = [
    {
        "id": 1,
        "image_id": 1,
        "category_id": 7,
        "bbox": [10, 10, 40, 40],
        "segmentation": [[10, 10, 50, 10, 30, 50]],
    },
    {
        "id": 2,
        "image_id": 1,
        "category_id": 9,
        "bbox": [20, 30, 60, 20],
        "segmentation": [QUAD],
        "label": "東京 st",
    },
    {"id": 3, "image_id": 2, "category_id": 3, "bbox": [4, 4, 8, 8], "score": 0.25},
]


def dataset(annotations=BOXES):
    return from_coco({"images": IMAGES, "annotations": annotations, "categories": CATEGORIES})


def normalised(bbox, image):
    x, y, w, h = bbox
    return [x / image.width, y / image.height, w / image.width, h / image.height]


def test_yolo_boxes_round_trip():
    data = dataset()
    files = export_files(data, "yolo")
    assert set(files) == {"labels/a.txt", "labels/sub/b.txt", "data.yaml"}
    assert files["labels/a.txt"].splitlines()[0] == "0 0.175000 0.350000 0.250000 0.300000"
    for image, path in zip(data.images, ("labels/a.txt", "labels/sub/b.txt"), strict=True):
        read = from_yolo(files[path], image, data.categories)
        wrote = data.annotations_by_image[image.id]
        assert [a.category_id for a in read] == [a.category_id for a in wrote]
        for got, want in zip(read, wrote, strict=True):
            assert normalised(got.bbox, image) == pytest.approx(normalised(want.bbox, image), abs=1e-6)


def test_yolo_data_yaml_names_classes_in_category_order():
    lines = export_files(dataset(), "yolo")["data.yaml"].splitlines()
    assert "nc: 3" in lines
    names = next(line for line in lines if line.startswith("names: "))
    assert json.loads(names.removeprefix("names: ")) == ["car", "café", "text"]


def test_yolo_writes_polygons_for_every_object_when_any_has_one():
    data = dataset(POLYGONS)
    files = export_files(data, "yolo")
    image = data.images[0]
    read = from_yolo(files["labels/a.txt"], image, data.categories)
    assert read[1].segmentation[0] == pytest.approx(QUAD, abs=1e-3)
    box_only = from_yolo(files["labels/sub/b.txt"], data.images[1], data.categories)[0]
    assert len(box_only.segmentation[0]) == 8  # the box's corners
    assert box_only.bbox == pytest.approx((4, 4, 8, 8), abs=1e-3)


def test_yolo_reader_rejects_unknown_class():
    with pytest.raises(FormatError, match="line 1: class 5"):
        from_yolo("5 0.5 0.5 0.1 0.1\n", dataset().images[0], dataset().categories)


@pytest.mark.parametrize("polygons", [False, True])
def test_labelstudio_tasks_have_the_documented_shape(polygons):
    annotations = [*BOXES, {**POLYGONS[1], "id": 4}] if polygons else BOXES
    kind = "polygonlabels" if polygons else "rectanglelabels"  # one region type per file
    data = dataset(annotations)
    tasks = json.loads(export_files(data, "labelstudio", image_root="/data/local-files/?d=")["tasks.json"])
    assert isinstance(tasks, list) and len(tasks) == 2
    assert [task["data"]["image"] for task in tasks] == [
        "/data/local-files/?d=a.jpg",
        "/data/local-files/?d=sub/b.png",
    ]
    for task, image in zip(tasks, IMAGES, strict=True):
        (prediction,) = task["predictions"]
        assert isinstance(prediction["model_version"], str)
        assert isinstance(prediction["result"], list)
        for result in prediction["result"]:
            assert {
                "id",
                "from_name",
                "to_name",
                "type",
                "value",
                "original_width",
                "original_height",
            } <= set(result)
            assert result["to_name"] == "image" and isinstance(result["id"], str)
            assert (result["original_width"], result["original_height"]) == (image["width"], image["height"])
            assert 0 <= result.get("score", 0) <= 1
            assert result["type"] in (kind, "textarea")
            value = result["value"]
            if result["type"] == "rectanglelabels":
                assert result["from_name"] == "label" and value["rotation"] == 0
                assert all(0 <= value[key] <= 100 for key in ("x", "y", "width", "height"))
                assert value["x"] + value["width"] <= 100 and value["y"] + value["height"] <= 100
                assert isinstance(value["rectanglelabels"], list) and len(value["rectanglelabels"]) == 1
            elif result["type"] == "polygonlabels":
                assert result["from_name"] == "label" and len(value["points"]) >= 3
                assert all(len(point) == 2 and all(0 <= v <= 100 for v in point) for point in value["points"])
            else:
                assert (result["type"], result["from_name"], value["text"]) == (
                    "textarea",
                    "transcription",
                    ["東京 st"],
                )
    first = tasks[0]["predictions"][0]
    assert first["score"] == pytest.approx(0.9)  # the mean of the scores present
    box = first["result"][0]["value"]
    assert box.pop(kind) == ["car"]
    if polygons:  # the box's four corners, clockwise from the top left
        assert [v for point in box["points"] for v in point] == pytest.approx([5, 20, 30, 20, 30, 50, 5, 50])
    else:
        assert box == pytest.approx({"x": 5, "y": 20, "width": 25, "height": 30, "rotation": 0})


def test_labelstudio_round_trip():
    data = dataset([*BOXES, {**POLYGONS[1], "id": 4}])
    tasks = json.loads(export_files(data, "labelstudio")["tasks.json"])
    read = from_labelstudio(tasks[0], data.images[0], data.categories)
    wrote = data.annotations_by_image[1]
    assert [(a.category_id, a.label, a.score) for a in read] == [
        (a.category_id, a.label, a.score) for a in wrote
    ]
    for got, want in zip(read, wrote, strict=True):
        assert got.bbox == pytest.approx(want.bbox, abs=1e-6)
    assert read[2].segmentation[0] == pytest.approx(QUAD)


def test_voc_xml_parses_back():
    data = dataset()
    files = export_files(data, "voc", image_root="/images/")
    assert set(files) == {"Annotations/a.xml", "Annotations/sub/b.xml"}
    root = ET.fromstring(files["Annotations/sub/b.xml"])
    assert (root.findtext("filename"), root.findtext("folder"), root.findtext("path")) == (
        "b.png",
        "sub",
        "/images/sub/b.png",
    )
    assert (root.findtext("size/width"), root.findtext("size/height"), root.findtext("size/depth")) == (
        "64",
        "48",
        "3",
    )
    assert [obj.findtext("name") for obj in ET.fromstring(files["Annotations/a.xml"]).iter("object")] == [
        "car",
        "café",
    ]
    for image, path in zip(data.images, files, strict=True):
        read = from_voc(files[path], image, data.categories)
        for got, want in zip(read, data.annotations_by_image[image.id], strict=True):
            assert got.category_id == want.category_id
            assert got.bbox == pytest.approx(want.bbox, abs=1)


@pytest.mark.parametrize(
    ("bbox", "size", "expected"),
    [
        ((10, 10, 20, 20), (100, 100), False),
        ((0, 10, 20, 20), (100, 100), True),  # on the left edge
        ((10, 10, 89.5, 20), (100, 100), True),  # within a pixel of the right edge
        ((10, 10, 20, 88), (100, 100), False),
        ((2, 2, 3994, 1996), (4000, 2000), True),  # Florence-2's bins 0 and 999 close half a bin inside
        ((8, 10, 20, 20), (4000, 2000), False),  # two bins in
    ],
)
def test_voc_marks_boxes_at_the_border_truncated(bbox, size, expected):
    assert truncated(Annotation(1, 1, 1, bbox, ""), ImageRecord(1, "a.jpg", *size)) is expected


def test_unnamed_categories_take_the_task_slug_or_object():
    data = from_coco(
        {"images": IMAGES, "annotations": [], "categories": [{"id": 1, "name": ""}, CATEGORIES[0]]}
    )
    assert [c.name for c in data.named_categories.values()] == ["object", "car"]
    data = from_coco({"info": {"task": "REGION_PROPOSAL"}, "images": IMAGES, "annotations": [],
                      "categories": [{"id": 1, "name": ""}]})  # fmt: skip
    assert [c.name for c in data.named_categories.values()] == ["region_proposal"]


def test_per_image_files_that_would_collide_are_refused():
    images = [*IMAGES, {"id": 3, "file_name": "a.png", "width": 5, "height": 5}]
    data = from_coco({"images": images, "annotations": [], "categories": CATEGORIES})
    with pytest.raises(FormatError, match=r"a\.jpg and a\.png would both be written to labels/a\.txt"):
        export_files(data, "yolo")


@pytest.mark.parametrize(
    ("to", "written"),
    [("yolo", "labels/sub/b.txt"), ("labelstudio", "tasks.json"), ("voc", "Annotations/a.xml")],
)
def test_export_command_writes_files(tmp_path, to, written):
    source = tmp_path / "od.json"
    source.write_text(
        json.dumps({"images": IMAGES, "annotations": BOXES, "categories": CATEGORIES}), encoding="utf-8"
    )
    result = CliRunner().invoke(export, [str(source), "--to", to, "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / written).is_file()


def test_export_command_errors_name_the_file(tmp_path):
    source = tmp_path / "broken.json"
    source.write_text('{"images": [', encoding="utf-8")
    result = CliRunner().invoke(export, [str(source), "--to", "voc", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and f"{source}: not valid JSON" in result.output
    source.write_text(
        json.dumps({"images": IMAGES, "annotations": [{**BOXES[0], "image_id": 5}], "categories": CATEGORIES})
    )
    result = CliRunner().invoke(export, [str(source), "--to", "voc", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "broken.json: annotation 1 names unknown image_id 5" in result.output
    result = CliRunner().invoke(
        export, [str(source), "--to", "yolo", "--image-root", "x/", "-o", str(tmp_path / "out")]
    )
    assert result.exit_code == 2 and "--image-root applies to labelstudio and voc only" in result.output


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"bbox": [1, 2, 3]}, r"annotations\[0\]: bbox should be \[x, y, width, height\]"),
        ({"score": "high"}, r"annotations\[0\]: 'score' should be a number"),
        ({"segmentation": {"counts": "abc", "size": [1, 1]}}, r"'segmentation' should be a list"),
        ({"segmentation": [[1, 2, 3, 4]]}, r"each polygon should hold 3 or more x, y pairs"),
        ({"category_id": 99}, r"annotation 1 names unknown category_id 99"),
    ],
)
def test_coco_reader_explains_bad_annotations(change, message):
    with pytest.raises(FormatError, match=message):
        dataset([{**BOXES[0], **change}])
