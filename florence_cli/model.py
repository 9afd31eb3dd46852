"""Stage 4: the model — loading a checkpoint and running Florence-2 on batches.

The generation path is the reference path split into its parts, so that each part can be batched and
reused: image features once per image (every task on that image shares them), the language encoder
once per prompt batch, then ``generate`` from the encoder's outputs (beam.py's search, which drops
finished images). Every part is the same call the reference makes. The kernels whose rounding depends
on the batch run, by ``products``, in the reference's per-image shapes (exact.py: answers
token-identical to the reference), in batch-invariant kernels (invariant.py: batched, and an answer
still independent of the images beside it), or batched as they come.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutput

from .beam import compacting_beam_search
from .checkpoint import (
    PICKLE,
    SAFETENSORS,
    SAFETENSORS_INDEX,
    ModelLoadError,
    checkpoint_layout,
    console_shielded,
    first_line,
    locate_model,
    pickle_refused,
    quiet_transformers,
)
from .config import DEFAULT_MODEL, resolve_products
from .config import resolve_device as device_rule
from .config import resolve_dtype as dtype_rule
from .decode import ResizeSpec
from .exact import reference_shapes
from .graphs import StaticDecoder
from .jobs import TaskRequest
from .kernel_check import KernelsUnusable, check_invariant_kernels
from .tasks import OptionError, TaskError, task_prompt

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Generated:
    """One generated answer: its tokens (decoder start to end of sequence) and their text."""

    token_ids: list[int]
    text: str  # batch_decode(..., skip_special_tokens=False) of token_ids
    token_logprobs: list[float] = field(default_factory=list)  # per generated token, after the start token


def resolve_device(device: str) -> torch.device:
    """The torch device for ``device`` (``config.resolve_device``'s rule); an unavailable CUDA device is
    an error."""
    try:
        resolved = torch.device(device_rule(device, torch.cuda.is_available()))
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} asked for, but CUDA is not available here")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {device!r} asked for, but only {torch.cuda.device_count()} GPU(s)")
    return resolved


def compute_threads() -> int:
    """The CPU threads this process's model computes with (float sums on CPU depend on it)."""
    return torch.get_num_threads()


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype for ``dtype`` on ``device`` (``config.resolve_dtype``'s rule)."""
    try:
        return TORCH_DTYPES[dtype_rule(dtype, device.type)]
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None


class Preprocessing:
    """What a checkpoint does before its weights: prompts into the encoder's token ids (within the limits
    its positions set) and images to its input size. Built from the processor and config alone, so a run
    refuses a text or a token budget the model cannot hold before any weights load, on a Ray driver too."""

    def __init__(self, processor, positions: int):
        self.processor = processor
        self.positions = positions  # tokens the encoder reads, and the decoder generates, at most
        self._prompt_ids: dict[str, list[int]] = {}

    @classmethod
    def load(cls, folder: Path) -> Preprocessing:
        """The preprocessing of the checkpoint in ``folder`` (``checkpoint.locate_model``'s), without
        reading its weights."""
        processor, config = load_processor(folder, with_config=True)
        return cls(processor, config.text_config.max_position_embeddings)

    @property
    def resize_spec(self) -> ResizeSpec:
        """How decode workers resize images for this checkpoint (as ``FlorenceModel`` will)."""
        return fast_pixel_spec(self.processor.image_processor)[0]

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of the encoder input for ``prompt`` (e.g. ``<OD>``), image placeholders first —
        as the processor builds them. A prompt longer than the encoder reads is a ``ValueError``."""
        if prompt not in self._prompt_ids:
            processor, tokenizer = self.processor, self.processor.tokenizer
            text = processor.image_token * processor.num_image_tokens
            text += tokenizer.bos_token + expand_prompt(processor, prompt) + tokenizer.eos_token
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > self.positions:
                raise ValueError(
                    f"the text input is too long: {len(ids) - processor.num_image_tokens} tokens, and with "
                    f"the image's {processor.num_image_tokens} the model reads at most {self.positions}"
                )
            self._prompt_ids[prompt] = ids
        return self._prompt_ids[prompt]

    def check(self, requests: list[TaskRequest], max_new_tokens: int | None) -> None:
        """Refuse (``OptionError``) a text input or a token budget this checkpoint cannot hold; texts
        given per image are checked as each image's prompt is built."""
        if max_new_tokens is not None and max_new_tokens > self.positions:
            raise OptionError(
                f"`generation.max_new_tokens` {max_new_tokens} is more than this model generates "
                f"({self.positions})"
            )
        for request in requests:
            for text in request.classes or [request.text]:
                if text is None and request.task.needs_text:
                    continue
                try:
                    self.prompt_ids(task_prompt(request.task, text))
                except ValueError as exc:
                    raise TaskError(f"{request.task.name}: {exc}") from None


class FlorenceModel:
    """A loaded Florence-2 model with its processor, on one device, in one dtype."""

    def __init__(
        self,
        model,
        processor,
        device: torch.device,
        dtype: torch.dtype,
        compact_beams: bool = True,
        fast_pixels: bool = True,
        products: str = "auto",
        cuda_graphs: bool = False,
    ):
        """``compact_beams``: finished images leave the generation batch (see beam.py).
        ``fast_pixels``: decode workers resize and the device normalises, where that equals the
        processor; off, the processor prepares full images in the main process (the reference way).
        ``products`` (``config.PRODUCTS``): per-image runs matrix products, attention and the vision
        tower in the shapes the one-image reference gives them, so answers are bit-identical (see
        exact.py); invariant batches the language model in kernels whose rounding ignores the batch
        (invariant.py; CUDA); batched runs all batched — fastest, but a near tie may then go another
        way than in the reference. Auto: per-image on CPU, invariant on CUDA — where the invariant
        kernels pass their check (kernel_check.py); otherwise batched, and ``fallback`` says why.
        ``cuda_graphs``: with ``compact_beams``, decoding steps run over a static cache in buckets of
        rows, replayed from CUDA graphs on a GPU and run as they are on CPU (see graphs.py); the step
        runs in the products' mode, whichever it is."""
        self.model = model.eval()
        self.compact_beams = compact_beams
        try:
            self.products = resolve_products(products, device.type)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
        self.fallback: str | None = None  # why auto products are batched here, not invariant
        self._invariant = None
        if self.products == "invariant":
            try:
                self._invariant = _invariant_kernels(self.model, device)
            except KernelsUnusable as exc:
                if products != "auto":
                    raise ModelLoadError(f"--products invariant cannot run here: {exc}") from None
                self.products = "batched"
                self.fallback = f"--products auto: {exc}; running stock batched products instead"
        self.static_decoder = StaticDecoder(self.model) if cuda_graphs else None
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = device
        self.dtype = dtype
        self.generation_config = model.generation_config
        self.preprocessing = Preprocessing(processor, model.config.text_config.max_position_embeddings)
        self.resize_spec, self._pixel_lut = (
            fast_pixel_spec(processor.image_processor) if fast_pixels else (ResizeSpec(size=None), None)
        )
        if self._pixel_lut is not None:
            self._pixel_lut = self._pixel_lut.to(device)

    @classmethod
    def load(
        cls,
        model: str = DEFAULT_MODEL,
        device: str = "auto",
        dtype: str = "auto",
        allow_pickle: bool = False,
        products: str = "auto",
        cuda_graphs: bool = False,
    ) -> FlorenceModel:
        """Load a native or original-format checkpoint from a folder or the Hub."""
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        folder = locate_model(model, allow_pickle=allow_pickle)
        loaded, processor = load_checkpoint(folder, torch_dtype, allow_pickle)
        return cls(
            loaded.to(torch_device), processor, torch_device, torch_dtype,
            products=products, cuda_graphs=cuda_graphs,
        )  # fmt: skip

    # -- images -------------------------------------------------------------------------------
    def pixel_values(self, images: list[np.ndarray]) -> torch.Tensor:
        """Model-ready pixels for decoded uint8 images, normalised on the device.

        The lookup table holds exactly the float32 values the processor computes for each of the
        256 levels of each channel, so this equals the processor's output bit for bit.
        """
        if self._pixel_lut is None:
            processed = self.processor.image_processor(images=images, return_tensors="pt")
            return processed["pixel_values"].to(self.device, self.dtype)
        batch = torch.from_numpy(np.stack(images))
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        batch = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2).long()  # B, 3, H, W
        channels = torch.arange(3, device=self.device).view(1, 3, 1, 1)
        # In the processor's layout (B, 3, H, W contiguous), not the channels-last one the lookup gives:
        # convolutions pick their kernel by layout, and in fp16 a channels-last batch rounded otherwise.
        return self._pixel_lut[channels, batch].to(self.dtype).contiguous()

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image features (B, image tokens, d_model) — the same call the model makes.

        The vision tower sees one image at a time, as in the reference, unless products are batched
        on CUDA: its convolutions round differently with the batch size (by ~1e-6 on CPU, which
        flipped beam-search answers of base-size models). It runs once per image, not once per token,
        so batch-invariant products keep it per image too.
        """
        vision = self.model.model.get_image_features
        with torch.inference_mode():
            if self.device.type == "cpu" or self.products != "batched":
                return torch.cat(
                    [vision(pixel_values[i : i + 1]).pooler_output for i in range(len(pixel_values))]
                )
            return vision(pixel_values).pooler_output

    @property
    def positions(self) -> int:
        """How many tokens the language model's encoder reads, and its decoder generates, at most."""
        return self.preprocessing.positions

    def prompt_ids(self, prompt: str) -> list[int]:
        """``Preprocessing.prompt_ids``."""
        return self.preprocessing.prompt_ids(prompt)

    # -- generation ---------------------------------------------------------------------------
    @torch.inference_mode()  # inputs made here too, so a compiled decoder sees one kind of tensor
    def generate(
        self,
        features: torch.Tensor,
        prompts: list[str],
        generation: dict[str, Any],
        with_scores: bool | Sequence[bool] = False,
    ) -> list[Generated]:
        """Generate one answer per (image features, prompt) row; ``with_scores`` (for all rows, or one
        flag per row) adds the model's log-probability of each generated token (see ``token_logprobs``)."""
        scored = [with_scores] * len(prompts) if isinstance(with_scores, bool) else list(with_scores)
        if self.products != "per-image":  # the invariant kernels' sums ignore padding
            return self._generate(features, prompts, generation, scored)
        # Prompts of one length per batch: padding would lengthen the attention's sums.
        by_length: dict[int, list[int]] = {}
        for row, prompt in enumerate(prompts):
            by_length.setdefault(len(self.prompt_ids(prompt)), []).append(row)
        results: list[Generated | None] = [None] * len(prompts)
        for rows in by_length.values():
            answers = self._generate(
                features[rows], [prompts[r] for r in rows], generation, [scored[r] for r in rows]
            )
            for row, answer in zip(rows, answers, strict=True):
                results[row] = answer
        return results

    def _generate(
        self, features: torch.Tensor, prompts: list[str], generation: dict[str, Any], scored: list[bool]
    ) -> list[Generated]:
        ids = [self.prompt_ids(p) for p in prompts]
        length = max(len(i) for i in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([i + [pad] * (length - len(i)) for i in ids], device=self.device)
        attention_mask = torch.tensor(
            [[1] * len(i) + [0] * (length - len(i)) for i in ids], device=self.device
        )
        language = self.model.model.language_model
        with self._kernels(1, language.encoder):  # one prompt
            encoder_outputs = self._encode(input_ids, attention_mask, features)
        # Per-image shapes and invariant kernels make each row this image's own encoder states, bit for
        # bit, up to its prompt's length: scoring reuses them. (Kept aside: generate expands the
        # outputs' tensors to one row per beam in place.)
        encoder_states = encoder_outputs.last_hidden_state if self.products != "batched" else None
        if self.compact_beams:
            generation = {**generation, "custom_generate": compacting_beam_search}
            # The invariant attention lets an image's beams read one copy of its encoder states (beam.py).
            generation["shared_encoder_states"] = self.products == "invariant"
            if self.static_decoder is not None:
                generation["static_decoder"] = self.static_decoder
        config = self.generation_config
        beams = max(generation.get("num_beams") or config.num_beams or 1, config.num_return_sequences or 1)
        with self._kernels(beams, language.decoder, self.model.lm_head):  # one image's beams
            output = self.model.generate(
                encoder_outputs=encoder_outputs, attention_mask=attention_mask, **generation
            )
        eos = self.tokenizer.eos_token_id
        results = []
        for row, sequence in enumerate(output.tolist()):
            sequence = _until_eos(sequence, eos)
            text = self.tokenizer.decode(sequence, skip_special_tokens=False)
            states = None if encoder_states is None else encoder_states[row : row + 1, : len(ids[row])]
            scores = (
                self.token_logprobs(ids[row], features[row : row + 1], sequence, encoder_states=states)
                if scored[row]
                else []
            )
            results.append(Generated(sequence, text, scores))
        return results

    @torch.inference_mode()
    def token_logprobs(
        self,
        prompt_ids: list[int],
        features: torch.Tensor,
        sequence: list[int],
        encoder_states: torch.Tensor | None = None,
    ) -> list[float]:
        """log p(token | image, prompt, tokens before it) for each token of ``sequence`` after the start.

        One teacher-forced pass for this image alone: the figures do not depend on which images shared
        its batch, so scores are as reproducible as the answers (generation's own beam scores are not).
        ``encoder_states``: the language encoder's output for this image and prompt, if already at hand.
        """
        tokens = torch.tensor([sequence], device=self.device)
        if encoder_states is None:
            input_ids = torch.tensor([prompt_ids], device=self.device)
            encoder_outputs = self._encode(input_ids, torch.ones_like(input_ids), features)
        else:
            encoder_outputs = BaseModelOutput(last_hidden_state=encoder_states)
        logits = self.model(encoder_outputs=encoder_outputs, decoder_input_ids=tokens[:, :-1]).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, 1:, None])
        return logprobs.flatten().tolist()

    def _kernels(self, rows: int, *modules):
        """The products' mode over ``modules`` (``rows``: one image's rows, for per-image shapes)."""
        if self.products == "per-image":
            return reference_shapes(rows, *modules)
        if self.products == "invariant":
            return self._invariant.batch_invariant(*modules)
        return contextlib.nullcontext()

    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, features: torch.Tensor):
        """The language encoder over prompt tokens with the image features in the ``<image>`` slots."""
        model = self.model
        embeds = model.get_input_embeddings()(input_ids)
        image_mask = model.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=features)
        embeds = embeds.masked_scatter(image_mask, features.to(embeds.device, embeds.dtype))
        return model.model.language_model.encoder(attention_mask=attention_mask, inputs_embeds=embeds)


