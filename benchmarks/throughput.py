"""Throughput of ``florence annotate`` against the model card's reference loop, same process, same device.

Builds a random-weight Florence-2 with the real base or large dimensions (nothing is downloaded),
writes N synthetic JPEGs of realistic sizes, then times
  (a) the reference loop: one image at a time, processor → generate → post_process_generation;
  (b) ``Annotator.run`` (batching, shared image features, the exact levers) through the Python API,
checks that both give identical answers, and prints images/s, the ratio (b)/(a), peak RAM and, on
CUDA, peak GPU memory. Random weights make generation lengths arbitrary, so by default both sides
generate exactly ``--new-tokens`` tokens (min_new_tokens = max_new_tokens). ``--lengths free`` lets
answers end where the model ends them instead (the model is tilted towards end-of-sequence so that
lengths vary from image to image, as real answers do); that is where dropping finished images from
the batch pays.

``--levers`` adds one run per lever with that lever off, so each one's share is measured:
per-image matrix products (exact; off = batched products, faster, but a near tie may flip), beam
compaction, decode processes (a lever that is off by default, as on CPU, is turned on), worker-side
resize with device-side normalisation, and (with several tasks) one vision pass per image for all
tasks; then levers that are off by default, to show whether they pay: transformers' static
key/value cache, the decoder compiled with ``torch.compile`` (compile time included), and (CUDA only;
"n/a" elsewhere) decoding steps replayed from CUDA graphs over a static cache (``--cuda-graphs``,
capture time included). ``--levers compaction,products`` runs only the levers whose names hold those
words.

``--counters 8,64`` adds device-independent costs (counters.py): operators dispatched, weight bytes and
key/value-cache bytes read per generated token per image, in a steady decoding step, for the reference
loop and the per-image, batch-invariant and batched modes at each batch size, counted over
``--counter-tokens`` pinned tokens (``-n 0`` prints them alone, without the timed runs).

    python benchmarks/throughput.py --device cpu --size base -n 8 --batch-sizes 8
    python benchmarks/throughput.py --device cpu --size base -n 8 --lengths free --levers compaction
    python benchmarks/throughput.py --device cuda --size large --dtype fp16 -n 256 --batch-sizes 16,32,64
    TRITON_INTERPRET=1 python benchmarks/throughput.py --device cpu --size base -n 0 --counters 8,64
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# benchmarks/counters.py, beside this script
from counters import MODES, cost_table, format_table, pinned_generation

from florence_cli.annotate import Annotator, GenerationSettings, RunConfig, RunSummary
from florence_cli.config import default_workers
from florence_cli.model import FlorenceModel, resolve_dtype
from florence_cli.tasks import resolve_task
from florence_cli.testing.tiny import build_random, tilt_towards_eos

# The generation settings in Microsoft's checkpoints (config.json's text_config), which the model
# card's code answers with; the random model gets them so both sides search as they would for real.
MICROSOFT_GENERATION = {
    "num_beams": 3, "early_stopping": True, "no_repeat_ngram_size": 3, "forced_bos_token_id": 0,
    "forced_eos_token_id": 2,
}  # fmt: skip
IMAGE_SIZES = [(640, 480), (1024, 768), (1920, 1080), (3000, 2000), (4000, 3000), (800, 1200)]


def write_images(folder: Path, count: int, seed: int = 0, processes: int = 1) -> list[Path]:
    """Synthetic photos: smooth colour fields with noise, JPEG-compressed, of realistic sizes
    (written by ``processes`` processes: large JPEGs take a while)."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"photo{i:05d}.jpg", i, seed) for i in range(count)]
    if processes <= 1:
        return [write_image(*job) for job in jobs]
    with ProcessPoolExecutor(processes) as pool:
        return list(pool.map(write_image, *zip(*jobs, strict=True)))


