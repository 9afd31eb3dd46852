"""Before the first image: do the batch-invariant kernels compile, launch and agree with PyTorch's own
products at this model's dimensions and dtype?

The kernels (invariant.py) are Triton's, compiled on the machine that runs them: a Triton too old or
too new for them, a GPU without the shared memory a tile needs, or a bug at some shape would otherwise
show on the first batch — and on every one after it. So, once per model, the language model runs a
two-image prompt (one padded, longer than a block of keys) and two decoding steps with a cache,
through the batch-invariant kernels, each call of them compared with PyTorch's equivalent on the same
inputs. On a GPU that is a few milliseconds once the kernels are compiled (which the run needs anyway);
on a CPU it runs under Triton's interpreter, as the tests do.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
from torch.nn import functional
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from .device_errors import describe

NAMESPACE = "florence_cli"
# How far a kernel's result may lie from PyTorch's, as a share of the largest value PyTorch gives: the
# kernels sum in fp32 like cuBLAS, in another order, so they differ by the output's rounding and a little.
TOLERANCES = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
PROMPT_ROWS, PROMPT_LENGTH, PADDED_LENGTH = 2, 70, 50  # longer than a kernel's block of 64 keys
DECODING_STEPS = 2  # the first step fills the cache, the second reads it


class KernelsUnusable(Exception):
    """The batch-invariant kernels cannot serve this model here; the message says why, in one line."""


def torch_equivalents() -> dict[str, Callable]:
    """PyTorch's computation of each ``florence_cli::`` operator, by name, from the same arguments."""

    def attention(query, key, value, mask, scale, causal):
        group = query.shape[0] // key.shape[0]  # query rows per key row: an image's beams, its states
        if group > 1:
            key, value = key.repeat_interleave(group, 0), value.repeat_interleave(group, 0)
            if mask is not None and mask.shape[0] * group == query.shape[0]:  # one per key row
                mask = mask.repeat_interleave(group, 0)
        if causal:  # aligned at the end, as the kernel (and a cache) does: the last query sees every key
            queries, keys = query.shape[2], key.shape[2]
            mask = torch.ones(queries, keys, dtype=torch.bool, device=query.device).tril(keys - queries)
        elif mask is not None and mask.dtype != torch.bool:
            mask = mask.to(query.dtype)
        out = functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
        return out.transpose(1, 2).contiguous()  # (batch, queries, heads, head dim), as the kernel

    return {f"{NAMESPACE}::bi_linear": functional.linear, f"{NAMESPACE}::bi_attention": attention}


def check_invariant_kernels(model, invariant: ModuleType) -> set[str]:
    """Raise ``KernelsUnusable`` unless the batch-invariant kernels of ``invariant`` compile, run and
    agree with PyTorch within the dtype's tolerance in ``model`` (a Florence-2 model, on its device).
    Returns the operators that ran but could not be compared (no PyTorch equivalent takes their
    arguments): none, unless the kernels changed and ``torch_equivalents`` did not."""
    language, head = model.model.language_model, model.lm_head
    weight = head.weight
    checked = (weight.dtype, weight.device)
    if getattr(model, "florence_kernels_checked", None) == checked:
        return set()  # the same model wrapped again (benchmarks do), in the same dtype and place
    tolerance = TOLERANCES.get(weight.dtype, TOLERANCES[torch.bfloat16])
    try:
        with (
            torch.inference_mode(),
            invariant.batch_invariant(language.encoder, language.decoder, head),
            _Compared(tolerance) as compared,
        ):
            _language_model_pass(language, head)
    except KernelsUnusable:
        raise
    except Exception as exc:  # a kernel that does not compile or launch: any error, in one line
        raise KernelsUnusable(f"the batch-invariant kernels failed: {describe(exc)}") from exc
    if compared.calls == 0:
        raise KernelsUnusable("the batch-invariant kernels were never called")
    model.florence_kernels_checked = checked
    return compared.uncompared


def _language_model_pass(language, head) -> None:
    """A padded prompt batch through the encoder, then decoding steps over a cache, then logits."""
    weight = head.weight
    generator = torch.Generator(device=weight.device).manual_seed(0)
    width = language.config.d_model
    embeds = torch.randn(
        (PROMPT_ROWS, PROMPT_LENGTH, width), generator=generator, device=weight.device, dtype=weight.dtype
    )
    mask = torch.ones((PROMPT_ROWS, PROMPT_LENGTH), dtype=torch.long, device=weight.device)
    mask[1, PADDED_LENGTH:] = 0
    states = language.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    config = language.decoder.config
    cache = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
    tokens = torch.full((PROMPT_ROWS, 1), config.decoder_start_token_id or 0, device=weight.device)
    for _ in range(DECODING_STEPS):
        hidden = language.decoder(
            input_ids=tokens, encoder_hidden_states=states, encoder_attention_mask=mask, cache=cache,
            use_cache=True,
        ).last_hidden_state  # fmt: skip
        tokens = head(hidden).argmax(-1)


class _Compared(TorchDispatchMode):
    """Runs each ``florence_cli::`` operator, then PyTorch's equivalent on the same inputs: the first
    result that is not finite, or lies beyond ``tolerance``, raises ``KernelsUnusable``."""

    def __init__(self, tolerance: float):
        super().__init__()
        self.tolerance = tolerance
        self.equivalents = torch_equivalents()
        self.calls = 0
        self.uncompared: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        found = func(*args, **kwargs)
        if func.namespace != NAMESPACE:
            return found
        self.calls += 1
        name = func._schema.name
        try:
            expected = self.equivalents[name](*args, **kwargs)
        except Exception:  # the check's own gap, not the kernel's fault: it compiled and ran, at least
            self.uncompared.add(name)
            return found
        self._compare(name, found, expected)
        return found

    def _compare(self, name: str, found: torch.Tensor, expected: torch.Tensor) -> None:
        shape = "x".join(map(str, expected.shape))
        if not bool(torch.isfinite(found).all()) and bool(torch.isfinite(expected).all()):
            raise KernelsUnusable(f"{name} gave values that are not finite at shape {shape}")
        scale = float(expected.float().abs().max()) or 1.0
        error = float((found.float() - expected.float()).abs().max()) / scale
        if error > self.tolerance:
            raise KernelsUnusable(
                f"{name} differs from PyTorch by {error:.2g} of its largest value at shape {shape} "
                f"(tolerance {self.tolerance:g})"
            )