def _invariant_kernels(model, device: torch.device):
    """The batch-invariant kernels' module, checked on ``model``, where they can run: CUDA, or a CPU
    under Triton's interpreter (tests). Elsewhere a ``ModelLoadError`` says what to do instead; on CUDA,
    ``KernelsUnusable`` says why they cannot serve (no Triton, or the check failed)."""
    elsewhere = (
        f"--products invariant runs on CUDA, not {device.type} (on CPU, per-image products are "
        "independent of the batch too, and bit-identical to the reference)"
    )
    try:
        from . import invariant
    except ImportError as exc:
        if device.type != "cuda":
            raise ModelLoadError(elsewhere) from None
        needs = f"the batch-invariant kernels need Triton (pip install triton): {exc}"
        raise KernelsUnusable(needs) from None
    if device.type != "cuda" and not invariant.INTERPRETED:
        raise ModelLoadError(elsewhere)
    check_invariant_kernels(model, invariant)
    return invariant


def _until_eos(sequence: list[int], eos: int) -> list[int]:
    """The sequence up to its end-of-sequence token; batch padding after it is dropped.
    Position 0 is the decoder start token (itself ``</s>`` in Florence-2)."""
    try:
        return sequence[: sequence.index(eos, 1) + 1]
    except ValueError:
        return sequence


