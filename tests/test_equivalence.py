"""Batching never changes an answer: every batch size equals the one-image reference loop."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from florence_cli.annotate import Annotator, GenerationSettings, RunConfig
from florence_cli.tasks import TASKS, task_prompt

from .conftest import MAX_NEW_TOKENS, write_images
from .helpers import assert_same_answer, read_jsonl

TEXTS = {"phrase": "a red car", "region": "100,200,600,900"}


def _text_for(task):
    return TEXTS.get(task.text_input.value)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("eq") / "imgs", 5)


@pytest.fixture(scope="module")
def expected(reference, images):
    answers = {}
    for task in TASKS.values():
        prompt = task_prompt(task, _text_for(task))
        for path in images:
            with Image.open(path) as image:
                answers[(path.name, task.name)] = reference.run(image.convert("RGB"), prompt)
    return answers


@pytest.mark.parametrize(("batch_size", "workers"), [(1, 0), (2, 0), (5, 2)])
def test_every_task_every_batch_size_equals_reference(
    florence_model, images, expected, tmp_path, batch_size, workers
):
    generation = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS)
    annotator = Annotator(RunConfig(batch_size=batch_size, generation=generation), model=florence_model)
    records = []
    for text_kind in (None, "phrase", "region"):
        tasks = [t.name for t in TASKS.values() if (_text_for(t) and t.text_input.value) == text_kind]
        summary = annotator.run(
            [str(images[0].parent)], tmp_path / f"out-{text_kind}", tasks,
            text=TEXTS.get(text_kind), workers=workers, jsonl=str(tmp_path / "all.jsonl"),
        )  # fmt: skip
        assert summary.exit_code == 0 and summary.annotated == len(images)
    records = read_jsonl(tmp_path / "all.jsonl")
    assert len(records) == len(images) * len(TASKS)
    for record in records:
        raw, parsed = expected[(record["file"], record["task"])]
        assert record["raw"] == raw, (record["file"], record["task"])
        assert_same_answer(record["result"], parsed, f"{record['file']} {record['task']}")


def test_answers_depend_on_the_image(expected, images):
    """Guard against a tiny model that ignores its input (the equality above would then be empty)."""
    raws = {expected[(p.name, "OD")][0] for p in images}
    assert len(raws) > 1


def test_image_features_do_not_depend_on_the_batch(florence_model, images):
    from florence_cli.decode import decode_image

    pixels = florence_model.pixel_values(
        [decode_image(str(p), florence_model.resize_spec)[2] for p in images]
    )
    batched = florence_model.image_features(pixels)
    for i in range(len(images)):
        assert torch.equal(batched[i], florence_model.image_features(pixels[i : i + 1])[0])


def test_processors_we_cannot_mirror_are_called_as_they_are(florence_model, images):
    """A processor other than Pillow's standard one (here: center-crop on) gets full images."""
    import copy

    from florence_cli.decode import decode_image
    from florence_cli.model import FlorenceModel

    processor = copy.deepcopy(florence_model.processor)
    processor.image_processor.do_center_crop = True
    processor.image_processor.crop_size = {"height": 96, "width": 96}
    model = FlorenceModel(florence_model.model, processor, florence_model.device, florence_model.dtype)
    assert model.resize_spec.size is None
    with Image.open(images[0]) as image:
        expected = processor(text="<OD>", images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
    pixels = model.pixel_values([decode_image(str(images[0]), model.resize_spec)[2]])
    assert torch.equal(pixels, expected)
