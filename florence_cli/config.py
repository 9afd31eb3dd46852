"""What a run is asked to do, besides its inputs and tasks: the one place for defaults and "auto" rules.

``ModelConfig`` names the checkpoint and how it computes; ``RunConfig`` adds how a run answers and
writes. The CLI, ``Annotator``, the Ray engine and shards all build from them; ``settings`` is what an
output folder records, so that answers made one way are never mixed with answers made another.
Imports no torch.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_MODEL = "mrhendrey/Florence-2-large-ft-safetensors"
AUTO_CUDA_BATCH = 64  # --batch-size auto starts here on CUDA, halving on out-of-memory
AUTO_CPU_BATCH = 8


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


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based): a deterministic share of the images, by name."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``I/N`` with ``0 <= I < N``; raises ``ValueError`` with a message for the user."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"--shard is I/N, e.g. 0/4; got {text!r}") from None
        if not 0 <= index < count:
            raise ValueError(f"--shard I/N needs 0 <= I < N; got {text!r}")
        return cls(index, count)

    def takes(self, name: str) -> bool:
        """Whether the image (or named input) ``name`` belongs to this shard: a hash of the name alone,
        so a file added or removed never moves another image between shards."""
        digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint, where, in which precision, whether its kernels run in the reference's
    per-image shapes (``exact``; off batches them: faster, but a near tie may go another way), and
    whether decoding steps replay CUDA graphs over a static cache (``cuda_graphs``; on CPU the same
    steps run uncaptured)."""

    name: str = DEFAULT_MODEL  # a Hub id or a local folder
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: str = "auto"  # auto (fp16 on CUDA, fp32 on CPU), fp16, bf16, fp32
    allow_pickle: bool = False
    exact: bool = True
    cuda_graphs: bool = False


@dataclass(frozen=True)
class RunConfig:
    """A run: its model, how it answers (batch size, generation, score floor) and how it writes."""

    model: ModelConfig = field(default_factory=ModelConfig)
    output: Path = Path("florence-out")
    batch_size: int | str = AUTO_CPU_BATCH  # or "auto"
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    min_score: float | None = None
    workers: int | None = None  # decode processes; None: the device's default (``decode_workers``)
    overwrite: bool = False
    jsonl: str | None = None  # also stream answers here ("-": standard output)
    progress: bool = False
    shard: Shard | None = None

    def settings(self) -> dict:
        """What the output folder's answers depend on besides the inputs and tasks (it refuses others)."""
        settings = {
            "model": self.model.name, "generation": self.generation.kwargs(), "min_score": self.min_score,
        }  # fmt: skip
        if not self.model.exact:
            settings["exact"] = False
        if self.model.cuda_graphs:  # the static cache's attention sums over other lengths
            settings["cuda_graphs"] = True
        return {**settings, "shard": str(self.shard)} if self.shard else settings

    def batch_size_on(self, device_type: str) -> int:
        """Images per batch: a number as it is; ``auto`` starts high on CUDA (halved on out-of-memory)."""
        if self.batch_size != "auto":
            return int(self.batch_size)
        return AUTO_CUDA_BATCH if device_type == "cuda" else AUTO_CPU_BATCH

    def decode_workers(self, device_type: str) -> int:
        """Decode processes: as asked, else on CUDA CPUs − 1 (at most 8) to keep the GPU fed; on CPU
        none, as the model's threads use every core and a decode process only competes with them (on
        2 cores, `<OD>` ran 3 to 20 % faster without one)."""
        if self.workers is not None:
            return self.workers
        return default_workers(device_type)


def default_workers(device) -> int:
    """The decode processes a run on ``device`` (a type such as ``"cuda"``, or a torch device) uses
    unless told otherwise."""
    kind = getattr(device, "type", device)
    return 0 if kind == "cpu" else max(0, min(8, (os.cpu_count() or 1) - 1))
