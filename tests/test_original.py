"""Microsoft-layout checkpoints: detection, exact loading, storage variants, refusals and conversion.

Every original here is a "twin" written from the tiny native checkpoint, so the native model is the
reference: loading the twin must give its tensors and, computed the original's way, its answers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, Florence2ForConditionalGeneration, LogitsProcessor

from florence_cli.checkpoint import is_original_layout
from florence_cli.original import (
    OriginalCheckpointError,
    convert_checkpoint,
    load_original,
    microsoft_added_tokens,
)
from florence_cli.testing.original_twin import write_original_twin
from florence_cli.testing.tiny import make_tiny_model

MAX_NEW_TOKENS = 20
# What Microsoft's text_config carries, and the same as generate() flags for the native model
# (whose generation config already has forced_eos_token_id=2).
GENERATION = {
    "no_repeat_ngram_size": 3, "forced_bos_token_id": 0, "forced_eos_token_id": 2, "early_stopping": True,
    "num_beams": 3,
}  # fmt: skip
FLAGS = {"no_repeat_ngram_size": 3, "forced_bos_token_id": 0, "early_stopping": True, "num_beams": 3}
EMBEDDINGS = {
    "model.language_model.shared.weight", "model.language_model.encoder.embed_tokens.weight",
    "model.language_model.decoder.embed_tokens.weight", "lm_head.weight",
}  # fmt: skip


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("native"), seed=0)


@pytest.fixture(scope="module")
def native_model(native):
    return Florence2ForConditionalGeneration.from_pretrained(native).eval()


@pytest.fixture(scope="module")
def native_processor(native):
    return AutoProcessor.from_pretrained(native)


@pytest.fixture(scope="module")
def twin(native, tmp_path_factory) -> Path:
    return write_original_twin(native, tmp_path_factory.mktemp("twin"), generation_fields=GENERATION)


@pytest.fixture(scope="module")
def loaded(twin):
    return load_original(twin, dtype=torch.float32)


def image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (72, 96, 3), dtype=np.uint8))


def generate(model, processor, **flags) -> torch.Tensor:
    inputs = processor(text="<OD>", images=image(), return_tensors="pt")
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, **flags)


def original_bias(model, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``final_logits_bias`` over the native vocabulary: the original has no ``<image>`` to generate."""
    vocab = model.config.image_token_id
    return torch.cat([torch.zeros(vocab) if bias is None else bias, torch.tensor([float("-inf")])])


def native_answer(model, processor, bias: torch.Tensor | None = None, **flags) -> torch.Tensor:
    """The native model computed as the original computes: bias added to lm_head's output, then generate."""
    full = original_bias(model, bias)
    hook = model.lm_head.register_forward_hook(lambda module, args, output: output + full)
    try:
        return generate(model, processor, **{**FLAGS, **flags})
    finally:
        hook.remove()


def edit_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_layout_is_detected_from_config_and_tensor_names(native, twin, tmp_path):
    assert is_original_layout(twin)
    assert not is_original_layout(native)
    assert not is_original_layout(tmp_path)
    # a native-looking config over original tensor names is still original
    shutil.copy(native / "config.json", tmp_path / "config.json")
    shutil.copy(twin / "model.safetensors", tmp_path / "model.safetensors")
    assert is_original_layout(tmp_path)


def test_twin_loads_to_the_native_tensors(loaded, native_model):
    model, _ = loaded
    assert not model.training and model.dtype == torch.float32
    ours, theirs = model.state_dict(), native_model.state_dict()
    assert ours.keys() == theirs.keys()
    image_id = model.config.image_token_id
    for key, tensor in ours.items():
        if key in EMBEDDINGS:  # the original format has no <image> row; it is zero here
            assert torch.equal(tensor[:image_id], theirs[key][:image_id]), key
            assert not tensor[image_id:].any(), key
        else:
            assert torch.equal(tensor, theirs[key]), key
    assert model.lm_head.weight.data_ptr() == model.model.language_model.shared.weight.data_ptr()


