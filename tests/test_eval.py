"""``florence eval``: pycocotools scores of florence-cli predictions matched to ground truth by names."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from florence_cli.cli.tools import eval_command
from florence_cli.evaluate import METRICS, evaluate, format_table
from florence_cli.formats.coco import from_coco


def _truth(id_, image_id, category_id, x, y, w, h):
    polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
    record = {
        "id": id_,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [x, y, w, h],
        "area": w * h,
    }
    return record | {"iscrowd": 0, "segmentation": [polygon]}


GROUND_TRUTH = {
    "images": [
        {"id": 10, "file_name": "a.jpg", "width": 100, "height": 100},
        {"id": 11, "file_name": "b.jpg", "width": 100, "height": 100},
    ],
    "categories": [{"id": 1, "name": "Car"}, {"id": 2, "name": "dog"}],
    "annotations": [_truth(1, 10, 1, 20, 20, 40, 40), _truth(2, 11, 2, 5, 5, 50, 30)],
}


def predictions(shift=0.0, labels=("car", "dog"), file_names=("a.jpg", "b.jpg")):
    """The ground truth as florence-cli writes it (own ids, free-text labels, no scores), boxes shifted."""
    annotations = [
        {
            "id": 100 + index,
            "image_id": index + 1,
            "category_id": index + 1,
            "bbox": [record["bbox"][0] + shift, *record["bbox"][1:]],
            "label": label,
            "segmentation": [[v + shift * (i % 2 == 0) for i, v in enumerate(record["segmentation"][0])]],
        }
        for index, (record, label) in enumerate(zip(GROUND_TRUTH["annotations"], labels, strict=True))
    ]
    return {
        "images": [
            {"id": i + 1, "file_name": name, "width": 100, "height": 100} for i, name in enumerate(file_names)
        ],
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": label} for i, label in enumerate(labels)],
    }


def test_predictions_equal_to_ground_truth_score_one():
    report = evaluate(from_coco(predictions()), GROUND_TRUTH)
    assert set(report.scores) == {"bbox", "segm"}
    for scores in report.scores.values():
        assert scores["AP"] == pytest.approx(1.0) and scores["AR100"] == pytest.approx(1.0)
        assert scores["APs"] == -1  # no small objects in the ground truth
    assert (report.images, report.predictions, sum(report.unmatched_labels.values())) == (2, 2, 0)


def test_shifted_predictions_score_less():
    report = evaluate(from_coco(predictions(shift=8)), GROUND_TRUTH)
    assert 0 < report.scores["bbox"]["AP"] < 1
    assert 0 < report.scores["segm"]["AP"] < 1


def test_labels_match_through_synonyms_and_unknown_ones_are_dropped():
    data = from_coco(predictions(labels=("automobile", "dog")))
    dropped = evaluate(data, GROUND_TRUTH)
    assert dropped.unmatched_labels == {"automobile": 1} and dropped.predictions == 1
    mapped = evaluate(data, GROUND_TRUTH, {"Automobile": "car"})
    assert mapped.scores["bbox"]["AP"] == pytest.approx(1.0)


def test_images_match_by_unique_base_name_and_boxes_alone_give_bbox_only():
    data = predictions(file_names=("val/a.jpg", "c.jpg"))
    for annotation in data["annotations"]:
        del annotation["segmentation"]
    report = evaluate(from_coco(data), GROUND_TRUTH)
    assert list(report.scores) == ["bbox"]
    assert (report.images, report.unmatched_images) == (1, ("c.jpg",))
    assert report.scores["bbox"]["AP"] == pytest.approx(1.0)  # scored on the images the predictions list


def test_table_has_the_twelve_standard_lines():
    table = format_table({metric.key: 0.5 for metric in METRICS}).splitlines()
    assert len(table) == 12
    assert table[0] == " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.500"
    assert table[6] == " Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ] = 0.500"


def test_eval_command_prints_table_and_writes_json(tmp_path):
    pred, gt, out = tmp_path / "od.json", tmp_path / "gt.json", tmp_path / "scores.json"
    pred.write_text(json.dumps(predictions(labels=("automobile", "dog"))), encoding="utf-8")
    gt.write_text(json.dumps(GROUND_TRUTH), encoding="utf-8")
    result = CliRunner().invoke(eval_command, [str(pred), str(gt), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "Dropped 1 predictions whose label matches no category: 'automobile' (1)" in result.output
    assert "Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ]" in result.output
    result = CliRunner().invoke(
        eval_command, [str(pred), str(gt), "--map", "automobile=car,puppy=dog", "--json", str(out)]
    )
    assert result.exit_code == 0 and "Dropped" not in result.output
    scores = json.loads(out.read_text(encoding="utf-8"))
    assert list(scores["bbox"]) == [metric.key for metric in METRICS]
    assert scores["bbox"]["AP"] == pytest.approx(1.0) and scores["predictions"] == 2


def test_eval_command_errors_name_the_file(tmp_path):
    pred, gt = tmp_path / "od.json", tmp_path / "gt.json"
    pred.write_text(json.dumps(predictions()), encoding="utf-8")
    gt.write_text("{not json", encoding="utf-8")
    result = CliRunner().invoke(eval_command, [str(pred), str(gt)])
    assert result.exit_code == 1 and result.output.startswith(f"Error: {gt}: not valid JSON")
    gt.write_text(json.dumps({**GROUND_TRUTH, "images": [{"id": 10}]}), encoding="utf-8")
    result = CliRunner().invoke(eval_command, [str(pred), str(gt)])
    assert result.exit_code == 1 and f"{gt}: images[0] lacks file_name, width, height" in result.output
    result = CliRunner().invoke(eval_command, [str(pred), str(pred), "--map", "car"])
    assert result.exit_code == 2 and "expected PRED=GT pairs" in result.output
