"""The ``florence`` command: a thin Click layer over the Python API.

Subcommands are imported only when called, so ``florence --help`` never loads torch.
"""

from __future__ import annotations

import importlib

import click

from .tasks import TASKS


class Refusal(click.ClickException):
    """A refusal before any work is done (e.g. a model that cannot be loaded): one line, exit status 2."""

    exit_code = 2


class LazyGroup(click.Group):
    """A group whose subcommands live in modules imported on first use."""

    def __init__(self, *args, lazy: dict[str, str], **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx, name):
        if name in self.lazy:
            module, attribute = self.lazy[name].split(":")
            return getattr(importlib.import_module(module, __package__), attribute)
        return super().get_command(ctx, name)


@click.group(
    cls=LazyGroup,
    lazy={
        "annotate": ".cli_annotate:annotate",
        "viz": ".cli_tools:viz",
        "eval": ".cli_tools:eval_command",
        "export": ".cli_tools:export",
        "merge": ".shard:merge_command",
    },
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(package_name="florence-cli")
def main() -> None:
    """Batch annotation of image folders with Microsoft's Florence-2."""


@main.command()
def tasks() -> None:
    """List the Florence-2 tasks, what each writes, and whether it needs --text."""
    width = max(len(name) for name in TASKS)
    for task in TASKS.values():
        output = f"{task.slug}.json (COCO)" if task.writes_coco else f"{task.slug}/<image>.txt"
        needs = f"needs --text ({task.text_input.value})" if task.needs_text else ""
        click.echo(f"{task.name:<{width}}  {task.summary:<40}  {output:<45} {needs}".rstrip())


@main.command()
@click.argument("source")
@click.argument("destination", type=click.Path(file_okay=False))
@click.option("--allow-pickle", is_flag=True, help="Allow pickled .bin weights (they can run code).")
def convert(source: str, destination: str, allow_pickle: bool) -> None:
    """Convert an original-format (Microsoft) checkpoint SOURCE into a native one at DESTINATION."""
    from pathlib import Path

    from .checkpoint import ModelLoadError, checkpoint_layout, console_shielded, first_line, locate_model
    from .original import OriginalCheckpointError, convert_checkpoint

    quiet_libraries(quiet=False)
    try:
        folder = locate_model(source, allow_pickle=allow_pickle)
        if checkpoint_layout(folder) != "original":
            raise click.ClickException(f"{source} is not an original-format Florence-2 checkpoint")
        with console_shielded():
            converted = convert_checkpoint(folder, Path(destination), allow_pickle=allow_pickle)
    except (ModelLoadError, OriginalCheckpointError) as exc:
        raise Refusal(first_line(exc)) from None
    click.echo(str(converted))


@main.command("make-tiny-model")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
@click.option(
    "--ends-after",
    type=click.IntRange(min=0),
    default=12,
    show_default=True,
    help="Answers end soon after this many tokens (a random model never ends one by itself).",
)
def make_tiny_model(folder: str, seed: int, ends_after: int) -> None:
    """Write a tiny random-weight Florence-2 checkpoint (a few MB) for offline smoke tests."""
    from .tiny import make_tiny_model as build

    quiet_libraries(quiet=True)
    click.echo(str(build(folder, seed=seed, ends_after=ends_after)))


def quiet_libraries(quiet: bool) -> None:
    """Keep transformers' per-load progress bars and advice off stderr; stderr is for our progress."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
