"""Memory stays flat in the number of images: stream N paths through the real driver.

Discovery, job planning, the decode worker processes, the journal, the text/JSONL writers and the
final COCO rebuild (an on-disk merge sort) all run for real over N files (hard links to one small
JPEG, so making them is cheap); only the model is replaced by a fixed answer, which keeps the run
to a minute. Prints the driver's resident memory as the run goes; it should level off, not grow
with N. With ``--shards``, the same images also run as WebDataset tar shards (discovery reads their
headers, decode workers their members), four runs in all (files, shards, shards, files), and the
mean throughputs are compared. With ``--s3`` too, the shards are read from a local S3 endpoint (moto's
server, in a process of its own on 127.0.0.1) against the same shards on local disk (shards, S3, S3,
shards; ``--rounds`` repeats the four), and the driver's CPU time per image is compared: the store's
reading must not cost the driver more than 20 % over local shards, nor its memory grow.

    python benchmarks/memory.py -n 100000
    python benchmarks/memory.py -n 100000 --shards 100
    python benchmarks/memory.py -n 100000 --shards 10000 --s3 --rounds 2      # 10,000 shards of 10
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

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


class _NoModel:
    """What the engine asks of a loaded model, for a run with none: a CPU, no limits, per-image products."""

    device = SimpleNamespace(type="cpu")
    preprocessing = SimpleNamespace(check=lambda requests, max_new_tokens: None)
    products = "per-image"
    fallback = None


class FixedAnswers:
    """A batch answerer whose model always answers the same box."""

    resize_spec = ResizeSpec(size=(64, 64))
    batch_size = 16
    model = _NoModel()

    def answer_safely(self, images):
        raw = "</s><s>car<loc_100><loc_200><loc_300><loc_400></s>"
        return [[parse_answer(job.task, raw, i.width, i.height) for job in i.ref.jobs] for i in images]


def make_files(scratch: Path, count: int) -> Path:
    """``count`` JPEG files in folders of 1,000 (hard links to one small JPEG, so making them is cheap)."""
    folder = scratch / "images"
    for i in range(count):
        source = scratch / f"source{i // 50_000}.jpg"  # a file takes at most 65,000 links
        if not source.exists():
            Image.new("RGB", (96, 64), (120, 30, 200)).save(source)
        target = folder / f"{i // 1000:03d}" / f"{i:07d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(source, target)
    return folder


def make_shards(scratch: Path, count: int, shards: int) -> str:
    """The same images as WebDataset shards, as img2dataset writes them (jpg, txt and json per sample);
    returns their brace pattern."""
    image = (scratch / "source0.jpg").read_bytes()
    per_shard = -(-count // shards)
    (scratch / "shards").mkdir()
    for shard in range(shards):
        with tarfile.open(scratch / "shards" / f"{shard:05d}.tar", "w") as tar:
            for i in range(shard * per_shard, min(count, (shard + 1) * per_shard)):
                for extension, data in (("jpg", image), ("txt", b"a caption"), ("json", b'{"width": 96}')):
                    info = tarfile.TarInfo(f"{i:09d}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(scratch / "shards" / f"{{00000..{shards - 1:05d}}}.tar")


def local_s3(shards: Path) -> tuple[subprocess.Popen, dict]:
    """moto's S3 server on a free loopback port, with ``shards`` uploaded to the bucket ``shards``: the
    server's process, and the storage options that reach it."""
    import s3fs

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    while True:  # a benchmark may wait on the server's start
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    options = {"endpoint_url": f"http://127.0.0.1:{port}"}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("shards")
    fs.put(str(shards) + "/", "shards/", recursive=True)
    return server, options


def measure(
    inputs: list[str], out: Path, count: int, workers: int, storage_options: dict | None = None
) -> tuple[float, float]:
    """Run the driver over ``inputs``; print its rate, its CPU time (which a busy machine does not
    inflate as it does the wall time) and its memory as it went; return the rate and the driver's CPU
    seconds per image."""
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            samples.append((time.perf_counter(), rss_mb()))

    threading.Thread(target=sample, daemon=True).start()
    started, cpu = time.perf_counter(), time.process_time()
    before = rss_mb()
    config = RunConfig(
        ModelConfig("fixed-answers"), output=out, workers=workers, storage_options=storage_options
    )
    summary = run(inputs, parse_requests(["OD"]), config, LocalEngine(config, FixedAnswers()))
    done.set()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    coco = json.loads((out / "od.json").read_text())
    assert len(coco["images"]) == count == summary.annotated, summary.line()
    rate = count / seconds
    print(f"{inputs[0]}: {count} images in {seconds:.0f} s ({rate:.0f} images/s)")
    print(f"  driver CPU: {cpu:.1f} s ({1e6 * cpu / count:.0f} us per image; the decode processes' apart)")
    print(f"  driver RSS before the run: {before:.0f} MB")
    for fraction in (0.1, 0.25, 0.5, 0.75, 1.0):
        index = min(len(samples) - 1, int(fraction * (len(samples) - 1)))
        print(f"  at {fraction:>4.0%} of the run: RSS {samples[index][1]:.0f} MB")
    print(f"  peak during the run: {max(s[1] for s in samples):.0f} MB")
    return rate, cpu / count


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", "--images", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--shards", type=int, default=0, help="also run on the images as N WebDataset shards")
    parser.add_argument(
        "--s3", action="store_true", help="with --shards: local shards against the same in S3"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="with --shards: run the four passes this many times"
    )
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="florence-memory-"))
    folder = make_files(scratch, args.images)
    if not args.shards:
        measure([str(folder)], scratch / "out", args.images, args.workers)
    else:  # A, B, B, A: a machine that slows down or speeds up favours neither
        pattern = make_shards(scratch, args.images, args.shards)
        server, options = local_s3(scratch / "shards") if args.s3 else (None, None)
        runs = {"files": ([str(folder)], None), "shards": ([pattern], None)}
        if args.s3:
            runs = {"shards": runs["shards"], "s3": ([f"s3://shards/{Path(pattern).name}"], options)}
        first, second = runs
        results: dict[str, list[tuple[float, float]]] = {first: [], second: []}
        try:
            for number, kind in enumerate((first, second, second, first) * args.rounds):
                inputs, storage_options = runs[kind]
                out = scratch / f"out{number}"
                results[kind].append(measure(inputs, out, args.images, args.workers, storage_options))
        finally:
            if server:
                server.kill()
        rate = {kind: sum(r for r, _ in found) / len(found) for kind, found in results.items()}
        cpu = {kind: sum(c for _, c in found) / len(found) for kind, found in results.items()}
        print(f"mean images/s: {first} {rate[first]:.0f}, {second} {rate[second]:.0f} "
              f"({second} / {first}: {rate[second] / rate[first]:.3f})")  # fmt: skip
        print(f"driver CPU per image: {first} {1e6 * cpu[first]:.0f} us, {second} {1e6 * cpu[second]:.0f} us "
              f"({second} / {first}: {cpu[second] / cpu[first]:.3f})")  # fmt: skip
    shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
