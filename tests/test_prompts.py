"""Free prompts (``--prompt``): fine-tuned captioners' own prompts, answered as the reference answers them."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from PIL import Image

from florence_cli.cli import main
from florence_cli.tasks import TaskError, prompt_task
from florence_cli.testing.original_twin import write_original_twin

from .conftest import MAX_NEW_TOKENS, Reference, write_images
from .helpers import read_jsonl

PROMPTS = ["<GENERATE_TAGS>", "Describe this picture, please."]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts") / "imgs"
    write_images(folder, 3)
    return folder


def _annotate(model, images, out, *args):
    argv = [
        "annotate",
        str(images),
        *args,
        "-m",
        str(model),
        "--device",
        "cpu",
        "-o",
        str(out),
        "--max-new-tokens",
        str(MAX_NEW_TOKENS),
        "--workers",
        "0",
        "-b",
        "2",
        "--jsonl",
        str(out / "a.jsonl"),
    ]
    return CliRunner().invoke(main, argv, catch_exceptions=False)  # fmt: skip


def _assert_like_reference(reference: Reference, images, out, prompts) -> None:
    records = [r for r in read_jsonl(out / "a.jsonl") if r["task"].startswith("prompt:")]
    assert len(records) == 3 * len(prompts)
    for record in records:
        prompt = record["task"].removeprefix("prompt:")
        with Image.open(images / record["file"]) as image:
            raw, answer = reference.run(image.convert("RGB"), prompt, task=prompt)
        assert (record["raw"], record["result"]) == (raw, answer), record["file"]
        text_file = out / prompt_task(prompt).slug / f"{record['file']}.txt"
        assert text_file.read_text(encoding="utf-8") == answer


def test_free_prompts_answer_as_the_reference_and_resume_like_tasks(tiny_model, reference, images, tmp_path):
    out = tmp_path / "out"
    args = [arg for prompt in PROMPTS for arg in ("--prompt", prompt)]
    result = _annotate(tiny_model, images, out, "-t", "CAPTION", *args)
    assert result.exit_code == 0, result.output
    assert {r["task"] for r in read_jsonl(out / "a.jsonl")} == {"CAPTION", *(f"prompt:{p}" for p in PROMPTS)}
    _assert_like_reference(reference, images, out, PROMPTS)
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and p.name.startswith("prompt-")) == sorted(
        prompt_task(p).slug for p in PROMPTS
    )
    rerun = _annotate(tiny_model, images, out, *args)
    assert rerun.exit_code == 0 and "0 annotated, 3 already done" in rerun.stderr


def test_prompts_that_are_tasks_or_empty_are_refused(tiny_model, images, tmp_path):
    for prompt, message in [("<OD>", "use -t OD"), ("What is <CAPTION> here", "use -t CAPTION"),
                            ("  ", "empty")]:  # fmt: skip
        result = _annotate(tiny_model, images, tmp_path / "o", "--prompt", prompt)
        assert result.exit_code == 2 and message in result.stderr
    result = _annotate(tiny_model, images, tmp_path / "o")
    assert result.exit_code == 2 and "give a task (-t) or a prompt (--prompt)" in result.stderr
    assert not (tmp_path / "o").exists()
    with pytest.raises(TaskError):
        prompt_task("")


def test_a_fine_tune_with_prompt_tokens_of_its_own_loads_and_answers_as_its_conversion(
    tiny_model, images, tmp_path
):
    """An original-format fine-tune whose tokenizer adds its prompts as tokens after Microsoft's (as
    PromptGen-style checkpoints may): loaded in memory, its prompt is one token, and its answers equal
    the reference loop's on the same checkpoint converted to transformers' layout."""
    own = ["<GENERATE_TAGS>", "<MIXED_CAPTION>"]
    twin = write_original_twin(tiny_model, tmp_path / "fine-tune", extra_tokens=own)
    from florence_cli.model import load_processor

    processor = load_processor(twin)
    tokenizer = processor.tokenizer
    first = len(tokenizer) - 1 - len(own)  # <image> is last
    assert tokenizer.convert_tokens_to_ids(own) == [first, first + 1]
    assert tokenizer("<GENERATE_TAGS>", add_special_tokens=False).input_ids == [first]
    assert tokenizer.convert_tokens_to_ids("<image>") == len(tokenizer) - 1
    converted = CliRunner().invoke(main, ["convert", str(twin), str(tmp_path / "converted")])
    assert converted.exit_code == 0, converted.output
    out = tmp_path / "out"
    result = _annotate(
        twin, images, out, "--prompt", "<GENERATE_TAGS>", "--sidecar-dir", str(tmp_path / "caps")
    )
    assert result.exit_code == 0, result.output
    _assert_like_reference(Reference(tmp_path / "converted"), images, out, ["<GENERATE_TAGS>"])
    for record in read_jsonl(out / "a.jsonl"):
        assert (tmp_path / "caps" / record["file"]).with_suffix(".txt").read_text(encoding="utf-8") == record[
            "result"
        ]