def expand_prompt(processor, prompt: str) -> str:
    """Replace a task token by its natural-language prompt, with the processor's own tables."""
    for token, text in processor.task_prompts_without_inputs.items():
        if token in prompt:
            if prompt != token:
                raise ValueError(f"task token {token} must be the whole prompt")
            return text
    for token, template in processor.task_prompts_with_input.items():
        if token in prompt:
            return template.format(input=prompt.replace(token, "").strip())
    return prompt


def fast_pixel_spec(image_processor) -> tuple[ResizeSpec, torch.Tensor | None]:
    """Resize in the decode workers and normalise by lookup, when the processor is Pillow's standard
    resize → rescale → normalise; otherwise (e.g. torchvision's backend, which resizes with other
    numerics) hand full images to the processor itself, so answers stay the reference's."""
    from transformers.image_processing_backends import PilBackend

    config = image_processor.to_dict()
    size = config.get("size") or {}
    standard = (
        isinstance(image_processor, PilBackend)
        and config.get("do_resize")
        and size.get("height")
        and size.get("width")
        and not config.get("do_center_crop")
        and not config.get("do_pad")
        and config.get("do_convert_rgb", True) is not False
        and config.get("do_rescale")
        and config.get("do_normalize")
    )
    if not standard:
        return ResizeSpec(size=None), None
    levels = np.arange(256, dtype=np.float64)[None, :] * config["rescale_factor"]
    levels = np.repeat(
        levels.astype(np.float32), 3, axis=0
    )  # as transformers' rescale: float64, then float32
    mean = np.asarray(config["image_mean"], dtype=np.float32)[:, None]
    std = np.asarray(config["image_std"], dtype=np.float32)[:, None]
    lut = torch.from_numpy((levels - mean) / std)
    resample = int(config.get("resample", 3))
    return ResizeSpec(size=(size["width"], size["height"]), resample=resample), lut


