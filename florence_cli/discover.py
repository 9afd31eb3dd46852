"""Stage 1: find the images to annotate, lazily and in a deterministic order.

Every image gets one output name, and every name one image: a file reached twice (named twice, through
a folder and directly, through a link) is annotated once, a folder reached again through a link loop
is not walked again, and a second file that would take a name already given is refused. A file is
its path with links resolved (hard links are files of their own, as their names are).

A ``.tar`` input is a WebDataset shard (``tarshards``): each sample's image is named ``<shard>/<key>``,
where the shard is named as a file would be, less ``.tar``. An input that does not exist but is a
pattern — ``shards/{00000..00099}.tar``, ``shards/*.tar`` — is expanded here, with no shell. A
``PathList`` input is a Parquet or CSV list of paths (``pathlist``).
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import storage
from .pathlist import PathList, PathListError
from .shardlisting import ShardListing
from .storage import StorageError, identity_from, identity_of, is_pipe, is_url, object_name
from .tarshards import Member, ShardEnd, ShardError, expand_braces, is_tar_name, samples, shard_stem

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})


@dataclass(frozen=True)
class ImageRef:
    """One input image: where it is, and the name it carries in the outputs."""

    path: str  # as found (absolute or relative to the working directory); a shard's sample: the tar
    name: str  # relative to the input folder it was found in (POSIX separators); outputs use it
    order: tuple  # sort key: the name's parts, so outputs list images as a sorted folder walk does
    member: Member | None = field(default=None, kw_only=True)  # a shard's sample: its image in the tar
    # What resume knows this version of it by (``storage.identity_of``), where discovery learnt it: a
    # shard's samples share their tar's, a listed object's comes with the listing. None: asked when keyed.
    identity: str | None = field(default=None, kw_only=True, compare=False)

    @property
    def source(self) -> str | Member:
        """What a decoder reads: the file, or the image member of a shard's sample."""
        return self.member or self.path

    @property
    def shard(self) -> str | None:
        """The output name of the tar shard this sample is in (None: a file)."""
        return self.member.shard if self.member else None


@dataclass(frozen=True)
class InputError:
    """An input that cannot be annotated; ``path`` is printable (see ``printable``); ``shard``: a tar
    shard that is not there (a pattern's, say), which is counted as a shard, not as an image."""

    path: str
    reason: str
    shard: bool = False


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


_GLOB = re.compile(r"[*?[]")
Input = str | PathList  # a path (a file, a folder, a tar shard, a pattern, - for stdin) or a list file
Finished = Callable[[str, str], "int | None"]  # (tar's identity, shard name) -> samples, if done earlier


def discover(
    inputs: Iterable[Input],
    stdin_lines: Iterable[str] = (),
    finished: Finished | None = None,
    listers: int = 0,
) -> Iterator[ImageRef | InputError | Duplicate | ShardEnd]:
    """Expand command-line inputs into images, yielding an ``InputError`` for each unusable one.

    Folders are walked (sorted, recursive, hidden entries skipped, non-images ignored); a file named
    explicitly must be an image or a tar shard. ``-`` reads newline-separated paths from
    ``stdin_lines``. With one folder, names are relative to it; with several inputs each folder's name
    comes first (as much of its path as tells it from the other folders), and files named directly
    are named by their path from the working directory. Each tar shard's samples end with a
    ``ShardEnd``; a shard that ``finished`` says an earlier run finished is not opened; with
    ``listers``, that many helper processes read shards by URL ahead (``ShardListing``). Nothing is
    buffered: millions of files stream through.
    """
    inputs = [path for item in inputs for path in expand_pattern(item)]
    storage.list_ahead(item for item in inputs if isinstance(item, str))
    prefixes = _folder_prefixes(inputs) if len(inputs) > 1 else {}
    seen = _Seen(finished)
    remote = [item for item in inputs if isinstance(item, str) and _is_remote_shard(item)]
    seen.listing = ShardListing(_planned_shards(remote, finished), listers) if listers and remote else None
    try:
        for item in inputs:
            if isinstance(item, PathList):
                yield from _listed(item, seen)
                continue
            items = (line.rstrip("\r\n") for line in stdin_lines) if item == "-" else [item]
            for path in items:
                if path.strip():
                    yield from _expand(path, prefixes.get(item, ""), seen)
    finally:
        if seen.listing:
            seen.listing.close()


def shard_inputs(inputs: Iterable[Input]) -> list[str]:
    """The tar shards among ``inputs``, patterns expanded (a glob by URL: one listing)."""
    return [p for item in inputs for p in expand_pattern(item) if isinstance(p, str) and is_tar_name(p)]


def _is_remote_shard(path: str) -> bool:
    return is_url(path) and not is_pipe(path) and is_tar_name(path)


def _planned_shards(urls: list[str], finished: Finished | None) -> Iterator[tuple[str, str, int | None]]:
    """The shards by URL that discovery will open, as ``_expand_url`` names them: not those an earlier
    run finished, nor those the store says nothing of (their own lines say why)."""
    for url in urls:
        try:
            found = storage.info(url)
        except StorageError:
            continue
        name = _url_shard_name(url)
        done = finished(identity_from(found), name) if finished else None
        if found.get("type") != "directory" and done is None:
            yield url, name, found.get("size")


