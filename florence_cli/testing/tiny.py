"""Tiny random-weight Florence-2 checkpoints for offline tests and smoke runs.

The layout is the real one (native transformers format, Microsoft's special tokens in
Microsoft's order, ``<image>`` last); only the sizes are small and the weights random.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..original import IMAGE_TOKEN, microsoft_added_tokens
from ..postconfig import post_processor_config

# Words the tiny tokenizer learns: the task prompts plus a few labels, some of them non-ASCII
# so that tests can see the model emit them.
_CORPUS = [
    "What is the text in the image?", "What is the text in the image, with regions?",
    "What does the image describe?", "Describe in detail what is shown in the image.",
    "Describe with a paragraph what is shown in the image.",
    "Locate the objects with category name in the image.",
    "Locate the objects in the image, with their descriptions.",
    "Locate the region proposals in the image.", "Locate the phrases in the caption:",
    "in the image with mask", "What is the polygon mask of region", "What is the region",
    "What does the region describe?", "What text is in the region?",
    "a car a person a dog a cat a traffic light a tree a red house on the street",
    "café naïve straße 東京 😀 señor", "0123456789,.:;!?-",
]  # fmt: skip


def build_tokenizer(vocab_size: int = 400, base_vocab: int | None = None):
    """A small byte-level BPE tokenizer with BART's specials and Florence-2's added tokens.

    ``base_vocab`` pads the base vocabulary with unused entries to that size (BART's is 50,265), so
    that token ids and the output layer have their real sizes.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import BartTokenizer

    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(
        _CORPUS * 4,
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        show_progress=False,
    )
    model = trainer._tokenizer.model
    vocab = dict(sorted(trainer.get_vocab().items(), key=lambda item: item[1]))
    for number in range(len(vocab), (base_vocab or 0) - 1):
        vocab[f"unused{number}"] = number
    vocab["<mask>"] = len(vocab)  # BART keeps <mask> as the last base-vocabulary entry
    merges = [tuple(merge.split(" ")) for merge in _merges_of(model)]
    tokenizer = BartTokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": microsoft_added_tokens()})
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False
    )
    return tokenizer


def _with_image_token(tokenizer, folder: Path):
    """Reload ``tokenizer`` so that it names ``<image>`` as its image token (as processors expect)."""
    from transformers import BartTokenizer

    tokenizer.save_pretrained(folder)
    return BartTokenizer.from_pretrained(
        folder, extra_special_tokens={"image_token": IMAGE_TOKEN}, trust_remote_code=False
    )


