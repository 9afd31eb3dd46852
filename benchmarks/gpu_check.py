"""The CUDA path in one run on one GPU (issue 17): speed, agreement with the reference, and answers
that do not depend on batching.

Builds a random-weight Florence-2 with the real dimensions (large by default; nothing is
downloaded), writes synthetic JPEGs of realistic sizes, and, in one process on one device:
  1. times the model card's loop (one image and one task at a time) on the first images;
  2. times ``Annotator.run`` over every image in each products mode (batch-invariant and batched by
     default; a mode this checkout lacks prints n/a), and counts its answers identical to the
     reference loop's;
  3. answers the first images again at each batch size (1, 7, 64 by default) and in batches that mix
     tasks (every other image has its tasks in the other order), and counts the answers that are the
     same in every run, per mode;
and prints images/s, the ratio to the reference loop, the agreement, and peak GPU memory (peak RAM
on a CPU). Random weights never end an answer, so every answer is pinned to ``--new-tokens``.

    benchmarks/gpu_check.sh                        # on the GPU machine: large, fp16, 256 images
    python benchmarks/gpu_check.py --smoke         # anywhere: tiny model on the CPU, in fp16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# benchmarks/, beside this script
from counters import Unavailable, products_model
from throughput import (
    MICROSOFT_GENERATION,
    end_phase,
    florence_run,
    reference_loop,
    start_phase,
    write_images,
)

from florence_cli.answer import BatchAnswerer
from florence_cli.config import GenerationSettings, RunConfig, default_workers
from florence_cli.decode import DecodedImage, decode_image
from florence_cli.discover import ImageRef
from florence_cli.jobs import WorkItem, parse_requests, plan_jobs
from florence_cli.model import FlorenceModel, resolve_device, resolve_dtype
from florence_cli.testing.tiny import build_random

SMOKE = {"size": "tiny", "device": "cpu", "dtype": "fp16", "images": 6, "reference_images": 3,
         "new_tokens": 8, "batch_size": 4, "equality_batches": "1,2,4"}  # fmt: skip


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="florence-gpu-check-"))
    # Images first: their writer processes fork before CUDA starts in this one.
    paths = write_images(scratch / "images", args.images, processes=os.cpu_count() or 1)
    model = build(args, scratch)
    tasks = args.tasks.split(",")
    generation = GenerationSettings(args.num_beams, args.new_tokens, None, args.new_tokens)
    params = sum(p.numel() for p in model.model.parameters()) / 1e6
    print(f"# {args.size} ({params:,.1f}M params), {model.device}, {model.dtype}, {args.images} images "
          f"(reference loop on {args.reference_images}), tasks {','.join(tasks)}, {args.num_beams} beams, "
          f"{args.new_tokens} pinned new tokens, batch {args.batch_size}", flush=True)  # fmt: skip
    results = {"settings": vars(args), "modes": {}}
    results["reference"] = timed_reference(model, paths[: args.reference_images], tasks, generation)
    for mode in args.modes.split(","):
        results["modes"][mode] = check_mode(
            args, model, mode, scratch, tasks, generation, results["reference"]
        )
    print(f"# done in {time.perf_counter() - started:.0f} s", flush=True)
    if args.json:
        del results["reference"]["answers"]
        Path(args.json).write_text(json.dumps(results, indent=1))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: " + json.dumps(SMOKE))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", choices=["tiny", "base", "large"], default="large")
    parser.add_argument("--dtype", default="fp16", choices=["auto", "fp16", "bf16", "fp32"])
    parser.add_argument("--tasks", default="OD,MORE_DETAILED_CAPTION")
    parser.add_argument("-n", "--images", type=int, default=256)
    parser.add_argument("--reference-images", type=int, default=24)
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--modes", default="invariant,batched", help="products modes to time and check")
    parser.add_argument("--equality-batches", default="1,7,64", help="batch sizes whose answers must agree")
    parser.add_argument("--workers", type=int, help="decode processes (default: as florence annotate's)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    return args


def build(args, scratch: Path) -> FlorenceModel:
    torch.manual_seed(0)
    model, processor = build_random(scratch / "tokenizer", args.size)
    model.generation_config.update(**MICROSOFT_GENERATION)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    return FlorenceModel(model.to(device, dtype), processor, device, dtype)


def memory(figures: dict) -> str:
    if "peak_gpu_mb" in figures:
        return f"peak GPU {figures['peak_gpu_mb']:,.0f} MB"
    return f"peak RAM {figures['peak_rss_mb']:,.0f} MB"


def timed_reference(model: FlorenceModel, paths: list[Path], tasks: list[str], generation) -> dict:
    prompts = [f"<{task}>" for task in tasks]
    started = start_phase(model.device)
    answers, _ = reference_loop(model, paths, prompts, generation.kwargs())
    figures = end_phase(model.device, started)
    figures["images_per_s"] = len(paths) / figures["seconds"]
    figures["answers"] = answers  # (file, task token): raw; left out of --json
    print(f"reference loop : {figures['images_per_s']:8.2f} img/s ({len(paths)} images, "
          f"{figures['seconds']:.0f} s), {memory(figures)}", flush=True)  # fmt: skip
    return figures


def check_mode(args, model: FlorenceModel, mode: str, scratch: Path, tasks, generation, reference) -> dict:
    """Time the mode over every image, compare with the reference, then across batch sizes."""
    try:
        variant = products_model(model, mode)
    except Unavailable as exc:
        print(f"{mode:<15}: n/a ({exc})", flush=True)
        return {"missing": str(exc)}
    workers = args.workers if args.workers is not None else default_workers(model.device)
    started = start_phase(model.device)
    answers = florence_run(
        variant, scratch / "images", scratch / f"out-{mode}", tasks, args.batch_size, generation, workers
    )
    figures = end_phase(model.device, started)
    failed = args.images * len(tasks) - len(answers)
    if failed:  # the figures would mean nothing
        sys.exit(f"{mode}: {failed} answers failed (see {scratch}/out-{mode}/errors.jsonl)")
    figures["images_per_s"] = args.images / figures["seconds"]
    figures["ratio"] = figures["images_per_s"] / reference["images_per_s"]
    expected = reference["answers"]
    figures["identical"] = sum(answers.get(key) == raw for key, raw in expected.items())
    share = figures["identical"] / len(expected)
    print(f"{mode:<15}: {figures['images_per_s']:8.2f} img/s ({args.images} images, "
          f"{figures['seconds']:.0f} s), {figures['ratio']:.1f}x the reference, identical to it "
          f"{figures['identical']}/{len(expected)} ({share:.1%}), {memory(figures)}", flush=True)  # fmt: skip
    figures["equality"] = batch_equality(
        args, variant, sorted((scratch / "images").iterdir()), tasks, generation
    )
    return figures


def batch_equality(args, model: FlorenceModel, paths: list[Path], tasks: list[str], generation) -> dict:
    """Answers of the first images at each batch size and in mixed-task batches: how many (image,
    task) answers are the same in every run."""
    sizes = [int(b) for b in args.equality_batches.split(",")]
    largest = max(sizes)
    requests = parse_requests(tasks)
    decoded = [decode_item(path, plan_jobs(_ref(path), requests)[0], model) for path in paths[:largest]]
    runs = {}
    for size in sizes:
        # A few batches of each size (batch 1: a few images), the largest once.
        count = min(largest, max(4, 3 * size))
        runs[f"batch {size}"] = answer_in_batches(model, decoded[:count], size, generation)
    mixed = [item if i % 2 == 0 else swapped(item) for i, item in enumerate(decoded)]
    runs["mixed tasks"] = answer_in_batches(model, mixed, largest, generation)
    seen: dict[tuple[str, str], set[str]] = {}
    for answers in runs.values():
        for key, raw in answers.items():
            seen.setdefault(key, set()).add(raw)
    compared = {key: raws for key, raws in seen.items() if sum(key in a for a in runs.values()) > 1}
    same = sum(len(raws) == 1 for raws in compared.values())
    verdict = "yes" if same == len(compared) else "NO"
    print(
        f"{'':<15}  answers equal across {', '.join(runs)}: {same}/{len(compared)} -> {verdict}", flush=True
    )
    return {"runs": list(runs), "compared": len(compared), "identical": same}


def _ref(path: Path) -> ImageRef:
    return ImageRef(path=str(path), name=path.name, order=(path.name,))


def decode_item(path: Path, jobs, model: FlorenceModel) -> DecodedImage:
    ref = _ref(path)
    item = WorkItem(ref.path, ref.name, ref.order, tuple(jobs))
    return DecodedImage(item, *decode_image(str(path), model.resize_spec))


def swapped(image: DecodedImage) -> DecodedImage:
    """The same image with its jobs in the other order, so that a batch mixes tasks at each position."""
    ref = image.ref
    item = WorkItem(ref.path, ref.name, ref.order, tuple(reversed(ref.jobs)))
    return DecodedImage(item, image.width, image.height, image.pixels)


def answer_in_batches(model: FlorenceModel, images: list[DecodedImage], size: int, generation) -> dict:
    answerer = BatchAnswerer(model, RunConfig(batch_size=size, generation=generation))
    found = {}
    for start in range(0, len(images), size):
        batch = images[start : start + size]
        for image, answers in zip(batch, answerer.answer(batch), strict=True):
            found |= {(image.ref.name, answer.task.name): answer.raw for answer in answers}
    return found


if __name__ == "__main__":
    main()
