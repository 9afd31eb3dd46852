"""Original-format checkpoints through ``florence annotate``: same answers as their native twin."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from PIL import Image

from florence_cli.cli import main
from florence_cli.testing.original_twin import write_original_twin

from .conftest import MAX_NEW_TOKENS, write_images
from .helpers import read_jsonl

# What Microsoft's config.json keeps in text_config (the model card's code generates with them).
GENERATION_FIELDS = {
    "no_repeat_ngram_size": 3, "forced_bos_token_id": 0, "forced_eos_token_id": 2, "early_stopping": True,
    "num_beams": 3,
}  # fmt: skip


def _annotate_jsonl(model_dir, images_dir, out, *extra) -> dict[tuple[str, str], str]:
    args = ["annotate", str(images_dir), "-t", "OD", "-t", "CAPTION", "-m", str(model_dir), "--device", "cpu",
            "-o", str(out), "--jsonl", str(out / "answers.jsonl"), "--max-new-tokens", str(MAX_NEW_TOKENS),
            "--workers", "0", "-q", *extra]  # fmt: skip
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return {(r["file"], r["task"]): r["raw"] for r in read_jsonl(out / "answers.jsonl")}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("orig") / "imgs"
    write_images(folder, 3)
    return folder


def test_original_twin_answers_like_native_twin(tiny_model, images, tmp_path):
    twin = write_original_twin(tiny_model, tmp_path / "twin")  # no generation fields: same config
    native = _annotate_jsonl(tiny_model, images, tmp_path / "native")
    original = _annotate_jsonl(twin, images, tmp_path / "original", "--num-beams", "3")
    assert original == native and len(native) == 6


def test_generation_defaults_of_original_config_apply_without_flags(tiny_model, reference, images, tmp_path):
    twin = write_original_twin(tiny_model, tmp_path / "twin", generation_fields=GENERATION_FIELDS)
    answers = _annotate_jsonl(twin, images, tmp_path / "out")
    flags = {"no_repeat_ngram_size": 3, "forced_bos_token_id": 0, "early_stopping": True}
    for path in sorted(images.glob("*.png")):
        with Image.open(path) as image:
            for task in ("OD", "CAPTION"):
                inputs = reference.processor(
                    text=f"<{task}>", images=image.convert("RGB"), return_tensors="pt"
                )
                ids = reference.model.generate(
                    **inputs, max_new_tokens=MAX_NEW_TOKENS, num_beams=3, do_sample=False, **flags
                )
                expected = reference.processor.batch_decode(ids, skip_special_tokens=False)[0]
                assert answers[(path.name, task)] == expected


def test_pickled_original_needs_allow_pickle(tiny_model, images, tmp_path):
    twin = write_original_twin(tiny_model, tmp_path / "twin", fmt="bin", tie_mode="all_copies")
    args = [
        "annotate",
        str(images),
        "-t",
        "OD",
        "-m",
        str(twin),
        "--device",
        "cpu",
        "-o",
        str(tmp_path / "o"),
    ]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2 and "--allow-pickle" in refused.output and "Traceback" not in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    allowed = _annotate_jsonl(twin, images, tmp_path / "allowed", "--allow-pickle")
    assert allowed == _annotate_jsonl(tiny_model, images, tmp_path / "native")


def test_convert_command_writes_a_native_checkpoint(tiny_model, images, tmp_path):
    twin = write_original_twin(tiny_model, tmp_path / "twin", generation_fields=GENERATION_FIELDS)
    result = CliRunner().invoke(main, ["convert", str(twin), str(tmp_path / "converted")])
    assert result.exit_code == 0, result.output
    from transformers import GenerationConfig

    generation = GenerationConfig.from_pretrained(tmp_path / "converted")
    assert generation.no_repeat_ngram_size == 3 and generation.forced_bos_token_id == 0
    assert _annotate_jsonl(tmp_path / "converted", images, tmp_path / "a") == _annotate_jsonl(
        twin, images, tmp_path / "b"
    )
    not_original = CliRunner().invoke(main, ["convert", str(tiny_model), str(tmp_path / "x")])
    assert not_original.exit_code == 1 and "not an original-format" in not_original.output