def name_roots(inputs: Iterable[Input]) -> list[str]:
    """Where a run's output names start, as ``discover`` names them: a lone folder's names are paths from
    it, as are files named directly, paths on standard input and tar shards from the working directory;
    several inputs' names start with each folder's name (so those folders together root them); a list's
    by its rows. Two runs whose roots differ may name two different files alike: an output folder
    annotates one set of roots (one dataset)."""
    inputs = list(inputs)
    roots = set()
    for item in inputs:  # an object by URL is named by its bucket (or host) and path: unique as it is
        if _is_url(item):
            roots.add(f"the folder {item}" if _looks_like_folder(item) else "objects named by their URLs")
    expanded = [path for item in inputs if not _is_url(item) for path in expand_pattern(item)]
    for item in expanded:
        if isinstance(item, PathList):
            roots.add(f"the list {os.path.abspath(item.file)}")
        elif item == "-" or not os.path.isdir(item):
            roots.add(f"paths from {os.path.realpath(os.getcwd())}")
        elif len(expanded) == 1:
            roots.add(f"paths from {os.path.realpath(item)}")
        else:
            roots.add(f"the folder {os.path.realpath(item)}, named by its name")
    return sorted(roots)


def _is_url(item: Input) -> bool:
    return isinstance(item, str) and is_url(item)


def _looks_like_folder(url: str) -> bool:
    """A URL whose objects are named from it (a folder), not by their own paths (shards, images, patterns)."""
    last = url.rstrip("/").rsplit("/", 1)[-1]
    return not (is_tar_name(url) or is_image_name(last) or _GLOB.search(last) or "{" in last)


def expand_pattern(item: Input) -> list[Input]:
    """An input that does not exist as written but is a pattern: the paths its braces name (existing or
    not, as a shell's), each glob matched (sorted); a glob that matches nothing stays as written."""
    if not isinstance(item, str) or item == "-" or is_pipe(item) or os.path.lexists(item):
        return [item]
    found: list[Input] = []
    for path in expand_braces(item):
        # (a web server lists nothing, and its URLs' "?" starts a query)
        globbed = _GLOB.search(path) and not path.startswith(("http://", "https://"))
        found += (_glob(path) or [path]) if globbed else [path]
    return found


def _glob(pattern: str) -> list[str]:
    if not is_url(pattern):
        return sorted(glob.glob(pattern))
    try:
        return storage.glob(pattern)
    except StorageError:  # said again, in the input's own line, when it is read
        return []


def _listed(paths: PathList, seen: _Seen) -> Iterator[ImageRef | InputError | Duplicate | ShardEnd]:
    try:
        for row, path, name in paths.entries():
            where = f"{printable(paths.file)} row {row}"
            if not path:
                yield InputError(where, f"no path in column {paths.path_column}")
            elif name.startswith("/") or {".", ".."} & set(name.split("/")):
                yield InputError(where, f"its key {name!r} cannot name a file inside the output folder")
            else:
                yield from _expand(path, "", seen, name)
    except PathListError as exc:
        yield InputError(printable(paths.file), str(exc))


class _Seen:
    """What discovery has given out: folders walked, files and names (8-byte digests, to stay small)."""

    def __init__(self, finished: Finished | None = None):
        self.folders: set[tuple[int, int]] = set()
        self.files: set[bytes] = set()  # real paths (a shard's sample: the tar's, and its offset)
        self.names: set[bytes] = set()
        self.finished = finished
        self.listing: ShardListing | None = None  # shards by URL read ahead

    def claim(
        self, path: str, name: str, real: str, member: Member | None = None, identity: str | None = None
    ) -> ImageRef | InputError | Duplicate:
        file = short_digest(os.fsencode(real))
        shown = printable(name if member else path)  # a shard's sample is known by its name
        if file in self.files:
            return Duplicate(shown)
        try:
            digest = short_digest(name.encode("utf-8"))
        except UnicodeEncodeError:
            return InputError(shown, "file name is not valid UTF-8; rename it to annotate it")
        if digest in self.names:
            return InputError(shown, f"its output name {name!r} is taken by another file")
        self.files.add(file)
        self.names.add(digest)
        return ImageRef(path=path, name=name, order=name_order(name), member=member, identity=identity)

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


def _expand(
    path: str, prefix: str, seen: _Seen, name: str | None = None
) -> Iterator[ImageRef | InputError | Duplicate | ShardEnd]:
    """The images of one input; ``name``: the name a list gives it (a folder's: its images' prefix)."""
    if is_url(path):
        yield from _expand_url(path, prefix, seen, name)
    elif not os.path.exists(path):
        yield InputError(printable(path), "no such file or directory", shard=is_tar_name(path))
    elif os.path.isdir(path):
        prefix = prefix if name is None else name
        for found in _walk_images(path, os.path.realpath(path), seen):
            if isinstance(found, InputError):
                yield found
            else:
                file, real = found
                yield seen.claim(file, Path(prefix, os.path.relpath(file, path)).as_posix(), real)
    elif is_tar_name(path):
        yield from _shard(path, shard_stem(_file_name(path)) if name is None else name, seen)
    elif not is_image_name(path):
        yield _not_an_image(path)
    else:
        yield seen.claim(path, _file_name(path) if name is None else name, os.path.realpath(path))


