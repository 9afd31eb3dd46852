"""Device-independent costs of decoding: operators dispatched, weight bytes and key/value-cache bytes read
per generated token per image, counted on any device (a CPU will do) with a ``TorchDispatchMode``.

On a GPU a decoding step is bound by launching its kernels (one per operator, more or less) or by
reading memory — the model's weights and the key/value cache its attention reads — not by arithmetic:
these counts predict that regime without a GPU.
What is counted: a *steady* decoding step — the decoder, the output layer, the beam search's work,
the cache's updates and the logits processors — averaged over the steps after the first and before
the last, divided by the images in the batch. Left out: the vision tower and the language encoder
(once per image, not per token) and the first step's cross-attention keys and values (once per
answer). Lengths are pinned (``min_new_tokens == max_new_tokens``) and image features are seeded
noise, so every step does the same work whatever the values: the counts are exact, not sampled.

Weight bytes: for each operator call, the bytes of its arguments that are views of the model's
parameters or buffers (matched by storage), once per call; a lookup (embedding rows, an index) counts
the bytes it returns, and a view (transpose, slice) reads nothing. Key/value-cache bytes: for each
attention of the decoder, the bytes of the cached keys and values it attends over (its layer of the
self-attention cache, and of the cross-attention cache: the encoder's states, a copy per beam or one
per image). Operators of the ``florence_cli``
namespace (florence_cli.invariant's batch-invariant kernels, Triton on CUDA) count as one operator
each, as one kernel launch, and are computed by PyTorch's equivalents
(``florence_cli.kernel_check.torch_equivalents``), so no Triton interpreter is needed: the counts, not
the bits, matter here.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from florence_cli.kernel_check import torch_equivalents
from florence_cli.model import FlorenceModel

MODES = ("reference", "per-image", "invariant", "batched")
CUSTOM_NAMESPACE = "florence_cli"
# Operators that read only some rows of a weight: they cost the bytes they return.
LOOKUPS = {
    torch.ops.aten.embedding.default, torch.ops.aten.index_select.default, torch.ops.aten.index.Tensor,
    torch.ops.aten.gather.default,
}  # fmt: skip


class Unavailable(Exception):
    """A mode this checkout cannot run (its message says why, for the table)."""


@dataclass
class Cost:
    ops: int = 0
    compute_ops: int = 0  # operators that are not views: on a GPU, about the kernels launched
    weight_bytes: int = 0
    kv_bytes: int = 0  # the key/value cache the attention reads

    def __add__(self, other: Cost) -> Cost:
        return Cost(*(a + b for a, b in zip(self.astuple(), other.astuple(), strict=True)))

    def scaled(self, factor: float) -> Cost:
        return Cost(*(value * factor for value in self.astuple()))

    def astuple(self) -> tuple:
        return self.ops, self.compute_ops, self.weight_bytes, self.kv_bytes


class CostCounter(TorchDispatchMode):
    """Counts the operators dispatched while active, step by step of each ``call`` (a generation):
    a step starts where the language decoder is called; the vision tower and the encoder are not
    counted. ``plain`` maps a ``florence_cli::`` operator's name to its plain-torch stand-in."""

    def __init__(self, model: torch.nn.Module, plain: dict | None = None):
        super().__init__()
        self.plain = plain or {}
        self.calls: list[list[Cost]] = []
        self.weights = {_storage(t) for t in (*model.parameters(), *model.buffers())} - {None}
        self._paused = 0
        inner = model.model
        decoder = inner.language_model.decoder
        self._hooks = [decoder.register_forward_pre_hook(self._new_step)]
        for quiet in (inner.vision_tower, inner.language_model.encoder):
            self._hooks += [quiet.register_forward_pre_hook(self._pause),
                            quiet.register_forward_hook(self._resume)]  # fmt: skip
        for layer in decoder.layers:
            for attention, cross in ((layer.self_attn, False), (layer.encoder_attn, True)):
                hook = functools.partial(self._attended, cross=cross)
                self._hooks.append(attention.register_forward_hook(hook, with_kwargs=True))

    def call(self) -> None:
        """A new generation starts: its steps are kept apart from the last one's."""
        self.calls.append([])

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def steady_step(self) -> Cost:
        """The mean of the steps after the first and before the last, over every call."""
        steady = [step for steps in self.calls for step in steps[1:-1]]
        if not steady:
            raise ValueError("count at least 3 new tokens: the first and last steps are left out")
        total = Cost()
        for step in steady:
            total = total + step
        return total.scaled(1 / len(steady))

    def _new_step(self, *_) -> None:
        if self.calls and not self._paused:
            self.calls[-1].append(Cost())

    def _pause(self, *_) -> None:
        self._paused += 1

    def _resume(self, *_) -> None:
        self._paused -= 1

    def _step_cost(self) -> Cost | None:
        """The cost of the step under way, or None outside steps and while paused."""
        steps = self.calls[-1] if self.calls else None
        return steps[-1] if steps and not self._paused else None

    def _attended(self, module, args, kwargs: dict, output, cross: bool) -> None:
        """Count the keys and values an attention just attended over: its layer of the step's cache."""
        cache, cost = kwargs.get("cache"), self._step_cost()
        if cache is None or cost is None:
            return
        layers = cache.cross_attention_cache if cross else cache.self_attention_cache
        layer = layers.layers[module.layer_idx]
        cost.kv_bytes += _nbytes(layer.keys) + _nbytes(layer.values)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        run = func
        if func.namespace == CUSTOM_NAMESPACE:
            run = self.plain.get(func._schema.name)
            if run is None:
                raise Unavailable(f"no plain-torch stand-in for {func._schema.name} to count it with")
        out = run(*args, **kwargs)
        cost = self._step_cost()
        if cost is not None:
            cost.ops += 1
            cost.compute_ops += not func.is_view
            cost.weight_bytes += self._weight_bytes(func, (args, kwargs), out)
        return out

    def _weight_bytes(self, func, inputs, out) -> int:
        if func.is_view:
            return 0
        read = {id(t): t for t in tree_leaves(inputs) if _is_tensor(t) and _storage(t) in self.weights}
        if not read:
            return 0
        if func in LOOKUPS:
            return sum(_nbytes(t) for t in tree_leaves(out) if _is_tensor(t))
        return sum(_nbytes(t) for t in read.values())


