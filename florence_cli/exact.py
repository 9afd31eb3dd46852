"""Run the batch-sensitive operations in the shapes the reference gives them, so batching cannot
move a bit of any answer.

Some kernels' rounding depends on the shape they are given, not only on their operands. On a CPU
with MKL, the rows of a 3-row matrix product (one image's three beams, as the one-image reference
decodes them) are summed by another kernel than the same rows inside a 12-row product; PyTorch's
CPU attention splits its work differently with the number of (batch, head) pairs. Either way the
logits differ in the last bits — enough to flip a beam search at a near tie (seen at Florence-2-base
dimensions: one answer in twelve). So, by default, the linear layers and the attention of the
language model run on one image's rows at a time — the encoder on one prompt, the decoder on one
image's beams — exactly as the reference runs them. The rest stays batched (norms, activations,
embeddings and the search itself are row by row, hence exact), and so does the work around the
kernels: one Python step, one cache update and one set of logits processors per batch. On CPU the
images' larger products run side by side, one per core: MKL keeps a few-row product on one core.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import sys
import types
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn
from torch.nn import functional
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

PER_IMAGE_ATTENTION = "florence_cli_per_image"
# Below this many weights a product takes microseconds and handing it to a thread costs more.
SIDE_BY_SIDE_MIN_WEIGHTS = 1 << 19
# A decoding step's products have one row per beam; a prompt's (hundreds of rows) use every core already.
SIDE_BY_SIDE_MAX_ROWS = 16


def _linear_per_image(self: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    rows = self.florence_rows
    if hidden.shape[0] <= rows:
        return functional.linear(hidden, self.weight, self.bias)
    parts = hidden.split(rows)
    small = self.weight.numel() < SIDE_BY_SIDE_MIN_WEIGHTS
    many_rows = parts[0].numel() // hidden.shape[-1] > SIDE_BY_SIDE_MAX_ROWS  # MKL threads those itself
    if hidden.device.type != "cpu" or torch.get_num_threads() < 2 or small or many_rows:
        return torch.cat([functional.linear(part, self.weight, self.bias) for part in parts])
    # MKL runs a few-row product on one core whatever its thread count (a 3-row product over the
    # 51k-word vocabulary took as long with 2 threads as with 1), so the images' products run side by
    # side, one per core. Each is still the same call on the same rows, so its bits do not change.
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def product(part: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):  # both are per thread
            return functional.linear(part, self.weight, self.bias)

    return torch.cat(list(_cpu_pool().map(product, parts)))


@functools.cache
def _cpu_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(torch.get_num_threads(), thread_name_prefix="florence-products")


def _attention_per_image(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """The model's own attention function, called on one image's rows at a time."""
    name = module.florence_attention
    own_eager = sys.modules[type(module).__module__].eager_attention_forward
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(name, own_eager) if name != "eager" else own_eager
    rows = module.florence_rows
    if query.shape[0] <= rows:
        return attention(module, query, key, value, attention_mask, **kwargs)
    parts = [query.split(rows), key.split(rows), value.split(rows)]
    masks = (
        attention_mask.split(rows)
        if attention_mask is not None and attention_mask.shape[0] == query.shape[0]
        else [attention_mask] * len(parts[0])
    )
    outputs = [attention(module, q, k, v, m, **kwargs) for q, k, v, m in zip(*parts, masks, strict=True)]
    weights = None if outputs[0][1] is None else torch.cat([w for _, w in outputs])
    return torch.cat([o for o, _ in outputs]), weights


AttentionInterface.register(PER_IMAGE_ATTENTION, _attention_per_image)


def _is_attention(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("q_proj", "k_proj", "v_proj", "config"))


@contextlib.contextmanager
def reference_shapes(rows: int, *modules: nn.Module) -> Iterator[None]:
    """While the block runs, the linear layers and attention in ``modules`` work on ``rows`` rows of
    the batch at a time (one image's: its prompt, or its beams)."""
    linears = [m for module in modules for m in module.modules() if isinstance(m, nn.Linear)]
    attentions = [m for module in modules for m in module.modules() if _is_attention(m)]
    configs = {}
    for linear in linears:
        linear.florence_rows = rows
        linear.forward = types.MethodType(_linear_per_image, linear)
    for attention in attentions:
        attention.florence_rows = rows
        attention.florence_attention = attention.config._attn_implementation
        configs[attention] = attention.config
        attention.config = copy.copy(attention.config)  # its own, so the shared config stays as it is
        attention.config._attn_implementation = PER_IMAGE_ATTENTION
    try:
        yield
    finally:
        for linear in linears:
            del linear.forward, linear.florence_rows  # back to the class's own forward
        for attention, config in configs.items():
            attention.config = config
            del attention.florence_rows, attention.florence_attention
