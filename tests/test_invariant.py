"""Batch-invariant products (invariant.py), proven on CPU under Triton's interpreter: a row's bits do not
depend on the rows beside it (batches of 1, 7 and 64, padded lengths, masks), the kernels agree with
PyTorch's own operations, and a tiny model's answers are the same bits alone and in a mixed batch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch.nn import functional
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

import triton.language as tl
from triton.runtime import interpreter

from florence_cli import beam, invariant
from florence_cli.cli import main
from florence_cli.graphs import StaticDecoder
from florence_cli.model import FlorenceModel
from florence_cli.testing.tiny import SIZES, build_random

from .conftest import random_image, write_images
from .helpers import Steps

if not invariant.INTERPRETED:
    pytest.skip("TRITON_INTERPRET was not set before triton was imported", allow_module_level=True)


def _as_fp32(handle) -> np.ndarray:
    if handle.dtype.scalar == tl.bfloat16:  # the interpreter keeps bf16 values as their bits
        return (handle.data.astype(np.uint32) << 16).view(np.float32)
    return handle.data.astype(np.float32)


def _dot_by_element(self, a, b, acc, input_precision, max_num_imprecise_acc):
    """``tl.dot`` summing every element's terms the same way, wherever its row sits in the tile."""
    terms = _as_fp32(a)[:, :, None] * _as_fp32(b)[None, :, :]
    return interpreter.TensorHandle(terms.sum(axis=1, dtype=np.float32) + acc.data, acc.dtype.scalar)


@pytest.fixture(autouse=True, scope="module")
def gpu_like_interpreter():
    """Two changes to the interpreter for this module. Its ``tl.dot`` is NumPy's BLAS product, whose
    rounding of a row follows the row's place in the tile (OpenBLAS here: half the rows of a 64-row tile
    differ from the same row alone), and which reads bf16 bits as integers; a GPU's matrix instructions
    round a row alike wherever it sits in the tile, which these kernels rely on, as Thinking Machines' and
    vLLM's batch-invariant matmuls do. And its integer-overflow checks, a debugging aid, are off: they
    double its run time."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(interpreter.InterpreterBuilder, "create_dot", _dot_by_element)
        builder = interpreter.interpreter_builder
        patch.setattr(builder, "options", dataclasses.replace(builder.options, sanitize_overflow=False))
        yield


TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # relative to the spread


def _close(found: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    scale = float(expected.float().abs().max())
    torch.testing.assert_close(found.float(), expected.float(), rtol=0, atol=TOLERANCES[dtype] * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_linear_rows_are_the_same_bits_in_a_batch_of_1_7_or_64(dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 80, generator=generator).to(dtype)  # 80, 136: not whole tiles
    weight = torch.randn(136, 80, generator=generator).to(dtype) / 9
    bias = torch.randn(136, generator=generator).to(dtype)
    linear = torch.ops.florence_cli.bi_linear
    for b in (bias, None):
        whole = linear(x, weight, b)
        assert torch.equal(linear(x[20:27], weight, b), whole[20:27])
        assert torch.equal(linear(x[20:27].view(7, 1, 80), weight, b).view(7, 136), whole[20:27])
        for row in (0, 33, 63):
            assert torch.equal(linear(x[row : row + 1], weight, b), whole[row : row + 1])
        expected = functional.linear(x.float(), weight.float(), None if b is None else b.float())
        _close(whole, expected, dtype)


def _qkv(batch: int, heads: int, q_len: int, k_len: int, dtype=torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, q_len, 16), (batch, heads, k_len, 16), (batch, heads, k_len, 16)]
    return [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]


def _sdpa(q, k, v, mask=None, causal=False) -> torch.Tensor:
    """PyTorch's attention, in fp32, in the kernel's output layout (batch, queries, heads, head dim)."""
    out = functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, is_causal=causal, scale=0.25
    )
    return out.transpose(1, 2)


@pytest.mark.parametrize(
    ("mask_kind", "dtype"), [("sdpa (boolean)", torch.float32), ("eager (added)", torch.float16)]
)
def test_padded_prompts_attend_with_the_bits_they_have_alone(mask_kind, dtype):
    """Encoder self-attention over prompts padded to the batch's longest, with the padding mask the model
    builds, equals each prompt's attention alone, unpadded and unmasked (as SDPA skips the mask then):
    keys past a prompt's end add exactly nothing. Lengths span up to three blocks of keys."""
    lengths = [70, 9, 130, 66, 3, 129, 100]
    q, k, v = _qkv(len(lengths), 1, 130, 130, dtype)
    allowed = torch.arange(130)[None, :] < torch.tensor(lengths)[:, None]  # (batch, keys)
    allowed = allowed[:, None, None, :].expand(-1, 1, 130, -1)
    mask = (
        allowed
        if mask_kind.startswith("sdpa")
        else torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    )
    batched = torch.ops.florence_cli.bi_attention(q, k, v, mask, 0.25, False)
    for row, length in enumerate(lengths):
        part = slice(row, row + 1)
        alone = torch.ops.florence_cli.bi_attention(
            q[part, :, :length], k[part, :, :length], v[part, :, :length], None, 0.25, False
        )
        assert torch.equal(batched[part, :length], alone), row
        _close(alone, _sdpa(q[part, :, :length], k[part, :, :length], v[part, :, :length]), dtype)


