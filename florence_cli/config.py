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

from .tasks import OptionError

DEFAULT_MODEL = "mrhendrey/Florence-2-large-ft-safetensors"
AUTO_CUDA_BATCH = 64  # --batch-size auto starts here on CUDA, halving on out-of-memory
AUTO_CPU_BATCH = 8
# How the language model's matrix products and attention meet the batch (see README, "Products"):
# per-image: in the one-image reference's shapes (bit-identical to it on CPU); invariant: batched, in
# kernels whose rounding ignores the batch (CUDA); batched: stock batched kernels (fastest; a near tie
# may go another way with other images beside it); auto: the device's default (``products_on``).
PRODUCTS = ("auto", "per-image", "invariant", "batched")
DTYPES = ("auto", "fp16", "bf16", "fp32")


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
    """Which checkpoint, where, in which precision, how its products meet the batch (``PRODUCTS``), and
    whether decoding steps replay CUDA graphs over a static cache (``cuda_graphs``; on CPU the same
    steps run uncaptured)."""

    name: str = DEFAULT_MODEL  # a Hub id or a local folder
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: str = "auto"  # auto (fp16 on CUDA, fp32 on CPU), fp16, bf16, fp32
    allow_pickle: bool = False
    products: str = "auto"
    cuda_graphs: bool = False

    def products_on(self, device_type: str) -> str:
        """``products`` on a device of this type, ``auto`` resolved."""
        return resolve_products(self.products, device_type)


def resolve_device(device: str, cuda_available: bool) -> str:
    """``auto`` is CUDA when available, else the CPU; any other name is kept (the model layer checks it)."""
    if device != "auto":
        return device
    return "cuda" if cuda_available else "cpu"


def resolve_dtype(dtype: str, device_type: str) -> str:
    """``auto`` is fp16 on CUDA and fp32 on CPU; an unknown dtype is a ``ValueError``."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (use {', '.join(DTYPES)})")
    if dtype != "auto":
        return dtype
    return "fp16" if device_type == "cuda" else "fp32"


def resolve_products(products: str, device_type: str) -> str:
    """``auto`` is per-image on CPU (bit-identical to the reference there) and invariant on CUDA (batched,
    answers still independent of the batch); an unknown mode is a ``ValueError``."""
    if products not in PRODUCTS:
        raise ValueError(f"unknown products {products!r} (use {', '.join(PRODUCTS)})")
    if products != "auto":
        return products
    return "invariant" if device_type == "cuda" else "per-image"


@dataclass(frozen=True)
class CaptionOptions:
    """Caption files for training sets (``captions``): sidecars and Hugging Face's ``metadata.jsonl``."""

    sidecar: bool = False  # a caption file beside each image
    sidecar_dir: Path | None = None  # ... or at the image's output name under this folder
    extension: str = ".txt"
    naming: str = "stem"  # "stem": a.jpg -> a.txt; "full": a.jpg -> a.jpg.txt
    task: str | None = None  # the text task the captions come from (None: the only one)
    prefix: str = ""  # trigger words before the caption (caption files only; not the journal)
    suffix: str = ""
    overwrite: bool = False  # replace caption files florence-cli did not write, or that were edited
    hf_metadata: bool = False  # metadata.jsonl in the input folder

    @property
    def sidecars(self) -> bool:
        return self.sidecar or self.sidecar_dir is not None

    @property
    def enabled(self) -> bool:
        return self.sidecars or self.hf_metadata


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
    # Also stream the answers earlier runs made for these inputs (at the end); None: for standard output
    # yes (a pipeline should see every answer), for a file no (it holds them from those runs).
    jsonl_all: bool | None = None
    parquet: bool = False  # also write OUT/<task>.parquet (rebuilt from the journal at the end)
    per_shard: bool = False  # write each tar shard's answers to OUT/<shard>.<task>.parquet once it is done
    upload: str | None = None  # a URL the output folder's finished files are put under (``storage``)
    storage_options: dict | None = None  # keyword arguments of every fsspec file system (``storage``)
    progress: bool = False
    shard: Shard | None = None
    captions: CaptionOptions = field(default_factory=CaptionOptions)

    def settings(self) -> dict:
        """What the output folder's answers depend on besides the inputs and tasks (it refuses others)."""
        settings = {
            "model": self.model.name, "generation": self.generation.kwargs(), "min_score": self.min_score,
        }  # fmt: skip
        # Answers independent of the batch (per-image, invariant) differ between those modes only in
        # rounding, as between devices and dtypes, which a folder does not record either; batch-dependent
        # answers are kept apart ("exact": false, as folders made before the modes had it).
        if self.model.products == "batched":
            settings["exact"] = False
        if self.model.cuda_graphs:  # the static cache's attention sums over other lengths
            settings["cuda_graphs"] = True
        return {**settings, "shard": str(self.shard)} if self.shard else settings

    @property
    def streams_earlier(self) -> bool:
        """Whether the JSONL stream carries earlier runs' answers too (``jsonl_all``, ``None`` resolved)."""
        return self.jsonl_all if self.jsonl_all is not None else self.jsonl == "-"

    def check(self) -> None:
        """Refuse (``OptionError``) a batch size or a number of decode processes that cannot be."""
        size = self.batch_size
        if size != "auto" and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise OptionError(f"`batch_size` is a whole number from 1, or auto; got {size!r}")
        if self.workers is not None and self.workers < 0:
            raise OptionError(f"`workers` is a number of decode processes, 0 or more; got {self.workers}")

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
