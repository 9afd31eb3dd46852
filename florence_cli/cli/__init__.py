"""The ``florence`` command: a thin Click layer over the Python API.

Subcommands live in modules imported only when called; their one-line help is written here, so
``florence --help`` imports neither torch nor numpy nor PIL.
"""

from __future__ import annotations

import importlib
import sys

import click

from ..tasks import TASKS

# name -> (module:attribute, the one line `florence --help` shows)
SUBCOMMANDS = {
    "annotate": (".annotate:annotate", "Annotate images: files, folders, or - for paths on stdin."),
    "convert": (".convert:convert", "Convert an original-format (Microsoft) checkpoint into a native one."),
    "eval": (".tools:eval_command", "Score a florence-cli COCO file against COCO ground truth."),
    "export": (".tools:export", "Convert a COCO file to YOLO, Label Studio or Pascal VOC."),
    "make-tiny-model": (".convert:make_tiny_model", "Write a tiny random-weight checkpoint for smoke tests."),
    "merge": (".merge:merge_command", "Combine the output folders of --shard runs into one run's files."),
    "viz": (".tools:viz", "Draw boxes, polygons and OCR quads of a COCO file on its images."),
}  # fmt: skip


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use, and listed without importing them; a usage
    error is one line, as every other error is (Click's own takes four)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as error:
            where = f" (see {error.ctx.command_path} --help)" if error.ctx else ""
            click.echo(f"Error: {error.format_message()}{where}", err=True)
            sys.exit(error.exit_code)
        except click.ClickException as error:
            error.show()
            sys.exit(error.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), *SUBCOMMANDS])

    def get_command(self, ctx, name):
        if name in SUBCOMMANDS:
            module, attribute = SUBCOMMANDS[name][0].split(":")
            return getattr(importlib.import_module(module, __package__), attribute)
        return super().get_command(ctx, name)

    def format_commands(self, ctx, formatter) -> None:
        def short_help(name: str) -> str:
            return SUBCOMMANDS[name][1] if name in SUBCOMMANDS else self.commands[name].get_short_help_str(80)

        rows = [(name, short_help(name)) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