def test_decoding_steps_attend_with_the_same_bits_in_a_batch_of_1_7_or_64():
    """A decoding step: one query per row over its self-attention cache (70 keys: two blocks), and over
    the encoder's states padded to other prompts' lengths (cross-attention, with the model's mask)."""
    q, k, v = _qkv(64, 1, 1, 70)
    attention = torch.ops.florence_cli.bi_attention
    whole = attention(q, k, v, None, 0.25, False)
    assert torch.equal(attention(q[20:27], k[20:27], v[20:27], None, 0.25, False), whole[20:27])
    for row in (0, 63):
        part = slice(row, row + 1)
        assert torch.equal(attention(q[part], k[part], v[part], None, 0.25, False), whole[part])
    _close(whole, _sdpa(q, k, v), torch.float32)
    lengths = torch.tensor([70, 40] * 32)
    padded = (torch.arange(70)[None, :] < lengths[:, None])[:, None, None, :]
    cross = attention(q, k, v, padded, 0.25, False)
    for row in (1, 20, 63):
        part, length = slice(row, row + 1), int(lengths[row])
        alone = attention(q[part], k[part, :, :length], v[part, :, :length], None, 0.25, False)
        assert torch.equal(cross[part], alone), row


def test_beams_over_one_key_row_attend_with_the_bits_of_their_own_copies():
    """Query rows grouped over one key row — an image's 3 beams over its encoder states, one query each,
    with its padding mask (boolean or added; one per image, or one per beam) — give the bits of each row
    attending over its own copy, as transformers' cache lays them out."""
    q, _, _ = _qkv(6, 2, 1, 70)
    _, k, v = _qkv(2, 2, 1, 70, seed=1)
    k_copies, v_copies = k.repeat_interleave(3, 0), v.repeat_interleave(3, 0)
    allowed = (torch.arange(70)[None, :] < torch.tensor([70, 40])[:, None])[:, None, None, :]
    added = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    attention = torch.ops.florence_cli.bi_attention
    assert torch.equal(
        attention(q, k, v, None, 0.25, False), attention(q, k_copies, v_copies, None, 0.25, False)
    )
    for mask in (allowed, added):
        per_beam = mask.repeat_interleave(3, 0)
        expected = attention(q, k_copies, v_copies, per_beam, 0.25, False)
        assert torch.equal(attention(q, k, v, mask, 0.25, False), expected)
        assert torch.equal(attention(q, k, v, per_beam, 0.25, False), expected)
    _close(expected, _sdpa(q, k_copies, v_copies, allowed.repeat_interleave(3, 0)), torch.float32)


@pytest.mark.parametrize("cached", [0, 5])
def test_causal_attention_aligns_the_last_query_with_the_last_key(cached):
    """Teacher-forced decoding (several queries, no mask: SDPA's causal case), after ``cached`` keys."""
    q, k, v = _qkv(2, 2, 7, 7 + cached)
    found = torch.ops.florence_cli.bi_attention(q, k, v, None, 0.25, True)
    allowed = torch.ones(7, 7 + cached, dtype=torch.bool).tril(diagonal=cached)
    _close(found, _sdpa(q, k, v, mask=allowed), torch.float32)


