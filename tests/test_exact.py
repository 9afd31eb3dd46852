"""Per-image matrix products: a batch computes every logit bit for bit as the one-image reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional

from florence_cli.exact import reference_shapes

from .conftest import random_image


def blocks_for_every_big_product(monkeypatch) -> None:
    """Column blocks (otherwise for the 51k-word output layer only) for products of 2^19 weights
    and more, in blocks of 192 columns: several per thread, and a partial one at the end."""
    from florence_cli import exact

    monkeypatch.setattr(exact, "COLUMN_BLOCKS_MIN_WEIGHTS", exact.SIDE_BY_SIDE_MIN_WEIGHTS)
    monkeypatch.setattr(exact, "BLOCK_WEIGHTS", 192 * 600)


# 48: one product after another; 600: big enough to run side by side on CPU; blocks: in column blocks
@pytest.mark.parametrize("case", ["48", "600", "600 in blocks"])
def test_linear_layers_multiply_one_images_rows_at_a_time_and_are_restored_after(case, monkeypatch):
    from florence_cli import exact

    width = int(case.split()[0])
    if "blocks" in case:
        blocks_for_every_big_product(monkeypatch)
    in_blocks = []
    monkeypatch.setattr(exact, "_linear_in_column_blocks", record(exact._linear_in_column_blocks, in_blocks))
    monkeypatch.setattr(exact, "_BLOCK_VERDICTS", {})  # so the kernel's one-off check runs here
    torch.manual_seed(0)
    layer = torch.nn.Linear(width, 1000)
    assert (layer.weight.numel() >= exact.SIDE_BY_SIDE_MIN_WEIGHTS) == (width == 600)
    hidden = torch.randn(12, 1, width)  # 4 images' beams, one token each: a decoding step
    with reference_shapes(3, torch.nn.Sequential(layer)):
        batched = layer(hidden)
        alone = layer(hidden[:3])  # one image: one product, or its columns in blocks
        small = layer(hidden[:2])  # fewer rows than a group: one product
    per_image = torch.cat(
        [functional.linear(hidden[i : i + 3], layer.weight, layer.bias) for i in (0, 3, 6, 9)]
    )
    assert torch.equal(batched, per_image)
    assert batched.requires_grad  # the caller's autograd mode holds in the threads too
    assert torch.equal(alone, per_image[:3])
    assert torch.equal(small, functional.linear(hidden[:2], layer.weight, layer.bias))
    # images per call: the kernel's check for 3-row parts, the batch, one image; the check for 2 rows, 2 rows
    images_per_block_call = [len(call[0]) for call in in_blocks]
    assert images_per_block_call == ([1, 4, 1, 1, 1] if "blocks" in case else [])
    assert "forward" not in vars(layer)  # the class's forward is back


def record(function, calls: list):
    def recorded(*args, **kwargs):
        calls.append(args)
        return function(*args, **kwargs)

    return recorded


def test_column_blocks_are_not_used_where_they_would_change_a_bit(monkeypatch):
    from florence_cli import exact

    blocks_for_every_big_product(monkeypatch)
    monkeypatch.setattr(exact, "_BLOCK_VERDICTS", {})  # the check runs again, on the kernel below
    blocks = exact._linear_in_column_blocks

    def rounding_otherwise(parts, weight, bias):  # a kernel whose blocks round differently
        return blocks(parts, weight, bias) * (1 + 2**-20)

    monkeypatch.setattr(exact, "_linear_in_column_blocks", rounding_otherwise)
    torch.manual_seed(0)
    layer = torch.nn.Linear(600, 1000)
    hidden = torch.randn(12, 1, 600)
    with torch.inference_mode(), reference_shapes(3, torch.nn.Sequential(layer)):
        batched = layer(hidden)
    verdicts = exact._BLOCK_VERDICTS
    assert verdicts == {((3, 1, 600), (1000, 600), torch.float32): False}
    assert torch.equal(
        batched, torch.cat([functional.linear(p, layer.weight, layer.bias) for p in hidden.split(3)])
    )


def lm_head_outputs(model, features, prompt: str, settings: dict) -> list[torch.Tensor]:
    """Every decoding step's logits, as the output layer computed them."""
    steps = []
    handle = model.model.lm_head.register_forward_hook(lambda _m, _i, out: steps.append(out.detach().clone()))
    try:
        model.generate(features, [prompt] * len(features), settings)
    finally:
        handle.remove()
    return steps


@pytest.mark.parametrize("prompt", ["<OD>", "<CAPTION>"])
@pytest.mark.parametrize("threads", ["as they come", "for every product"])
def test_batched_logits_equal_the_one_image_logits_bit_for_bit(florence_model, prompt, threads, monkeypatch):
    from florence_cli import exact

    if threads == "for every product":  # the tiny model's products are too small for threads otherwise
        monkeypatch.setattr(exact, "SIDE_BY_SIDE_MIN_WEIGHTS", 0)
        monkeypatch.setattr(exact, "COLUMN_BLOCKS_MIN_WEIGHTS", 0)
        monkeypatch.setattr(exact, "BLOCK_WEIGHTS", 0)  # one alignment's width per block
    in_blocks = []
    monkeypatch.setattr(exact, "_linear_in_column_blocks", record(exact._linear_in_column_blocks, in_blocks))
    model = florence_model
    size = model.resize_spec.size
    pixels = [np.asarray(random_image(s).resize(size, Image.Resampling.BICUBIC)) for s in range(5)]
    features = model.image_features(model.pixel_values(pixels))
    settings = {"num_beams": 3, "max_new_tokens": 12, "min_new_tokens": 12, "no_repeat_ngram_size": 3}
    model.compact_beams = False  # rows stay where they are, so step t of image i is rows 3i..3i+2
    try:
        batched = lm_head_outputs(model, features, prompt, settings)
        model.products = "batched"  # for one image, the reference's own calls
        alone = [lm_head_outputs(model, features[i : i + 1], prompt, settings) for i in range(len(features))]
    finally:
        model.compact_beams, model.products = True, "per-image"
    assert bool(in_blocks) == (threads == "for every product")
    # (Why the per-image shapes exist: batched kernels may round a row by the batch's make-up — some
    # CPUs' MKL and attention kernels do, at some sizes, and a near tie can then flip. Whether this
    # machine's do at the tiny model's sizes is the hardware's business, not asserted here.)
    for image in range(len(features)):
        assert len(alone[image]) == len(batched)
        for step, logits in enumerate(alone[image]):
            assert torch.equal(batched[step][slice(3 * image, 3 * image + 3)], logits), (image, step)


def test_scores_from_the_batchs_encoder_states_equal_a_fresh_one_image_pass(florence_model):
    """Scoring reuses generation's encoder states: per-image shapes make them each image's own."""
    model = florence_model
    size = model.resize_spec.size
    pixels = [np.asarray(random_image(s).resize(size, Image.Resampling.BICUBIC)) for s in range(4)]
    features = model.image_features(model.pixel_values(pixels))
    answers = model.generate(features, ["<OD>"] * 4, {"num_beams": 3, "max_new_tokens": 10}, with_scores=True)
    for image, answer in enumerate(answers):
        fresh = model.token_logprobs(model.prompt_ids("<OD>"), features[image : image + 1], answer.token_ids)
        assert answer.token_logprobs == fresh and len(fresh) == len(answer.token_ids) - 1