def test_tokenizer_gets_florence_tokens_then_image(loaded, native_processor, twin, tmp_path):
    tokenizer, reference = loaded[1].tokenizer, native_processor.tokenizer
    base = len(json.loads((twin / "vocab.json").read_text()))
    assert tokenizer.image_token == "<image>"
    assert tokenizer.image_token_id == base + len(microsoft_added_tokens()) == reference.image_token_id
    texts = ["What does the image describe?", "car<loc_53><loc_334></od> café 東京 😀", "<image><s>a dog</s>"]
    assert [tokenizer(text).input_ids for text in texts] == [reference(text).input_ids for text in texts]
    # BART's vocab.json + merges.txt, without tokenizer.json, tokenize the same
    shutil.copytree(twin, tmp_path / "twin")
    (tmp_path / "twin" / "tokenizer.json").unlink()
    merged = load_original(tmp_path / "twin", dtype=torch.float32)[1].tokenizer
    assert [merged(text).input_ids for text in texts] == [reference(text).input_ids for text in texts]


def test_tokenizer_files_that_do_not_tokenize_are_refused(twin, tmp_path):
    shutil.copytree(twin, tmp_path / "twin")
    (tmp_path / "twin" / "tokenizer.json").unlink()
    (tmp_path / "twin" / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(OriginalCheckpointError, match="do not tokenize"):
        load_original(tmp_path / "twin", dtype=torch.float32)


def test_generation_defaults_come_from_text_config(loaded, native_model, native_processor):
    model, processor = loaded
    for field, value in GENERATION.items():
        assert getattr(model.generation_config, field) == value, field
    inputs = processor(text="<OD>", images=image(), return_tensors="pt")
    reference = native_processor(text="<OD>", images=image(), return_tensors="pt")
    assert all(torch.equal(inputs[key], reference[key]) for key in reference)
    ours = generate(model, processor)  # no flags: the defaults must do it
    assert torch.equal(ours, generate(native_model, native_processor, **FLAGS))
    assert torch.equal(ours, native_answer(native_model, native_processor))


def test_final_logits_bias_is_added_as_the_original_adds_it(
    native, native_model, native_processor, loaded, tmp_path
):
    bias = torch.randn(native_model.config.image_token_id, generator=torch.Generator().manual_seed(1)) * 3
    twin = write_original_twin(native, tmp_path, generation_fields=GENERATION, final_logits_bias=bias)
    model, processor = load_original(twin, dtype=torch.float32)
    ours = generate(model, processor)
    assert torch.equal(ours, native_answer(native_model, native_processor, bias))
    assert not torch.equal(ours, generate(*loaded))  # a large bias changes the answer

    class AddBias(LogitsProcessor):  # exact for greedy search, which sees raw logits
        def __call__(self, input_ids, scores):
            return scores + original_bias(native_model, bias)

    greedy = {**FLAGS, "num_beams": 1}
    assert torch.equal(
        generate(model, processor, num_beams=1),
        generate(native_model, native_processor, **greedy, logits_processor=[AddBias()]),
    )


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("tie_mode", ["shared_only", "all_copies"])
def test_storage_variants_load_alike(native, loaded, tmp_path, tie_mode, fmt):
    twin = write_original_twin(native, tmp_path, tie_mode=tie_mode, fmt=fmt, generation_fields=GENERATION)
    model, processor = load_original(twin, dtype=torch.float32, allow_pickle=fmt == "bin")
    reference = loaded[0].state_dict()
    assert all(torch.equal(tensor, reference[key]) for key, tensor in model.state_dict().items())
    assert torch.equal(generate(model, processor), generate(*loaded))


def test_pickle_needs_allow_pickle(native, tmp_path):
    twin = write_original_twin(native, tmp_path, fmt="bin")
    with pytest.raises(OriginalCheckpointError, match="--allow-pickle") as error:
        load_original(twin, dtype=torch.float32)
    assert "arbitrary code" in str(error.value)


QKV = "vision_tower.blocks.0.0.spatial_block.window_attn.fn.qkv.weight"


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [
        (QKV, None, f"tensor '{QKV}' is missing"),
        ("language_model.model.shared.weight", None, "'language_model.model.shared.weight' is missing"),
        (
            "language_model.model.decoder.layers.1.fc2.weight",
            (64, 32),
            r"has shape \[64, 32\]; .* \[32, 64\]",
        ),
        ("image_projection", (32, 64), r"'image_projection' has shape \[32, 64\]; .* \[64, 32\]"),
        ("language_model.final_logits_bias", (1, 7), "'language_model.final_logits_bias' has shape"),
    ],
)
def test_missing_or_misshaped_tensors_are_refused(twin, tmp_path, name, shape, message):
    folder = shutil.copytree(twin, tmp_path / "twin")

    def edit(state):
        del state[name]
        if shape is not None:
            state[name] = torch.zeros(shape)

    edit_weights(folder, edit)
    with pytest.raises(OriginalCheckpointError, match=message):
        load_original(folder, dtype=torch.float32)


