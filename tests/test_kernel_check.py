"""The batch-invariant kernels' check before the first image (kernel_check.py), for real on CPU under
Triton's interpreter, and with kernels made to fail: auto products fall back to batched ones in one
line, an explicit ``--products invariant`` is refused in one line (exit status 2) before any image."""

from __future__ import annotations

import ast
import json

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("triton")

from triton.compiler.errors import CompilationError

from florence_cli import config, engine, invariant, model
from florence_cli.checkpoint import ModelLoadError
from florence_cli.cli import main
from florence_cli.kernel_check import KernelsUnusable, check_invariant_kernels
from florence_cli.model import FlorenceModel

from .conftest import write_images

if not invariant.INTERPRETED:
    pytest.skip("TRITON_INTERPRET was not set before triton was imported", allow_module_level=True)


class _Launcher:
    """Stands in for the linear kernel's launch (``kernel[grid](...)``): runs it, then ``spoil``s the
    output, or raises ``error`` instead."""

    def __init__(self, kernel, spoil=None, error=None):
        self.kernel, self.spoil, self.error = kernel, spoil, error

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.error is not None:
                raise self.error
            self.kernel[grid](*args, **kwargs)
            self.spoil(args[3])  # out

        return launch


def _compile_error() -> CompilationError:
    source = "def kernel(x):\n    y = tl.dot(x, x)\n"
    node = ast.parse(source).body[0].body[0]
    return CompilationError(source, node, "AssertionError('Both inputs must be either 2D or 3D')")


BROKEN = {
    "compile error": (
        {"error": _compile_error()},
        "CompilationError: AssertionError('Both inputs must be either 2D or 3D')",
    ),
    "wrong numbers": ({"spoil": lambda out: out.add_(1.0)}, "florence_cli::bi_linear differs from PyTorch"),
    "not finite": ({"spoil": lambda out: out.fill_(float("nan"))}, "gave values that are not finite"),
}


@pytest.fixture
def broken_kernel(request, monkeypatch):
    """The linear kernel broken as ``request.param`` says; yields what the one line must name."""
    change, named = BROKEN[request.param]
    monkeypatch.setattr(invariant, "_linear_kernel", _Launcher(invariant._linear_kernel, **change))
    return named


@pytest.fixture
def as_on_cuda(monkeypatch):
    """Auto products resolved as on CUDA (invariant), on this CPU."""
    on_cuda = lambda products, _: config.resolve_products(products, "cuda")  # noqa: E731
    monkeypatch.setattr(model, "resolve_products", on_cuda)


@pytest.fixture
def fresh_model(tiny_model):
    """A model loaded anew: the check runs once per model."""
    return FlorenceModel.load(str(tiny_model), device="cpu", products="per-image")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_kernels_pass_their_check_and_it_runs_once_per_model(fresh_model, dtype, monkeypatch):
    hf = fresh_model.model.to(dtype)
    calls = []
    real = invariant._linear_kernel
    monkeypatch.setattr(invariant, "_linear_kernel", _Launcher(real, spoil=lambda out: calls.append(1)))
    assert check_invariant_kernels(hf, invariant) == set()  # every kernel call compared
    assert calls  # the kernels ran
    checked = len(calls)
    check_invariant_kernels(hf, invariant)
    assert len(calls) == checked


@pytest.mark.parametrize("broken_kernel", list(BROKEN), indirect=True)
def test_a_broken_kernel_is_named_in_one_line(fresh_model, broken_kernel):
    with pytest.raises(KernelsUnusable) as raised:
        check_invariant_kernels(fresh_model.model, invariant)
    assert broken_kernel in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("broken_kernel", ["compile error"], indirect=True)
def test_auto_falls_back_to_batched_products_and_says_why(fresh_model, broken_kernel, as_on_cuda):
    hf, processor = fresh_model.model, fresh_model.processor
    auto = FlorenceModel(hf, processor, fresh_model.device, fresh_model.dtype, products="auto")
    assert auto.products == "batched"
    assert broken_kernel in auto.fallback and "batched" in auto.fallback
    with pytest.raises(ModelLoadError, match="--products invariant cannot run here: ") as raised:
        FlorenceModel(hf, processor, fresh_model.device, fresh_model.dtype, products="invariant")
    assert broken_kernel in str(raised.value)


def test_auto_keeps_the_invariant_kernels_when_they_pass(fresh_model, as_on_cuda):
    auto = FlorenceModel(
        fresh_model.model, fresh_model.processor, fresh_model.device, fresh_model.dtype, products="auto"
    )
    assert auto.products == "invariant" and auto.fallback is None


def _annotate(tiny_model, images, out, *extra):
    argv = ["annotate", str(images), "-t", "OD", "-m", str(tiny_model), "--device", "cpu", "-o", str(out),
            "--max-new-tokens", "4", "--num-beams", "1", "--workers", "0", *extra]  # fmt: skip
    return CliRunner().invoke(main, argv, catch_exceptions=False)


@pytest.mark.parametrize("broken_kernel", ["wrong numbers"], indirect=True)
def test_cli_refuses_explicit_invariant_products_before_any_image(
    tiny_model, tmp_path, broken_kernel, monkeypatch
):
    images = tmp_path / "imgs"
    write_images(images, 2)
    read = []
    monkeypatch.setattr(engine, "decode_stream", lambda items, *args, **kwargs: read.append(items) or [])
    result = _annotate(tiny_model, images, tmp_path / "out", "--products", "invariant")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--products invariant cannot run here" in lines[0]
    assert broken_kernel in lines[0]
    journal = tmp_path / "out" / ".florence" / "journal.jsonl"
    assert not read and (not journal.exists() or journal.read_text() == "")


@pytest.mark.parametrize("broken_kernel", ["compile error"], indirect=True)
def test_cli_auto_runs_batched_with_one_line_and_the_folder_records_it(
    tiny_model, tmp_path, broken_kernel, as_on_cuda
):
    images, out = tmp_path / "imgs", tmp_path / "out"
    write_images(images, 2)
    result = _annotate(tiny_model, images, out)
    assert result.exit_code == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and broken_kernel in notes[0] and "batched" in notes[0]
    assert "2 annotated" in result.stderr and "batched products" in result.stderr
    settings = json.loads((out / ".florence" / "settings.json").read_text())
    assert settings["exact"] is False  # batch-dependent answers: kept apart from the others
