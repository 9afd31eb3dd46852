"""Batch-invariant kernels for the language model: an image's answer does not depend on the images
beside it, however many, and the model still runs batched (one kernel per layer for the whole batch).

Stock GPU kernels choose their work split by the shape of the whole call: a matrix product of 3 rows
and one of 192 may sum a row's terms in another order (split-K, tile sizes picked per shape), and
attention kernels split the keys over more blocks when the batch is small (split-KV). Each choice is
deterministic, but the rounding follows the batch. These Triton kernels fix the split instead:

- ``florence_cli::bi_linear``: every output tile sums the whole inner dimension in one program, in
  blocks of ``BLOCK_K`` in order (no split-K), with tile sizes fixed per dtype; the row count is not
  even a compile-time specialisation, so every batch size runs the same binary.
- ``florence_cli::bi_attention``: one program per (key row, head, block of queries) walks the keys
  in blocks of ``BLOCK_N`` from key 0, with an online softmax in fp32 (no split-KV). Keys beyond a
  row's length, under its padding mask or past its causal limit give exactly 0 and leave the running
  sums untouched, so padding a prompt to a longer one's length changes no bit of it. Several query
  rows may read one key row — an image's beams, its encoder states (beam.py keeps them once per
  image) — and their queries then share the program's blocks: a decoding step reads an image's
  cross-attention keys and values once for all its beams. A block holds as few queries as fit them
  (16 or more, for ``tl.dot``), chosen from a row's query count and the beams, never the batch.

Offsets are 64-bit: rows × stride passes 2^31 in large batches, where 32-bit ones wrapped silently.
``benchmarks/kernel_compile.py`` compiles both kernels, without a GPU, at the model's call sites for
sm_80 and sm_90 and fails on an error, a register spill or too much shared memory.

Layer norm, softmax and log-softmax stay PyTorch's: on CUDA each row is reduced by one thread block
whose size follows the row length only (``layer_norm_kernel.cu``, ``SoftMax.cu``), which is batch
invariant already; elementwise operations are. The vision tower is not patched: it runs one image at a
time in this mode (see ``model.FlorenceModel.image_features``), as it runs once per image anyway.

The kernels run on CUDA; on a CPU only under Triton's interpreter (``TRITON_INTERPRET=1`` before this
module is imported), which is how the tests prove their invariance.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import nn
from transformers.modeling_utils import AttentionInterface

from .exact import swapped_kernels

INVARIANT_ATTENTION = "florence_cli_invariant"

# Tile sizes per dtype, the same for every batch: (rows, output columns, inner dimension), and warps per
# tile (fp32's products run in registers: with 4 warps they spilled on sm_90).
LINEAR_TILES = {torch.float16: (64, 128, 64), torch.bfloat16: (64, 128, 64), torch.float32: (64, 128, 32)}
LINEAR_WARPS = {torch.float16: 4, torch.bfloat16: 4, torch.float32: 8}
# Attention, per dtype: the most queries per program (fewer for fewer queries: ``query_block``), the keys
# per step of the online softmax — the fixed split of every reduction — and pipeline stages. fp32's
# products run on CUDA cores, in registers: with 64 × 64 blocks or two stages they spilled.
ATTENTION_TILES = {torch.float16: (64, 64, 2), torch.bfloat16: (64, 64, 2), torch.float32: (32, 32, 1)}


def _precision(dtype: torch.dtype) -> str:
    # fp32 products in full precision (Triton's default for them is TF32); others have one way.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit(do_not_specialize=["rows", "row_tiles"])
def _linear_kernel(
    x, weight, bias, out, rows, row_tiles, cols, depth, stride_x, stride_w, stride_out,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[rows, cols] = x[rows, depth] @ weight[cols, depth]ᵀ (+ bias), one output tile per program."""
    pid = tl.program_id(0)
    # Row tiles next to each other in launch order share a block of weights while it is in cache.
    # Offsets in 64 bits: rows × stride passes 2^31 in large batches (fc1: ~870 images of 600 tokens).
    row_offsets = ((pid % row_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    col_offsets = ((pid // row_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    inner = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, depth, BLOCK_K):
        k = start + inner
        a = tl.load(
            x + row_offsets[:, None] * stride_x + k[None, :],
            mask=(row_offsets[:, None] < rows) & (k[None, :] < depth),
            other=0.0,
        )
        b = tl.load(
            weight + col_offsets[None, :] * stride_w + k[:, None],
            mask=(col_offsets[None, :] < cols) & (k[:, None] < depth),
            other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias + col_offsets, mask=col_offsets < cols, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out + row_offsets[:, None] * stride_out + col_offsets[None, :],
        acc.to(out.dtype.element_ty),
        mask=(row_offsets[:, None] < rows) & (col_offsets[None, :] < cols),
    )


@torch.library.custom_op("florence_cli::bi_linear", mutates_args=())
def bi_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``functional.linear(x, weight, bias)``, each row's result independent of the other rows."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty((flat.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    if out.numel():
        grid, args, options = linear_launch(flat, weight.contiguous(), bias, out)
        _linear_kernel[grid](*args, **options)
    return out.view(*x.shape[:-1], weight.shape[0])


def linear_launch(flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor):
    """``_linear_kernel``'s grid, arguments and options for ``bi_linear``'s rows (``flat``: rows × depth,
    rows contiguous), weights, bias and output."""
    rows, depth = flat.shape
    cols = weight.shape[0]
    block_m, block_n, block_k = LINEAR_TILES[flat.dtype]
    row_tiles = triton.cdiv(rows, block_m)
    grid = (row_tiles * triton.cdiv(cols, block_n),)
    args = (
        flat, weight, flat if bias is None else bias, out, rows, row_tiles, cols, depth,
        flat.stride(0), weight.stride(0), out.stride(0),
    )  # fmt: skip
    options = {
        "HAS_BIAS": bias is not None, "PRECISION": _precision(flat.dtype),
        "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": LINEAR_WARPS[flat.dtype],
        "num_stages": 3,
    }  # fmt: skip
    return grid, args, options


# Whether the kernels were built for Triton's interpreter (they then run on CPU tensors too).
INTERPRETED = not isinstance(_linear_kernel, triton.runtime.JITFunction)


@bi_linear.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


NO_MASK, ALLOWED_MASK, ADDED_MASK = 0, 1, 2  # no mask, a boolean one (True: attend), an additive one


@triton.jit(do_not_specialize=["q_len", "k_len"])
def _attention_kernel(
    q, k, v, mask, out, scale, heads, group, q_len, k_len, head_dim,
    q_sb, q_sh, q_sm, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, m_sk, m_sg, m_sh, m_sm, m_sn, o_sb, o_sh, o_sm,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """softmax(q kᵀ · scale + mask) v for one block of the queries that read one (key row, head): the
    queries of the ``group`` query rows ``key row × group + member``, numbered row by row. The mask's
    row is at ``key row × m_sk + member × m_sg`` (one per query row, or one per key row)."""
    # Offsets in 64 bits: a row's index × its stride passes 2^31 in large batches.
    key_row = (tl.program_id(1) // heads).to(tl.int64)
    head = (tl.program_id(1) % heads).to(tl.int64)
    slots = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    live = slots < group * q_len
    member = (slots // q_len).to(tl.int64)
    rows = key_row * group + member
    queries = (slots % q_len).to(tl.int64)
    mask_rows = key_row * m_sk + member * m_sg + head * m_sh + queries * m_sm
    dims = tl.arange(0, BLOCK_D)
    q_block = tl.load(
        q + rows[:, None] * q_sb + head * q_sh + queries[:, None] * q_sm + dims[None, :],
        mask=live[:, None] & (dims[None, :] < head_dim),
        other=0.0,
    )
    # A finite start, so that a block with no key allowed yet leaves the sums at exactly 0.
    top = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start in range(0, k_len, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N).to(tl.int64)
        inside = keys[None, :] < k_len
        k_block = tl.load(
            k + key_row * k_sb + head * k_sh + keys[None, :] * k_sn + dims[:, None],
            mask=inside & (dims[:, None] < head_dim),
            other=0.0,
        )
        scores = tl.dot(q_block, k_block, input_precision=PRECISION) * scale
        allowed = inside & live[:, None]
        if CAUSAL:  # aligned at the end: the last query sees every key (a cache's earlier ones too)
            allowed = allowed & (keys[None, :] <= queries[:, None] + (k_len - q_len))
        if MASK != 0:
            given = tl.load(
                mask + mask_rows[:, None] + keys[None, :] * m_sn,
                mask=allowed,
                other=0,
            )
            if MASK == 1:
                allowed = allowed & (given != 0)
            else:
                scores += given.to(tl.float32)
        scores = tl.where(allowed, scores, float("-inf"))
        new_top = tl.maximum(top, tl.max(scores, axis=1))
        weights = tl.exp(scores - new_top[:, None])  # exactly 0 where not allowed
        shrink = tl.exp(top - new_top)  # exactly 1 when this block raised no maximum
        total = total * shrink + tl.sum(weights, axis=1)
        v_block = tl.load(
            v + key_row * v_sb + head * v_sh + keys[:, None] * v_sn + dims[None, :],
            mask=(keys[:, None] < k_len) & (dims[None, :] < head_dim),
            other=0.0,
        )
        acc = acc * shrink[:, None] + tl.dot(weights.to(v_block.dtype), v_block, input_precision=PRECISION)
        top = new_top
    result = acc / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(
        out + rows[:, None] * o_sb + head * o_sh + queries[:, None] * o_sm + dims[None, :],
        result.to(out.dtype.element_ty),
        mask=live[:, None] & (dims[None, :] < head_dim),
    )


def query_block(queries: int, dtype: torch.dtype) -> int:
    """Queries per program for a key row read by ``queries`` queries (its query rows × each row's
    queries): the smallest power of two that holds them, from 16 (``tl.dot`` takes 16 rows or more) to
    the dtype's largest. A decoding step's one query then fills 16 rows, not 64, and its beams, reading
    one image's encoder states, share a block. It follows a row's own query count and the beams only,
    never the batch, and each query sums its keys in the same blocks (``ATTENTION_TILES``) whatever its
    block: the batch still changes no bit."""
    return min(ATTENTION_TILES[dtype][0], max(16, triton.next_power_of_2(queries)))


@torch.library.custom_op("florence_cli::bi_attention", mutates_args=())
def bi_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    causal: bool,
) -> torch.Tensor:
    """Attention of ``query`` (batch, heads, queries, head dim) over ``key`` and ``value`` (batch ÷ group,
    heads, keys, head dim: query rows ``i × group`` to ``i × group + group - 1`` read key row ``i``, as
    an image's beams read its encoder states), with ``mask`` broadcastable to (batch, heads, queries,
    keys), or to (batch ÷ group, ...): one per key row (an image's prompt padding, for all its beams) —
    boolean (True: attend) or added to the scores — and ``causal`` aligning the last query with the last
    key. Returns (batch, queries, heads, head dim), the layout the model's output projection reads."""
    batch, heads, q_len, head_dim = query.shape
    out = torch.empty((batch, q_len, heads, head_dim), dtype=query.dtype, device=query.device)
    if out.numel():
        grid, args, options = attention_launch(query, key, value, mask, scale, causal, out)
        _attention_kernel[grid](*args, **options)
    return out


def attention_launch(query, key, value, mask, scale: float, causal: bool, out: torch.Tensor):
    """``_attention_kernel``'s grid, arguments and options for ``bi_attention``'s inputs and output."""
    batch, heads, q_len, head_dim = query.shape
    key_rows, _, k_len, _ = key.shape
    if batch % key_rows:
        raise ValueError(f"{batch} query rows do not share {key_rows} key rows evenly")
    group = batch // key_rows
    kind = NO_MASK if mask is None else ALLOWED_MASK if mask.dtype == torch.bool else ADDED_MASK
    mask_strides = _mask_strides(mask, batch, key_rows, heads, q_len, k_len)
    mask = query if mask is None else mask  # no mask: any tensor, never read
    if min(query.stride(3), key.stride(3), value.stride(3)) != 1:
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    block_m = query_block(group * q_len, query.dtype)
    largest, block_n, stages = ATTENTION_TILES[query.dtype]
    # A full block's registers spilled in 4 warps (64 queries on sm_80; fp32's 32, its products in
    # registers); a 16-query fp32 block spilled in 8 (sm_90).
    warps = 8 if block_m == largest else 4
    grid = (triton.cdiv(group * q_len, block_m), key_rows * heads)
    args = (
        query, key, value, mask, out, scale, heads, group, q_len, k_len, head_dim,
        *query.stride()[:3], *key.stride()[:3], *value.stride()[:3], *mask_strides,
        out.stride(0), out.stride(2), out.stride(1),
    )  # fmt: skip
    options = {
        "MASK": kind, "CAUSAL": causal, "PRECISION": _precision(query.dtype), "BLOCK_M": block_m,
        "BLOCK_N": block_n, "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
        "num_warps": warps, "num_stages": stages,
    }  # fmt: skip
    return grid, args, options


def _mask_strides(mask: torch.Tensor | None, batch: int, key_rows: int, heads: int, q_len: int, k_len: int):
    """The kernel's mask strides (key row, member of its group, head, query, key) for a mask with a row
    per query row (or one for all), or one per key row, which its group of query rows shares."""
    if mask is None:
        return (0, 0, 0, 0, 0)  # never read; zeros add no specialisation of the kernel
    per_key_row = mask.shape[0] == key_rows != batch
    row, head, query, key = mask.expand(key_rows if per_key_row else batch, heads, q_len, k_len).stride()
    return (row, 0, head, query, key) if per_key_row else (row * (batch // key_rows), row, head, query, key)


@bi_attention.register_fake
def _(query, key, value, mask, scale, causal):
    batch, heads, q_len, head_dim = query.shape
    return query.new_empty((batch, q_len, heads, head_dim))


def _linear_invariant(self: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    return torch.ops.florence_cli.bi_linear(hidden, self.weight, self.bias)


def _attention_invariant(
    module: nn.Module, query, key, value, attention_mask, scaling=None, is_causal=None, **kwargs
):
    """The attention function for transformers' interface, with masks as the model built them for its own
    implementation: eager's (added), SDPA's (boolean, or none, when causality or no padding lets SDPA
    skip it: then causal as SDPA would be)."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal and attention_mask is None and query.shape[2] > 1)
    return torch.ops.florence_cli.bi_attention(query, key, value, attention_mask, float(scale), causal), None


AttentionInterface.register(INVARIANT_ATTENTION, _attention_invariant)


def batch_invariant(*modules: nn.Module) -> contextlib.AbstractContextManager[None]:
    """While the block runs, the linear layers and attention in ``modules`` use the batch-invariant
    kernels."""
    return swapped_kernels(modules, _linear_invariant, INVARIANT_ATTENTION)
