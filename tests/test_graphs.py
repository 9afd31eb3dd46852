"""Decoding steps over a static cache in buckets of rows (graphs.py), run uncaptured on CPU: what a CUDA
graph would replay — the same padding, static cache and masks — gives the plain path's answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from florence_cli import graphs
from florence_cli.graphs import StaticDecoder, attended_length, image_bucket
from florence_cli.model import FlorenceModel

from .conftest import random_image
from .helpers import Steps

IMAGES = 10
SMALL_BUCKETS = (2, 4, 8)  # 10 images: 16, then 8, 4 and 2 as they finish
SETTINGS = {
    "checkpoint defaults": {"max_new_tokens": 24},
    "Microsoft's defaults": {
        "max_new_tokens": 24, "early_stopping": True, "no_repeat_ngram_size": 3, "forced_bos_token_id": 0,
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def exact(varied_dir):
    return FlorenceModel.load(str(varied_dir), device="cpu")


@pytest.fixture(scope="module")
def batched(exact):
    return FlorenceModel(exact.model, exact.processor, exact.device, exact.dtype, products="batched")


@pytest.fixture(scope="module")
def features(exact):
    size = exact.resize_spec.size
    pixels = [np.asarray(random_image(seed).resize(size, Image.Resampling.BICUBIC)) for seed in range(IMAGES)]
    return exact.image_features(exact.pixel_values(pixels))


def test_buckets_of_images_and_of_attended_positions():
    assert [image_bucket(n) for n in (1, 8, 9, 17, 33, 64, 65, 130)] == [8, 8, 16, 32, 64, 64, 128, 192]
    assert [image_bucket(n, SMALL_BUCKETS) for n in (1, 3, 5, 10)] == [2, 4, 8, 16]
    assert [attended_length(n, 1025) for n in (1, 16, 17, 33, 600, 1025)] == [16, 16, 32, 64, 1024, 1025]
    assert attended_length(20, 25) == 25


@pytest.mark.parametrize(
    ("prompt", "setting"),
    [
        ("<OD>", "checkpoint defaults"),
        ("<OD>", "Microsoft's defaults"),
        ("<CAPTION>", "Microsoft's defaults"),
    ],
)
def test_static_steps_equal_the_plain_path_bit_for_bit_when_they_attend_the_written_positions(
    exact, features, prompt, setting, monkeypatch
):
    """Attending exactly the positions written (one shape per length), the static steps are the plain
    path's computation in the same per-image shapes, so every logit of every step is the same — across
    buckets, padding, compaction and beam reordering."""
    monkeypatch.setattr(graphs, "attended_length", lambda written, cache_length: written)
    steps = Steps(monkeypatch)
    settings = SETTINGS[setting]
    plain, plain_logits = steps.generate(exact, features, prompt, settings)
    static = StaticDecoder(exact.model, buckets=SMALL_BUCKETS)
    answers, static_logits = steps.generate(exact, features, prompt, settings, static)
    assert answers == plain
    assert len(static_logits) == len(plain_logits)
    assert all(torch.equal(a, b) for a, b in zip(static_logits, plain_logits, strict=True))
    assert steps.shapes[0][0] == 16 * 3 > steps.shapes[-1][0]  # 10 images: bucket 16, then fewer


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_static_steps_give_the_plain_paths_answers_across_buckets(exact, features, setting, monkeypatch):
    """Attending powers of two (the rest masked), a logit may differ in its last bits, not more; the
    answers are the plain path's, as images leave the batch bucket by bucket and prompts change length."""
    steps = Steps(monkeypatch)
    static = StaticDecoder(exact.model)  # 10 images: buckets of 16 and 8
    settings = SETTINGS[setting]
    buckets = set()
    for prompt in ("<OD>", "<CAPTION>"):  # the second prompt is shorter: the same buffers serve it
        plain, plain_logits = steps.generate(exact, features, prompt, settings)
        buffers = static.buffers
        answers, static_logits = steps.generate(exact, features, prompt, settings, static)
        assert answers == plain, prompt
        assert buffers is None or static.buffers is buffers
        for a, b in zip(static_logits, plain_logits, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
        rows = [rows for rows, *_ in steps.shapes]
        assert rows[0] == 48 and rows == sorted(rows, reverse=True)
        assert any(
            length > position + 1
            for (_, length, *_), position in zip(steps.shapes, steps.positions, strict=True)
        )
        buckets.update(rows)
    assert buckets == {48, 24}
    assert exact.generate(features[:2], ["<OD>"] * 2, {"num_beams": 1, "max_new_tokens": 8})  # greedy: plain


def test_prompts_of_other_lengths_in_one_batch_mask_the_encoders_padding(batched, features, monkeypatch):
    """Batched products take prompts of several lengths in one batch, padded: the static steps keep each
    row's encoder mask (and drop it with its image), and give the plain path's answers."""
    steps = Steps(monkeypatch)
    prompts = ["<OD>", "<CAPTION>"] * (IMAGES // 2)
    settings = SETTINGS["Microsoft's defaults"]
    plain, _ = steps.generate(batched, features, prompts, settings)
    static = StaticDecoder(batched.model, buckets=SMALL_BUCKETS)
    answers, _ = steps.generate(batched, features, prompts, settings, static)
    assert answers == plain
    assert static.masked and all(masked for *_, masked in steps.shapes)
    assert len({rows for rows, *_ in steps.shapes}) > 1


def test_padding_rows_never_change_a_live_rows_bits(batched, features, monkeypatch):
    """Padding rows filled with anything — other tokens, other cache rows, infinities — before every
    step leave every live row's logits as they were: no operation of a step mixes rows. (Batched
    products: the padding rows share the live rows' products.)"""
    steps = Steps(monkeypatch)
    settings = SETTINGS["checkpoint defaults"]
    clean, clean_logits = steps.generate(batched, features, "<OD>", settings, StaticDecoder(batched.model))
    step = StaticDecoder._step
    generator = torch.Generator().manual_seed(0)

    def with_garbage(decoder, rows, *shape):
        buffers, live = decoder.buffers, decoder.rows
        padding = rows - live
        if padding:
            vocabulary = buffers.logits.shape[1]
            buffers.tokens[live:rows] = torch.randint(vocabulary, (padding,), generator=generator)
            lines = (padding, buffers.cache_length)
            buffers.ancestry[live:rows] = torch.randint(buffers.capacity, lines, generator=generator)
            written = int(buffers.position)  # positions before this step's
            unused = torch.ones(buffers.capacity, dtype=torch.bool)  # rows no live row's history is in
            unused[buffers.ancestry[:live, :written].flatten()] = False
            buffers.states[:, :, unused] = torch.randn(
                buffers.states[:, :, unused].shape, generator=generator
            )
            buffers.cross_view(rows, decoder.encoder_length)[:, :, live:] = float("inf")
        step(decoder, rows, *shape)

    monkeypatch.setattr(StaticDecoder, "_step", with_garbage)
    noisy, noisy_logits = steps.generate(batched, features, "<OD>", settings, StaticDecoder(batched.model))
    assert noisy == clean
    assert all(torch.equal(a, b) for a, b in zip(noisy_logits, clean_logits, strict=True))
    assert all(torch.isfinite(logits).all() for logits in noisy_logits)


def test_captured_steps_are_recorded_once_per_shape_and_replay_the_uncaptured_steps(
    exact, features, monkeypatch
):
    """The capture's control flow, with a stand-in for CUDA graphs that runs the warm-ups for real and
    replays by running the step: recording leaves the cache as it was, and each shape records once."""
    recorded = []

    class Replay:
        def __init__(self, step):
            self.replay = step

    def record(step, pool, device):
        recorded.append(step.args)
        for _ in range(graphs.WARMUP_STEPS):
            step()
        return Replay(step)

    monkeypatch.setattr(graphs, "record", record)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    steps = Steps(monkeypatch)
    settings = SETTINGS["Microsoft's defaults"]
    uncaptured = StaticDecoder(exact.model, capture=False, buckets=SMALL_BUCKETS)
    expected, expected_logits = steps.generate(exact, features, "<OD>", settings, uncaptured)
    captured = StaticDecoder(exact.model, capture=True, buckets=SMALL_BUCKETS)
    for _ in range(2):  # the second generation replays the first one's graphs
        answers, logits = steps.generate(exact, features, "<OD>", settings, captured)
        assert answers == expected
        assert all(torch.equal(a, b) for a, b in zip(logits, expected_logits, strict=True))
    assert sorted(recorded) == sorted(set(steps.shapes)) == sorted(captured.graphs)
