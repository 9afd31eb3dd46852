"""The batch-invariant kernels compile for NVIDIA GPUs (sm_80 and sm_90) at every call site the model
makes — no compile error, no register spill, shared memory within the target's limit — proven without a
GPU by Triton's ahead-of-time compiler (benchmarks/kernel_compile.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from benchmarks.kernel_compile import ARCHITECTURES, failures

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    """Every distinct kernel, compiled once per target in a process of its own: this session runs Triton's
    interpreter (conftest.py), under which the kernels are not compilable functions. Triton's cache keeps
    the binaries, so a rerun of unchanged kernels is quick."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernel_compile", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert results, run.stderr[-3000:]
    return results


@pytest.mark.slow
def test_every_kernel_compiles_for_sm_80_and_sm_90_without_spills(compiled):
    failed = {f"sm_{r['arch']} {r['sites'][0]}": failures(r) for r in compiled if failures(r)}
    assert not failed
    assert all(r["registers"] > 0 for r in compiled)  # cuobjdump's usage was read


def test_the_compiled_kernels_cover_the_model_call_sites(compiled):
    """Both targets; both kernels in fp16, bf16 and fp32; attention without a mask and with boolean and
    additive ones, causal, a decoding step's one query (16-query blocks), beams reading one image's
    encoder states (a group that is not the constant 1), and head dims 64, 32 and 16."""
    assert {r["arch"] for r in compiled} == set(ARCHITECTURES)
    for kernel, pointer in (("_linear_kernel", "x"), ("_attention_kernel", "q")):
        types = {r["signature"][pointer] for r in compiled if r["kernel"] == kernel}
        assert types == {"*fp16", "*bf16", "*fp32"}, kernel
    attention = [r for r in compiled if r["kernel"] == "_attention_kernel"]
    constants = [r["constants"] for r in attention]
    assert {c["MASK"] for c in constants} == {0, 1, 2}
    assert any(c["CAUSAL"] for c in constants)
    assert {c["BLOCK_M"] for c in constants} == {16, 32, 64}
    assert {c["BLOCK_D"] for c in constants} == {16, 32, 64}
    grouped = [r for r in attention if r["signature"]["group"] != "constexpr"]
    assert grouped and all(r["constants"]["BLOCK_M"] == 16 for r in grouped)
    sites = {site for r in compiled for site in r["sites"]}
    assert any("large fp16 linear, output layer" in site for site in sites)


def test_a_spill_or_too_much_shared_memory_fails_the_check():
    fine = {"arch": 80, "spilled": 0, "shared": ARCHITECTURES[80], "registers": 200}
    assert failures(fine) == []
    assert failures({**fine, "spilled": 16}) == ["spills 16 bytes per thread"]
    assert "over sm_80's limit" in failures({**fine, "shared": ARCHITECTURES[80] + 1})[0]
    assert failures({**fine, "error": "CompilationError: ..."}) == ["CompilationError: ..."]
