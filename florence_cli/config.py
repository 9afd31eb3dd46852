"""Settings that decide answers, and so the output folder they may be written to. Imports no torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GenerationSettings:
    """Generation flags; ``None`` leaves the checkpoint's own generation config in charge."""

    num_beams: int | None = 3
    max_new_tokens: int | None = 1024
    no_repeat_ngram_size: int | None = None
    min_new_tokens: int | None = None  # benchmarks pin generation lengths with it

    def kwargs(self) -> dict:
        flags = {k: v for k, v in asdict(self).items() if v is not None}
        return {"do_sample": False, **flags}


AUTO_CUDA_BATCH = 64  # --batch-size auto starts here on CUDA, halving on out-of-memory
AUTO_CPU_BATCH = 8


def auto_batch_size(batch_size: int | str, on_cuda: bool) -> int:
    """Images per batch: a number as it is; ``auto`` starts high on CUDA (halved on out-of-memory)."""
    if batch_size != "auto":
        return int(batch_size)
    return AUTO_CUDA_BATCH if on_cuda else AUTO_CPU_BATCH


def output_settings(
    model_name: str,
    generation: GenerationSettings,
    min_score: float | None,
    exact: bool,
    shard: str | None = None,
) -> dict:
    """What an output folder's answers depend on besides the inputs and tasks: a folder holds answers
    made one way only (another shard's folder is refused too)."""
    settings = {"model": model_name, "generation": generation.kwargs(), "min_score": min_score}
    if not exact:
        settings["exact"] = False
    return {**settings, "shard": shard} if shard else settings
