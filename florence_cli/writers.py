"""Stage 6: write answers — text files and JSONL as they finish (COCO files: ``formats.coco``).

Every final file is written to a temporary name and renamed into place, so a reader never sees a
half-written file and a crash never leaves one.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

from .tasks import Task


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give: the user's umask applies (mkstemp's 0600 would not)


@contextmanager
def atomic_writer(path: Path, mode: str = "w"):
    """Open a temporary file beside ``path``; on success rename it over ``path``.

    The temporary name is short (an image name near the file system's 255-byte limit still fits), and
    the file gets the mode a plain ``open`` would give under the user's umask.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".florence-", suffix=".tmp")
    try:
        os.fchmod(handle, FILE_MODE)
        with os.fdopen(handle, mode, encoding="utf-8" if "b" not in mode else None) as file:
            yield file
        os.replace(temporary, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(temporary)
        raise


def text_path(output: Path, task: Task, name: str) -> Path:
    """Where a text task's answer for image ``name`` goes: ``OUT/<task>/<name>.txt``."""
    return output / task.slug / f"{name}.txt"


def write_text(output: Path, task: Task, name: str, text: str) -> None:
    with atomic_writer(text_path(output, task, name)) as file:
        file.write(text)


class StdoutClosed(Exception):
    """Standard output was closed by its reader (``florence annotate … --jsonl - | head``)."""


class JsonlSink:
    """One JSON object per line, flushed as each answer finishes; ``-`` is standard output."""

    def __init__(self, target: str):
        self.target = target
        self._own = target != "-"
        self._file: IO[str] = open(target, "a", encoding="utf-8") if self._own else sys.stdout  # noqa: SIM115

    def write(self, records: Iterable[dict]) -> None:
        """Write and flush; a reader that closed standard output raises ``StdoutClosed``."""
        try:
            for record in records:
                self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._file.flush()
        except BrokenPipeError:
            if self._own:
                raise
            raise StdoutClosed from None

    def close(self) -> None:
        if self._own:
            self._file.close()