def load_checkpoint(folder: Path, dtype: torch.dtype, allow_pickle: bool = False) -> tuple[Any, Any]:
    """The model (in ``dtype``) and processor of a local checkpoint, checked first (``checkpoint_layout``)
    and built by florence-cli's code or transformers' own classes, never the checkpoint's."""
    from . import original

    layout = checkpoint_layout(folder)
    with _loading(folder):
        if layout == "original":
            return original.load_original(folder, dtype=dtype, allow_pickle=allow_pickle)
        processor = _native_processor(folder)
        return _native_model(folder, dtype, allow_pickle), processor


def load_processor(folder: Path, with_config: bool = False) -> Any:
    """The processor alone (no weights read), checked and built as by ``load_checkpoint``; with
    ``with_config``, ``(processor, the model's native config)``."""
    from transformers import Florence2Config

    from . import original

    layout = checkpoint_layout(folder)
    with _loading(folder):
        if layout == "original":
            config = original.load_original_config(folder)
            processor = original.load_original_processor(folder, config)
        else:
            config = Florence2Config.from_pretrained(folder) if with_config else None
            processor = _native_processor(folder)
    return (processor, config) if with_config else processor


@contextlib.contextmanager
def _loading(folder: Path) -> Iterator[None]:
    """Loading ``folder``: off stdout and stdin, transformers' progress bars and advice off stderr (which
    is for our progress), and any failure one ``ModelLoadError`` line."""
    from .original import OriginalCheckpointError

    quiet_transformers()
    with console_shielded():
        try:
            yield
        except ModelLoadError:
            raise
        except OriginalCheckpointError as exc:
            raise ModelLoadError(first_line(exc)) from None
        except Exception as exc:  # transformers' errors are many; the user needs one line
            raise ModelLoadError(
                f"cannot load a Florence-2 checkpoint from {folder}: {first_line(exc)}"
            ) from None


