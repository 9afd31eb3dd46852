"""The Python API: in-memory annotation, and batches that fail or run out of memory."""

from __future__ import annotations

import pytest
import torch

from florence_cli.annotate import Annotator, GenerationSettings, RunConfig

from .conftest import MAX_NEW_TOKENS, random_image, write_images
from .helpers import read_jsonl


def test_annotate_in_memory_matches_reference(annotator, reference):
    images = [random_image(seed) for seed in range(3)]
    answers = annotator.annotate(images, ["OD", "CAPTION"])
    for image, answer in zip(images, answers, strict=True):
        raw, _ = reference.run(image, "<OD>")
        assert answer["OD"].raw == raw
        assert answer["CAPTION"].text == reference.run(image, "<CAPTION>")[1]


def _flaky_generate(model, fail_when):
    real = model.generate

    def generate(features, prompts, generation, with_scores=False):
        error = fail_when(features)
        if error:
            raise error
        return real(features, prompts, generation, with_scores)

    return generate


def test_out_of_memory_halves_the_batch_and_loses_nothing(florence_model, tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    write_images(folder, 7)
    settings = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS)
    expected = Annotator(RunConfig(batch_size=1, generation=settings), model=florence_model)
    expected.run([str(folder)], tmp_path / "expected", ["OD"], jsonl=str(tmp_path / "expected.jsonl"))
    annotator = Annotator(RunConfig(batch_size=6, generation=settings), model=florence_model)
    too_big = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(
        florence_model, "generate", _flaky_generate(florence_model, lambda f: too_big if len(f) > 2 else None)
    )
    summary = annotator.run([str(folder)], tmp_path / "out", ["OD"], jsonl=str(tmp_path / "out.jsonl"))
    assert summary.exit_code == 0 and summary.annotated == 7
    assert annotator.batch_size <= 2  # later batches never again try a size that ran out of memory
    # identical records, scores included: they do not depend on how images were batched
    assert read_jsonl(tmp_path / "out.jsonl") == read_jsonl(tmp_path / "expected.jsonl")


def test_an_image_that_breaks_generation_fails_alone(florence_model, tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    paths = write_images(folder, 5)
    config = RunConfig(batch_size=5, generation=GenerationSettings(max_new_tokens=8))
    annotator = Annotator(config, model=florence_model)
    guilty = annotator.model.pixel_values([_pixels(annotator, paths[3])])
    features_of_guilty = annotator.model.image_features(guilty)[0]

    def fail_when(features):
        hit = any(torch.allclose(row, features_of_guilty, atol=1e-5) for row in features)
        return RuntimeError("bad kernel") if hit else None

    monkeypatch.setattr(florence_model, "generate", _flaky_generate(florence_model, fail_when))
    failures = []
    summary = annotator.run([str(folder)], tmp_path / "out", ["OD"], on_error=failures.append)
    assert summary.exit_code == 1 and summary.annotated == 4
    assert [(f.name, f.reason) for f in failures] == [(paths[3].name, "generation failed: bad kernel")]


def _pixels(annotator, path):
    from florence_cli.decode import decode_image

    return decode_image(str(path), annotator.model.resize_spec)[2]


def test_batch_size_auto_on_cpu(florence_model):
    assert Annotator(RunConfig(batch_size="auto"), model=florence_model).batch_size == 8


@pytest.mark.parametrize("bad", ["0", "-3", "many"])
def test_bad_batch_sizes(bad, tiny_model, tmp_path):
    from click.testing import CliRunner

    from florence_cli.cli import main

    write_images(tmp_path / "imgs", 1)
    argv = ["annotate", str(tmp_path / "imgs"), "-t", "OD", "-b", bad, "-m", str(tiny_model)]
    result = CliRunner().invoke(main, [*argv, "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--batch-size" in result.output, result.output
    assert not (tmp_path / "out").exists()  # refused before the output folder is made


def test_only_located_answers_pay_for_a_scoring_pass(annotator, florence_model, monkeypatch):
    """Scores belong to boxes, polygons and regions; text answers skip the teacher-forced pass."""
    scored_lengths = []
    real = florence_model.token_logprobs

    def counting(prompt_ids, features, sequence, **kwargs):
        scored_lengths.append(len(sequence))
        return real(prompt_ids, features, sequence, **kwargs)

    monkeypatch.setattr(florence_model, "token_logprobs", counting)
    images = [random_image(seed) for seed in range(3)]
    answers = annotator.annotate(images, ["CAPTION", "OCR"])
    assert scored_lengths == [] and all(a["CAPTION"].text for a in answers)
    answers = annotator.annotate(images, ["CAPTION", "OD"])
    assert len(scored_lengths) == len(images)
    assert all(i.score is not None for a in answers for i in a["OD"].instances)


@pytest.mark.parametrize("guarded", [False, True])
def test_decode_processes_from_a_script_without_a_main_guard_are_refused_in_one_line(
    tiny_model, tmp_path, guarded
):
    """Decode processes start with "spawn", which runs the calling script again in each: a script that
    annotates at its top level would start its run once per process (and fight for the output folder)."""
    import subprocess
    import sys

    body = (
        "from florence_cli.config import ModelConfig, RunConfig\n"
        "from florence_cli.engine import LocalEngine\n"
        "from florence_cli.tasks import OptionError\n"
        f"config = RunConfig(ModelConfig({str(tiny_model)!r}, device='cpu'), workers=2)\n"
        "try:\n"
        "    LocalEngine(config).check([], None)\n"
        "    print('checked')\n"
        "except OptionError as error:\n"
        "    print(error)\n"
    )
    if guarded:
        body = "if __name__ == '__main__':\n" + "".join(f"    {line}\n" for line in body.splitlines())
    script = tmp_path / "pasted.py"
    script.write_text(body)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    if guarded:
        assert run.stdout.strip() == "checked"
    else:
        assert run.stdout.count("\n") == 1 and 'if __name__ == "__main__":' in run.stdout
        assert str(script) in run.stdout
