"""Microsoft's original Florence-2 checkpoints, converted in memory to transformers' native classes.

The ``microsoft/Florence-2-*`` repos (and copies of them) ship remote code: a DaViT/BART config,
weights under the remote code's names, BART's bare tokenizer and a CLIP preprocessor config. The
native classes "load" such a folder with random weights and mere warnings, so the layout is detected
explicitly (checkpoint.py), and every tensor is renamed, shape-checked and loaded here; remote code
never runs.

Two facts of the original that the native model has no field for are kept in the model itself: the
vocabulary has no ``<image>`` (its logit is -inf) and ``final_logits_bias`` is added to the logits
where the original adds it, before generation's processors and beam search's log-softmax.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from .checkpoint import PICKLE, PICKLE_INDEX, SAFETENSORS, SAFETENSORS_INDEX, pickle_refused
from .postconfig import post_processor_config

log = logging.getLogger(__name__)

# The 1,024 tokens Microsoft's processor adds, in its order: location tokens must sit at the
# same offsets relative to each other, and ``<image>`` must come after all of them.
TASK_TOKENS_BEFORE_LOCATIONS = ["<od>", "</od>", "<ocr>", "</ocr>"]
TASK_TOKENS_AFTER_LOCATIONS = [
    "<cap>", "</cap>", "<ncap>", "</ncap>", "<dcap>", "</dcap>", "<grounding>", "</grounding>",
    "<seg>", "</seg>", "<sep>", "<region_cap>", "</region_cap>", "<region_to_desciption>",
    "</region_to_desciption>", "<proposal>", "</proposal>", "<poly>", "</poly>", "<and>",
]  # fmt: skip
IMAGE_TOKEN = "<image>"


def microsoft_added_tokens() -> list[str]:
    """The tokens Microsoft's Florence-2 processor adds to BART's vocabulary, in order."""
    locations = [f"<loc_{i}>" for i in range(1000)]
    return TASK_TOKENS_BEFORE_LOCATIONS + locations + TASK_TOKENS_AFTER_LOCATIONS


# Microsoft's remote code generates through its language model, whose generation settings come from
# text_config; transformers 5's BartConfig drops most of them, so they are carried over by hand.
GENERATION_FIELDS = (
    "no_repeat_ngram_size", "forced_bos_token_id", "forced_eos_token_id", "early_stopping", "num_beams",
)  # fmt: skip
# BART fields read from text_config (the rest is legacy fairseq or generation settings).
TEXT_FIELDS = (
    "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads",
    "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings", "activation_function",
    "scale_embedding", "dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop",
    "decoder_layerdrop", "init_std", "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
)  # fmt: skip
# Vision fields that no weight shape checks must be stated; the patch fields default alike on both sides.
VISION_REQUIRED = ("dim_embed", "depths", "num_heads", "num_groups", "window_size", "projection_dim")
VISION_OPTIONAL = ("patch_size", "patch_stride", "patch_padding", "patch_prenorm", "drop_path_rate")
# Sizes nested one level down, with the only kind of each that the native model computes.
NESTED = {
    "image_pos_embed": ("max_pos_embeddings", "learned_abs_2d"),
    "visual_temporal_embedding": ("max_temporal_embeddings", "COSINE"),
}
FEATURE_SOURCE = ["spatial_avg_pool", "temporal_avg_pool"]  # the only combination the native projector has
IMAGE_FIELDS = (
    "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
    "do_normalize", "image_mean", "image_std",
)  # fmt: skip
AUTO_MAP = {
    "AutoConfig": "configuration_florence2.Florence2Config",
    "AutoModelForCausalLM": "modeling_florence2.Florence2ForConditionalGeneration",
}

# One embedding under four names: safetensors copies store one of them, Microsoft's .bin all four.
TIED = (
    "language_model.model.shared.weight", "language_model.lm_head.weight",
    "language_model.model.encoder.embed_tokens.weight", "language_model.model.decoder.embed_tokens.weight",
)  # fmt: skip
BIAS = "language_model.final_logits_bias"
PROJECTION = "image_projection"  # a raw [dim, projection_dim] Parameter; the native Linear holds its .T
UNUSED = ("vision_tower.norms.", "vision_tower.head.")  # DaViT's classifier, which Florence-2 never runs

# Native name -> original name, applied in order; the one table serves loading and writing twins.
_RENAMES = [
    (r"^model\.vision_tower\.convs\.(\d+)\.conv\.", r"vision_tower.convs.\1.proj."),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"\.(conv[12])\.", r".\1.fn.dw."),
    (r"\.spatial_block\.norm1\.", ".spatial_block.window_attn.norm."),
    (r"\.channel_block\.norm1\.", ".channel_block.channel_attn.norm."),
    (r"\.(window_attn|channel_attn)\.(qkv|proj)\.", r".\1.fn.\2."),
    (r"\.norm2\.", ".ffn.norm."),
    (r"\.ffn\.(fc[12])\.", r".ffn.fn.net.\1."),
    (r"^model\.multi_modal_projector\.image_projection\.weight$", PROJECTION),
    (r"^model\.multi_modal_projector\.image_position_embed\.", "image_pos_embed."),
    (r"^model\.multi_modal_projector\.", ""),
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
]


class OriginalCheckpointError(Exception):
    """An original checkpoint that cannot be loaded faithfully; the message names the file or tensor."""


def load_original(folder: Path, *, dtype, allow_pickle: bool = False) -> tuple[Any, Any]:
    """Load an original-format folder as ``(model, processor)``, the model in eval mode.

    ``final_logits_bias`` is added inside the model (a logits processor would see beam search's
    log-softmaxed scores rather than the logits the original adds it to).
    """
    folder = Path(folder)
    model, bias = _native_model(folder, allow_pickle, dtype)
    _install_logits_bias(model, bias)
    return model, _processor(folder, model.config)


def load_original_config(folder: Path) -> Any:
    """The native ``Florence2Config`` of an original-format folder (no weights read)."""
    path = Path(folder) / "config.json"
    return _native_config(_read_json(path), path)


def load_original_processor(folder: Path, config: Any = None) -> Any:
    """The native processor of an original-format folder, as ``load_original`` builds it (no weights
    read); ``config``: its ``load_original_config``, if already read."""
    return _processor(Path(folder), config or load_original_config(folder))


def convert_checkpoint(src: Path, dst: Path, *, allow_pickle: bool = False) -> Path:
    """Write ``src`` as a native checkpoint that plain ``from_pretrained`` loads; returns ``dst``."""
    src, dst = Path(src), Path(dst)
    model, bias = _native_model(src, allow_pickle, dtype=None)
    if bias.any():
        raise OriginalCheckpointError(
            f"{src}: tensor {BIAS!r} is non-zero and native Florence-2 has no place for it; "
            "load the original folder directly instead, which applies it"
        )
    # The original vocabulary has no <image>: keep the native model from ever generating it.
    model.generation_config.suppress_tokens = [model.config.image_token_id]
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    _processor(src, model.config).save_pretrained(dst)
    return dst


# --- loading ------------------------------------------------------------------------------------------


def _native_model(folder: Path, allow_pickle: bool, dtype) -> tuple[Any, Any]:
    """The native model (in the stored dtype when ``dtype`` is None) and ``final_logits_bias``."""
    import torch
    from transformers import Florence2ForConditionalGeneration

    original = _read_json(folder / "config.json")
    config = _native_config(original, folder / "config.json")
    raw = _read_weights(folder, allow_pickle)
    with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
        model = Florence2ForConditionalGeneration(config)
    model.load_state_dict(_native_state(raw, model.state_dict(), folder), strict=True, assign=True)
    model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    model.config.dtype = model.dtype
    for field in GENERATION_FIELDS:
        if field in original["text_config"]:
            setattr(model.generation_config, field, original["text_config"][field])
    return model.eval(), _logits_bias(raw, config.image_token_id, folder)


def _native_config(original: dict, path: Path):
    """Florence2Config for an original config.json: its vocabulary plus ``<image>``, DaViT fields renamed."""
    from transformers import BartConfig, Florence2Config, Florence2VisionConfig

    text, vision = original.get("text_config"), original.get("vision_config")
    if not isinstance(text, dict) or not isinstance(vision, dict):
        raise OriginalCheckpointError(f"{path}: text_config or vision_config is missing")
    missing = [field for field in VISION_REQUIRED if field not in vision]
    missing += [
        f"{field}.{size}" for field, (size, _) in NESTED.items() if size not in (vision.get(field) or {})
    ]
    if missing:
        raise OriginalCheckpointError(f"{path}: vision_config lacks {', '.join(missing)}")
    _refuse_unknown_kinds(vision, path)
    vocab = text.get("vocab_size", original.get("vocab_size"))
    if not isinstance(vocab, int):
        raise OriginalCheckpointError(f"{path}: text_config has no vocab_size")
    text_config = BartConfig(**{key: text[key] for key in TEXT_FIELDS if key in text}, vocab_size=vocab + 1)
    vision_config = Florence2VisionConfig(
        embed_dim=vision["dim_embed"],
        max_position_embeddings=vision["image_pos_embed"]["max_pos_embeddings"],
        max_temporal_embeddings=vision["visual_temporal_embedding"]["max_temporal_embeddings"],
        **{key: vision[key] for key in VISION_REQUIRED[1:] + VISION_OPTIONAL if key in vision},
    )
    return Florence2Config(
        text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), image_token_id=vocab
    )


def _refuse_unknown_kinds(vision: dict, path: Path) -> None:
    """Refuse vision settings that the native model would silently compute differently."""
    found = {f"{field}.type": (vision[field].get("type", kind), kind) for field, (_, kind) in NESTED.items()}
    found["image_feature_source"] = (list(vision.get("image_feature_source", FEATURE_SOURCE)), FEATURE_SOURCE)
    for field, (value, supported) in found.items():
        if value != supported:
            raise OriginalCheckpointError(f"{path}: vision_config {field} is {value!r}, not {supported!r}")


def _native_state(raw: dict, expected: dict, folder: Path) -> dict:
    """Every tensor the native model expects, renamed and reshaped; absent or misshaped ones are refused."""
    import torch

    embedding = _tied_embedding(raw, folder)
    # a zero row for <image>: image features replace its embedding, and its logit is masked
    padded = torch.cat([embedding, embedding.new_zeros(1, *embedding.shape[1:])])
    used = {*TIED, BIAS}
    state = {}
    for key, meta in expected.items():
        name = original_name(key)
        tensor = embedding if name in TIED else raw.get(name)
        if tensor is None:
            raise OriginalCheckpointError(f"{folder}: tensor {name!r} is missing from the weights")
        want = _original_shape(name, tuple(meta.shape))
        if tuple(tensor.shape) != want:
            raise OriginalCheckpointError(
                f"{folder}: tensor {name!r} has shape {list(tensor.shape)}; config.json implies {list(want)}"
            )
        state[key] = padded if name in TIED else tensor.T.contiguous() if name == PROJECTION else tensor
        used.add(name)
    unused = sorted(name for name in raw if name not in used and not name.startswith(UNUSED))
    if unused:
        log.warning("%s: ignoring %d tensors the model has no place for: %s", folder, len(unused), unused[:5])
    return state


def _original_shape(name: str, native_shape: tuple) -> tuple:
    if name == PROJECTION:
        return native_shape[::-1]
    if name in TIED:
        return (native_shape[0] - 1, *native_shape[1:])
    return native_shape


def _tied_embedding(raw: dict, folder: Path):
    """The embedding under whichever tied names are stored; copies must agree, as the original ties them."""
    import torch

    present = [name for name in TIED if name in raw]
    if not present:
        raise OriginalCheckpointError(f"{folder}: tensor {TIED[0]!r} is missing (and no tied copy is stored)")
    for name in present[1:]:
        if not torch.equal(raw[name], raw[present[0]]):
            raise OriginalCheckpointError(f"{folder}: tensor {name!r} differs from {present[0]!r}, its tie")
    return raw[present[0]]


def _logits_bias(raw: dict, vocab: int, folder: Path):
    """``final_logits_bias`` as a [vocab] vector; absent means zero, as in the original model."""
    import torch

    bias = raw.get(BIAS)
    if bias is None:
        return torch.zeros(vocab)
    if tuple(bias.shape) not in ((1, vocab), (vocab,)):
        raise OriginalCheckpointError(
            f"{folder}: tensor {BIAS!r} has shape {list(bias.shape)}, not [1, {vocab}]"
        )
    return bias.reshape(vocab).float()


def _install_logits_bias(model, bias) -> None:
    """Add the bias, and -inf for ``<image>`` (not in the original vocabulary), to lm_head's output.

    The sum happens after lm_head, as in the original; the buffer follows ``.to()`` and is never saved.
    """
    import torch

    full = torch.cat([bias, torch.full((1,), float("-inf"))]).to(model.lm_head.weight.dtype)
    model.lm_head.register_buffer("final_logits_bias", full, persistent=False)
    model.lm_head.register_forward_hook(_add_logits_bias)


def _add_logits_bias(module, args, output):
    return output + module.final_logits_bias


def _read_weights(folder: Path, allow_pickle: bool) -> dict:
    """All tensors under their stored names; pickles only with ``allow_pickle``, and then weights-only."""
    import torch
    from safetensors.torch import load_file

    files, pickled = _weight_files(folder)
    if pickled and not allow_pickle:
        raise OriginalCheckpointError(pickle_refused(files[0]))
    state = {}
    for path in files:
        try:
            state.update(
                torch.load(path, map_location="cpu", weights_only=True) if pickled else load_file(path)
            )
        except Exception as error:  # corrupt or hostile: say which file, keep the cause
            raise OriginalCheckpointError(f"{path}: cannot read weights ({error})") from error
    return state


def _weight_files(folder: Path) -> tuple[list[Path], bool]:
    """The weight files, safetensors first, and whether they are pickles."""
    for single, index, pickled in ((SAFETENSORS, SAFETENSORS_INDEX, False), (PICKLE, PICKLE_INDEX, True)):
        if (folder / single).is_file():
            return [folder / single], pickled
        if (folder / index).is_file():
            shards = sorted(set(_read_json(folder / index)["weight_map"].values()))
            return [folder / shard for shard in shards], pickled
    raise OriginalCheckpointError(f"{folder}: no {SAFETENSORS} or {PICKLE} found")


def original_name(native_key: str) -> str:
    """The name a native tensor has in Microsoft's layout."""
    for pattern, replacement in _RENAMES:
        native_key = re.sub(pattern, replacement, native_key)
    return native_key


