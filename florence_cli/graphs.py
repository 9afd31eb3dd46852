"""Decoding steps over a static key/value cache, in buckets of batch rows, replayed from CUDA graphs.

At batch 64 a decoding step is still hundreds of small kernels (some twenty per layer, for the self-
and cross-attention, the feed-forward and the norms), each launched from Python: on a GPU the step
waits on launches, not on arithmetic. A CUDA graph records a step's kernels once and replays them with one
launch, but only over fixed shapes at fixed addresses. So here:

- the self-attention's keys and values live in a static cache, allocated once for the generation's
  longest answer (``max_length`` positions, the decoder's start token included); the step writes the
  new token's keys and values at its position and attends over a fixed length (the position rounded
  up to a power of two), the positions not yet written masked out;
- the cross-attention's keys and values (the encoder's states, written by the first step, which is
  transformers' own) are copied into a static buffer once per generation — a row per image where the
  cache holds them so (beam.py's ``shared_encoder_states``), else a row per beam, and the encoder's
  mask alike;
- rows are padded to buckets of 8, 16, 32 or 64 images (then multiples of 64), each image with its
  beams: one graph per (bucket, attended length, encoder length, padded prompts or not). When images
  leave the batch (beam.py), the kept rows are gathered to the front and the next step runs in the
  smallest bucket that holds them;
- the self-attention cache is never moved: a position's keys and values are written once, at that
  step, in the row that computed them, and an ancestry table (rows × positions, small) says in which row
  each row's history lies at each position. A beam that takes its parent's place, or a row gathered to
  the front, only copies its line of the table; the step reads each row's history through it (one
  gather of the attended positions into the attention's input), so beam reordering is part of the
  replay and no step copies the cache into itself.

Padding rows carry dummy tokens and states and their logits are never read: every operation of a
step works row by row (products, norms, attention over a row's own cache), so no value of a live
row depends on them. Their *shape* can: a kernel may round a 48-row product otherwise than a 24-row
one, as it may a 24-row product otherwise than the plain path's 21 rows. The step runs in whatever
products mode the model's generation is under (model.py patches the same modules), so that depends
on the mode:

- per-image (exact.py): the products run in each image's own rows, which the step keeps (buckets are
  whole images with their beams); the self-attention's length differs from the plain path's: it sums
  over the fixed length, the masked positions adding exact zeros, where transformers' loop sums over
  the positions written, and the kernels may group those sums otherwise, so a logit may differ in its
  last bits and a beam search at a near tie may go another way;
- invariant (invariant.py): neither the rows nor the masked positions change a bit — the kernels' sums
  ignore the batch and masked keys — so the steps give the plain invariant path's logits exactly, and
  the Triton kernels are captured like any other;
- batched: both may change the rounding, as the batch itself does in that mode.

On CPU the same step runs without capture, so tests compare it with the plain path: attending over
exactly the positions written, in the per-image shapes, it gives the same logits bit for bit; over
the padded lengths, the same answers on the test model; in invariant products (Triton's interpreter),
the same logits bit for bit over the padded lengths and buckets too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer, EncoderDecoderCache
from transformers.models.bart.modeling_bart import BartDecoder, BartDecoderLayer

from .exact import attention_function

IMAGE_BUCKETS = (8, 16, 32, 64)  # images per bucket; beyond the last, its multiples
SHORTEST_ATTENDED = 16  # attended lengths: powers of two from this, capped at the cache's length
WARMUP_STEPS = 2  # before a capture: lazy initialisations (cuBLAS workspaces, kernel autotuning)


def image_bucket(images: int, buckets: tuple[int, ...] = IMAGE_BUCKETS) -> int:
    """The bucket that holds ``images`` images: the smallest that does, or a multiple of the largest."""
    for bucket in buckets:
        if images <= bucket:
            return bucket
    return -(-images // buckets[-1]) * buckets[-1]


def encoder_rows(rows: torch.Tensor, group: int) -> torch.Tensor:
    """The rows of encoder-side tensors (encoder states, their mask, cross-attention states) that query
    rows ``rows`` — whole groups of ``group`` rows, in order — read: one per group."""
    return rows[::group] // group


def attended_length(positions: int, cache_length: int) -> int:
    """How many cache positions a step attends over when ``positions`` of them are written."""
    length = SHORTEST_ATTENDED
    while length < positions:
        length *= 2
    return min(length, cache_length)


@dataclass
class _Buffers:
    """Static tensors a step reads and writes (a graph holds their addresses), for up to ``capacity``
    rows, and ``encoder_rows`` rows of cross-attention states and encoder mask (one per image, or per
    row). Those are flat, viewed per encoder length, so that prompts of another length reuse them."""

    capacity: int
    encoder_rows: int
    cache_length: int
    encoder_capacity: int
    states: torch.Tensor  # layers, keys/values, rows, heads, positions, head dims
    cross: torch.Tensor  # flat: layers × keys/values × rows × heads × encoder positions × head dims
    encoder_mask: torch.Tensor  # flat: rows × encoder positions, additive (0 or the dtype's minimum)
    tokens: torch.Tensor  # the token each row reads at this step
    # rows, positions: the row of ``states`` that holds each row's keys and values at each position (a
    # position is written once, at its step, in the row that computed it; reordering copies these lines)
    ancestry: torch.Tensor
    position: torch.Tensor  # the new token's position (one element)
    logits: torch.Tensor  # rows, vocabulary

    def cross_view(self, rows: int, encoder_length: int) -> torch.Tensor:
        layers, _, _, heads, _, head_dim = self.states.shape
        shape = (layers, 2, self.encoder_rows, heads, encoder_length, head_dim)
        return self.cross[: self._size(shape)].view(shape)[:, :, :rows]

    def mask_view(self, rows: int, encoder_length: int) -> torch.Tensor:
        shape = (self.encoder_rows, 1, 1, encoder_length)  # broadcast over heads and the one query
        return self.encoder_mask[: self._size(shape)].view(shape)[:rows]

    @staticmethod
    def _size(shape: tuple[int, ...]) -> int:
        return int(torch.Size(shape).numel())


class StaticDecoder:
    """The decoding steps of one model over static buffers, kept (with their graphs) across
    generations; ``start`` begins a generation from the cache of its first step."""

    def __init__(self, model, capture: bool | None = None, buckets: tuple[int, ...] = IMAGE_BUCKETS):
        """``capture``: record each step shape once in a CUDA graph and replay it (default: on CUDA);
        off, the same step runs as it is, kernel by kernel."""
        self.model = model
        self.decoder = model.model.language_model.decoder
        device = model.lm_head.weight.device
        self.capture = device.type == "cuda" if capture is None else capture
        self.buckets = buckets
        self.buffers: _Buffers | None = None
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.pool = None
        # The generation under way: rows, beams, rows per encoder-side row (beams where the cache holds
        # the encoder's states once per image, else 1), encoder length, whether cross states follow beams.
        self.rows = self.beams = self.encoder_length = 0
        self.encoder_group = 1
        self.masked = self.cross_follows_beams = False

    def fits(self, cache) -> bool:
        """Whether the step mirrors this decoder and cache: BART's layers, transformers' dynamic cache."""
        return (
            isinstance(self.decoder, BartDecoder)
            and all(isinstance(layer, BartDecoderLayer) for layer in self.decoder.layers)
            and not self.decoder.training
            and isinstance(cache, EncoderDecoderCache)
            and all(
                isinstance(layer, DynamicLayer) and layer.keys is not None
                for caches in (cache.self_attention_cache, cache.cross_attention_cache)
                for layer in caches.layers
            )
        )

    @torch.inference_mode()
    def start(
        self,
        cache: EncoderDecoderCache,
        encoder_mask: torch.Tensor | None,
        beams: int,
        cache_length: int,
        cross_beams_alike: bool,
    ) -> None:
        """Take over a generation after its first step: ``cache`` holds that step's states (the plain
        path's), ``encoder_mask`` the prompts' 0/1 mask, ``cache_length`` the positions it may reach.
        ``cross_beams_alike``: every image's beams hold the same cross-attention states, so they need
        not follow the beams."""
        self_layers, cross_layers = cache.self_attention_cache.layers, cache.cross_attention_cache.layers
        rows, _, written, _ = self_layers[0].keys.shape
        encoder_group = rows // cross_layers[0].keys.shape[0]
        # Per-image products recorded their split by an image's rows in the graphs, the steps their
        # encoder-side rows.
        if (beams, encoder_group) != (self.beams, self.encoder_group):
            self.graphs.clear()
        self.rows, self.beams, self.encoder_group = rows, beams, encoder_group
        self.encoder_length = cross_layers[0].keys.shape[2]
        self.cross_follows_beams = not cross_beams_alike
        bucket = image_bucket(rows // beams, self.buckets) * beams
        buffers = self._buffers_for(bucket, bucket // encoder_group, cache_length, self.encoder_length)
        for i, (own, cross) in enumerate(zip(self_layers, cross_layers, strict=True)):
            buffers.states[i, 0, :rows, :, :written] = own.keys
            buffers.states[i, 1, :rows, :, :written] = own.values
            view = buffers.cross_view(rows // encoder_group, self.encoder_length)
            view[i, 0].copy_(cross.keys)
            view[i, 1].copy_(cross.values)
        self.masked = encoder_mask is not None and not bool(encoder_mask.all())
        if self.masked:
            minimum = torch.finfo(buffers.logits.dtype).min
            additive = (1 - encoder_mask.to(buffers.logits.dtype)) * minimum
            buffers.mask_view(rows // encoder_group, self.encoder_length).copy_(additive[:, None, None, :])
        buffers.ancestry.copy_(_own_rows(buffers.ancestry))

    @torch.inference_mode()
    def reorder(self, origins: torch.Tensor) -> None:
        """Each row's cache becomes its beam's parent's (``origins``: a row index per row)."""
        _take_rows(self.buffers.ancestry, origins)
        if self.cross_follows_beams:
            self._gather_rows(origins, with_ancestry=False)

    @torch.inference_mode()
    def select(self, kept: torch.Tensor) -> None:
        """Keep only the rows ``kept`` (indices, in order), gathered to the front."""
        self._gather_rows(kept, with_ancestry=True)
        self.rows = len(kept)

    @torch.inference_mode()
    def logits(self, flat_running: torch.Tensor) -> torch.Tensor:
        """One decoding step for the last token of each live row of ``flat_running`` (rows × tokens so
        far): the next token's float32 logits."""
        buffers, rows = self.buffers, self.rows
        position = flat_running.shape[1] - 1
        buffers.tokens[:rows] = flat_running[:, -1]
        buffers.position.fill_(position)
        shape = (
            image_bucket(rows // self.beams, self.buckets) * self.beams,
            attended_length(position + 1, buffers.cache_length),
            self.encoder_length,
            self.masked,
        )
        if self.capture:
            self._graph(shape).replay()
        else:
            self._step(*shape)
        return buffers.logits[:rows].to(torch.float32, copy=True)

    # -- the step --------------------------------------------------------------------------------
    def _step(self, rows: int, length: int, encoder_length: int, masked: bool) -> None:
        """What a graph replays: the decoder and output layer for one token per row, as transformers' BART
        decoder computes them, each row's earlier keys and values read through the ancestry table."""
        buffers, decoder = self.buffers, self.decoder
        position = buffers.position
        ancestry = buffers.ancestry[:rows]
        ancestry.index_copy_(1, position, _own_rows(ancestry[:, :1]))  # this step's: in each row itself
        _, _, _, heads, _, head_dim = buffers.states.shape
        # (keys/values, rows, heads, attended positions, head dims) from each row's ancestry
        history = ancestry[:, :length].view(1, rows, 1, length, 1).expand(2, rows, heads, length, head_dim)
        hidden = decoder.embed_tokens(buffers.tokens[:rows, None])
        hidden = decoder.layernorm_embedding(hidden + decoder.embed_positions(None, position_ids=position))
        minimum = torch.finfo(buffers.logits.dtype).min
        written = torch.arange(length, device=position.device) <= position
        self_mask = torch.where(written, 0.0, minimum).to(buffers.logits.dtype).view(1, 1, 1, length)
        encoder = rows // self.encoder_group
        cross = buffers.cross_view(encoder, encoder_length)
        cross_mask = buffers.mask_view(encoder, encoder_length) if masked else None
        for i, layer in enumerate(decoder.layers):
            attention = layer.self_attn
            projections = (attention.k_proj, attention.v_proj)
            for kept, projection in zip(buffers.states[i, :, :rows], projections, strict=True):
                kept.index_copy_(2, position, _heads(projection(hidden), attention))
            # a layer at a time: one layer's attended history in memory at once
            own = torch.gather(buffers.states[i, :, :, :, :length], 1, history)
            attended = _attend(attention, hidden, own[0], own[1], self_mask)
            hidden = layer.self_attn_layer_norm(hidden + attended)
            attended = _attend(layer.encoder_attn, hidden, cross[i, 0], cross[i, 1], cross_mask)
            hidden = layer.encoder_attn_layer_norm(hidden + attended)
            feed_forward = layer.fc2(layer.activation_fn(layer.fc1(hidden)))
            hidden = layer.final_layer_norm(hidden + feed_forward)
        buffers.logits[:rows] = self.model.lm_head(hidden)[:, 0]

    def _gather_rows(self, rows: torch.Tensor, with_ancestry: bool) -> None:
        """Row ``i`` of the cross-attention states (and mask, and ancestry) becomes row ``rows[i]``'s. The
        self-attention cache stays where it is: the ancestry says where each row's is."""
        buffers = self.buffers
        encoder, encoder_count = encoder_rows(rows, self.encoder_group), self.rows // self.encoder_group
        cross = buffers.cross_view(encoder_count, self.encoder_length)
        for layer in cross:
            _gather(layer, encoder)
        if with_ancestry:
            _take_rows(buffers.ancestry, rows)
            if self.masked:
                mask = buffers.mask_view(encoder_count, self.encoder_length)
                mask[: len(encoder)] = mask[encoder]

    # -- buffers and graphs ------------------------------------------------------------------------
    def _buffers_for(self, rows: int, encoder_rows: int, cache_length: int, encoder_length: int) -> _Buffers:
        """The buffers, made anew (and every graph dropped) when these rows or lengths do not fit."""
        current = self.buffers
        if (
            current is not None
            and current.capacity >= rows
            and current.encoder_rows >= encoder_rows
            and current.cache_length == cache_length
            and current.encoder_capacity >= encoder_length
        ):
            return current
        self.graphs.clear()
        self.buffers = self.pool = None  # the old memory is free before the new buffers take theirs
        capacity = max(rows, current.capacity if current else 0)
        encoder_rows = max(encoder_rows, current.encoder_rows if current else 0)
        encoder_capacity = max(encoder_length, current.encoder_capacity if current else 0)
        attention = self.decoder.layers[0].self_attn
        weight = self.model.lm_head.weight
        layers, heads, head_dim = len(self.decoder.layers), attention.num_heads, attention.head_dim
        states = (layers, 2, capacity, heads, cache_length, head_dim)
        cross = layers * 2 * encoder_rows * heads * encoder_capacity * head_dim
        on = {"device": weight.device}
        self.buffers = _Buffers(
            capacity, encoder_rows, cache_length, encoder_capacity,
            states=torch.zeros(states, dtype=weight.dtype, **on),
            cross=torch.zeros(cross, dtype=weight.dtype, **on),
            encoder_mask=torch.zeros(encoder_rows * encoder_capacity, dtype=weight.dtype, **on),
            tokens=torch.full((capacity,), self.decoder.padding_idx or 0, dtype=torch.long, **on),
            ancestry=_own_rows(torch.empty((capacity, cache_length), dtype=torch.long, **on)).contiguous(),
            position=torch.zeros(1, dtype=torch.long, **on),
            logits=torch.zeros((capacity, self.model.lm_head.out_features), dtype=weight.dtype, **on),
        )  # fmt: skip
        return self.buffers

    def _graph(self, shape: tuple) -> torch.cuda.CUDAGraph:
        """The captured step for ``shape`` (rows, attended length, encoder length, masked), recorded
        the first time it is needed. Recording runs the step for real (warm-ups): it writes only the new
        position, as the replay does again."""
        graph = self.graphs.get(shape)
        if graph is not None:
            return graph
        device = self.buffers.position.device
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()  # one memory pool: steps replay one at a time
        try:
            graph = record(functools.partial(self._step, *shape), self.pool, device)
        except BaseException:
            self.graphs.clear()  # a failed capture (out of memory) leaves nothing half made
            self.buffers = self.pool = None
            raise
        self.graphs[shape] = graph
        return graph


def record(step: Callable[[], None], pool, device: torch.device) -> torch.cuda.CUDAGraph:
    """``step`` captured in a CUDA graph on ``device`` (memory from ``pool``), after warm-up runs on a
    side stream (lazy initialisations — cuBLAS workspaces, kernel autotuning — must not happen during
    capture)."""
    with torch.cuda.device(device):
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                step()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            step()
    return graph


def _own_rows(ancestry: torch.Tensor) -> torch.Tensor:
    """An ancestry (rows, positions) in which every row's history is its own."""
    rows = torch.arange(ancestry.shape[0], device=ancestry.device)
    return rows[:, None].expand_as(ancestry)


def _take_rows(ancestry: torch.Tensor, rows: torch.Tensor) -> None:
    """Row ``i``'s history becomes row ``rows[i]``'s."""
    ancestry[: len(rows)] = ancestry.index_select(0, rows)


def _gather(states: torch.Tensor, rows: torch.Tensor) -> None:
    """Keys and values (keys/values, rows, ...): row ``i`` becomes row ``rows[i]``."""
    states[:, : len(rows)] = states.index_select(1, rows)


def _heads(states: torch.Tensor, attention) -> torch.Tensor:
    """(rows, 1, model dims) to (rows, heads, 1, head dims), as BART's attention lays them out."""
    return states.view(states.shape[0], 1, -1, attention.head_dim).transpose(1, 2)


def _attend(attention, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask) -> torch.Tensor:
    """``attention``'s output for one query per row over ``keys``/``values``, through the model's
    attention function (a patched one too, e.g. exact.py's per-image one)."""
    query = _heads(attention.q_proj(hidden), attention)
    function = attention_function(attention, attention.config._attn_implementation)
    output, _ = function(attention, query, keys, values, mask, dropout=0.0, scaling=attention.scaling)
    return attention.out_proj(output.reshape(hidden.shape[0], 1, -1).contiguous())
