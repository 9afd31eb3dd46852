"""The CUDA path in one run on one GPU: does every mode work, how fast is it, does it agree with the
reference loop, and do its answers depend on batching?

Builds a random-weight Florence-2 with the real dimensions (large by default; nothing is downloaded),
writes synthetic JPEGs of realistic sizes, and, in one process on one device:
  1. preflight (about a minute, nothing timed): each variant — per-image, invariant and batched
     products, each without and with CUDA graphs — answers a few images in one batch of 7 and one at a
     time; whether they answered, whether the answers are equal, whether graphs were captured;
  2. times the model card's loop (one image and one task at a time) on the first images;
  3. times ``Annotator.run`` over every image in each variant that passed its preflight: images/s, the
     ratio to the loop, the answers identical to the loop's, peak memory;
  4. (``--equality-batches``, in ``--full``) answers the first images again at each batch size and in
     batches that mix tasks, and counts the answers that are the same in every run.
Random weights never end an answer, so every answer is pinned to ``--new-tokens``. Every figure goes
to ``gpu_check.json`` under ``--out`` (``$OUT`` when set), rewritten after each step, so a run cut
short keeps what it did; ``gpu_check.sh`` also keeps the printed lines in ``gpu_check.log``.

    benchmarks/gpu_check.sh                        # on the GPU machine: about 4 minutes on an H100
    benchmarks/gpu_check.sh --full                 # 256 images, 24 through the loop, 150 tokens, ...
    benchmarks/gpu_check.sh --smoke                # anywhere: the tiny model on the CPU, in seconds
"""

# Triton decides when it is imported whether its kernels are interpreted (on a CPU, the only way they
# run): before torch, whose compiler imports it, and before anything else.
import os
import sys

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# benchmarks/, beside this script
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
from florence_cli.device_errors import describe
from florence_cli.discover import ImageRef
from florence_cli.jobs import WorkItem, parse_requests, plan_jobs
from florence_cli.model import FlorenceModel, resolve_device, resolve_dtype
from florence_cli.testing.tiny import build_random

VARIANTS = ("per-image", "invariant", "batched", "per-image+graphs", "invariant+graphs", "batched+graphs")
# Answers that must not depend on the batch: the others' equality is measured, not required.
BATCH_INDEPENDENT = ("per-image", "invariant")
FIRST_RUN = {"images": 128, "reference_images": 8, "new_tokens": 100,
             "timed": "per-image,invariant,batched,invariant+graphs,batched+graphs",
             "equality_batches": ""}  # fmt: skip
FULL = {"images": 256, "reference_images": 24, "new_tokens": 150, "equality_batches": "1,7,64",
        "timed": "invariant,batched,invariant+graphs,batched+graphs"}  # fmt: skip
# Triton's interpreter runs the invariant kernels on a CPU slowly: few images, every variant.
SMOKE = {"size": "tiny", "device": "cpu", "dtype": "fp16", "images": 4, "reference_images": 2,
         "new_tokens": 6, "batch_size": 4, "preflight_images": 3, "preflight_tokens": 4,
         "timed": ",".join(VARIANTS), "equality_batches": ""}  # fmt: skip