def test_tied_copies_must_agree(native, tmp_path):
    twin = write_original_twin(native, tmp_path, tie_mode="all_copies")
    edit_weights(twin, lambda state: state["language_model.lm_head.weight"].add_(1.0))
    with pytest.raises(OriginalCheckpointError, match=r"'language_model\.lm_head\.weight' differs"):
        load_original(twin, dtype=torch.float32)


def base_size(config: dict) -> None:
    """Florence-2-base's shapes over the tiny weights: must be refused, never loaded as random weights."""
    config["vision_config"].update(
        dim_embed=[128, 256, 512, 1024], num_heads=[4, 8, 16, 32], num_groups=[4, 8, 16, 32],
        depths=[1, 1, 9, 1], window_size=12, projection_dim=768,
    )  # fmt: skip
    config["text_config"].update(
        d_model=768, encoder_layers=6, decoder_layers=6, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
        encoder_attention_heads=12, decoder_attention_heads=12, max_position_embeddings=1024,
        vocab_size=51289,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (base_size, "tensor '.*' has shape"),
        (lambda config: config["vision_config"].pop("num_heads"), "vision_config lacks num_heads"),
        (
            lambda config: config["vision_config"].update(image_feature_source=["last_frame"]),
            "image_feature_source",
        ),
    ],
)
def test_configs_the_weights_or_native_model_cannot_honour_are_refused(twin, tmp_path, edit, message):
    folder = shutil.copytree(twin, tmp_path / "twin")
    edit_config(folder, edit)
    with pytest.raises(OriginalCheckpointError, match=message):
        load_original(folder, dtype=torch.float32)


def test_fp16_weights_load_in_the_dtype_asked_for(native, native_model, tmp_path):
    twin = write_original_twin(native, tmp_path, fp16=True)
    model = load_original(twin, dtype=torch.float32)[0]
    assert model.dtype == torch.float32
    reference = native_model.state_dict()
    for key, tensor in model.state_dict().items():
        rows = model.config.image_token_id if key in EMBEDDINGS else None
        assert torch.equal(tensor[:rows], reference[key][:rows].half().float()), key
    half = load_original(twin, dtype=torch.float16)[0]
    assert half.dtype == torch.float16 and half.lm_head.final_logits_bias.dtype == torch.float16


def test_converted_checkpoint_loads_with_plain_transformers(twin, loaded, tmp_path):
    converted = convert_checkpoint(twin, tmp_path / "converted")
    assert not is_original_layout(converted)
    model = Florence2ForConditionalGeneration.from_pretrained(converted).eval()
    processor = AutoProcessor.from_pretrained(converted)
    for field, value in GENERATION.items():
        assert getattr(model.generation_config, field) == value, field
    assert model.generation_config.suppress_tokens == [model.config.image_token_id]
    assert torch.equal(generate(model, processor), generate(*loaded))


def test_conversion_refuses_to_drop_a_bias(native, tmp_path):
    twin = write_original_twin(native, tmp_path / "twin", final_logits_bias=torch.ones(1425))
    with pytest.raises(OriginalCheckpointError, match="final_logits_bias' is non-zero"):
        convert_checkpoint(twin, tmp_path / "converted")
