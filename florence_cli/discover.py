"""Stage 1: find the images to annotate, lazily and in a deterministic order.

Every image gets one output name, and every name one image: a file reached twice (named twice, through
a folder and directly, through a link) is annotated once, a folder reached again through a link loop
is not walked again, and a second file that would take a name already given is refused. A file is
its path with links resolved (hard links are files of their own, as their names are).
"""

from __future__ import annotations

import hashlib
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
    order: tuple  # sort key: the name's parts, so outputs list images as a sorted folder walk does


@dataclass(frozen=True)
class InputError:
    """An input that cannot be annotated; ``path`` is printable (see ``printable``)."""

    path: str
    reason: str


@dataclass(frozen=True)
class Duplicate:
    """A file already found (under this name or another): it is annotated once, under the first."""

    path: str


def name_order(name: str) -> tuple[str, ...]:
    """The sort key of an output name: its parts, compared one by one (a sorted folder walk's order)."""
    return tuple(name.split("/"))


def printable(path: str) -> str:
    """``path`` as one printable line: bytes that are not UTF-8 as ``\\xNN``, control characters escaped."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(repr(c)[1:-1] if not c.isprintable() else c for c in text)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def discover(
    inputs: Iterable[str], stdin_lines: Iterable[str] = ()
) -> Iterator[ImageRef | InputError | Duplicate]:
    """Expand command-line inputs into images, yielding an ``InputError`` for each unusable one.

    Folders are walked (sorted, recursive, hidden entries skipped, non-images ignored); a file named
    explicitly must be an image. ``-`` reads newline-separated paths from ``stdin_lines``. With one
    folder, names are relative to it; with several inputs each folder's name comes first (as much of
    its path as tells it from the other folders), and files named directly are named by their path
    from the working directory. Nothing is buffered: millions of files stream through.
    """
    inputs = list(inputs)
    prefixes = _folder_prefixes(inputs) if len(inputs) > 1 else {}
    seen = _Seen()
    for item in inputs:
        items = (line.rstrip("\r\n") for line in stdin_lines) if item == "-" else [item]
        for path in items:
            if path.strip():
                yield from _expand(path, prefixes.get(item, ""), seen)


class _Seen:
    """What discovery has given out: folders walked, files and names (8-byte digests, to stay small)."""

    def __init__(self):
        self.folders: set[tuple[int, int]] = set()
        self.files: set[bytes] = set()  # real paths
        self.names: set[bytes] = set()

    def claim(self, path: str, name: str, real: str) -> ImageRef | InputError | Duplicate:
        file = short_digest(os.fsencode(real))
        if file in self.files:
            return Duplicate(printable(path))
        try:
            digest = short_digest(name.encode("utf-8"))
        except UnicodeEncodeError:
            return InputError(printable(path), "file name is not valid UTF-8; rename it to annotate it")
        if digest in self.names:
            return InputError(printable(path), f"its output name {name!r} is taken by another file")
        self.files.add(file)
        self.names.add(digest)
        return ImageRef(path=path, name=name, order=name_order(name))

    def first_walk(self, folder: str) -> bool:
        """Whether ``folder`` is walked for the first time (a link loop leads back to one walked)."""
        stat = os.stat(folder)
        identity = (stat.st_dev, stat.st_ino)
        if identity in self.folders:
            return False
        self.folders.add(identity)
        return True


def short_digest(data: bytes) -> bytes:
    """8 bytes that tell ``data`` from any other in a set of millions (sets of them stay small)."""
    return hashlib.blake2b(data, digest_size=8).digest()


def _expand(path: str, prefix: str, seen: _Seen) -> Iterator[ImageRef | InputError | Duplicate]:
    if not os.path.exists(path):
        yield InputError(printable(path), "no such file or directory")
    elif os.path.isdir(path):
        for found in _walk_images(path, os.path.realpath(path), seen):
            if isinstance(found, InputError):
                yield found
            else:
                file, real = found
                yield seen.claim(file, Path(prefix, os.path.relpath(file, path)).as_posix(), real)
    elif not is_image_name(path):
        expected = "/".join(sorted(IMAGE_EXTENSIONS))
        yield InputError(printable(path), f"not an image file (expected {expected})")
    else:
        yield seen.claim(path, _file_name(path), os.path.realpath(path))


def _walk_images(folder: str, real: str, seen: _Seen) -> Iterator[tuple[str, str] | InputError]:
    """Image files under ``folder`` (whose links resolve to ``real``) with their real paths, sorted by
    name at each level; hidden entries, non-images and folders already walked (a link loop) are
    skipped. A folder that cannot be listed becomes an ``InputError``; the walk goes on."""
    try:
        if not seen.first_walk(folder):
            return
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        yield InputError(printable(folder), f"cannot read folder: {_reason(exc)}")
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            is_folder = entry.is_dir()
            if not is_folder and not (is_image_name(entry.name) and entry.is_file()):
                if is_image_name(entry.name) and entry.is_symlink():
                    os.stat(entry.path)  # a dangling or looping link: say why
                continue
            target = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real, entry.name)
        except OSError as exc:  # a looping link; an image's is worth a line, a folder's is skipped
            if is_image_name(entry.name):
                yield InputError(printable(entry.path), f"cannot read: {_reason(exc)}")
            continue
        if is_folder:
            yield from _walk_images(entry.path, target, seen)
        else:
            yield entry.path, target


def _folder_prefixes(inputs: list[str]) -> dict[str, str]:
    """Each folder input's name prefix: the fewest last parts of its absolute path that no other folder
    input ends with (``a/img`` and ``b/img`` stay apart; the same folder twice gets one prefix)."""
    folders = {item: Path(os.path.abspath(item)).parts[1:] for item in inputs if os.path.isdir(item)}
    distinct = set(folders.values())
    prefixes = {}
    for item, parts in folders.items():
        depth = 1
        while depth < len(parts) and any(
            other != parts and other[-depth:] == parts[-depth:] for other in distinct
        ):
            depth += 1
        prefixes[item] = Path(*parts[-depth:]).as_posix() if parts else ""
    return prefixes


def _file_name(path: str) -> str:
    """The output name of a file named directly: its path relative to the working directory when
    inside it (``find . -name '*.jpg'`` keeps its folders), else its absolute path without the root."""
    absolute = os.path.abspath(path)
    relative = os.path.relpath(absolute)
    if relative.startswith(".."):
        relative = os.path.splitdrive(absolute)[1].lstrip("/\\")
    return Path(relative).as_posix()


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
