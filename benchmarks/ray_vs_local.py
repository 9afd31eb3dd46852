"""``--engine ray`` against ``--engine local`` on the same device, in one process.

Writes a random-weight Florence-2 (tiny, or the real base/large dimensions) to disk — Ray's replicas
load it from there, as on a cluster — and N synthetic JPEGs, then annotates them (a) with the local
engine and (b) with the Ray engine (a local Ray started here; one replica per GPU, or one on CPU).
Both generate exactly ``--new-tokens`` tokens. Prints images/s for each and the ratio (b)/(a), twice:
end to end (Ray: including the replicas' start and model load; local: the model is loaded before the
clock starts), and in steady state (from the first finished batch to the last). Checks that both
runs wrote the same files.

    python benchmarks/ray_vs_local.py --device cpu -n 20
    python benchmarks/ray_vs_local.py --device cuda --size large --dtype fp16 -n 512 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import write_images

from florence_cli import runner
from florence_cli.config import GenerationSettings, ModelConfig, RunConfig
from florence_cli.engine import LocalEngine
from florence_cli.jobs import parse_requests
from florence_cli.testing.tiny import build_random


class Clock:
    """Wraps an engine's ``results`` to note when each batch of results reaches the driver."""

    def __init__(self, results):
        self.inner, self.times, self.counts = results, [], []

    def __call__(self, items):
        for results in self.inner(items):
            self.times.append(time.perf_counter())
            self.counts.append(len(results))
            yield results

    def steady(self) -> float:
        """Images/s from the first finished batch to the last."""
        if len(self.times) < 2:
            return float("nan")
        return sum(self.counts[1:]) / (self.times[-1] - self.times[0])


def timed(run, clock: Clock) -> dict:
    started = time.perf_counter()
    summary = run()
    seconds = time.perf_counter() - started
    return {"images": summary.annotated, "end_to_end": summary.annotated / seconds, "steady": clock.steady()}


def files(out: Path) -> dict[str, bytes]:
    found = [p for p in out.rglob("*") if p.is_file() and ".florence" not in p.parts]
    return {str(p.relative_to(out)): p.read_bytes() for p in found}


def run_local(scratch: Path, images: Path, args, config: RunConfig) -> tuple[dict, torch.device]:
    config = replace(config, output=scratch / "local", workers=args.workers)
    engine = LocalEngine(config)
    engine.start()  # the model loads before the clock starts
    clock = engine.results = Clock(engine.results)
    run = lambda: runner.run([str(images)], parse_requests([args.task]), config, engine)  # noqa: E731
    return timed(run, clock), engine.answerer.model.device


def run_ray(scratch: Path, images: Path, args, config: RunConfig) -> dict:
    from florence_cli.ray_engine import RayEngine

    config = replace(config, output=scratch / "ray")
    engine = RayEngine(config)
    clock = engine.results = Clock(engine.results)
    engine.start()  # Ray's own start is not the engine's throughput; the replicas' start is
    return timed(lambda: runner.run([str(images)], parse_requests([args.task]), config, engine), clock)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--size", choices=["tiny", "base", "large"], default="tiny")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"])
    parser.add_argument("--task", default="OD")
    parser.add_argument("-n", "--images", type=int, default=20)
    parser.add_argument("-b", "--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="local decode processes")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="florence-ray-bench-"))
    model, processor = build_random(scratch / "model", args.size)
    model.save_pretrained(scratch / "model")
    processor.save_pretrained(scratch / "model")
    images = scratch / "images"
    write_images(images, args.images)
    generation = GenerationSettings(args.num_beams, args.new_tokens, None, args.new_tokens)
    model_config = ModelConfig(str(scratch / "model"), args.device, args.dtype)
    config = RunConfig(model_config, batch_size=args.batch_size, generation=generation)

    local, device = run_local(scratch, images, args, config)
    ray = run_ray(scratch, images, args, config)
    same = files(scratch / "local") == files(scratch / "ray")
    figures = {"size": args.size, "device": str(device), "batch_size": args.batch_size, "local": local,
               "ray": ray, "ratio_end_to_end": ray["end_to_end"] / local["end_to_end"],
               "ratio_steady": ray["steady"] / local["steady"], "same_files": same}  # fmt: skip
    threads = torch.get_num_threads()
    print(f"# {args.size}, {device}, {args.images} images, batch {args.batch_size}, {args.task}, "
          f"{args.num_beams} beams, {args.new_tokens} tokens, {threads} torch threads")  # fmt: skip
    for name in ("end_to_end", "steady"):
        print(f"{name:<11} local {local[name]:.3f} img/s, ray {ray[name]:.3f} img/s, "
              f"ratio {figures['ratio_' + name]:.2f}")  # fmt: skip
    print(f"same files: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