def _is_tensor(value) -> bool:
    return isinstance(value, torch.Tensor)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _storage(tensor: torch.Tensor) -> int | None:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, meta)
        return None


def invariant_module():
    """``florence_cli.invariant`` if this checkout has it, else raises ``Unavailable``."""
    if importlib.util.find_spec("florence_cli.invariant") is None:
        raise Unavailable("florence_cli.invariant missing")
    return importlib.import_module("florence_cli.invariant")


def products_model(model: FlorenceModel, products: str) -> FlorenceModel:
    """The same loaded model computing its products ``per-image``, ``invariant`` or ``batched``."""
    if products == "invariant":
        interpreted = invariant_module().INTERPRETED
        # The kernels are counted, never run (stand-ins compute them), but on a CPU the model takes them
        # only under Triton's interpreter, which must be named before anything imports Triton.
        if model.device.type != "cuda" and not interpreted:
            raise Unavailable("on a CPU, only with TRITON_INTERPRET=1 set before Python starts")
    return FlorenceModel(
        model.model, model.processor, model.device, model.dtype, products=products,
        compact_beams=model.compact_beams,
    )  # fmt: skip


@contextlib.contextmanager
def counting(model: FlorenceModel):
    """A ``CostCounter`` on ``model``, with one CPU thread while it counts: florence-cli shares a
    step's products out to CPU threads, where a dispatch mode (per thread) would not see them, and on
    a GPU there are no such threads — one thread gives the CUDA path's operators."""
    threads = torch.get_num_threads()
    counter = CostCounter(model.model, torch_equivalents())
    torch.set_num_threads(1)
    try:
        with counter:
            yield counter
    finally:
        torch.set_num_threads(threads)
        counter.close()


def seeded_features(model: FlorenceModel, images: int, seed: int = 0) -> torch.Tensor:
    """Image features of the model's shape (noise: see the module's note on values)."""
    config = model.model.config
    shape = (images, model.processor.num_image_tokens, config.text_config.d_model)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return noise.to(model.device, model.dtype)


def pinned_generation(new_tokens: int, num_beams: int) -> dict:
    return {"num_beams": num_beams, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens,
            "do_sample": False}  # fmt: skip


def mode_cost(model: FlorenceModel, mode: str, batch: int, prompt: str, generation: dict) -> Cost:
    """A steady decoding step's cost per image in ``mode`` at ``batch`` images (``Unavailable``
    when this checkout cannot run the mode)."""
    if mode == "reference":
        return reference_cost(model, prompt, generation)
    variant = products_model(model, mode)
    features = seeded_features(model, batch)
    with counting(model) as counter:
        counter.call()
        variant.generate(features, [prompt] * batch, generation)
    return counter.steady_step().scaled(1 / batch)


