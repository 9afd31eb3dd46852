"""The cost counters of benchmarks/counters.py: what they count is what a decoding step reads."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional

from benchmarks.counters import CostCounter, Unavailable, mode_cost, pinned_generation

GENERATION = pinned_generation(4, 3)


def _step_weight_bytes(model) -> int:
    """Bytes of the weights a steady decoding step reads in full: every decoder weight but the
    embeddings (rows looked up) and the cross-attention's key and value projections (first step
    only), and the output layer."""
    decoder = model.model.model.language_model.decoder
    skipped = ("embed_tokens", "embed_positions", "encoder_attn.k_proj", "encoder_attn.v_proj")
    read = [p for name, p in decoder.named_parameters() if not any(s in name for s in skipped)]
    read += list(model.model.lm_head.parameters())
    return sum(p.numel() * p.element_size() for p in read)


def test_batched_step_reads_the_decoder_once_for_the_batch(florence_model):
    batch = 4
    cost = mode_cost(florence_model, "batched", batch, "<OD>", GENERATION)
    looked_up = cost.weight_bytes * batch - _step_weight_bytes(florence_model)
    row = florence_model.model.config.text_config.d_model * 4  # one fp32 embedding row
    # Besides full weights, a step looks up each beam's token and the step's position (one row, or
    # one per beam where positions are expanded to the batch).
    beams = 3 * batch
    assert looked_up in ((beams + 1) * row, 2 * beams * row)


def test_per_image_products_read_the_weights_once_per_image(florence_model):
    per_image = mode_cost(florence_model, "per-image", 4, "<OD>", GENERATION)
    batched = mode_cost(florence_model, "batched", 4, "<OD>", GENERATION)
    assert per_image.weight_bytes > 3.5 * batched.weight_bytes
    assert per_image.ops > batched.ops and per_image.compute_ops < per_image.ops


def test_reference_reads_what_one_image_of_the_per_image_mode_reads(florence_model):
    reference = mode_cost(florence_model, "reference", 1, "<OD>", GENERATION)
    alone = mode_cost(florence_model, "per-image", 1, "<OD>", GENERATION)
    assert reference.weight_bytes == alone.weight_bytes


@torch.library.custom_op("florence_cli::counters_probe_linear", mutates_args=())
def _probe_linear(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("a Triton kernel, not runnable here")


def test_florence_cli_operators_count_once_and_run_their_stand_in(florence_model):
    weight = florence_model.model.lm_head.weight
    hidden = torch.ones(3, weight.shape[1])
    name = "florence_cli::counters_probe_linear"
    counter = CostCounter(florence_model.model, {name: functional.linear})
    counter.call()
    with counter, torch.inference_mode():
        florence_model.model.model.language_model.decoder.embed_positions.weight.sum()  # outside a step
        counter._new_step()
        out = torch.ops.florence_cli.counters_probe_linear(hidden, weight)
    counter.close()
    assert torch.equal(out, functional.linear(hidden, weight))
    [[step]] = counter.calls
    assert (step.ops, step.weight_bytes) == (1, weight.numel() * weight.element_size())
    with pytest.raises(Unavailable, match="counters_probe_linear"), CostCounter(florence_model.model):
        torch.ops.florence_cli.counters_probe_linear(hidden, weight)


def test_invariant_steps_read_each_image_encoder_states_once_for_its_beams(florence_model):
    """The key/value-cache bytes of a step: in batched products each beam's cross-attention reads its own
    copy of the encoder's states; in invariant products one copy per image serves its 3 beams. The
    self-attention caches (a beam's own tokens) are the same in both."""
    batched = mode_cost(florence_model, "batched", 4, "<OD>", GENERATION)
    invariant = mode_cost(florence_model, "invariant", 4, "<OD>", GENERATION)
    config = florence_model.model.config.text_config
    prompt = len(florence_model.prompt_ids("<OD>"))
    # Keys and values of every decoder layer over the prompt, fp32: one image's copy.
    copy = config.decoder_layers * 2 * prompt * config.d_model * 4
    assert batched.kv_bytes - invariant.kv_bytes == pytest.approx((3 - 1) * copy)
    assert invariant.kv_bytes > copy  # the one copy, and the self-attention caches
    assert invariant.weight_bytes == batched.weight_bytes
