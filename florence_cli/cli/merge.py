"""``florence merge``: a thin Click layer over ``merge.merge``."""

from __future__ import annotations

from pathlib import Path

import click

from ..merge import MergeError, merge


@click.command("merge")
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="A new folder.")
def merge_command(folders: tuple[str, ...], output: str) -> None:
    """Combine the output FOLDERS of `florence annotate --shard I/N` runs into the files one run writes."""
    try:
        summary = merge([Path(f) for f in folders], Path(output))
    except MergeError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(summary.line(), err=True)