def _native_processor(folder: Path):
    from transformers import Florence2Processor

    return Florence2Processor.from_pretrained(folder, trust_remote_code=False)


def _native_model(folder: Path, dtype: torch.dtype, allow_pickle: bool):
    """Transformers' Florence-2 model with every tensor from the checkpoint: none missing, none left over,
    none reshaped (loaded alone, those would become random weights or be dropped with a mere warning)."""
    from transformers import Florence2ForConditionalGeneration

    if not allow_pickle and not any((folder / name).is_file() for name in (SAFETENSORS, SAFETENSORS_INDEX)):
        raise ModelLoadError(pickle_refused(folder / PICKLE))
    model, info = Florence2ForConditionalGeneration.from_pretrained(
        folder, dtype=dtype, use_safetensors=None if allow_pickle else True, trust_remote_code=False,
        output_loading_info=True, ignore_mismatched_sizes=True,
    )  # fmt: skip
    misshaped = [
        f"{name} ({list(stored)}, config.json implies {list(wanted)})"
        for name, stored, wanted in sorted(info["mismatched_keys"])
    ]
    unfit = [
        _tensors("missing", sorted(info["missing_keys"])),
        _tensors("unexpected", sorted(info["unexpected_keys"])),
        _tensors("misshaped", misshaped),
    ]
    if any(unfit):
        raise ModelLoadError(
            f"{folder}: the weights do not fit config.json: {'; '.join(filter(None, unfit))}"
        )
    return model


def _tensors(kind: str, names: list[str], shown: int = 3) -> str:
    """``kind`` tensors a, b, c and N more — or "" when there are none."""
    if not names:
        return ""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{kind} tensors {', '.join(names[:shown])}{more}"
