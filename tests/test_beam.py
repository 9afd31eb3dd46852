"""Beam search with finished images dropped from the batch: the same answers, less work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from florence_cli import beam
from florence_cli.annotate import Annotator, GenerationSettings, RunConfig
from florence_cli.beam import _beams_alike
from florence_cli.model import FlorenceModel

from .conftest import Reference, random_image, write_images
from .helpers import assert_same_answer, read_jsonl

IMAGES = 10
SETTINGS = {
    "checkpoint defaults": {"max_new_tokens": 40},
    "Microsoft's defaults": {
        "max_new_tokens": 40, "early_stopping": True, "no_repeat_ngram_size": 3, "forced_bos_token_id": 0,
    },
    "4 beams, length penalty": {
        "num_beams": 4, "max_new_tokens": 30, "min_new_tokens": 4, "length_penalty": 0.5,
        "early_stopping": "never", "repetition_penalty": 1.3,
    },
    "greedy": {"num_beams": 1, "max_new_tokens": 30},
    "length decay (make-tiny-model's)": {"max_new_tokens": 40, "exponential_decay_length_penalty": (6, 1.25)},
}  # fmt: skip


@pytest.fixture(scope="module")
def varied(varied_dir):
    return FlorenceModel.load(str(varied_dir), device="cpu")


@pytest.fixture(scope="module")
def features(varied):
    size = varied.resize_spec.size
    pixels = [np.asarray(random_image(seed).resize(size, Image.Resampling.BICUBIC)) for seed in range(IMAGES)]
    return varied.image_features(varied.pixel_values(pixels))


def generate(model: FlorenceModel, features, prompt: str, settings: dict, compact: bool) -> list[list[int]]:
    model.compact_beams = compact
    try:
        return [g.token_ids for g in model.generate(features, [prompt] * len(features), settings)]
    finally:
        model.compact_beams = True


def decoder_batch_sizes(model: FlorenceModel, run) -> list[int]:
    """The decoder's batch size at each call while ``run()`` runs."""
    sizes = []
    decoder = model.model.model.language_model.decoder

    def record(_module, _args, kwargs):
        tokens = kwargs.get("input_ids")
        sizes.append((kwargs["inputs_embeds"] if tokens is None else tokens).shape[0])

    handle = decoder.register_forward_pre_hook(record, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return sizes


@pytest.mark.slow
@pytest.mark.parametrize("prompt", ["<OD>", "<CAPTION>", "<OCR>"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_compacted_batch_equals_one_image_at_a_time(varied, features, prompt, setting):
    settings = SETTINGS[setting]
    alone = [generate(varied, features[i : i + 1], prompt, settings, compact=False)[0] for i in range(IMAGES)]
    assert generate(varied, features, prompt, settings, compact=True) == alone
    assert generate(varied, features, prompt, settings, compact=False) == alone


def test_answers_of_the_fixture_model_vary_in_length(varied, features):
    """Without varied lengths the equality tests above would never drop an image mid-batch."""
    for setting in ("checkpoint defaults", "Microsoft's defaults", "4 beams, length penalty"):
        lengths = {len(t) for t in generate(varied, features, "<OD>", SETTINGS[setting], True)}
        assert len(lengths) >= 3, (setting, lengths)


@pytest.mark.parametrize("setting", ["checkpoint defaults", "length decay (make-tiny-model's)"])
def test_finished_images_leave_the_batch(varied, features, setting):
    settings = SETTINGS[setting]
    compacted = decoder_batch_sizes(varied, lambda: generate(varied, features, "<OD>", settings, True))
    full = decoder_batch_sizes(varied, lambda: generate(varied, features, "<OD>", settings, False))
    beams = varied.generation_config.num_beams
    assert set(full) == {IMAGES * beams}
    assert compacted[0] == IMAGES * beams and compacted[-1] < compacted[0]
    assert compacted == sorted(compacted, reverse=True) and all(size % beams == 0 for size in compacted)
    assert sum(compacted) < sum(full)


def test_settings_it_does_not_mirror_go_to_transformers_own_loop(varied, features):
    """A logits processor outside the known row-local ones (here: banned words) is left to transformers."""
    settings = {"max_new_tokens": 40, "bad_words_ids": [[7]]}
    expected = [generate(varied, features[i : i + 1], "<OD>", settings, False)[0] for i in range(4)]
    assert len({len(tokens) for tokens in expected}) > 1  # compaction would have shrunk the batch
    answers = []
    sizes = decoder_batch_sizes(
        varied, lambda: answers.extend(generate(varied, features[:4], "<OD>", settings, True))
    )
    assert answers == expected
    assert len(set(sizes)) == 1


def test_annotate_on_varied_lengths_equals_reference(varied, varied_dir, tmp_path):
    images = write_images(tmp_path / "imgs", 6, start_seed=20)
    reference = Reference(varied_dir)
    config = RunConfig(batch_size=6, generation=GenerationSettings(max_new_tokens=40))
    annotator = Annotator(config, model=varied)
    summary = annotator.run([str(tmp_path / "imgs")], tmp_path / "out", ["OD", "CAPTION"],
                            jsonl=str(tmp_path / "all.jsonl"))  # fmt: skip
    assert summary.exit_code == 0
    records = read_jsonl(tmp_path / "all.jsonl")
    assert len(records) == 2 * len(images)
    for record in records:
        prompt = "<OD>" if record["task"] == "OD" else "<CAPTION>"
        with Image.open(tmp_path / "imgs" / record["file"]) as image:
            raw, parsed = reference.run(image.convert("RGB"), prompt, max_new_tokens=40)
        assert record["raw"] == raw, (record["file"], record["task"])
        assert_same_answer(record["result"], parsed, record["file"])


def test_beams_alike_compares_each_images_beams_bit_for_bit():
    states = torch.randn(2, 1, 4, 5, 8).expand(2, 3, 4, 5, 8).reshape(6, 4, 5, 8)  # 2 images × 3 beams
    cache = DynamicCache()
    cache.update(states.clone(), states.clone(), 0)
    assert _beams_alike(cache, 3)
    assert not _beams_alike(cache, 2)  # rows grouped otherwise do differ
    cache.layers[0].values[4, 0, 0, 0] += 1e-6  # image 1, beam 1
    assert not _beams_alike(cache, 3)


@pytest.mark.parametrize("alike", [True, False])
def test_cross_attention_states_are_copied_between_beams_only_where_they_differ(
    varied, features, alike, monkeypatch
):
    """Each beam search step moves every beam's cache rows to its parent's; the encoder states that
    cross-attention caches are the same for all beams of an image, so moving them changes nothing."""
    whole_cache_reorders = []
    reorder = EncoderDecoderCache.reorder_cache

    def recorded(cache, origins):
        whole_cache_reorders.append(origins)
        reorder(cache, origins)

    monkeypatch.setattr(EncoderDecoderCache, "reorder_cache", recorded)
    if not alike:  # as if a kernel had given the beams different states
        monkeypatch.setattr(beam, "_beams_alike", lambda cache, beams: False)
    settings = SETTINGS["Microsoft's defaults"]
    alone = [generate(varied, features[i : i + 1], "<OD>", settings, compact=False)[0] for i in range(4)]
    whole_cache_reorders.clear()
    assert generate(varied, features[:4], "<OD>", settings, compact=True) == alone
    assert bool(whole_cache_reorders) == (not alike)
