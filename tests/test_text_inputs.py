"""Text inputs that differ per image: text files, classes, chained grounding, pixel regions, scores."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from florence_cli.cli import main
from florence_cli.jobs import pixel_region_bins

from .conftest import MAX_NEW_TOKENS, write_images
from .helpers import assert_same_answer, read_jsonl

PHRASES = ["a car", "a red house on the street", "dog", "a person a cat a tree", "the traffic light"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("texts") / "imgs", 5)


def _run(model, images, out, *args):
    argv = ["annotate", str(images[0].parent), "-m", str(model), "--device", "cpu", "-o", str(out),
            "--max-new-tokens", str(MAX_NEW_TOKENS), "--workers", "0", "-b", "4", "-q",
            "--jsonl", str(out / "answers.jsonl"), *args]  # fmt: skip
    result = CliRunner().invoke(main, argv, catch_exceptions=False)
    return result, (read_jsonl(out / "answers.jsonl") if (out / "answers.jsonl").exists() else [])


def _reference(reference, path, prompt):
    with Image.open(path) as image:
        return reference.run(image.convert("RGB"), prompt)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_text_file_gives_each_image_its_own_prompt_in_mixed_batches(
    tiny_model, reference, images, tmp_path, fmt
):
    # relative names for some images, absolute paths for others; the last image has no entry
    entries = [(p.name if i % 2 else str(p), PHRASES[i]) for i, p in enumerate(images[:-1])]
    text_file = tmp_path / f"texts.{fmt}"
    if fmt == "csv":
        text_file.write_text("file,text\n" + "".join(f'{f},"{t}"\n' for f, t in entries))
    else:
        text_file.write_text("".join(json.dumps({"file": f, "text": t}) + "\n" for f, t in entries))
    result, records = _run(tiny_model, images, tmp_path / "out", "-t", "CAPTION_TO_PHRASE_GROUNDING",
                           "-t", "OD", "--text-file", str(text_file))  # fmt: skip
    assert result.exit_code == 1  # the image without an entry fails for that task only
    errors = read_jsonl(tmp_path / "out" / "errors.jsonl")
    assert errors == [
        {"file": images[-1].name, "error": "no entry in the text file", "task": "CAPTION_TO_PHRASE_GROUNDING"}
    ]
    grounding = {r["file"]: r for r in records if r["task"] == "CAPTION_TO_PHRASE_GROUNDING"}
    assert len(grounding) == 4 and len([r for r in records if r["task"] == "OD"]) == 5
    for i, path in enumerate(images[:-1]):
        raw, parsed = _reference(reference, path, f"<CAPTION_TO_PHRASE_GROUNDING>{PHRASES[i]}")
        assert grounding[path.name]["raw"] == raw and grounding[path.name]["text"] == PHRASES[i]
        assert_same_answer(grounding[path.name]["result"], parsed)


def test_classes_give_one_query_each_and_exactly_those_categories(tiny_model, reference, images, tmp_path):
    classes = ["traffic light", "car", "person"]
    result, records = _run(tiny_model, images, tmp_path / "out", "-t", "OPEN_VOCABULARY_DETECTION",
                           "--classes", ",".join(classes))  # fmt: skip
    assert result.exit_code == 0
    coco = json.loads((tmp_path / "out" / "open_vocabulary_detection.json").read_text())
    assert [c["name"] for c in coco["categories"]] == classes
    assert [i["file_name"] for i in coco["images"]] == [p.name for p in images]  # one entry per image
    assert len(records) == len(images) * len(classes)
    by_query = {(r["file"], r["text"]): r for r in records}
    path = images[1]
    for name in classes:
        raw, parsed = _reference(reference, path, f"<OPEN_VOCABULARY_DETECTION>{name}")
        assert by_query[(path.name, name)]["raw"] == raw
        assert_same_answer(by_query[(path.name, name)]["result"], parsed)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    expected = sum(len(r["result"]["bboxes"]) + len(r["result"]["polygons"]) for r in records)
    assert len(coco["annotations"]) == expected
    assert all(names[a["category_id"]] in classes for a in coco["annotations"])


def test_ground_from_grounds_each_images_own_caption_in_one_pass(tiny_model, reference, images, tmp_path):
    args = [
        "-t",
        "MORE_DETAILED_CAPTION",
        "-t",
        "CAPTION_TO_PHRASE_GROUNDING",
        "--ground-from",
        "MORE_DETAILED_CAPTION",
    ]
    result, records = _run(tiny_model, images, tmp_path / "out", *args)
    assert result.exit_code == 0
    by_key = {(r["file"], r["task"]): r for r in records}
    for path in images:
        caption_raw, caption = _reference(reference, path, "<MORE_DETAILED_CAPTION>")
        assert by_key[(path.name, "MORE_DETAILED_CAPTION")]["raw"] == caption_raw
        raw, parsed = _reference(reference, path, f"<CAPTION_TO_PHRASE_GROUNDING>{caption}")
        assert by_key[(path.name, "CAPTION_TO_PHRASE_GROUNDING")]["raw"] == raw
        assert_same_answer(by_key[(path.name, "CAPTION_TO_PHRASE_GROUNDING")]["result"], parsed)
    # resumed: captions from an earlier run feed the grounding of a later one
    out = tmp_path / "two-runs"
    _run(tiny_model, images, out, "-t", "MORE_DETAILED_CAPTION")
    (out / "answers.jsonl").unlink()
    _, later = _run(tiny_model, images, out, *args)
    assert [r["task"] for r in later] == ["CAPTION_TO_PHRASE_GROUNDING"] * len(images)
    assert {r["file"]: r["raw"] for r in later} == {
        f: r["raw"] for (f, t), r in by_key.items() if t == "CAPTION_TO_PHRASE_GROUNDING"
    }


def test_region_in_pixels(tiny_model, reference, images, tmp_path):
    result, records = _run(
        tiny_model, images, tmp_path / "out", "-t", "REGION_TO_CATEGORY", "--region", "10,5,40.5,30"
    )
    assert result.exit_code == 0
    for path in images[:2]:
        with Image.open(path) as image:
            bins = pixel_region_bins((10, 5, 40.5, 30), *image.size)
        raw, parsed = _reference(
            reference, path, "<REGION_TO_CATEGORY>" + "".join(f"<loc_{b}>" for b in bins.split(","))
        )
        record = next(r for r in records if r["file"] == path.name)
        assert record["raw"] == raw and record["result"] == parsed


def test_pixel_region_bins():
    assert pixel_region_bins((0, 0, 640, 480), 640, 480) == "0,0,999,999"
    assert pixel_region_bins((64, 48, 320, 240), 640, 480) == "100,100,500,500"


def test_min_score_filters_and_scores_are_probabilities(tiny_model, images, tmp_path):
    _, everything = _run(tiny_model, images, tmp_path / "all", "-t", "OD")
    scores = sorted(s for r in everything for s in r["result"].get("scores", []))
    assert scores and all(0 < s <= 1 for s in scores)
    threshold = scores[len(scores) // 2]
    _, kept = _run(tiny_model, images, tmp_path / "kept", "-t", "OD", "--min-score", str(threshold))
    kept_scores = [s for r in kept for s in r["result"].get("scores", [])]
    assert kept_scores and all(s >= threshold for s in kept_scores) and len(kept_scores) < len(scores)
    assert [r["raw"] for r in kept] == [r["raw"] for r in everything]  # scores never change answers


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-t", "OD", "--ground-from", "OD"], "needs a text task"),
        (["-t", "CAPTION", "--ground-from", "CAPTION"], "needs a task that takes a phrase"),
        (["-t", "REGION_TO_CATEGORY", "--region", "5,5,1,1"], "in pixels"),
        (["-t", "CAPTION_TO_PHRASE_GROUNDING", "--text-file", "/nonexistent.csv"], "cannot read text file"),
    ],
)
def test_text_input_usage_errors(tmp_path, args, message):
    result = CliRunner().invoke(main, ["annotate", str(tmp_path), "-m", str(tmp_path / "nomodel"), *args])
    assert result.exit_code == 2 and message in result.output