def build_processor(tokenizer_folder: Path, image_size: int = 128, base_vocab: int | None = None):
    """A Florence-2 processor whose images are ``image_size`` pixels square."""
    from transformers import CLIPImageProcessor, Florence2Processor

    image_processor = CLIPImageProcessor(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=3,  # bicubic, as Florence-2
        do_center_crop=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_convert_rgb=True,
    )
    # DaViT downsamples by 32; one extra token carries the temporal (whole-image) feature.
    image_processor.image_seq_length = (image_size // 32) ** 2 + 1
    tokenizer = _with_image_token(build_tokenizer(base_vocab=base_vocab), tokenizer_folder)
    return Florence2Processor(
        image_processor=image_processor, tokenizer=tokenizer, post_processor_config=post_processor_config()
    )


@dataclass(frozen=True)
class Size:
    """Dimensions of a Florence-2 model: the real base and large ones, and a tiny one for tests."""

    image_size: int
    base_vocab: int | None
    depths: tuple[int, ...]
    embed_dim: tuple[int, ...]
    heads: tuple[int, ...]  # vision heads and groups per stage
    window_size: int
    d_model: int
    layers: int  # encoder and decoder each
    text_heads: int
    ffn: int


SIZES = {
    "tiny": Size(128, None, (1, 1, 1, 1), (8, 16, 32, 64), (1, 2, 2, 4), 2, 32, 2, 2, 64),
    "base": Size(768, 50265, (1, 1, 9, 1), (128, 256, 512, 1024), (4, 8, 16, 32), 12, 768, 6, 12, 3072),
    "large": Size(768, 50265, (1, 1, 9, 1), (256, 512, 1024, 2048), (8, 16, 32, 64), 12, 1024, 12, 16, 4096),
}


def build_config(vocab_size: int, image_token_id: int, size: Size = SIZES["tiny"]):
    """A Florence-2 config with the real architecture at the given size."""
    from transformers import BartConfig, Florence2Config, Florence2VisionConfig

    vision = Florence2VisionConfig(
        depths=list(size.depths),
        embed_dim=list(size.embed_dim),
        num_heads=list(size.heads),
        num_groups=list(size.heads),
        window_size=size.window_size,
        projection_dim=size.d_model,
        drop_path_rate=0.0,
    )
    text = BartConfig(
        vocab_size=vocab_size,
        d_model=size.d_model,
        encoder_layers=size.layers,
        decoder_layers=size.layers,
        encoder_attention_heads=size.text_heads,
        decoder_attention_heads=size.text_heads,
        encoder_ffn_dim=size.ffn,
        decoder_ffn_dim=size.ffn,
        max_position_embeddings=1024 if size.base_vocab else 1100,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=2,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        scale_embedding=False,
    )
    return Florence2Config(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=image_token_id
    )


def build_model(config, seed: int = 0, std: float = 0.3):
    """Seeded random weights; text-side weights widened so that answers depend on the image."""
    import torch
    from transformers import Florence2ForConditionalGeneration

    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("model.vision_tower") or param.dim() < 2:
                continue
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


def tilt_towards_eos(model, strength: float, seed: int = 0) -> None:
    """Make the end-of-sequence token likelier by ``strength`` (in units of the random logits' spread),
    so that a random model's answers end at varied lengths, as real ones do, instead of all running
    to the token limit. Benchmarks and tests of length-dependent batching use it."""
    import torch

    decoder = model.model.language_model.decoder
    bias = decoder.layers[-1].final_layer_norm.bias
    direction = torch.randn(bias.shape, generator=torch.Generator().manual_seed(seed))
    direction /= direction.norm()
    eos = model.config.text_config.eos_token_id
    with torch.no_grad():
        spread = float(model.lm_head.weight.std()) * bias.numel() ** 0.5  # std of a logit over the vocabulary
        # The last layer's output gains a fixed component, and the EOS row of the output embedding
        # points along it. That row is also the input embedding of the decoder's start token (EOS in
        # Florence-2), so the first position's embedding takes the change back out: otherwise the
        # start token itself would push the first step to end the answer at once.
        tilt = strength * spread * direction
        bias += direction.to(bias.dtype)
        model.lm_head.weight[eos] += tilt.to(model.lm_head.weight.dtype)
        decoder.embed_positions.weight[decoder.embed_positions.offset] -= tilt.to(bias.dtype)


def build_random(folder: str | Path, size: str | Size = "tiny", seed: int = 0):
    """A seeded random-weight model and its processor at ``size`` (a name in ``SIZES``, or dimensions;
    tokenizer files go to ``folder``)."""
    dims = SIZES[size] if isinstance(size, str) else size
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    processor = build_processor(folder, image_size=dims.image_size, base_vocab=dims.base_vocab)
    tokenizer = processor.tokenizer
    config = build_config(vocab_size=len(tokenizer), image_token_id=tokenizer.image_token_id, size=dims)
    model = build_model(config, seed=seed)
    model.generation_config.num_beams = 3
    return model, processor


def make_tiny_model(folder: str | Path, seed: int = 0, ends_after: int | None = None) -> Path:
    """Write a tiny native Florence-2 checkpoint (model + processor, a few MB) to ``folder``.

    A random model never ends an answer by itself: each runs to the token limit. ``ends_after`` makes
    the end of sequence likelier with every token past that many (generation's own exponential length
    penalty, kept in the checkpoint's generation config, so the reference loop applies it too), so
    smoke runs take seconds.
    """
    model, processor = build_random(folder, "tiny", seed)
    if ends_after is not None:
        model.generation_config.exponential_decay_length_penalty = (ends_after, 1.25)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)


def _merges_of(bpe_model) -> list[str]:
    import json

    return [" ".join(m) if isinstance(m, list) else m for m in json.loads(bpe_model.__getstate__())["merges"]]