def _not_an_image(path: str) -> InputError:
    expected = "/".join(sorted(IMAGE_EXTENSIONS))
    return InputError(printable(path), f"not an image file (expected {expected}) nor a .tar shard")


def _expand_url(
    url: str, prefix: str, seen: _Seen, name: str | None
) -> Iterator[ImageRef | InputError | Duplicate | ShardEnd]:
    """``_expand`` for a URL: an object, a folder (every image object under it, sorted) or a ``pipe:``."""
    if is_pipe(url):
        yield from _pipe_shard(url, name, seen)
        return
    try:
        found = storage.info(url)
        listed = storage.walk(url) if found.get("type") == "directory" else None
    except StorageError as exc:
        yield InputError(printable(url), _storage_reason(exc), shard=is_tar_name(url))
        return
    if listed is not None:
        prefix = prefix if name is None else name
        for object_url, details in listed:
            if is_image_name(object_url):
                relative = object_url[len(url.rstrip("/")) + 1 :]
                claimed = Path(prefix, relative).as_posix()
                yield seen.claim(object_url, claimed, object_url, identity=identity_from(details))
    elif is_tar_name(url):
        yield from _shard(url, _url_shard_name(url) if name is None else name, seen, found)
    elif not is_image_name(url):
        yield _not_an_image(url)
    else:
        claimed = object_name(url) if name is None else name
        yield seen.claim(url, claimed, url, identity=identity_from(found))


def _url_shard_name(url: str) -> str:
    """A shard by URL's output name: its bucket (or host) and path, less its tar suffix."""
    return shard_stem(object_name(url))


def _storage_reason(exc: StorageError) -> str:
    """A storage failure as an input's reason (the input is named already: its line need not repeat it)."""
    return "no such file or directory" if exc.missing else exc.reason


def _pipe_shard(
    command: str, name: str | None, seen: _Seen
) -> Iterator[ImageRef | InputError | Duplicate | ShardEnd]:
    """A ``pipe:`` shard, named after the last word of its command that names a tar (``pipe:aws s3 cp
    s3://data/00000.tar -``: ``data/00000``)."""
    if name is None:
        tars = [word for word in command[len(storage.PIPE) :].split() if is_tar_name(word)]
        if not tars:
            yield InputError(
                printable(command), "a pipe: shard's command must name its .tar (it names the samples)"
            )
            return
        name = shard_stem(object_name(tars[-1]) if is_url(tars[-1]) else _file_name(tars[-1]))
    yield from _shard(command, name, seen)


def _shard(
    path: str, shard: str, seen: _Seen, info: dict | None = None
) -> Iterator[ImageRef | InputError | Duplicate | ShardEnd]:
    """A tar shard's samples, then its ``ShardEnd``; not opened when an earlier run finished it.
    ``info``: what the store said of it (asked once: its identity and size come from it)."""
    real = path if is_url(path) else os.path.realpath(path)
    file = short_digest(os.fsencode(real))
    if file in seen.files:
        yield Duplicate(printable(path))
        return
    seen.files.add(file)
    identity = identity_from(info) if info else identity_of(path)
    done = seen.finished(identity, shard) if seen.finished else None
    if done is not None:
        yield ShardEnd(path, shard, clean=True, skipped=done, identity=identity)
        return
    clean, listed = True, 0
    try:
        read = seen.listing.samples if seen.listing else samples
        for key, member in read(path, shard, info.get("size") if info else None):
            listed += 1
            name = f"{shard}/{key}"
            if member is None:
                clean = False
                yield InputError(printable(name), "no image member (jpg, jpeg, png or webp) in this sample")
                continue
            found = seen.claim(path, name, f"{real}\0{member.offset}", member, identity)
            clean = clean and isinstance(found, ImageRef)
            yield found
    except ShardError as exc:
        clean = False
        yield InputError(printable(path), f"cannot read the tar shard past its sample {listed}: {exc}")
    yield ShardEnd(path, shard, clean, identity=identity)


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


def _folder_prefixes(inputs: list[Input]) -> dict[str, str]:
    """Each folder input's name prefix: the fewest last parts of its absolute path that no other folder
    input ends with (``a/img`` and ``b/img`` stay apart; the same folder twice gets one prefix)."""
    folders = {item: parts for item in inputs if isinstance(item, str) and (parts := _folder_parts(item))}
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


def _folder_parts(item: str) -> tuple[str, ...] | None:
    """A folder input's absolute path in parts (a URL's: its bucket and path, when it names neither an
    image nor a shard); None for anything else."""
    if is_url(item):
        named = is_pipe(item) or is_tar_name(item) or is_image_name(item)
        return None if named else tuple(object_name(item).split("/"))
    return Path(os.path.abspath(item)).parts[1:] if os.path.isdir(item) else None


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
