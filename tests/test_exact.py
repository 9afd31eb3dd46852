"""Per-image matrix products: a batch computes every logit bit for bit as the one-image reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional

from florence_cli.exact import reference_shapes

from .conftest import random_image


@pytest.mark.parametrize("width", [48, 600])  # 600: products big enough to run side by side on CPU
def test_linear_layers_multiply_one_images_rows_at_a_time_and_are_restored_after(width):
    from florence_cli.exact import SIDE_BY_SIDE_MAX_ROWS, SIDE_BY_SIDE_MIN_WEIGHTS

    torch.manual_seed(0)
    layer = torch.nn.Linear(width, 960)
    assert (layer.weight.numel() >= SIDE_BY_SIDE_MIN_WEIGHTS) == (width == 600)
    hidden = torch.randn(12, 2, width)
    assert SIDE_BY_SIDE_MAX_ROWS >= 3 * 2  # one image's part: few rows, as in a decoding step
    with reference_shapes(3, torch.nn.Sequential(layer)):
        batched = layer(hidden)
        small = layer(hidden[:2])  # fewer rows than a group: one product
    per_image = torch.cat(
        [functional.linear(hidden[i : i + 3], layer.weight, layer.bias) for i in (0, 3, 6, 9)]
    )
    assert torch.equal(batched, per_image)
    assert batched.requires_grad  # the caller's autograd mode holds in the threads too
    assert torch.equal(small, functional.linear(hidden[:2], layer.weight, layer.bias))
    assert "forward" not in vars(layer)  # the class's forward is back


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
def test_batched_logits_equal_the_one_image_logits_bit_for_bit(florence_model, prompt):
    model = florence_model
    size = model.resize_spec.size
    pixels = [np.asarray(random_image(s).resize(size, Image.Resampling.BICUBIC)) for s in range(5)]
    features = model.image_features(model.pixel_values(pixels))
    settings = {"num_beams": 3, "max_new_tokens": 12, "min_new_tokens": 12, "no_repeat_ngram_size": 3}
    model.compact_beams = False  # rows stay where they are, so step t of image i is rows 3i..3i+2
    try:
        batched = lm_head_outputs(model, features, prompt, settings)
        model.reference_shapes = False
        batched_products = lm_head_outputs(model, features, prompt, settings)
    finally:
        model.compact_beams, model.reference_shapes = True, True
    differs = False
    for image in range(len(features)):
        alone = lm_head_outputs(model, features[image : image + 1], prompt, settings)
        assert len(alone) == len(batched)
        for step, logits in enumerate(alone):
            rows = slice(3 * image, 3 * image + 3)
            assert torch.equal(batched[step][rows], logits), (image, step)
            differs |= not torch.equal(batched_products[step][rows], logits)
    # Why the per-image shapes exist: batched kernels round otherwise (true of this CPU's MKL and
    # attention kernels; the reason a near tie can flip).
    assert differs
