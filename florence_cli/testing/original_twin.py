"""Original-format (Microsoft layout) twins of native checkpoints, for tests: the inverse of
``original.py``'s loading, so that the native model is the reference for the conversion."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..checkpoint import PICKLE, SAFETENSORS
from ..original import (
    AUTO_MAP,
    BIAS,
    FEATURE_SOURCE,
    IMAGE_FIELDS,
    PROJECTION,
    TEXT_FIELDS,
    TIED,
    VISION_OPTIONAL,
    VISION_REQUIRED,
    microsoft_added_tokens,
    original_name,
)


def write_original_twin(
    native_folder: Path,
    dst: Path,
    *,
    tie_mode: str = "shared_only",
    fmt: str = "safetensors",
    final_logits_bias=None,
    generation_fields: dict | None = None,
    fp16: bool = False,
    extra_tokens: Sequence[str] = (),
) -> Path:
    """Write a native checkpoint in Microsoft's layout (the inverse of loading), for tests; returns ``dst``.

    ``tie_mode`` "shared_only" stores the embedding once, as safetensors copies do; "all_copies" stores
    all four tied names, as Microsoft's ``.bin`` does. ``generation_fields`` go into text_config.
    ``extra_tokens`` are added after Microsoft's, with seeded random embeddings, as a fine-tune that
    taught the model prompts of its own saves them (its tokenizer.json then lists Microsoft's tokens too).
    """
    import torch
    from safetensors.torch import save_file

    if tie_mode not in ("shared_only", "all_copies") or fmt not in ("safetensors", "bin"):
        raise ValueError(f"unknown tie_mode {tie_mode!r} or fmt {fmt!r}")
    native_folder, dst = Path(native_folder), Path(dst)
    native = _read_json(native_folder / "config.json")
    microsoft = native["image_token_id"]  # rows from <image> on are the native model's own additions
    vocab = microsoft + len(extra_tokens)
    dtype = torch.float16 if fp16 else torch.float32
    state = _original_state(
        native_folder, microsoft, len(extra_tokens), all_copies=tie_mode == "all_copies", shared=fmt == "bin"
    )
    bias = torch.zeros(vocab) if final_logits_bias is None else torch.as_tensor(final_logits_bias)
    state[BIAS] = bias.reshape(1, vocab)
    state = {
        name: tensor.to(dtype) if tensor.is_floating_point() else tensor for name, tensor in state.items()
    }
    dst.mkdir(parents=True, exist_ok=True)
    if fmt == "bin":
        torch.save(state, dst / PICKLE)
    else:
        save_file(state, dst / SAFETENSORS, metadata={"format": "pt"})
    config = _original_config(native, vocab, generation_fields or {}, str(dtype).removeprefix("torch."))
    _write_json(dst / "config.json", config)
    base = microsoft - len(microsoft_added_tokens())
    _write_bart_tokenizer(native_folder / "tokenizer.json", dst, base, extra_tokens, microsoft)
    image = _read_json(native_folder / "processor_config.json")["image_processor"]
    _write_json(dst / "preprocessor_config.json", {
        "auto_map": {"AutoProcessor": "processing_florence2.Florence2Processor"},
        "processor_class": "Florence2Processor", "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": None, "image_seq_length": image["image_seq_length"],
        **{key: image[key] for key in IMAGE_FIELDS if key in image},
    })  # fmt: skip
    return dst


def _original_state(native_folder: Path, vocab: int, extra: int, *, all_copies: bool, shared: bool) -> dict:
    """Native weights under original names, the embedding cut to ``vocab`` rows (plus ``extra`` seeded
    random ones) and stored once or four times.

    ``shared`` keeps the copies on one storage, as a pickle can (safetensors files refuse it).
    """
    import torch
    from safetensors.torch import load_file

    state = {}
    for key, tensor in load_file(native_folder / SAFETENSORS).items():
        name = original_name(key)
        state[name] = tensor.T.contiguous() if name == PROJECTION else tensor
    embedding = next(state[name] for name in TIED if name in state)[:vocab]
    if extra:
        rows = torch.randn(extra, embedding.shape[1], generator=torch.Generator().manual_seed(extra))
        embedding = torch.cat([embedding, rows.to(embedding.dtype) * embedding.std()])
    for index, name in enumerate(TIED):
        state.pop(name, None)
        if index == 0 or all_copies:
            state[name] = embedding if shared else embedding.clone()
    return state


def _original_config(native: dict, vocab: int, generation: dict, dtype: str) -> dict:
    """Microsoft's config.json for a native config whose vocabulary is cut back to ``vocab``."""
    text, vision = native["text_config"], native["vision_config"]
    text_config = {key: text[key] for key in TEXT_FIELDS if key in text}
    text_config.update(model_type="florence2_language", vocab_size=vocab, **generation)
    vision_config = {key: vision[key] for key in VISION_REQUIRED[1:] + VISION_OPTIONAL}
    vision_config.update(
        model_type="davit",
        dim_embed=vision["embed_dim"],
        enable_checkpoint=False,
        image_pos_embed={"type": "learned_abs_2d", "max_pos_embeddings": vision["max_position_embeddings"]},
        visual_temporal_embedding={
            "type": "COSINE",
            "max_temporal_embeddings": vision["max_temporal_embeddings"],
        },
        image_feature_source=FEATURE_SOURCE,
    )
    return {
        "_name_or_path": "florence2", "architectures": ["Florence2ForConditionalGeneration"],
        "auto_map": AUTO_MAP, "model_type": "florence2", "bos_token_id": 0, "eos_token_id": 2,
        "pad_token_id": 1, "ignore_index": -100, "projection_dim": vision["projection_dim"],
        "vocab_size": vocab, "is_encoder_decoder": True, "torch_dtype": dtype,
        "text_config": text_config, "vision_config": vision_config,
    }  # fmt: skip


def _write_bart_tokenizer(
    tokenizer_json: Path, dst: Path, base: int, extra_tokens: Sequence[str] = (), microsoft: int = 0
) -> None:
    """BART's files as Microsoft ships them: the first ``base`` ids, none of Florence-2's added tokens;
    with ``extra_tokens``, as a fine-tune saves them: Florence-2's tokens (below ``microsoft``), then
    its own."""
    spec = _read_json(tokenizer_json)
    vocab = {token: index for token, index in spec["model"]["vocab"].items() if index < base}
    merges = [" ".join(merge) if isinstance(merge, list) else merge for merge in spec["model"]["merges"]]
    kept = microsoft if extra_tokens else base
    spec["added_tokens"] = [token for token in spec["added_tokens"] if token["id"] < kept] + [
        {"id": microsoft + number, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for number, token in enumerate(extra_tokens)
    ]  # fmt: skip
    _write_json(dst / "tokenizer.json", spec)
    _write_json(dst / "vocab.json", vocab)
    (dst / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    _write_json(dst / "tokenizer_config.json", {"model_max_length": 1024})


def _read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
