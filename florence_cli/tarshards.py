"""WebDataset shards: tar files whose members group into samples, read in place, never extracted.

A sample is a run of adjacent members whose names share a key: the name up to the first dot of its
base name (``a/b.seg.png``: key ``a/b``, extension ``seg.png``), as the webdataset package groups
them; a repeated extension starts a new sample, and names without one (or hidden) are skipped. A
sample's image is its first jpg, jpeg, png or webp member. Discovery lists samples from the tar's
headers alone, skipping the data (read here: five times faster than ``tarfile``, which parses every
field of every header); a decode worker reads the image's bytes at their offset. A cut or damaged
tar lists the samples before the damage and then says why it stops.

A shard is a local file, a URL (read by ranges, ``storage``), or webdataset's ``pipe:COMMAND``; a
gzip-compressed one (``.tar.gz``) and a pipe are streams, read front to back once.
"""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import BinaryIO

from .storage import PIPE, is_pipe, is_url, open_headers, read_range, read_ranges

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_BLOCK = 512  # a tar block; an archive ends with two zero blocks


class ShardError(Exception):
    """A tar shard that cannot be read to its end; the message is one line."""


@dataclass(frozen=True)
class Member:
    """A sample's image inside a tar shard: where its bytes lie, and the shard's output name."""

    tar: str
    offset: int
    size: int
    shard: str
    data: bytes | None = field(default=None, repr=False)  # a stream's image, read as it passed


@dataclass(frozen=True)
class ShardEnd:
    """Discovery is past a tar shard: ``clean`` when every sample in it was listed as an image.
    ``skipped``: the samples of a shard an earlier run finished with the same tasks (it was not opened)."""

    path: str
    name: str
    clean: bool
    skipped: int = 0
    identity: str = field(default="", compare=False)  # the shard's, as opened (``storage.identity_of``)


TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def is_tar_name(path: str) -> bool:
    """Whether ``path`` names a shard: a tar, gzip-compressed or not, or a ``pipe:`` command."""
    return is_pipe(path) or path.lower().endswith(TAR_SUFFIXES)


def reads_through(path: str) -> bool:
    """Whether only reading ``path`` through would count its samples: a shard by URL, a ``pipe:`` command
    or a gzip-compressed one (a local tar's headers are read by seeking, at little cost)."""
    return is_url(path) or path.lower().endswith((".gz", ".tgz"))


def shard_stem(path: str) -> str:
    """A shard's path less its tar suffix (a ``pipe:`` command's: as written)."""
    lower = path.lower()
    return next((path[: -len(s)] for s in TAR_SUFFIXES if lower.endswith(s)), path)


