"""What the subcommands share: how a refusal ends them, and keeping libraries' chatter off stderr."""

from __future__ import annotations

import os
import sys

import click


class Refusal(click.ClickException):
    """A refusal before any work is done (e.g. a model that cannot be loaded): one line, exit status 2."""

    exit_code = 2


def quiet_libraries(quiet: bool) -> None:
    """``-q``: no Hub download bars either (transformers' own bars and advice are kept off stderr where
    models load, ``model._loading``), nor the error lines Ray's C++ core writes to stderr as a local Ray
    shuts down (``core_worker.cc … E``; Ray's own failures still reach the user as one line)."""
    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # read when Ray starts its processes


def echo_err(message: str) -> None:
    """One line on stderr, above a progress bar if one is showing."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)
