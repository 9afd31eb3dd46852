"""The batch-invariant kernels (florence_cli/invariant.py) compiled for NVIDIA GPUs without one: every
kernel at the call sites Florence-2 makes, for sm_80 and sm_90, with Triton's ahead-of-time compiler.
A compile error, a register spill or more shared memory than the target gives a block is a failure.

    python benchmarks/kernel_compile.py           # a table; exit status 1 on any failure
    python benchmarks/kernel_compile.py --json    # one JSON object per compiled kernel

About 300 compiles, a second or so each (spread over ``--jobs`` processes); Triton's cache keeps them,
so a rerun of unchanged kernels takes seconds.

Run it with ``TRITON_INTERPRET`` unset: under the interpreter the kernels are not compilable functions.
A site's arguments come from invariant.py's own launch helpers (``linear_launch``, ``attention_launch``),
given meta tensors of the site's shapes and layouts, and are specialised as Triton's launcher does (an
integer 1 becomes a constant, a multiple of 16 is marked divisible by 16, pointers 16-byte aligned as
PyTorch allocates them); sites that specialise alike compile once.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import torch

ARCHITECTURES = {80: 163 * 1024, 90: 227 * 1024}  # compute capability: shared memory a block may use
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
POINTER_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.bool: "i1"}
VOCABULARY = 51_289  # Florence-2's tokenizer
BEAMS = 3
IMAGES = 2  # rows are never a specialisation: any count compiles the same kernel
PROMPTS = (590, 592)  # image tokens and a prompt: not a multiple of 16, and one (masks' strides differ)
ANSWER = 40  # tokens generated so far (a decoding step's self-attention cache; the scoring pass)
SHORT_ANSWER = 20  # a caption's: the scoring pass in a 32-query block


@dataclass(frozen=True)
class Dims:
    """A model's language dimensions: Florence-2 base and large, and the tests' small models."""

    name: str
    d_model: int
    heads: int
    ffn: int

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


# Florence-2's dims in every dtype; the tests' models (head dims 32 and 16) in fp16.
DIMS = {
    Dims("large", 1024, 16, 4096): DTYPES,
    Dims("base", 768, 12, 3072): DTYPES,
    Dims("tests, one head", 32, 1, 64): (torch.float16,),
    Dims("tests, tiny", 32, 2, 64): (torch.float16,),
}


@dataclass
class Site:
    """A kernel launch the model makes: its name and what invariant.py's launch helper returns."""

    name: str
    kernel: Callable
    args: tuple
    options: dict


@dataclass
class Specialisation:
    """What Triton compiles for a launch: one per distinct signature, constants and options."""

    kernel: Callable
    signature: dict[str, str]
    constants: dict[str, object]
    attrs: dict[tuple[int, ...], list]
    options: dict
    sites: list[str] = field(default_factory=list)

    def key(self) -> str:
        parts = (self.signature, self.constants, sorted(self.attrs), self.options)
        return self.kernel.__name__ + repr(parts)


def specialise(site: Site) -> Specialisation:
    """The signature, constants and divisibility attributes Triton's launcher gives ``site``'s arguments."""
    params = site.kernel.params
    values = list(site.args) + [site.options[p.name] for p in params[len(site.args) :]]
    signature, constants, attrs = {}, {}, {}
    for index, (param, value) in enumerate(zip(params, values, strict=True)):
        if param.is_constexpr or (_specialised(param, value) and value == 1):
            signature[param.name], constants[param.name] = "constexpr", value
            continue
        if isinstance(value, torch.Tensor):
            signature[param.name] = "*" + POINTER_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if _specialised(param, value) and value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    options = {name: site.options[name] for name in ("num_warps", "num_stages")}
    return Specialisation(site.kernel, signature, constants, attrs, options, [site.name])


