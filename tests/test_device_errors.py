"""A device that fails stops the run at once (exit status 4, one line, the journal intact, the same command
resumes); an error one image can cause still fails that image alone, and out-of-memory still halves."""

from __future__ import annotations

import ast
import json

import pytest
import torch
from click.testing import CliRunner

from florence_cli.cli import main
from florence_cli.device_errors import device_failure
from florence_cli.model import FlorenceModel
from florence_cli.runner import EXIT_DEVICE_FAILED

from .conftest import write_images
from .helpers import line_count

triton_errors = pytest.importorskip("triton.runtime.errors")
compiler_errors = pytest.importorskip("triton.compiler.errors")

KERNEL_SOURCE = "def kernel(x):\n    y = x + BLOCK\n"


def _compilation_error():
    node = ast.parse(KERNEL_SOURCE).body[0].body[0]
    return compiler_errors.CompilationError(KERNEL_SOURCE, node, "NameError('BLOCK is not defined')")


def _cuda_message(text: str) -> str:
    # As torch words its CUDA errors: the error, then advice on further lines.
    return (
        f"CUDA error: {text}\nCUDA kernel errors might be asynchronously reported at some other API call, "
        "so the stacktrace below might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1"
    )


# (the error, what the one line must name)
DEVICE_ERRORS = {
    "compile error": (_compilation_error, "CompilationError: NameError('BLOCK is not defined')"),
    "out of resources": (
        lambda: triton_errors.OutOfResources(232448, 101376, "shared memory"),
        "OutOfResources: out of resource: shared memory",
    ),
    "illegal memory access": (
        lambda: torch.AcceleratorError(_cuda_message("an illegal memory access was encountered")),
        "AcceleratorError: CUDA error: an illegal memory access was encountered",
    ),
    "launch failure": (
        lambda: RuntimeError(_cuda_message("unspecified launch failure")),
        "RuntimeError: CUDA error: unspecified launch failure",
    ),
    "device-side assert": (
        lambda: RuntimeError(_cuda_message("device-side assert triggered")),
        "RuntimeError: CUDA error: device-side assert triggered",
    ),
    "lost device": (
        lambda: torch.AcceleratorError(_cuda_message("CUDA-capable device(s) is/are busy or unavailable")),
        "CUDA-capable device(s) is/are busy or unavailable",
    ),
    "triton launch": (
        lambda: RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered"),
        "RuntimeError: Triton Error [CUDA]: an illegal memory access was encountered",
    ),
}


def _annotate(model, images, out, *extra):
    argv = ["annotate", str(images), "-t", "OD", "-m", str(model), "--device", "cpu", "-o", str(out),
            "--max-new-tokens", "6", "-b", "2", "--workers", "0", *extra]  # fmt: skip
    return CliRunner().invoke(main, argv, catch_exceptions=False)


def _failing_generate(monkeypatch, error, from_call: int) -> list[int]:
    """``FlorenceModel.generate`` raising ``error()`` from its ``from_call``-th call on; returns the list of
    batch sizes it was called with."""
    calls: list[int] = []
    real = FlorenceModel.generate

    def generate(self, features, *args, **kwargs):
        calls.append(len(features))
        if len(calls) >= from_call:
            raise error()
        return real(self, features, *args, **kwargs)

    monkeypatch.setattr(FlorenceModel, "generate", generate)
    return calls