def split_name(name: str) -> tuple[str, str] | None:
    """A member name's (key, lowercase extension), or None for a name that is part of no sample."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not stem or not dot:
        return None
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def samples(tar: str, shard: str, size: int | None = None) -> Iterator[tuple[str, Member | None]]:
    """Each sample's key and image member (None: it has none), in the tar's order (``size``: an object's,
    where the store said it already).

    A shard that can only be read front to back (``pipe:``, gzip-compressed) has its images' bytes read
    here, as they pass, and carried in their members; any other is read by ranges later.
    Raises ``ShardError`` where the tar stops being readable, once the samples before that point are
    listed: a truncated tar (the image the cut goes through fails when it is decoded) or a damaged one.
    """
    key, extensions, image = None, set(), None
    try:
        with open_shard(tar, size) as (file, end):
            for name, offset, length in _members_of(file, end):
                split = split_name(name)
                if split is None:
                    continue
                if split[0] != key or split[1] in extensions:  # a new key, or the same extension again
                    if key is not None:
                        yield key, image
                    key, extensions, image = split[0], set(), None
                extensions.add(split[1])
                if image is None and split[1] in IMAGE_EXTENSIONS:
                    data = file.read(length) if end is None else None  # a stream: now or never
                    image = Member(tar, offset, length, shard, data=data)
    except ShardError:
        if key is not None:
            yield key, image
        raise
    if key is not None:
        yield key, image


def members(tar: str) -> Iterator[tuple[str, int, int]]:
    """Each regular file in ``tar``: its name, the offset of its data and its size, read from the
    headers alone (ustar, GNU long names, pax paths and sizes), the data skipped.

    Raises ``ShardError`` for a header whose checksum fails, and where the tar ends early: after the
    member that the end cuts in two, or before its end-of-archive block.
    """
    with open_shard(tar) as (file, end):
        yield from _members_of(file, end)


@contextmanager
def open_shard(tar: str, size: int | None = None) -> Iterator[tuple[BinaryIO, int | None]]:
    """A shard opened to read front to back, and its size (an object's, if known: not asked again);
    None: a stream (``pipe:``, gzip), which cannot seek back. Failures to open or read are
    ``ShardError``s."""
    try:
        with ExitStack() as stack:
            if is_pipe(tar):
                file, end = stack.enter_context(_piped(tar[len(PIPE) :])), None
            elif is_url(tar):
                file = stack.enter_context(open_headers(tar, size))
                end = file.size
            else:
                file = stack.enter_context(open(tar, "rb"))
                end = os.fstat(file.fileno()).st_size
            if _peek(file, len(_GZIP)) == _GZIP:
                file, end = _Forward(stack.enter_context(gzip.GzipFile(fileobj=file))), None
            yield file, end
    except (OSError, EOFError, zlib.error) as exc:  # a gzip stream cut short is an EOFError
        raise ShardError(_reason(exc)) from None


def _members_of(file: BinaryIO, end: int | None) -> Iterator[tuple[str, int, int]]:
    """``members`` of a shard opened by ``open_shard``; a caller may read the data of the member just
    yielded before asking for the next."""
    offset, extended, name = 0, {}, ""  # extended: the next member's path and size (pax, GNU header)
    while True:
        if file.seek(offset) != offset:  # a stream that ended inside the member before
            raise ShardError(f"truncated inside {name}")
        header = file.read(_BLOCK)
        if header == bytes(_BLOCK):
            return
        if len(header) < _BLOCK:
            raise ShardError("truncated: the end-of-archive block is missing")
        if not _checksum_holds(header):
            raise ShardError(f"a damaged member header at byte {offset}")
        kind, data = header[156:157], offset + _BLOCK
        size = extended.get("size") or _number(header[124:136])
        name = extended.get("path") or _header_name(header)
        extended = {}
        if kind in _REGULAR:
            yield name, data, size
        if end is not None and data + size > end:
            raise ShardError(f"truncated inside {name}")
        if kind in _EXTENDED:
            extended = _extended(kind, file.read(size))
        offset = data + -(-size // _BLOCK) * _BLOCK


_GZIP = b"\x1f\x8b"


def _peek(file, size: int) -> bytes:
    if isinstance(file, _Forward):
        return file.peek(size)
    start = file.tell()
    found = file.read(size)
    file.seek(start)
    return found


class _Forward:
    """A stream that seeks forward only, by reading and dropping what it skips (a pipe, a gzip stream);
    ``seek`` returns the position reached, short of the target where the stream ended."""

    _CHUNK = 1 << 20

    def __init__(self, stream):
        self.stream = stream
        self.position = 0
        self.pending = b""  # read by a peek, not yet given out

    def read(self, size: int) -> bytes:
        data, self.pending = self.pending[:size], self.pending[size:]
        while len(data) < size:
            more = self.stream.read(size - len(data))
            if not more:
                break
            data += more
        self.position += len(data)
        return data

    def tell(self) -> int:
        return self.position

    def peek(self, size: int) -> bytes:
        """The next ``size`` bytes (fewer at the end), left to be read."""
        self.pending += self.stream.read(max(size - len(self.pending), 0))
        return self.pending[:size]

    def seek(self, target: int) -> int:
        if target < self.position:
            raise ShardError("a stream cannot be read backwards")
        while self.position < target and self.read(min(self._CHUNK, target - self.position)):
            pass
        return self.position


@contextmanager
def _piped(command: str) -> Iterator[_Forward]:
    """The standard output of ``command`` (a shell command line, as webdataset's ``pipe:`` runs it); a
    command that fails is named with the last line it wrote to its standard error."""
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=errors)
        status = None
        try:
            yield _Forward(process.stdout)
        except ShardError:  # a stream cut short: the command's own failure says why, where it failed
            status = _stop(process)
            if status > 0:
                errors.seek(0)
                said = errors.read().decode("utf-8", "replace").strip().splitlines()
                failed = f"the command failed (exit status {status}): {said[-1] if said else ''}"
                raise ShardError(failed) from None
            raise
        finally:
            if status is None:
                _stop(process)


def _stop(process: subprocess.Popen) -> int:
    """End a ``pipe:`` command (the rest of a stream that was not read to its end is not wanted)."""
    process.stdout.close()
    if process.poll() is None:
        process.kill()
    return process.wait()


_REGULAR = (b"0", b"\0", b"7")  # tar type flags of regular files
_EXTENDED = (b"x", b"L")  # a pax header, a GNU long name: both describe the next member


def _number(field: bytes) -> int:
    """A header number: octal text, or GNU's base-256 for large values."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise ShardError(f"a damaged member header (not a number: {text[:20]!r})") from None


def _checksum_holds(header: bytes) -> bool:
    """Whether a header's checksum is the sum of its bytes: unsigned, or signed (as some old tars wrote)."""
    written = _number(header[148:156])
    unsigned = sum(header[:148]) + sum(header[156:]) + 8 * ord(" ")
    if written == unsigned:
        return True
    return written == unsigned - 256 * sum(byte >= 128 for byte in header[:148] + header[156:])


def _header_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:263] == b"ustar\0":  # POSIX ustar: a prefix of the path of its own
        prefix = header[345:500].split(b"\0", 1)[0]
        name = prefix + b"/" + name if prefix else name
    return name.decode("utf-8", "surrogateescape")


def _extended(kind: bytes, data: bytes) -> dict:
    """The path and size a pax header (``<length> <key>=<value>\\n`` records) or a GNU long name gives."""
    if kind == b"L":
        return {"path": data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")}
    found, position = {}, 0
    try:
        while position < len(data) and data[position : position + 1] != b"\0":
            length = int(data[position:].split(b" ", 1)[0])
            key, _, value = data[position : position + length].split(b" ", 1)[1][:-1].partition(b"=")
            if key == b"path":
                found["path"] = value.decode("utf-8", "surrogateescape")
            elif key == b"size":
                found["size"] = int(value)
            position += max(length, 1)
    except (ValueError, IndexError):
        raise ShardError("a damaged pax header") from None
    return found


def fetch_members(sources: list[str | Member]) -> list[str | Member]:
    """``sources`` with the bytes of their images in shards by URL read at once, carried in their members
    (``read_ranges``): a decode process given several waits on its store once, not once per image."""
    remote = [i for i, s in enumerate(sources) if isinstance(s, Member) and s.data is None and is_url(s.tar)]
    if len(remote) < 2:
        return sources
    fetched = read_ranges([(sources[i].tar, sources[i].offset, sources[i].size) for i in remote])
    sources = list(sources)
    for index, data in zip(remote, fetched, strict=True):
        if data is not None:
            sources[index] = replace(sources[index], data=data)
    return sources


def read_member(member: Member) -> bytes:
    """The bytes of ``member`` (raises ``ValueError`` where the tar was cut inside it)."""
    if member.data is not None:
        data = member.data
    elif is_url(member.tar):
        data = read_range(member.tar, member.offset, member.size)
    else:
        with open(member.tar, "rb") as file:
            file.seek(member.offset)
            data = file.read(member.size)
    if len(data) < member.size:
        raise ValueError(f"the tar shard ends inside this image ({len(data)} of {member.size} bytes)")
    if not data:
        raise ValueError("empty image member (0 bytes)")
    return data


_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


def expand_braces(pattern: str) -> list[str]:
    """``{a,b}`` and ``{00000..00099}`` (zero-padded as written) expanded as a shell does, left to
    right, nested too; a brace pair that is neither is kept as written."""
    start = pattern.find("{")
    while start != -1:
        end, commas = _closing(pattern, start)
        if end == -1:
            break
        body = pattern[start + 1 : end]
        choices = _range(body) or ([body[a:b] for a, b in _spans(commas, len(body))] if commas else None)
        if choices is not None:
            head, tail = pattern[:start], pattern[end + 1 :]
            return [full for choice in choices for full in expand_braces(head + choice + tail)]
        start = pattern.find("{", start + 1)
    return [pattern]


def _closing(pattern: str, start: int) -> tuple[int, list[int]]:
    """The index of the brace closing the one at ``start`` (-1: none) and its top-level commas (relative
    to the body)."""
    depth, commas = 0, []
    for index in range(start, len(pattern)):
        char = pattern[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if not depth:
                return index, commas
        elif char == "," and depth == 1:
            commas.append(index - start - 1)
    return -1, []


def _spans(commas: list[int], length: int) -> list[tuple[int, int]]:
    return [(a + 1, b) for a, b in pairwise([-1, *commas, length])]


def _range(body: str) -> list[str] | None:
    match = _RANGE.fullmatch(body)
    if not match:
        return None
    first, last = match.groups()
    padded = any(len(n.lstrip("-")) > 1 and n.lstrip("-").startswith("0") for n in (first, last))
    width = max(len(first), len(last)) if padded else 0
    step = 1 if int(last) >= int(first) else -1
    return [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
