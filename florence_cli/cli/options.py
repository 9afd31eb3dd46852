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
    models load, ``model._loading``)."""
    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def quiet_native_stderr() -> None:
    """``-q`` with Ray: Ray's C++ core writes its log lines (``core_worker.cc … E``) to file descriptor 2
    itself, past Python's logging, and its own switch (``RAY_BACKEND_LOG_LEVEL``) prints a line of its
    own in every process. So descriptor 2 goes nowhere, and Python's ``sys.stderr`` — every line this
    command writes, Ray's failures included — keeps the terminal on a copy of it."""
    kept = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    sys.stderr.flush()
    sys.stderr = os.fdopen(kept, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")


def echo_err(message: str) -> None:
    """One line on stderr, above a progress bar if one is showing."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)