def reference_cost(model: FlorenceModel, prompt: str, generation: dict, images: int = 2) -> Cost:
    """The model card's loop: the processor, then ``generate`` on one image at a time."""
    from PIL import Image

    side = model.processor.image_processor.size["height"]
    inputs = []
    for seed in range(images):
        noise = torch.randint(0, 256, (side, side, 3), generator=torch.Generator().manual_seed(seed))
        image = Image.fromarray(noise.numpy().astype("uint8"))
        one = model.processor(text=prompt, images=image, return_tensors="pt").to(model.device, model.dtype)
        one["input_ids"] = one["input_ids"].long()
        inputs.append(one)
    with counting(model) as counter, torch.inference_mode():
        for one in inputs:
            counter.call()
            model.model.generate(**one, **generation)
    return counter.steady_step()


def cost_table(
    model: FlorenceModel, batches: list[int], prompt: str, generation: dict, modes: tuple[str, ...] = MODES
) -> list[dict]:
    """One row per mode and batch size: ``cost`` per generated token per image, or ``missing`` (why)."""
    rows, reference = [], None
    for batch in batches:
        for mode in modes:
            row = {"mode": mode, "batch": 1 if mode == "reference" else batch}
            if mode == "reference" and reference is not None:
                row["cost"] = reference  # one image at a time whatever the batch: counted once
            else:
                try:
                    row["cost"] = mode_cost(model, mode, batch, prompt, generation)
                except Unavailable as exc:
                    row["missing"] = str(exc)
            if mode == "reference":
                reference = row.get("cost")
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> list[str]:
    """A Markdown table of ``cost_table``'s rows, with ratios to batched mode (same batch size) and to
    the reference loop, and the issue's goal for batch-invariant mode at the largest batch."""
    batched = {r["batch"]: r["cost"] for r in rows if r["mode"] == "batched" and "cost" in r}
    reference = next((r["cost"] for r in rows if r["mode"] == "reference" and "cost" in r), None)
    lines = [
        "| mode | batch | operators | of which kernels | weight MB | KV-cache MB | operators vs batched "
        "| weight vs batched | KV-cache vs batched | reference ÷ this, operators | reference ÷ this, weight "
        "| reference ÷ this, KV-cache |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    shown_reference = False
    for row in rows:
        if row["mode"] == "reference" and shown_reference:
            continue
        shown_reference |= row["mode"] == "reference"
        batch = row["batch"] if row["mode"] != "reference" else "1 (any)"
        if "cost" not in row:
            lines.append(f"| {row['mode']} | {batch} | n/a ({row['missing']}) |" + " |" * 9)
            continue
        cost = row["cost"]
        versus = batched.get(row["batch"]) if row["mode"] != "reference" else None
        cells = [f"{cost.ops:,.1f}", f"{cost.compute_ops:,.1f}", f"{cost.weight_bytes / 1e6:,.2f}"]
        cells.append(f"{cost.kv_bytes / 1e6:,.2f}")
        cells += [_ratio(cost, versus), _ratio(reference, cost)]
        lines.append(f"| {row['mode']} | {batch} | " + " | ".join(cells) + " |")
    lines.append(goal_line(rows))
    return lines


def goal_line(rows: list[dict]) -> str:
    """Issue 17's goal without a GPU: batch-invariant mode at the largest batch within 2x of batched
    in operators and weight bytes per image-token, and 20x or more below the reference loop."""
    largest = max(r["batch"] for r in rows)
    found = {r["mode"]: r for r in rows if r["batch"] in (largest, 1) and r["mode"] != "per-image"}
    if any("cost" not in found.get(mode, {}) for mode in ("reference", "invariant", "batched")):
        return f"goal at batch {largest}: n/a (a mode is missing)"
    invariant, batched, reference = (found[m]["cost"] for m in ("invariant", "batched", "reference"))
    close = invariant.ops <= 2 * batched.ops and invariant.weight_bytes <= 2 * batched.weight_bytes
    below = reference.ops >= 20 * invariant.ops and reference.weight_bytes >= 20 * invariant.weight_bytes
    verdict = "met" if close and below else "not met"
    return (
        f"goal at batch {largest} (invariant within 2x of batched, >= 20x below the reference): "
        f"{verdict} (within 2x: {close}; 20x below: {below})"
    )


def _ratio(numerator: Cost | None, denominator: Cost | None) -> str:
    """Three cells: the ratios of operators, of weight bytes and of key/value-cache bytes ("" where there
    is nothing to compare)."""
    if numerator is None or denominator is None:
        return " |  | "
    pairs = [
        (numerator.ops, denominator.ops),
        (numerator.weight_bytes, denominator.weight_bytes),
        (numerator.kv_bytes, denominator.kv_bytes),
    ]
    return " | ".join(f"{a / b:.2f}" if b else "" for a, b in pairs)
