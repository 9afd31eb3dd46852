"""Stage 1: find the images to annotate, lazily and in a deterministic order."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})


@dataclass(frozen=True)
class ImageRef:
    """One input image: where it is, and the name it carries in the outputs."""

    path: str  # as found (absolute or relative to the working directory)
    name: str  # relative to the input folder it was found in (POSIX separators); outputs use it
    order: tuple  # sort key: position of the input argument, then the path's parts


@dataclass(frozen=True)
class InputError:
    """An input named by the user that cannot be annotated."""

    path: str
    reason: str


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def walk_images(folder: str) -> Iterator[str | InputError]:
    """Image files under ``folder``, recursively, sorted by name at each level; hidden entries skipped.

    A folder that cannot be listed becomes an ``InputError``; the walk goes on.
    """
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        yield InputError(folder, f"cannot read folder: {exc.strerror or exc}")
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            yield from walk_images(entry.path)
        elif is_image_name(entry.name) and entry.is_file():
            yield entry.path


def discover(inputs: Iterable[str], stdin_lines: Iterable[str] = ()) -> Iterator[ImageRef | InputError]:
    """Expand command-line inputs into images, yielding an ``InputError`` for each unusable named path.

    Folders are walked; a file named explicitly must be an image (a non-image named explicitly is an
    error, not silently skipped). ``-`` reads newline-separated paths from ``stdin_lines``. Names are
    relative to the folder given; with several inputs they start with that folder's own name, so two
    folders cannot give the same name. Nothing is buffered: millions of files stream through.
    """
    inputs = list(inputs)
    for position, item in enumerate(inputs):
        prefix = Path(os.path.abspath(item)).name if len(inputs) > 1 and os.path.isdir(item) else ""
        items = (line.rstrip("\r\n") for line in stdin_lines) if item == "-" else [item]
        for path in items:
            if path.strip():
                yield from _expand(path, position, prefix)


def _expand(path: str, position: int, prefix: str) -> Iterator[ImageRef | InputError]:
    if os.path.isdir(path):
        for found in walk_images(path):
            if isinstance(found, InputError):
                yield found
                continue
            name = Path(prefix, os.path.relpath(found, path)).as_posix()
            yield ImageRef(path=found, name=name, order=(position, *Path(name).parts))
    elif not os.path.exists(path):
        yield InputError(path, "no such file or directory")
    elif not is_image_name(path):
        yield InputError(path, "not an image file (expected " + "/".join(sorted(IMAGE_EXTENSIONS)) + ")")
    else:
        name = _file_name(path)
        yield ImageRef(path=path, name=name, order=(position, *Path(name).parts))


def _file_name(path: str) -> str:
    """The output name of a file named directly: its path relative to the working directory when
    inside it (``find . -name '*.jpg'`` keeps its folders), else its absolute path without the root."""
    absolute = os.path.abspath(path)
    relative = os.path.relpath(absolute)
    if relative.startswith(".."):
        relative = os.path.splitdrive(absolute)[1].lstrip("/\\")
    return Path(relative).as_posix()