def _specialised(param, value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and not param.do_not_specialize


def sites() -> Iterator[Site]:
    """Every launch of the kernels that Florence-2's language model makes, per dims and dtype."""
    for dims, dtypes in DIMS.items():
        for dtype in dtypes:
            yield from _linear_sites(dims, dtype)
            yield from _attention_sites(dims, dtype)


def _linear_sites(dims: Dims, dtype: torch.dtype) -> Iterator[Site]:
    from florence_cli import invariant

    d, ffn = dims.d_model, dims.ffn
    layers = {"projection": (d, d, True), "fc1": (d, ffn, True), "fc2": (ffn, d, True)}
    layers["output layer"] = (d, VOCABULARY, False)
    for name, (depth, cols, has_bias) in layers.items():
        flat = _meta((IMAGES * BEAMS, depth), dtype)
        weight = _meta((cols, depth), dtype)
        bias = _meta((cols,), dtype) if has_bias else None
        _, args, options = invariant.linear_launch(flat, weight, bias, _meta((len(flat), cols), dtype))
        label = f"{dims.name} {POINTER_TYPES[dtype]} linear, {name}"
        yield Site(label, invariant._linear_kernel, args, options)


def _attention_sites(dims: Dims, dtype: torch.dtype) -> Iterator[Site]:
    """Encoder prompts (unpadded, or padded with a boolean or additive mask), the decoder's first and
    steady steps (one query per beam; its cross-attention reading one image's states and mask for all
    its beams, in the plain cache's layout and the CUDA graphs' static one, or, in transformers' own
    beam search, a copy per beam), and the scoring pass (causal)."""
    steps = IMAGES * BEAMS
    for prompt in PROMPTS:
        for mask in ("none", "boolean", "additive"):
            states = _projected(dims, IMAGES, prompt, dtype)
            padding = _padding(IMAGES, prompt, prompt, mask, dtype)
            yield _attention(dims, f"encoder, {prompt} tokens, {mask} mask", states, states, padding, False)
            query = _projected(dims, steps, 1, dtype)
            shared = _padding(IMAGES, 1, prompt, mask, dtype)
            cross = {
                "cache": (states, shared),
                "static": (_cached(dims, IMAGES, prompt, dtype), shared),
                "a copy per beam": (
                    _projected(dims, steps, prompt, dtype),
                    _padding(steps, 1, prompt, mask, dtype),
                ),
            }
            for layout, (keys, padding) in cross.items():
                yield _attention(dims, f"cross step ({layout}), {mask} mask", query, keys, padding, False)
    query = _projected(dims, steps, 1, dtype)
    yield _attention(dims, "self, first step", query, query, None, False)
    cache = _cached(dims, steps, ANSWER, dtype)
    yield _attention(dims, "self step", query, cache, None, False)
    static_mask = _meta((1, 1, 1, 64), dtype)  # graphs.py's: the attended length, additive
    yield _attention(dims, "self step (static)", query, _cached(dims, steps, 64, dtype), static_mask, False)
    for length in (ANSWER, SHORT_ANSWER):
        answer = _projected(dims, 1, length, dtype)
        yield _attention(dims, f"scoring {length} tokens, self (causal)", answer, answer, None, True)
        states = _projected(dims, 1, PROMPTS[0], dtype)
        yield _attention(dims, f"scoring {length} tokens, cross", answer, states, None, False)


def _attention(dims: Dims, name: str, query, keys, mask, causal: bool) -> Site:
    from florence_cli import invariant

    rows, heads, q_len, head_dim = query.shape
    out = _meta((rows, q_len, heads, head_dim), query.dtype)
    _, args, options = invariant.attention_launch(query, keys, keys, mask, 0.125, causal, out)
    label = f"{dims.name} {POINTER_TYPES[query.dtype]} attention, {name}"
    return Site(label, invariant._attention_kernel, args, options)


def _projected(dims: Dims, rows: int, length: int, dtype: torch.dtype) -> torch.Tensor:
    """A projection's output split into heads, as BART lays it out: (rows, heads, length, head dim)."""
    flat = _meta((rows, length, dims.d_model), dtype)
    return flat.view(rows, length, dims.heads, dims.head_dim).transpose(1, 2)


def _cached(dims: Dims, rows: int, length: int, dtype: torch.dtype) -> torch.Tensor:
    """Keys or values as a grown or copied cache holds them: contiguous (rows, heads, length, head dim)."""
    return _meta((rows, dims.heads, length, dims.head_dim), dtype)


def _padding(rows: int, q_len: int, length: int, kind: str, dtype: torch.dtype) -> torch.Tensor | None:
    """The model's padding mask over ``length`` keys, as transformers builds it for SDPA (boolean) or
    eager attention (additive): one row of keys per row, broadcast over the queries."""
    if kind == "none":
        return None
    mask = _meta((rows, 1, 1, length), torch.bool if kind == "boolean" else dtype)
    return mask.expand(rows, 1, q_len, length)


def _meta(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def distinct(found: list[Site]) -> list[Specialisation]:
    """The specialisations of ``found``, each once, with the names of the sites that share it."""
    by_key: dict[str, Specialisation] = {}
    for site in found:
        spec = specialise(site)
        kept = by_key.setdefault(spec.key(), spec)
        if kept is not spec:
            kept.sites.append(site.name)
    return list(by_key.values())


def compile_for(spec: Specialisation, capability: int) -> dict:
    """Compile ``spec`` for ``capability``: its registers, spilled bytes and shared memory per block, or
    the compiler's error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    found = {"kernel": spec.kernel.__name__, "arch": capability, "sites": spec.sites}
    found |= {"signature": spec.signature, "constants": spec.constants}
    source = ASTSource(spec.kernel, spec.signature, spec.constants, spec.attrs)
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=spec.options)
    except Exception as exc:  # the compiler's errors are many; the message is what the test shows
        return {**found, "error": f"{type(exc).__name__}: {exc}"}
    usage = _resource_usage(compiled.asm["cubin"])
    # Spilled registers live in the thread's stack frame (local memory): ptxas' "bytes stack frame".
    spilled = usage["STACK"] + usage["LOCAL"]
    return {**found, "registers": usage["REG"], "spilled": spilled, "shared": compiled.metadata.shared}


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """cuobjdump's resource usage of the one function in ``cubin`` (REG, STACK, SHARED, LOCAL, ...)."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        listing = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "-res-usage", file.name], capture_output=True, text=True, check=True
        ).stdout
    line = next(line for line in listing.splitlines() if "REG:" in line)
    return {name: int(value) for name, value in (item.split(":")[:2] for item in line.split())}


def failures(result: dict) -> list[str]:
    """What is wrong with a compiled kernel: its error, spills, or shared memory over the target's limit."""
    if "error" in result:
        return [result["error"]]
    found = []
    if result["spilled"]:
        found.append(f"spills {result['spilled']} bytes per thread")
    if result["shared"] > ARCHITECTURES[result["arch"]]:
        found.append(f"{result['shared']} bytes of shared memory, over sm_{result['arch']}'s limit")
    return found


def _compile_one(job: tuple[int, int]) -> dict:
    """Compile distinct specialisation ``job[0]`` for capability ``job[1]`` (in a worker process, which
    lists the sites itself: the kernels do not pickle)."""
    index, capability = job
    return compile_for(_specialisations()[index], capability)


@functools.cache
def _specialisations() -> list[Specialisation]:
    return distinct(list(sites()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per compiled kernel")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="compiler processes (default: CPUs)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET"):
        parser.error("unset TRITON_INTERPRET: the interpreter's kernels do not compile")
    jobs = [(index, capability) for index in range(len(_specialisations())) for capability in ARCHITECTURES]
    failed = 0
    with ProcessPoolExecutor(args.jobs) as pool:
        for result in pool.map(_compile_one, jobs):
            failed += bool(failures(result))
            if args.json:
                print(json.dumps(result), flush=True)
            else:
                verdict = "; ".join(failures(result)) or (
                    f"{result['registers']} registers, {result['shared'] / 1024:.0f} KB shared"
                )
                alike = len(result["sites"]) - 1
                print(f"sm_{result['arch']} {result['sites'][0]} (+{alike} alike): {verdict}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