class Results:
    """The figures so far, written to ``gpu_check.json`` under ``folder`` after each step."""

    def __init__(self, folder: Path, settings: dict):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "gpu_check.json"
        self.figures: dict = {"settings": settings, "environment": environment(), "finished": False}

    def put(self, key: str, value, under: str | None = None) -> None:
        (self.figures.setdefault(under, {}) if under else self.figures)[key] = value
        partial = self.path.with_suffix(".json.partial")
        partial.write_text(json.dumps(self.figures, indent=1))
        partial.replace(self.path)


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    results = Results(Path(args.out), vars(args))
    say(f"# figures: {results.path}")
    scratch = Path(tempfile.mkdtemp(prefix="florence-gpu-check-"))
    # Images first: their writer processes fork before CUDA starts in this one.
    paths = write_images(scratch / "images", args.images, processes=os.cpu_count() or 1)
    model = build(args, scratch)
    tasks = args.tasks.split(",")
    params = sum(p.numel() for p in model.model.parameters()) / 1e6
    say(f"# {args.size} ({params:,.1f}M params), {model.device}, {model.dtype}, {args.images} images "
        f"(reference loop on {args.reference_images}), tasks {','.join(tasks)}, {args.num_beams} beams, "
        f"{args.new_tokens} pinned new tokens, batch {args.batch_size}")  # fmt: skip
    working = preflight(args, model, paths, tasks[0], results)
    generation = GenerationSettings(args.num_beams, args.new_tokens, None, args.new_tokens)
    reference = timed_reference(model, paths[: args.reference_images], tasks, generation, results)
    for name in args.timed.split(","):
        if name not in working:
            say(f"{name:<17}: not timed (failed its preflight)")
            continue
        # Popped: its static cache and graphs are freed before the next variant's peak is measured.
        loaded = working.pop(name)
        try:
            figures = time_variant(args, loaded, name, scratch, tasks, generation, reference)
            results.put(name, figures, under="timed")
            if args.equality_batches:
                figures["equality"] = batch_equality(args, loaded, paths, tasks, generation)
        except Exception as exc:  # one variant's failure is a finding; the others are still measured
            figures = {"error": describe(exc)}
            say(f"{name:<17}: FAILED: {figures['error']}")
        results.put(name, figures, under="timed")
    results.put("seconds", time.perf_counter() - started)
    results.put("finished", True)
    say(f"# done in {time.perf_counter() - started:.0f} s")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: " + json.dumps(SMOKE))
    parser.add_argument("--full", action="store_true", help="the full check: " + json.dumps(FULL))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", choices=["tiny", "base", "large"], default="large")
    parser.add_argument("--dtype", default="fp16", choices=["auto", "fp16", "bf16", "fp32"])
    parser.add_argument("--tasks", default="OD,MORE_DETAILED_CAPTION")
    parser.add_argument("-n", "--images", type=int, default=FIRST_RUN["images"])
    parser.add_argument("--reference-images", type=int, default=FIRST_RUN["reference_images"])
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=FIRST_RUN["new_tokens"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--preflight-images", type=int, default=7, help="answered alone and in one batch")
    parser.add_argument("--preflight-tokens", type=int, default=16, help="pinned new tokens in the preflight")
    parser.add_argument(
        "--timed", default=FIRST_RUN["timed"], help="variants to time, of " + ",".join(VARIANTS)
    )
    parser.add_argument("--equality-batches", default=FIRST_RUN["equality_batches"],
                        help="after timing, batch sizes whose answers must agree (e.g. 1,7,64)")  # fmt: skip
    parser.add_argument("--workers", type=int, help="decode processes (default: as florence annotate's)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out", help="where figures go")
    # A preset changes the defaults; options given still win (``--full --timed invariant``).
    preset, _ = parser.parse_known_args()
    for chosen, values in ((preset.full, FULL), (preset.smoke, SMOKE)):
        if chosen:
            parser.set_defaults(**values)
    args = parser.parse_args()
    unknown = set(args.timed.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"--timed: no variant {', '.join(sorted(unknown))} (of {', '.join(VARIANTS)})")
    return args


def say(line: str) -> None:
    print(line, flush=True)


def environment() -> dict:
    import transformers

    found = {"python": sys.version.split()[0], "torch": torch.__version__,
             "transformers": transformers.__version__, "cuda": torch.version.cuda}  # fmt: skip
    try:
        import triton

        found["triton"] = triton.__version__
    except ImportError:
        found["triton"] = None
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name()
    return found


def build(args, scratch: Path) -> FlorenceModel:
    torch.manual_seed(0)
    model, processor = build_random(scratch / "tokenizer", args.size)
    model.generation_config.update(**MICROSOFT_GENERATION)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    return FlorenceModel(model.to(device, dtype), processor, device, dtype, products="batched")


def variant(model: FlorenceModel, name: str) -> FlorenceModel:
    """The same loaded model in the variant ``name`` (products, ``+graphs``)."""
    products, _, graphs = name.partition("+")
    return FlorenceModel(
        model.model, model.processor, model.device, model.dtype, products=products, cuda_graphs=bool(graphs)
    )


def preflight(args, model: FlorenceModel, paths: list[Path], task: str, results: Results) -> dict:
    """Each variant answers the first images in one batch and one at a time; returns those that
    answered."""
    generation = GenerationSettings(args.num_beams, args.preflight_tokens, None, args.preflight_tokens)
    requests = parse_requests([task])
    first = paths[: args.preflight_images]
    decoded = [decode_item(path, plan_jobs(_ref(path), requests)[0], model) for path in first]
    working = {}
    for name in VARIANTS:
        started = time.perf_counter()
        figures, loaded = preflight_variant(model, name, decoded, generation)
        figures["seconds"] = time.perf_counter() - started
        results.put(name, figures, under="preflight")
        if loaded is not None:
            working[name] = loaded
    return working


def preflight_variant(
    model: FlorenceModel, name: str, decoded: list[DecodedImage], generation
) -> tuple[dict, FlorenceModel | None]:
    """The variant's preflight figures, and the variant's model if it answered."""
    try:
        loaded = variant(model, name)
        together = answer_in_batches(loaded, decoded, len(decoded), generation)
        alone = answer_in_batches(loaded, decoded, 1, generation)
    except Exception as exc:  # a variant that cannot run is a finding, not the end of the check
        error = describe(exc)
        say(f"preflight {name:<17}: FAILED: {error}")
        return {"ok": False, "error": error}, None
    same = sum(alone[key] == raw for key, raw in together.items())
    figures = {"ok": True, "answers": len(together), "equal_alone_and_in_a_batch": same}
    graphs = ""
    decoder = loaded.static_decoder
    if decoder is not None:
        figures["graphs_captured"] = len(decoder.graphs)
        captured = f"{len(decoder.graphs)} CUDA graphs captured{'' if decoder.graphs else ' -> NO'}"
        graphs = f"; {captured if decoder.capture else 'graph steps run uncaptured'}"
    required = name.partition("+")[0] in BATCH_INDEPENDENT
    verdict = "yes" if same == len(together) else "NO" if required else "no (batched: allowed)"
    say(f"preflight {name:<17}: answered {len(together)}; equal alone and in a batch of {len(decoded)}: "
        f"{same}/{len(together)} -> {verdict}{graphs}")  # fmt: skip
    return figures, loaded


def memory(figures: dict) -> str:
    if "peak_gpu_mb" in figures:
        return f"peak GPU {figures['peak_gpu_mb']:,.0f} MB"
    return f"peak RAM {figures['peak_rss_mb']:,.0f} MB"


def timed_reference(model: FlorenceModel, paths: list[Path], tasks: list[str], generation, results) -> dict:
    prompts = [f"<{task}>" for task in tasks]
    started = start_phase(model.device)
    answers, _ = reference_loop(model, paths, prompts, generation.kwargs())
    figures = end_phase(model.device, started)
    figures["images"] = len(paths)
    figures["images_per_s"] = len(paths) / figures["seconds"]
    say(f"{'reference loop':<17}: {figures['images_per_s']:8.2f} img/s ({len(paths)} images, "
        f"{figures['seconds']:.0f} s), {memory(figures)}")  # fmt: skip
    results.put("reference", figures)
    return {**figures, "answers": answers}  # (file, task token): raw; not in the JSON


def time_variant(args, model: FlorenceModel, name: str, scratch: Path, tasks, generation, reference) -> dict:
    """Time ``Annotator.run`` over every image, and compare its answers with the reference loop's."""
    workers = args.workers if args.workers is not None else default_workers(model.device)
    out = scratch / f"out-{name}"
    started = start_phase(model.device)
    answers, summary = florence_run(
        model, scratch / "images", out, tasks, args.batch_size, generation, workers
    )
    figures = end_phase(model.device, started)
    figures["images_per_s"] = args.images / figures["seconds"]
    figures["ratio"] = figures["images_per_s"] / reference["images_per_s"]
    expected = reference["answers"]
    figures["identical"] = sum(answers.get(key) == raw for key, raw in expected.items())
    figures["compared"] = len(expected)
    figures["agreement"] = figures["identical"] / len(expected)
    figures["failed_answers"] = args.images * len(tasks) - len(answers)
    failed = figures["failed_answers"]
    failed = f"; {failed} answers FAILED (see {out}/errors.jsonl)" if failed else ""
    stopped = f"; STOPPED: {summary.device_error}" if summary.device_error else ""
    say(f"{name:<17}: {figures['images_per_s']:8.2f} img/s ({args.images} images, "
        f"{figures['seconds']:.0f} s), {figures['ratio']:.1f}x the loop, identical to it "
        f"{figures['identical']}/{len(expected)} ({figures['agreement']:.1%}), {memory(figures)}"
        f"{failed}{stopped}")  # fmt: skip
    if summary.device_error:
        figures["device_error"] = summary.device_error
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
    say(f"{'':<17}  answers equal across {', '.join(runs)}: {same}/{len(compared)} -> {verdict}")
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