def test_offsets_past_2_to_the_31_are_computed_in_64_bits(monkeypatch):
    """Rows × stride passes 2^31 in large batches (fc1's inputs at ~870 images of 600-token prompts), so
    the kernels compute offsets in 64 bits: 32-bit ones wrapped around and read other rows. Here the
    interpreter's overflow check is on, which stops a kernel at any 32-bit offset past 2^31. A block's
    rows, queries or keys past the last compute their offsets too, so one row, query or key with a huge
    stride (any stride is legal for a dimension of size 1) takes a block's offsets past 2^31."""
    builder = interpreter.interpreter_builder
    monkeypatch.setattr(
        builder, "options", dataclasses.replace(builder.options, sanitize_overflow=True, debug=True)
    )
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 80, generator=generator)
    weight, bias = torch.randn(136, 80, generator=generator), torch.randn(136, generator=generator)
    far = x.as_strided((1, 80), (2**26, 1))  # a 64-row tile's last row: 63 × 2^26 elements on
    linear = torch.ops.florence_cli.bi_linear
    assert torch.equal(linear(far, weight, bias), linear(x, weight, bias))
    q, k, v = _qkv(1, 1, 1, 1)
    mask = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    # 16 queries or 32 keys in a block: the last 15 or 31 × 2^28 elements on.
    far_q, far_k, far_v = (t.as_strided(t.shape, (16, 16, 2**28, 1)) for t in (q, k, v))
    far_mask = mask.as_strided(mask.shape, (1, 1, 2**28, 2**28))
    attention = torch.ops.florence_cli.bi_attention
    found = attention(far_q, far_k, far_v, far_mask, 0.25, False)
    assert torch.equal(found, attention(q, k, v, mask, 0.25, False))