@pytest.mark.parametrize("kind", list(DEVICE_ERRORS))
def test_a_device_error_stops_the_run_in_one_line_and_the_same_command_resumes(
    kind, tiny_model, tmp_path, monkeypatch
):
    error, named = DEVICE_ERRORS[kind]
    images, out = tmp_path / "imgs", tmp_path / "out"
    write_images(images, 6)
    calls = _failing_generate(monkeypatch, error, from_call=2)
    result = _annotate(tiny_model, images, out, "-q")
    assert result.exit_code == EXIT_DEVICE_FAILED == 4
    assert calls == [2, 2]  # the failing batch is not split: no image is to blame
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: the device failed: ") and named in lines[0]
    assert "; 2 of " in lines[0] and "run the same command to resume" in lines[0]
    journal = out / ".florence" / "journal.jsonl"
    assert line_count(journal) == 2  # the batch before the error, whole
    coco = json.loads((out / "od.json").read_text())
    assert [image["file_name"] for image in coco["images"]] == ["img00.png", "img01.png"]  # as journaled
    monkeypatch.undo()
    again = _annotate(tiny_model, images, out)
    assert again.exit_code == 0, again.stderr
    assert "4 annotated, 2 already done, 0 failed" in again.stderr
    assert line_count(journal) == 6


def test_an_ordinary_error_still_fails_only_its_image(tiny_model, tmp_path, monkeypatch):
    """Not the device's: the batch is split until the guilty image fails alone (here every call fails,
    so each image is tried alone and fails), and the run goes on to the end."""
    images, out = tmp_path / "imgs", tmp_path / "out"
    write_images(images, 3)
    calls = _failing_generate(monkeypatch, lambda: ValueError("bad prompt"), from_call=1)
    result = _annotate(tiny_model, images, out, "-q")
    assert result.exit_code == 1
    assert calls == [2, 1, 1, 1]
    assert result.stderr.count("generation failed: bad prompt") == 3


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        torch.AcceleratorError(_cuda_message("out of memory")),
        ValueError("bad prompt"),
        KeyError("CUDA"),
    ],
)
def test_out_of_memory_and_ordinary_errors_are_not_device_failures(error):
    assert device_failure(error) is None


def test_a_device_error_behind_another_is_found():
    try:
        try:
            raise RuntimeError(_cuda_message("an illegal memory access was encountered"))
        except RuntimeError as inner:
            raise ValueError("while answering") from inner
    except ValueError as outer:
        assert device_failure(outer) == "RuntimeError: CUDA error: an illegal memory access was encountered"


def test_a_ray_replicas_device_error_stops_the_driver(tmp_path, monkeypatch):
    """A replica answers its images with the device's error; the driver raises it as a local run does."""
    pytest.importorskip("ray")
    import numpy as np

    from florence_cli.answer import DeviceFailure
    from florence_cli.config import RunConfig
    from florence_cli.decode import DecodedImage, ResizeSpec
    from florence_cli.jobs import WorkItem
    from florence_cli.ray_engine import Placement, RayEngine
    from florence_cli.ray_engine import engine as ray_engine
    from florence_cli.ray_engine.stages import AnsweredImage, ModelStage, pack_answered

    class Failing:
        def answer_safely(self, images):
            raise DeviceFailure("AcceleratorError: CUDA error: an illegal memory access was encountered")

    stage = ModelStage.__new__(ModelStage)  # its model is not needed here
    stage.answerer = Failing()
    work = [WorkItem(str(tmp_path / f"{name}.png"), f"{name}.png", (name,), ()) for name in "ab"]
    images = [DecodedImage(item, 8, 8, np.zeros((8, 8, 3), np.uint8)) for item in work]
    failures = stage._answer(images)
    answered = pack_answered([AnsweredImage(k, 8, 8, error=f.reason) for k, f in enumerate(failures)])

    class Answered:
        def iter_batches(self, **_):
            yield answered

    engine = RayEngine(RunConfig(batch_size=2))
    engine.placement, engine.resize = Placement(1, 0, 1.0, 1, "cpu"), ResizeSpec(size=None)
    monkeypatch.setattr(engine, "_dataset", lambda rows, placement, replicas: Answered())
    monkeypatch.setattr(ray_engine, "reserve", lambda placement, replicas: None)
    monkeypatch.setattr(ray_engine.ray.util, "remove_placement_group", lambda group: None)
    with pytest.raises(DeviceFailure, match=r"^AcceleratorError: CUDA error: an illegal memory access"):
        list(engine.results(work))