# --- processor ----------------------------------------------------------------------------------------


def _processor(folder: Path, config):
    """A native Florence2Processor from BART's tokenizer files and Microsoft's preprocessor_config.json."""
    from transformers import CLIPImageProcessor, Florence2Processor

    path = folder / "preprocessor_config.json"
    settings = _read_json(path)
    size = settings.get("size") or {}
    if not {"height", "width"} <= set(size):
        raise OriginalCheckpointError(f"{path}: size must give height and width, not {size}")
    stride = math.prod(config.vision_config.patch_stride)
    tokens = (size["height"] // stride) * (size["width"] // stride) + 1  # + one whole-image token
    if settings.get("image_seq_length", tokens) != tokens:
        raise OriginalCheckpointError(
            f"{path}: image_seq_length is {settings['image_seq_length']}, but {size} images give {tokens}"
        )
    image_processor = CLIPImageProcessor(
        **{key: settings[key] for key in IMAGE_FIELDS if key in settings}, do_convert_rgb=True
    )
    image_processor.image_seq_length = tokens
    return Florence2Processor(
        image_processor=image_processor,
        tokenizer=_tokenizer(folder, config.image_token_id),
        post_processor_config=post_processor_config(),
    )


def _tokenizer(folder: Path, image_id: int):
    """BART's tokenizer, Microsoft's 1,024 tokens, then ``<image>`` at ``image_id``, named the image token."""
    from tokenizers import Tokenizer
    from transformers import BartTokenizer

    if (folder / "tokenizer.json").is_file():
        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        # BartTokenizer(vocab_file=..., merges_file=...) would silently ignore the files
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        backend = BartTokenizer(vocab=_read_json(folder / "vocab.json"), merges=merges).backend_tokenizer
    else:
        raise OriginalCheckpointError(f"{folder}: neither tokenizer.json nor vocab.json with merges.txt")
    added = [*microsoft_added_tokens(), IMAGE_TOKEN]
    tokenizer = BartTokenizer(tokenizer_object=backend)
    tokenizer.add_special_tokens({"additional_special_tokens": added})
    # naming the image token at construction would add it first; name it once it has its place
    image = {"image_token": IMAGE_TOKEN}
    tokenizer = BartTokenizer(
        tokenizer_object=tokenizer.backend_tokenizer, model_specific_special_tokens=image
    )
    # Microsoft's tokens in Microsoft's order after BART's vocabulary; a fine-tune's own tokens (say,
    # prompts of its own) after them; <image> last, at config.json's vocab_size.
    ids = tokenizer.convert_tokens_to_ids(added)
    microsoft = list(range(ids[0], ids[0] + len(added) - 1))
    if ids[:-1] != microsoft or ids[-1] != image_id or len(tokenizer) != image_id + 1:
        raise OriginalCheckpointError(
            f"{folder}: the tokenizer must hold BART's vocabulary, then Florence-2's {len(microsoft)} tokens "
            f"in Microsoft's order, then any tokens a fine-tune added: {image_id} tokens in all, to match "
            f"config.json's vocab_size (it holds {len(tokenizer) - 1})"
        )
    prompt = "What does the image describe?"
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    if tokenizer.decode(ids) != prompt or len(ids) >= len(prompt):  # byte-per-token: merges not applied
        raise OriginalCheckpointError(f"{folder}: the tokenizer files do not tokenize text (got {ids})")
    return tokenizer


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise OriginalCheckpointError(f"{path}: cannot read ({error})") from error