def write_image(path: Path, number: int, seed: int) -> Path:
    rng = np.random.default_rng([seed, number])
    width, height = IMAGE_SIZES[number % len(IMAGE_SIZES)]
    small = rng.integers(0, 256, (height // 64 + 1, width // 64 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
    noisy = np.asarray(image, dtype=np.int16) + rng.integers(-12, 12, (height, width, 3), dtype=np.int16)
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def reset_peak_rss() -> None:
    """Linux: reset the process's peak resident size so each phase reports its own."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def start_phase(device: torch.device) -> float:
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    return time.perf_counter()


def end_phase(device: torch.device, started: float) -> dict:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    figures = {"seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        figures["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return figures


def reference_loop(
    model: FlorenceModel, paths: list[Path], prompts: list[str], generation: dict
) -> tuple[dict[tuple[str, str], str], list[int]]:
    """The model card's code, one image and one task at a time: answers keyed by (file, task token),
    and the number of tokens generated for each."""
    processor, answers, lengths = model.processor, {}, []
    for path in paths:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
        for prompt in prompts:
            inputs = processor(text=prompt, images=image, return_tensors="pt").to(model.device, model.dtype)
            inputs["input_ids"] = inputs["input_ids"].long()
            with torch.inference_mode():
                ids = model.model.generate(**inputs, **generation)
            raw = processor.batch_decode(ids, skip_special_tokens=False)[0]
            processor.post_process_generation(raw, task=prompt, image_size=image.size)
            answers[path.name, prompt] = raw
            lengths.append(ids.shape[1] - 1)  # after the decoder's start token
    return answers, lengths


def florence_run(model: FlorenceModel, images: Path, out: Path, tasks: list[str], batch_size: int,
                 generation: GenerationSettings, workers: int) -> tuple[dict, RunSummary]:  # fmt: skip
    """``Annotator.run`` over the folder: answers keyed by (file, task token), and the run's summary."""
    annotator = Annotator(RunConfig(batch_size=batch_size, generation=generation), model=model)
    summary = annotator.run([str(images)], out, tasks, workers=workers, jsonl=str(out / "answers.jsonl"))
    records = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    return {(r["file"], resolve_task(r["task"]).token): r["raw"] for r in records}, summary


@dataclass(frozen=True)
class StaticCacheSettings(GenerationSettings):
    """The same generation with transformers' static (preallocated) key/value cache."""

    def kwargs(self) -> dict:
        return {**super().kwargs(), "cache_implementation": "static"}


@contextlib.contextmanager
def compiled_decoder(model: FlorenceModel):
    """The language decoder compiled with ``torch.compile`` (dynamic shapes: the batch shrinks as
    images finish) while the block runs; the compile time is part of the measured time."""
    decoder = model.model.model.language_model.decoder
    decoder.compile(dynamic=True)
    try:
        yield
    finally:
        decoder._compiled_call_impl = None  # back to eager (nn.Module.compile keeps it here)


@dataclass
class Variant:
    """One measured way of running: its runs' times add up. A run is (model, tasks, workers)."""

    name: str
    runs: list[tuple[FlorenceModel, list[str], int]]
    generation: GenerationSettings
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    cuda_only: bool = False  # a lever that only means something on a GPU


def variants(args, tasks: list[str], model: FlorenceModel, generation: GenerationSettings) -> list[Variant]:
    """Everything on, then (with ``--levers``) each lever off in turn, then the levers not kept."""
    found = [Variant("all levers", [(model, tasks, args.workers)], generation)]
    if not args.levers:
        return found

    def like(**change) -> FlorenceModel:
        return FlorenceModel(model.model, model.processor, model.device, model.dtype, **change)

    plain, processor_pixels = like(compact_beams=False), like(fast_pixels=False)
    found += [
        Variant("batched products", [(like(products="batched"), tasks, args.workers)], generation),
        Variant("no beam compaction", [(plain, tasks, args.workers)], generation),
        Variant(
            "decode in main process" if args.workers else "1 decode process",
            [(model, tasks, 0 if args.workers else 1)],
            generation,
        ),
        Variant("processor preprocessing", [(processor_pixels, tasks, args.workers)], generation),
    ]
    if len(tasks) > 1:
        found.append(
            Variant("one run per task", [(model, [task], args.workers) for task in tasks], generation)
        )
    static = StaticCacheSettings(**asdict(generation))
    found.append(Variant("+ static KV cache", [(plain, tasks, args.workers)], static))  # fixed shapes
    found.append(Variant("+ compiled decoder", [(model, tasks, args.workers)], generation,
                         lambda: compiled_decoder(model)))  # fmt: skip
    graphed = like(cuda_graphs=True)
    found.append(Variant("+ CUDA graphs", [(graphed, tasks, args.workers)], generation, cuda_only=True))
    words = [] if args.levers == "all" else args.levers.split(",")
    return [found[0]] + [v for v in found[1:] if not words or any(w in v.name for w in words)]


def report(row: dict) -> str:
    line = (
        f"{row['tasks']:<12} batch {row['batch_size']:>3} {row['variant']:<24}: "
        f"reference {row['reference_images_per_s']:.3f} img/s, "
        f"florence {row['florence_images_per_s']:.3f} img/s, ratio {row['speedup']:.2f}x, "
        f"identical answers {row['identical']}/{row['answers']}, "
        f"peak RSS {row['reference_peak_rss_mb']:.0f} / {row['florence_peak_rss_mb']:.0f} MB"
    )
    if "florence_peak_gpu_mb" in row:
        line += f", peak GPU {row['reference_peak_gpu_mb']:.0f} / {row['florence_peak_gpu_mb']:.0f} MB"
    return line


def length_summary(lengths: list[int]) -> str:
    lengths = sorted(lengths)
    middle = lengths[len(lengths) // 2]
    return f"generated tokens per answer: min {lengths[0]}, median {middle}, max {lengths[-1]}"


def print_counters(args, model: FlorenceModel, task: str) -> None:
    batches = [int(b) for b in args.counters.split(",")]
    print(f"# decoding costs per generated token per image ({resolve_task(task).token}; one steady step: "
          "decoder, output layer, beam search, cache updates; vision tower, encoder and the first "
          f"step's cross-attention projections left out), counted over {args.counter_tokens} pinned "
          f"tokens, {model.dtype} weights", flush=True)  # fmt: skip
    generation = pinned_generation(args.counter_tokens, args.num_beams)
    modes = tuple(args.counter_modes.split(","))
    rows = cost_table(model, batches, resolve_task(task).token, generation, modes)
    print("\n".join(format_table(rows)), flush=True)


def timed_rows(args, tasks, loaded, paths, scratch, generation) -> list[dict]:
    """The reference loop, then each variant at each batch size, timed; a printed line and a row each."""
    device = loaded.device
    started = start_phase(device)
    expected, lengths = reference_loop(
        loaded, paths, [resolve_task(t).token for t in tasks], generation.kwargs()
    )
    reference = end_phase(device, started)
    print(f"# reference loop: {length_summary(lengths)}", flush=True)
    rows = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        for variant in variants(args, tasks, loaded, generation):
            if variant.cuda_only and device.type != "cuda":
                print(f"{','.join(tasks):<12} batch {batch_size:>3} {variant.name:<24}: n/a on {device.type}")
                continue
            started, answers = start_phase(device), {}
            with variant.context():
                for i, (model_variant, run_tasks, workers) in enumerate(variant.runs):
                    out = scratch / f"out-{batch_size}-{variant.name.replace(' ', '-')}-{i}"
                    answers |= florence_run(model_variant, scratch / "images", out, run_tasks, batch_size,
                                            variant.generation, workers)[0]  # fmt: skip
            ours = end_phase(device, started)
            same = sum(answers.get(key) == raw for key, raw in expected.items())
            row = {
                "tasks": ",".join(tasks), "batch_size": batch_size, "variant": variant.name,
                "size": args.size, "device": str(device), "dtype": str(loaded.dtype).removeprefix("torch."),
                "images": args.images, "lengths": args.lengths, "answers": len(expected),
                "reference_images_per_s": args.images / reference["seconds"],
                "florence_images_per_s": args.images / ours["seconds"],
                "identical": same, "agreement": same / len(expected),
            }  # fmt: skip
            row["speedup"] = row["florence_images_per_s"] / row["reference_images_per_s"]
            for key in ("peak_rss_mb", "peak_gpu_mb"):
                if key in ours:
                    row[f"reference_{key}"], row[f"florence_{key}"] = reference[key], ours[key]
            rows.append(row)
            print(report(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", choices=["tiny", "base", "large"], default="base")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"])
    parser.add_argument("--tasks", default="OD", help="comma-separated; several run together on each image")
    parser.add_argument("-n", "--images", type=int, default=8)
    parser.add_argument("--batch-sizes", default="8", help="comma-separated")
    parser.add_argument("--new-tokens", type=int, default=150, help="length, or free lengths' limit")
    parser.add_argument("--lengths", choices=["pinned", "free"], default="pinned")
    parser.add_argument("--eos-tilt", type=float, default=1.2, help="free lengths: see tiny.tilt_towards_eos")
    parser.add_argument("--levers", nargs="?", const="all", default=None, metavar="WORDS",
                        help="also run with each lever off in turn (or only those whose name holds "
                        "one of these comma-separated words, e.g. compaction)")  # fmt: skip
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--workers", type=int, help="decode processes (default: as florence annotate's)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument(
        "--counters",
        nargs="?",
        const="8,64",
        metavar="BATCHES",
        help="also count operators and weight bytes per image-token at these batch sizes",
    )
    parser.add_argument("--counter-tokens", type=int, default=5, help="pinned tokens to count over (>= 3)")
    parser.add_argument(
        "--counter-modes", default=",".join(MODES), help="comma-separated, of " + ",".join(MODES)
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    scratch = Path(tempfile.mkdtemp(prefix="florence-bench-"))
    model, processor = build_random(scratch / "tokenizer", args.size)
    model.generation_config.update(**MICROSOFT_GENERATION)
    pinned = args.lengths == "pinned"
    if not pinned:
        tilt_towards_eos(model, args.eos_tilt)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))  # fmt: skip
    dtype = resolve_dtype(args.dtype, device)
    if args.workers is None:
        args.workers = default_workers(device)
    loaded = FlorenceModel(model.to(device, dtype), processor, device, dtype)
    paths = write_images(scratch / "images", args.images)
    exact = args.new_tokens if pinned else None
    generation = GenerationSettings(args.num_beams, args.new_tokens, None, exact)
    tasks = args.tasks.split(",")
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"# {args.size} ({params:.0f}M params), {device}, {dtype}, {args.images} images, "
          f"{args.num_beams} beams, {args.lengths} lengths, {args.new_tokens} new tokens",
          flush=True)  # fmt: skip
    rows = timed_rows(args, tasks, loaded, paths, scratch, generation) if args.images else []
    if args.counters:
        print_counters(args, loaded, tasks[0])
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
