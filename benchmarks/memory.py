"""Memory stays flat in the number of images: stream N paths through the real driver.

Discovery, job planning, the decode worker processes, the journal, the text/JSONL writers and the
final COCO rebuild (an on-disk merge sort) all run for real over N files (hard links to one small
JPEG, so making them is cheap); only the model is replaced by a fixed answer, which keeps the run
to a minute. Prints the driver's resident memory as the run goes; it should level off, not grow
with N.

    python benchmarks/memory.py -n 100000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from florence_cli.config import ModelConfig, RunConfig
from florence_cli.decode import ResizeSpec
from florence_cli.engine import LocalEngine
from florence_cli.jobs import parse_requests
from florence_cli.parse import parse_answer
from florence_cli.runner import run


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class FixedAnswers:
    """A batch answerer whose model always answers the same box."""

    resize_spec = ResizeSpec(size=(64, 64))
    batch_size = 16

    def answer_safely(self, images):
        raw = "</s><s>car<loc_100><loc_200><loc_300><loc_400></s>"
        return [[parse_answer(job.task, raw, i.width, i.height) for job in i.ref.jobs] for i in images]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", "--images", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="florence-memory-"))
    folder = scratch / "images"
    for i in range(args.images):
        source = scratch / f"source{i // 50_000}.jpg"  # a file takes at most 65,000 links
        if not source.exists():
            Image.new("RGB", (96, 64), (120, 30, 200)).save(source)
        target = folder / f"{i // 1000:03d}" / f"{i:07d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(source, target)
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            samples.append((time.perf_counter(), rss_mb()))

    threading.Thread(target=sample, daemon=True).start()
    started = time.perf_counter()
    before = rss_mb()
    config = RunConfig(ModelConfig("fixed-answers"), output=scratch / "out")
    summary = run([str(folder)], parse_requests(["OD"]), config, LocalEngine(FixedAnswers, args.workers))
    done.set()
    seconds = time.perf_counter() - started
    coco = json.loads((scratch / "out" / "od.json").read_text())
    assert len(coco["images"]) == args.images == summary.annotated, summary.line()
    rate = args.images / seconds
    print(f"{args.images} images in {seconds:.0f} s ({rate:.0f} images/s); driver RSS before {before:.0f} MB")
    for fraction in (0.1, 0.25, 0.5, 0.75, 1.0):
        index = min(len(samples) - 1, int(fraction * (len(samples) - 1)))
        print(f"  at {fraction:>4.0%} of the run: RSS {samples[index][1]:.0f} MB")
    print(f"  peak during the run: {max(s[1] for s in samples):.0f} MB")


if __name__ == "__main__":
    main()