class _Dispatched(TorchDispatchMode):
    """Names the operators dispatched while it is active, and the (query rows, key rows) of each attention."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()
        self.attention_rows: set[tuple[int, int]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        if func.name() == "florence_cli::bi_attention":
            self.attention_rows.add((args[0].shape[0], args[1].shape[0]))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def small_invariant(tmp_path_factory) -> FlorenceModel:
    """A one-layer, one-head tiny model in invariant mode: the interpreter runs a kernel program per
    (row, head), so fewer of both keep the test short without changing what it proves."""
    size = dataclasses.replace(SIZES["tiny"], layers=1, text_heads=1)
    model, processor = build_random(tmp_path_factory.mktemp("small-model"), size, seed=0)
    return FlorenceModel(model, processor, torch.device("cpu"), torch.float32, products="invariant")


def test_answers_are_the_same_bits_alone_and_in_a_mixed_batch_of_7(small_invariant):
    """Seven images with four tasks (prompts of four lengths, padded together), generated as one batch,
    answer token for token and score for score as each image does alone; images finish at different
    steps, so the batch also shrinks as they leave it."""
    model = small_invariant
    size = model.resize_spec.size
    pixels = [np.asarray(random_image(s).resize(size, Image.Resampling.BICUBIC)) for s in range(7)]
    features = model.image_features(model.pixel_values(pixels))
    prompts = ["<OD>", "<CAPTION>", "<OD>", "<MORE_DETAILED_CAPTION>", "<OCR>", "<OD>", "<CAPTION>"]
    settings = {"num_beams": 3, "max_new_tokens": 10, "exponential_decay_length_penalty": (2, 1.15)}
    with _Dispatched() as seen:  # the products of generation (scoring is a pass of its own, per image)
        model.generate(features[:2], prompts[:2], {**settings, "max_new_tokens": 2})
    assert {"florence_cli::bi_linear", "florence_cli::bi_attention"} <= seen.names
    assert not seen.names & {"aten::linear", "aten::addmm", "aten::scaled_dot_product_attention"}
    batch = model.generate(features, prompts, settings, with_scores=True)
    assert len({len(answer.token_ids) for answer in batch}) > 1
    for image, prompt in enumerate(prompts):
        alone = model.generate(features[image : image + 1], [prompt], settings, with_scores=True)[0]
        assert alone.token_ids == batch[image].token_ids, image
        assert alone.token_logprobs == batch[image].token_logprobs, image


def test_static_steps_give_the_plain_invariant_steps_bits(small_invariant, monkeypatch):
    """The CUDA graphs' static steps (graphs.py, uncaptured) in invariant products: rows padded to buckets
    and the self-attention over padded lengths, masked, change no bit of any step's logits — the kernels'
    sums ignore the batch and masked keys — for prompts of several lengths padded together."""
    model = small_invariant
    size = model.resize_spec.size
    pixels = [np.asarray(random_image(s).resize(size, Image.Resampling.BICUBIC)) for s in range(5)]
    features = model.image_features(model.pixel_values(pixels))
    prompts = ["<OD>", "<CAPTION>", "<OD>", "<OCR>", "<CAPTION>"]
    settings = {"num_beams": 3, "max_new_tokens": 10, "exponential_decay_length_penalty": (2, 1.15)}
    steps = Steps(monkeypatch)
    plain, plain_logits = steps.generate(model, features, prompts, settings)
    static = StaticDecoder(model.model, buckets=(2, 4, 8))
    answers, static_logits = steps.generate(model, features, prompts, settings, static)
    assert answers == plain
    assert len(static_logits) == len(plain_logits)
    assert all(torch.equal(a, b) for a, b in zip(static_logits, plain_logits, strict=True))
    rows = [rows for rows, *_ in steps.shapes]
    assert rows[0] == 8 * 3 and rows[-1] < rows[0]  # 5 images: bucket 8, then fewer as they finish
    attended = [length for _, length, *_ in steps.shapes]
    assert any(length > position + 1 for length, position in zip(attended, steps.positions, strict=True))
    assert static.masked


def test_beams_read_one_copy_of_their_image_encoder_states(small_invariant, monkeypatch):
    """Invariant products keep an image's encoder states, their mask and its cross-attention cache once
    for all its beams: a step's cross-attention reads one key row per image for its 3 beams' queries. Every
    step's logits are the bits of transformers' layout (a copy per beam), in plain and static steps."""
    model = small_invariant
    size = model.resize_spec.size
    pixels = [np.asarray(random_image(s).resize(size, Image.Resampling.BICUBIC)) for s in range(3)]
    features = model.image_features(model.pixel_values(pixels))
    prompts = ["<OD>", "<CAPTION>", "<OCR>"]  # three lengths: the encoder's mask is in play
    settings = {"num_beams": 3, "max_new_tokens": 6}
    steps = Steps(monkeypatch)
    with _Dispatched() as seen:
        shared, shared_logits = steps.generate(model, features, prompts, settings)
    assert (9, 3) in seen.attention_rows  # 3 images × 3 beams of queries, 3 rows of keys
    static = StaticDecoder(model.model, buckets=(4,))
    static_answers, static_logits = steps.generate(model, features, prompts, settings, static)
    assert static.encoder_group == 3 and static.buffers.encoder_rows == 4
    one_per_image = beam._BeamSearch.__init__
    monkeypatch.setattr(
        beam._BeamSearch, "__init__", lambda search, *args: one_per_image(search, *args[:-1], False)
    )
    with _Dispatched() as seen:
        per_beam, per_beam_logits = steps.generate(model, features, prompts, settings)
    assert (9, 3) not in seen.attention_rows
    assert shared == per_beam == static_answers
    for logits in (shared_logits, static_logits):
        assert len(logits) == len(per_beam_logits)
        assert all(torch.equal(a, b) for a, b in zip(logits, per_beam_logits, strict=True))


def test_cli_names_invariant_products_and_refuses_them_where_they_cannot_run(
    tiny_model, tmp_path, monkeypatch
):
    image = str(write_images(tmp_path / "imgs", 1)[0])

    def annotate(out: str):
        argv = ["annotate", image, "-t", "OD", "-o", str(tmp_path / out), "-m", str(tiny_model), "--device",
                "cpu", "--products", "invariant", "--max-new-tokens", "3", "--num-beams", "1"]  # fmt: skip
        return CliRunner().invoke(main, argv, catch_exceptions=False)

    ran = annotate("out")
    assert ran.exit_code == 0, ran.output
    assert "1 annotated" in ran.stderr and "invariant products" in ran.stderr
    monkeypatch.setattr(invariant, "INTERPRETED", False)  # as when TRITON_INTERPRET was not set
    refused = annotate("refused")
    assert refused.exit_code == 2
    assert "--products invariant runs on CUDA, not cpu" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
