"""``florence annotate``: flags → ``Annotator.run``; domain errors → one-line messages."""

from __future__ import annotations

import sys

import click

from .cli import Refusal, quiet_libraries
from .tasks import TaskError


def _shard(ctx, param, value: str | None):
    from .shard import Shard

    try:
        return Shard.parse(value) if value else None
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _batch_size(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        size = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a whole number") from None
    if size < 1:
        raise click.BadParameter("must be at least 1")
    return size


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "-t", "--task", "tasks", multiple=True, required=True, help="Task to run (repeatable): OD, od or <OD>."
)
@click.option(
    "--text", help="Text input for tasks that need one (phrase, expression, or region x1,y1,x2,y2 in bins)."
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
    "--min-score", type=click.FloatRange(0, 1), default=None, help="Drop instances scored below this."
)
@click.option("-o", "--output", default="florence-out", show_default=True, type=click.Path(file_okay=False))
@click.option(
    "-m",
    "--model",
    default=None,
    help="Hub id or local folder.  [default: mrhendrey/Florence-2-large-ft-safetensors]",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--dtype", type=click.Choice(["auto", "fp16", "bf16", "fp32"]), default="auto", show_default=True
)
@click.option(
    "-b",
    "--batch-size",
    default="8",
    show_default=True,
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
@click.option("--allow-pickle", is_flag=True, help="Allow pickled .bin weights (they can run code).")
@click.option(
    "--batched-products",
    is_flag=True,
    help="Batch the model's matrix products and attention across images: faster, mostly on GPUs, but a "
    "near tie may then be decided otherwise than by the one-image reference (see README).",
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
    help="--engine ray: join this cluster (auto or HOST:PORT), not a local Ray.",
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
    """Annotate images (files, folders, or - for paths on stdin) with Florence-2 tasks."""
    from .annotate import Annotator, GenerationSettings, SettingsMismatch
    from .engine import default_workers
    from .jobs import parse_requests
    from .model import DEFAULT_MODEL, ModelLoadError

    try:  # every usage error comes before any model is loaded
        requests = parse_requests(
            list(flags["tasks"]), flags["text"], flags["text_file"], flags["classes"], flags["ground_from"],
            flags["region"],
        )  # fmt: skip
    except TaskError as exc:
        raise click.UsageError(str(exc)) from None
    batch_size = _batch_size(flags["batch_size"])
    _check_engine_flags(flags)
    generation = GenerationSettings(
        flags["num_beams"], flags["max_new_tokens"], flags["no_repeat_ngram_size"]
    )
    quiet = flags["quiet"]
    quiet_libraries(quiet)
    model = flags["model"] or DEFAULT_MODEL
    settings = (
        flags["device"], flags["dtype"], batch_size, generation, flags["allow_pickle"], flags["min_score"],
        not flags["batched_products"],
    )  # fmt: skip

    def report(failure) -> None:
        where = f"{failure.name} [{failure.task}]" if failure.task else failure.name
        _echo_err(f"error: {where}: {failure.reason}")

    common = {
        "overwrite": flags["overwrite"], "jsonl": flags["jsonl"], "on_error": report, "progress": not quiet,
        "stdin_lines": sys.stdin if "-" in inputs else (), "shard": flags["shard"],
    }  # fmt: skip
    try:
        if flags["engine"] == "ray":
            summary = _run_on_ray(inputs, flags, requests, model, settings, common)
        else:
            annotator = Annotator(model, *settings)
            workers = flags["workers"]
            if workers is None:
                workers = default_workers(annotator.model.device)
            summary = annotator.run(inputs, flags["output"], requests, workers=workers, **common)
    except ModelLoadError as exc:
        raise Refusal(str(exc)) from None
    except SettingsMismatch as exc:
        raise click.UsageError(str(exc)) from None
    if not quiet:
        click.echo(summary.line(), err=True)
    sys.exit(summary.exit_code)


_RAY_FLAGS = ("ray_address", "gpu_workers", "decode_cpus")


def _check_engine_flags(flags: dict) -> None:
    """Ray's flags need --engine ray; --workers (local decode processes) has no meaning there."""
    if flags["engine"] == "local":
        for name in _RAY_FLAGS:
            if flags[name] is not None:
                raise click.UsageError(f"--{name.replace('_', '-')} needs --engine ray")
    elif flags["workers"] is not None:
        raise click.UsageError("--workers is for --engine local; with --engine ray use --decode-cpus")


def _run_on_ray(inputs, flags: dict, requests, model: str, settings: tuple, common: dict):
    """The same run with the model on Ray workers; a missing Ray is one line and exit status 2."""
    try:
        from .ray_engine import ModelSpec, RayEngine, RayEngineError, RayOptions
    except ImportError as exc:
        error = click.ClickException(f"--engine ray needs Ray Data: pip install 'florence-cli[ray]' ({exc})")
        error.exit_code = 2
        raise error from None
    options = RayOptions(flags["ray_address"], flags["gpu_workers"], flags["decode_cpus"])
    try:
        engine = RayEngine(ModelSpec(model, *settings), options)
        return engine.run(inputs, flags["output"], requests, **common)
    except RayEngineError as exc:
        raise click.ClickException(str(exc)) from None


def _echo_err(message: str) -> None:
    try:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
    except ImportError:  # pragma: no cover
        click.echo(message, err=True)
