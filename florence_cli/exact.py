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
kernels: one Python step, one cache update and one set of logits processors per batch. On CPU a
decoding step's larger products run side by side, one per core (MKL keeps a few-row product on one
core), and the output layer's, too big for the cache, go block of columns by block, each block meeting
every image's rows while it is in cache.
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
# Weights too many for the processor's cache (32 MB of fp32: the 51k-word output layer, not the
# decoder's layers) are read from memory in blocks of output columns, each block once for all images.
COLUMN_BLOCKS_MIN_WEIGHTS = 1 << 23
BLOCK_WEIGHTS = 1 << 19
# Blocks start on a multiple of this many columns: kernels treat a matrix's columns in panels (on this
# machine's MKL, blocks not a multiple of 8 gave other bits); 192 is a multiple of the usual widths.
BLOCK_ALIGNMENT = 192


def _linear_per_image(self: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    weight, bias = self.weight, self.bias
    parts = hidden.split(self.florence_rows)
    # MKL runs a few-row product (a decoding step's) on one core whatever its thread count (a 3-row
    # product over the 51k-word vocabulary took as long with 2 threads as with 1), so the cores share
    # the images' products out. Each output is still one image's rows times the weights.
    in_threads = (
        hidden.device.type == "cpu"
        and torch.get_num_threads() > 1
        and parts[0].numel() // hidden.shape[-1] <= SIDE_BY_SIDE_MAX_ROWS  # MKL threads many rows itself
    )
    if (
        in_threads
        and weight.numel() >= COLUMN_BLOCKS_MIN_WEIGHTS
        and _blocks_give_same_bits(tuple(parts[0].shape), weight, bias)
    ):
        return _linear_in_column_blocks(parts, weight, bias)
    if len(parts) == 1:
        return functional.linear(hidden, weight, bias)
    if in_threads and weight.numel() >= SIDE_BY_SIDE_MIN_WEIGHTS:
        return torch.cat(_side_by_side(functools.partial(functional.linear, weight=weight, bias=bias), parts))
    return torch.cat([functional.linear(part, weight, bias) for part in parts])


def _linear_in_column_blocks(
    parts: tuple[torch.Tensor, ...], weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Each image's product, computed block of output columns by block, the blocks shared out to the
    cores: a block of weights is read from memory once, while it is in cache, for every image (a
    few-row product is bound by reading its weights). A column's sum does not depend on the columns
    computed beside it on this machine's kernel — checked once per shape: ``_blocks_give_same_bits``."""
    block = max(1, BLOCK_WEIGHTS // weight.shape[1] // BLOCK_ALIGNMENT) * BLOCK_ALIGNMENT

    def products(starts: range) -> list[list[torch.Tensor]]:
        """Per block starting at one of ``starts``: each image's product with it."""
        found = []
        for start in starts:
            block_weight = weight[start : start + block]
            block_bias = None if bias is None else bias[start : start + block]
            found.append([functional.linear(part, block_weight, block_bias) for part in parts])
        return found

    starts = range(0, weight.shape[0], block)
    share = -(-len(starts) // torch.get_num_threads())  # contiguous runs of blocks, one per thread
    runs = _side_by_side(products, [starts[i : i + share] for i in range(0, len(starts), share)])
    by_image = zip(*[image_products for run in runs for image_products in run], strict=True)
    return torch.cat([torch.cat(image_blocks, dim=-1) for image_blocks in by_image])


# _blocks_give_same_bits' verdicts by (rows' shape, weights' shape, dtype): kernels decide, not numbers.
_BLOCK_VERDICTS: dict[tuple, bool] = {}


def _blocks_give_same_bits(
    part_shape: tuple[int, ...], weight: torch.Tensor, bias: torch.Tensor | None
) -> bool:
    """Whether this machine's kernel gives a product in column blocks the same bits as in one call, tried
    once per shape on random rows (true of MKL on x86 for blocks of whole 8-column panels; a kernel that
    summed a column by its position among the others would fail)."""
    key = (part_shape, tuple(weight.shape), weight.dtype)
    if key not in _BLOCK_VERDICTS:
        generator = torch.Generator(weight.device).manual_seed(0)
        part = torch.randn(part_shape, generator=generator, device=weight.device).to(weight.dtype)
        with torch.inference_mode():
            whole = functional.linear(part, weight, bias)
            _BLOCK_VERDICTS[key] = torch.equal(_linear_in_column_blocks((part,), weight, bias), whole)
    return _BLOCK_VERDICTS[key]


def _side_by_side(function, items) -> list:
    """``function`` on each item, in the CPU threads, under the caller's autograd modes."""
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def call(item):
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):  # both are per thread
            return function(item)

    return list(_cpu_pool().map(call, items))


@functools.cache
def _cpu_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(torch.get_num_threads(), thread_name_prefix="florence-products")


def _attention_per_image(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """The model's own attention function, called on one image's rows at a time."""
    attention = attention_function(module, module.florence_attention)
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


def attention_function(module: nn.Module, name: str):
    """The attention function ``name`` (a ``config._attn_implementation``) as ``module``'s class
    calls it: "eager" is the class's own module's function."""
    own_eager = sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS.get_interface(name, own_eager) if name != "eager" else own_eager


def _is_attention(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("q_proj", "k_proj", "v_proj", "config"))


def reference_shapes(rows: int, *modules: nn.Module) -> contextlib.AbstractContextManager[None]:
    """While the block runs, the linear layers and attention in ``modules`` work on ``rows`` rows of
    the batch at a time (one image's: its prompt, or its beams)."""
    return swapped_kernels(modules, _linear_per_image, PER_IMAGE_ATTENTION, florence_rows=rows)


@contextlib.contextmanager
def swapped_kernels(modules, linear_forward, attention: str, **marks) -> Iterator[None]:
    """While the block runs, the linear layers in ``modules`` compute with ``linear_forward`` (called as
    their method) and their attention modules with the attention function registered as ``attention``
    (the model's own, named by ``module.florence_attention``, stays at hand); ``marks`` are set on every
    swapped module for those functions to read. All is undone after, whatever happens."""
    linears = [m for module in modules for m in module.modules() if isinstance(m, nn.Linear)]
    attentions = [m for module in modules for m in module.modules() if _is_attention(m)]
    configs = {}
    for linear in linears:
        linear.__dict__.update(marks)
        linear.forward = types.MethodType(linear_forward, linear)
    for module in attentions:
        module.__dict__.update(marks)
        module.florence_attention = module.config._attn_implementation
        configs[module] = module.config
        module.config = copy.copy(module.config)  # its own, so the shared config stays as it is
        module.config._attn_implementation = attention
    try:
        yield
    finally:
        for linear in linears:
            del linear.forward  # back to the class's own forward
            for name in marks:
                delattr(linear, name)
        for module, config in configs.items():
            module.config = config
            del module.florence_attention
            for name in marks:
                delattr(module, name)
