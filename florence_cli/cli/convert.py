"""``florence convert`` and ``florence make-tiny-model``: checkpoints made or rewritten on disk."""

from __future__ import annotations

import click

from .options import Refusal


@click.command()
@click.argument("source")
@click.argument("destination", type=click.Path(file_okay=False))
@click.option("--allow-pickle", is_flag=True, help="Allow pickled .bin weights (they can run code).")
def convert(source: str, destination: str, allow_pickle: bool) -> None:
    """Convert an original-format (Microsoft) checkpoint SOURCE into a native one at DESTINATION."""
    from pathlib import Path

    from ..checkpoint import (
        ModelLoadError,
        checkpoint_layout,
        console_shielded,
        first_line,
        locate_model,
        quiet_transformers,
    )
    from ..original import OriginalCheckpointError, convert_checkpoint

    quiet_transformers()
    try:
        folder = locate_model(source, allow_pickle=allow_pickle)
        if checkpoint_layout(folder) != "original":
            raise click.ClickException(f"{source} is not an original-format Florence-2 checkpoint")
        with console_shielded():
            converted = convert_checkpoint(folder, Path(destination), allow_pickle=allow_pickle)
    except (ModelLoadError, OriginalCheckpointError) as exc:
        raise Refusal(first_line(exc)) from None
    click.echo(str(converted))


@click.command("make-tiny-model")
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
    from ..checkpoint import quiet_transformers
    from ..testing.tiny import make_tiny_model as build

    quiet_transformers()
    click.echo(str(build(folder, seed=seed, ends_after=ends_after)))
