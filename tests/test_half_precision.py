"""The whole pipeline in fp16 and bf16 on CPU: files written and well formed, answers the reference's.

CUDA runs in half precision by default, and CI has no GPU: these runs catch what half precision breaks
on the way (pixels, image features, scores, boxes) without one.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from florence_cli.cli import main

from .conftest import MAX_NEW_TOKENS, Reference, write_images
from .helpers import read_jsonl

TASKS = ["OD", "CAPTION", "REFERRING_EXPRESSION_SEGMENTATION"]
EXPRESSION = "a red car"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("half") / "imgs", 3)


def _annotate(model, images, out, dtype: str, *flags: str):
    argv = ["annotate", str(images[0].parent), "-m", str(model), "--device", "cpu", "--dtype", dtype,
            "--max-new-tokens", str(MAX_NEW_TOKENS), "-o", str(out), "-b", "3", "--workers", "0",
            "--text", f"REFERRING_EXPRESSION_SEGMENTATION={EXPRESSION}", "--jsonl", str(out / "all.jsonl"),
            *[arg for task in TASKS for arg in ("-t", task)], *flags]  # fmt: skip
    return CliRunner().invoke(main, argv, catch_exceptions=False)


def _finite(values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _assert_well_formed(out, images) -> None:
    names = [path.name for path in images]
    for name in names:
        assert (out / "caption" / f"{name}.txt").read_text(encoding="utf-8").strip()
    for task in ["OD", "REFERRING_EXPRESSION_SEGMENTATION"]:
        coco = json.loads((out / f"{task.lower()}.json").read_text())
        sizes = {i["id"]: (i["width"], i["height"]) for i in coco["images"]}
        assert [i["file_name"] for i in coco["images"]] == names
        for annotation in coco["annotations"]:
            x, y, w, h = annotation["bbox"]
            width, height = sizes[annotation["image_id"]]
            assert _finite([x, y, w, h]) and w >= 0 and h >= 0 and x + w <= width and y + h <= height
            assert _finite([annotation["score"]]) and 0 <= annotation["score"] <= 1
            assert all(_finite(polygon) for polygon in annotation.get("segmentation", []))
    assert not (out / "errors.jsonl").read_text()


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_run_writes_the_reference_answers(tiny_model, images, tmp_path, dtype):
    out = tmp_path / "out"
    result = _annotate(tiny_model, images, out, dtype)
    assert result.exit_code == 0, result.output
    _assert_well_formed(out, images)
    records = read_jsonl(out / "all.jsonl")
    assert len(records) == len(images) * len(TASKS)
    # A batch of 3 in half precision, against the one-image reference loop in the same precision.
    reference = Reference(tiny_model, dtype=DTYPES[dtype])
    for record in records:
        prompt = f"<{record['task']}>" + (EXPRESSION if record["task"].startswith("REFERRING") else "")
        with Image.open(images[0].parent / record["file"]) as image:
            raw, _ = reference.run(image.convert("RGB"), prompt)
        assert record["raw"] == raw, (dtype, record["file"], record["task"])


def test_half_precision_with_batched_products(tiny_model, images, tmp_path):
    out = tmp_path / "out"
    result = _annotate(tiny_model, images, out, "fp16", "--batched-products")
    assert result.exit_code == 0, result.output
    _assert_well_formed(out, images)
