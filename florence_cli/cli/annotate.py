"""``florence annotate``: flags → requests, a ``RunConfig`` and an engine → ``runner.run``; library errors
→ one-line messages in the flags' names."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
from dataclasses import replace
from importlib import import_module
from pathlib import Path

import click

from ..config import PRODUCTS
from ..discover import printable
from ..tasks import OptionError, TaskError, worded
from .options import Refusal, echo_err, quiet_libraries, quiet_native_stderr


def _shard(ctx, param, value: str | None):
    from ..config import Shard

    try:
        return Shard.parse(value) if value else None
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _batch_size(ctx, param, value: str) -> int | str:
    if value == "auto":
        return value
    try:
        size = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a whole number or auto") from None
    if size < 1:
        raise click.BadParameter(f"must be at least 1, got {size}")
    return size


def _min_score(ctx, param, value: float | None) -> float | None:
    if value is not None and math.isnan(value):
        raise click.BadParameter("must be a number from 0 to 1, got nan")
    return value


def _storage_options(ctx, param, value: str | None) -> dict | None:
    if value is None:
        return None
    try:
        options = json.loads(value)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}") from None
    if not isinstance(options, dict):
        raise click.BadParameter("a JSON object of keyword arguments, e.g. '{\"anon\": true}'")
    return options


def _device(ctx, param, value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise click.BadParameter(f"{value!r} is not one of auto, cpu, cuda, cuda:N")
    return value


EXIT_STATUS = """Exit status: 0 all done; 1 some images failed; 2 refused before any image was read (usage,
missing input or model, a checkpoint that is not Florence-2 or is broken, an output folder that cannot be
used); 3 the output folder could not be written mid-run; 4 the device failed mid-run (a kernel that cannot
compile or launch, a CUDA error); 130 Ctrl-C; 141 standard output closed; 143 SIGTERM. After 3, 4 and the
signals, the same command resumes."""


@click.command(epilog=EXIT_STATUS)
@click.argument("inputs", nargs=-1)
@click.option("-t", "--task", "tasks", multiple=True, help="Task to run (repeatable): OD, od or <OD>.")
@click.option(
    "--prompt",
    "prompts",
    multiple=True,
    metavar="TEXT",
    help="A prompt sent as written, answered as text (repeatable): fine-tuned captioners' own prompts, "
    "e.g. '<GENERATE_TAGS>'. Written to OUT/prompt-<slug>/.",
)
@click.option(
    "--text",
    "texts",
    multiple=True,
    metavar="[TASK=]TEXT",
    help="Text input for the tasks that need one (phrase, expression, or region x1,y1,x2,y2 in bins); "
    "with several such tasks, one each: --text TASK=TEXT (repeatable).",
)
@click.option(
    "--text-file",
    type=click.Path(dir_okay=False),
    help="Per-image text inputs: JSONL {file, text} or CSV file,text (paths relative or absolute).",
)
@click.option("--classes", help="OPEN_VOCABULARY_DETECTION: one query per class, e.g. 'car,person'.")
@click.option(
    "--ground-from", help="Ground each image's own answer of this caption task, e.g. MORE_DETAILED_CAPTION."
)
@click.option(
    "--region", help="Region tasks: x1,y1,x2,y2 in pixels of each image (instead of bins in --text)."
)
@click.option(
    "--min-score",
    type=click.FloatRange(0, 1),
    default=None,
    callback=_min_score,
    help="Drop instances scored below this.",
)
@click.option(
    "-o",
    "--output",
    default="florence-out",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Output folder, or a URL (s3://…) that finished files are uploaded to.",
)
@click.option(
    "-m",
    "--model",
    default=None,
    help="Hub id or local folder.  [default: mrhendrey/Florence-2-large-ft-safetensors]",
)
@click.option(
    "--device", default="auto", show_default=True, callback=_device, help="auto, cpu, cuda or cuda:N."
)
@click.option(
    "--dtype", type=click.Choice(["auto", "fp16", "bf16", "fp32"]), default="auto", show_default=True
)
@click.option(
    "-b",
    "--batch-size",
    default="8",
    show_default=True,
    callback=_batch_size,
    help="Images per batch, or auto (CUDA: start at 64, halve on out-of-memory).",
)
@click.option("--num-beams", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option(
    "--no-repeat-ngram-size",
    type=click.IntRange(min=0),
    default=None,
    help="Override the checkpoint's no_repeat_ngram_size (original checkpoints: 3).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="Decode processes (default: CPUs - 1 with CUDA, none on CPU; 0: none).",
)
@click.option(
    "--overwrite", is_flag=True, help="Start over instead of resuming earlier work in the output folder."
)
@click.option(
    "--jsonl", default=None, help="Also write one JSON object per image and task to PATH (- for stdout)."
)
@click.option(
    "--jsonl-all/--jsonl-new",
    default=None,
    help="With --jsonl: also stream the answers earlier runs made for these inputs, after the new ones "
    "(default: yes for -, no for a file, which holds them already).",
)
@click.option(
    "--from-parquet",
    "path_list",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="Also annotate the images a Parquet (or .csv) file lists in --path-column (paths relative to "
    "FILE's folder, or absolute).",
)
@click.option("--path-column", metavar="COL", help="--from-parquet: its column of paths [default: path].")
@click.option("--key-column", metavar="COL", help="--from-parquet: name each image by this column.")
@click.option(
    "--parquet", is_flag=True, help="Also write OUT/<task>.parquet, a row per image and task (needs pyarrow)."
)
@click.option(
    "--per-shard",
    is_flag=True,
    help="Write each tar shard's answers to OUT/<shard>.<task>.parquet as soon as the shard is done.",
)
@click.option(
    "--storage-options",
    metavar="JSON",
    callback=_storage_options,
    help='fsspec options for URL inputs and outputs, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'.',
)
@click.option("--allow-pickle", is_flag=True, help="Allow pickled .bin weights (they can run code).")
@click.option(
    "--products",
    type=click.Choice(PRODUCTS),
    default="auto",
    show_default=True,
    help="How the model's matrix products and attention meet the batch: per-image (bit-identical to the "
    "one-image reference), invariant (batched; answers independent of the batch; CUDA), batched "
    "(fastest; a near tie may depend on the images beside it); auto: per-image on CPU, invariant on "
    "CUDA, or batched where its kernels fail their check before the first image (see README).",
)
@click.option("--batched-products", is_flag=True, help="Short for --products batched.")
@click.option(
    "--sidecar", is_flag=True, help="Write each image's caption beside it: imgs/a.jpg -> imgs/a.txt."
)
@click.option(
    "--sidecar-dir",
    type=click.Path(file_okay=False),
    help="Write the captions under this folder instead, in the images' tree (the image folder is untouched).",
)
@click.option(
    "--caption-extension", default=".txt", show_default=True, help="Extension of the caption files."
)
@click.option(
    "--sidecar-naming",
    type=click.Choice(["stem", "full"]),
    default="stem",
    show_default=True,
    help="stem: a.jpg -> a.txt; full: a.jpg -> a.jpg.txt (a.jpg and a.png may then share a folder).",
)
@click.option("--sidecar-task", help="With several text tasks: the one the captions come from.")
@click.option("--prefix", default="", help="Text before each caption in caption files, e.g. 'ohwx person, '.")
@click.option("--suffix", default="", help="Text after each caption in caption files.")
@click.option(
    "--overwrite-captions",
    is_flag=True,
    help="Replace caption files florence-cli did not write, or that were edited since (kept otherwise).",
)
@click.option(
    "--hf-metadata",
    is_flag=True,
    help="Write metadata.jsonl into the input folder, for datasets.load_dataset('imagefolder', ...).",
)
@click.option(
    "--cuda-graphs",
    is_flag=True,
    help="Replay decoding steps from CUDA graphs over a static key/value cache (fewer kernel launches; "
    "on CPU the same steps run uncaptured). Works with every --products mode; its attention sums over "
    "a fixed length, so outside invariant products a near tie may be decided otherwise (see "
    "docs/performance.md).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
@click.option(
    "--shard",
    metavar="I/N",
    callback=_shard,
    help="Annotate only shard I of N (0-based), e.g. 3/8; see florence merge.",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="Run the model in this process, or on Ray (every GPU of this machine or of a cluster).",
)
@click.option(
    "--ray-address",
    metavar="ADDRESS",
    help="--engine ray: join this cluster (auto or HOST:PORT), with this machine's Ray auth token if it "
    "has one (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token), not a local Ray.",
)
@click.option(
    "--gpu-workers", type=click.IntRange(min=1), help="--engine ray: model replicas (default: one per GPU)."
)
@click.option(
    "--decode-cpus",
    type=click.IntRange(min=1),
    help="--engine ray: decode tasks at once (default: spare CPUs).",
)
def annotate(inputs: tuple[str, ...], **flags) -> None:
    """Annotate images (files, folders, WebDataset .tar/.tar.gz shards or patterns of them such as
    'shards/{00000..00099}.tar', URLs of any of them such as 's3://bucket/shards/{00000..00099}.tar',
    webdataset's 'pipe:COMMAND', or - for paths on stdin) with Florence-2 tasks; `florence tasks` lists
    them. The same command resumes a stopped run.

    \b
    Examples:
      florence annotate imgs -t OD -t CAPTION -o out      # out/od.json (COCO), out/caption/*.txt
      florence annotate imgs -t OD -m ./my-model          # a local checkpoint
      florence annotate imgs -t MORE_DETAILED_CAPTION --sidecar --prefix 'ohwx, '   # for training
      florence annotate imgs -t CAPTION_TO_PHRASE_GROUNDING --text 'a red house'
      florence annotate 'shards/{00000..00099}.tar' -t CAPTION --parquet -o out
      (cd imgs && find . -newer ../last-run | florence annotate - -t OD -o ../out)  # adds new files
      florence annotate imgs -t CAPTION --jsonl - -q | jq -r .result  # answers as a stream
    """
    from ..interrupts import Interrupted, interruptible

    try:
        with interruptible():
            summary = _annotate(inputs, flags)
    except Interrupted as exc:  # before any image was read: nothing to finish
        echo_err("interrupted before any image was read")
        sys.exit(128 + exc.signum)
    if summary.stopped_by == signal.SIGPIPE:
        _silence_stdout()
    stopped = summary.output_error or summary.device_error
    if stopped or (summary.stopped_by and summary.stopped_by != signal.SIGPIPE):
        echo_err(summary.line())  # how far it got is worth saying even with -q
    elif not flags["quiet"]:
        echo_err(summary.line())
    for path in summary.kept_captions:
        echo_err(f"kept {printable(path)}: not written by florence-cli, or edited since")
    if summary.damaged_journal_lines:
        echo_err(
            f"note: skipped {summary.damaged_journal_lines} damaged line(s) of the journal; "
            "the answers on them are done again"
        )
    sys.exit(summary.exit_code)


def _annotate(inputs: tuple[str, ...], flags: dict):
    """Flags into requests and a ``RunConfig``, the run through ``runner.run`` (whose preflight refuses,
    before any image is read, what the flags alone cannot tell), library errors into one line each."""
    from ..checkpoint import ModelLoadError
    from ..engine import EngineError
    from ..jobs import parse_requests, split_texts
    from ..outdir import OutputError
    from ..runner import run
    from ..storage import StorageError

    try:
        requests = parse_requests(
            list(flags["tasks"]), split_texts(list(flags["texts"])), flags["text_file"], flags["classes"],
            flags["ground_from"], flags["region"], list(flags["prompts"]),
        )  # fmt: skip
        config = replace(_config(flags), captions=_caption_options(flags))
        engine = _engine(flags, config)
        stdin_lines = _stdin_lines(inputs)
        inputs = _with_path_list(inputs, flags)
        quiet_libraries(flags["quiet"])
        return run(inputs, requests, config, engine, stdin_lines, _report, _note)
    except OptionError as exc:
        raise click.UsageError(exc.worded(FLAGS)) from None
    except TaskError as exc:
        raise click.UsageError(str(exc)) from None
    except (ModelLoadError, OutputError, EngineError, ImportError, StorageError) as exc:
        raise Refusal(str(exc)) from None


# Options as the library names them in its messages (``OptionError``), and as this command spells them.
FLAGS = {
    "tasks": "-t", "prompts": "--prompt", "text": "--text", "region": "--region",
    "ground_from": "--ground-from", "batch_size": "--batch-size", "workers": "--workers",
    "generation.max_new_tokens": "--max-new-tokens", "captions.sidecar": "--sidecar",
    "captions.sidecar_dir": "--sidecar-dir", "captions.extension": "--caption-extension",
    "captions.naming": "--sidecar-naming", "captions.task": "--sidecar-task", "captions.prefix": "--prefix",
    "captions.suffix": "--suffix", "captions.overwrite": "--overwrite-captions",
    "captions.hf_metadata": "--hf-metadata",
}  # fmt: skip


def _report(failure) -> None:
    """An image that failed: one line on stderr as it happens."""
    where = f"{printable(failure.name)} [{failure.task}]" if failure.task else printable(failure.name)
    echo_err(f"error: {where}: {printable(worded(failure.reason, FLAGS))}")


def _note(note: str) -> None:
    """Something the user should know before the run goes on (auto products' fallback)."""
    echo_err(f"note: {note}")


def _engine(flags: dict, config):
    """The engine the flags ask for: this process, or Ray (whose flags need it, and which needs Ray)."""
    if flags["engine"] == "local":
        for name in _RAY_FLAGS:
            if flags[name] is not None:
                raise click.UsageError(f"--{name.replace('_', '-')} needs --engine ray")
        from ..engine import LocalEngine

        return LocalEngine(config)
    if flags["workers"] is not None:
        raise click.UsageError("--workers is for --engine local; with --engine ray use --decode-cpus")
    try:
        ray_engine = import_module("..ray_engine", __package__)
    except ImportError as exc:
        raise Refusal(f"--engine ray needs Ray Data: pip install 'florence-cli[ray]' ({exc})") from None
    if flags["quiet"]:
        quiet_native_stderr()
    options = ray_engine.RayOptions(flags["ray_address"], flags["gpu_workers"], flags["decode_cpus"])
    return ray_engine.RayEngine(config, options)


def _config(flags: dict):
    """The run the flags ask for."""
    from ..config import DEFAULT_MODEL, GenerationSettings, ModelConfig, RunConfig

    products = flags["products"]
    if flags["batched_products"]:
        if products not in ("auto", "batched"):
            raise click.UsageError(f"--batched-products contradicts --products {products}")
        products = "batched"
    model = ModelConfig(
        name=flags["model"] or DEFAULT_MODEL, device=flags["device"], dtype=flags["dtype"],
        allow_pickle=flags["allow_pickle"], products=products, cuda_graphs=flags["cuda_graphs"],
    )  # fmt: skip
    generation = GenerationSettings(
        num_beams=flags["num_beams"], max_new_tokens=flags["max_new_tokens"],
        no_repeat_ngram_size=flags["no_repeat_ngram_size"],
    )  # fmt: skip
    output, upload = _output(flags["output"])
    return RunConfig(
        model=model, output=output, batch_size=flags["batch_size"], generation=generation,
        min_score=flags["min_score"], workers=flags["workers"], overwrite=flags["overwrite"],
        jsonl=flags["jsonl"], jsonl_all=flags["jsonl_all"], parquet=flags["parquet"],
        progress=not flags["quiet"], shard=flags["shard"], per_shard=flags["per_shard"], upload=upload,
        storage_options=flags["storage_options"],
    )  # fmt: skip


def _output(output: str) -> tuple[Path, str | None]:
    """The output folder, and the URL its finished files go to when ``-o`` is one: the folder is then a
    local one of that URL's own (``output_cache``), where the journal stays, so the same command
    resumes."""
    from ..storage import is_url, output_cache

    return (output_cache(output), output) if is_url(output) else (Path(output), None)


def _caption_options(flags: dict):
    """The caption files the flags ask for (``TaskError`` for an extension that cannot be one)."""
    from ..captions import check_extension
    from ..config import CaptionOptions

    sidecar_dir = Path(flags["sidecar_dir"]) if flags["sidecar_dir"] else None
    extension = check_extension(flags["caption_extension"])
    return CaptionOptions(
        sidecar=flags["sidecar"], sidecar_dir=sidecar_dir, extension=extension,
        naming=flags["sidecar_naming"], task=flags["sidecar_task"], prefix=flags["prefix"],
        suffix=flags["suffix"], overwrite=flags["overwrite_captions"], hf_metadata=flags["hf_metadata"],
    )  # fmt: skip


def _stdin_lines(inputs: tuple[str, ...]):
    """Paths on standard input for ``-`` (as the file system spells them, bytes that are not UTF-8
    too); every other input must exist, or be a pattern that names something that does."""
    from ..discover import expand_pattern
    from ..storage import is_url

    for item in inputs:
        if is_url(item):  # checked as it is read: a missing object is its own error line, not a refusal
            continue
        if item != "-" and not any(os.path.lexists(path) for path in expand_pattern(item)):
            raise click.UsageError(f"{printable(item)}: no such file or folder")
    if "-" not in inputs:
        return ()
    if sys.stdin is None or sys.stdin.closed:
        raise click.UsageError("- reads image paths from standard input, but standard input is closed")
    return (os.fsdecode(line) for line in sys.stdin.buffer)


def _with_path_list(inputs: tuple[str, ...], flags: dict) -> list:
    """The inputs, and the list of ``--from-parquet`` (checked: it opens, it has the columns); refuses
    a run with neither, and the list's flags without a list."""
    from ..pathlist import PathList, PathListError

    if not flags["path_list"]:
        for name in ("path_column", "key_column"):
            if flags[name]:
                raise click.UsageError(f"--{name.replace('_', '-')} needs --from-parquet")
        if not inputs:
            raise click.UsageError("nothing to annotate: give INPUT... or --from-parquet FILE")
        return list(inputs)
    paths = PathList(flags["path_list"], flags["path_column"] or "path", flags["key_column"])
    try:
        paths.check()
    except PathListError as exc:
        raise click.UsageError(str(exc)) from None
    return [*inputs, paths]


def _silence_stdout() -> None:
    """Standard output's reader is gone: send what Python still flushes at exit nowhere, quietly."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


_RAY_FLAGS = ("ray_address", "gpu_workers", "decode_cpus")
