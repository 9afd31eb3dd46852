"""Inputs and outputs where datasets live: object stores and web servers by URL, through fsspec.

A URL (``s3://``, ``gs://``, ``az://``, ``https://``, ``file://`` …) is read with the fsspec file system
its scheme names, built with the storage options a run was given (``use_options``) and credentials from
their standard places (the AWS environment and config files, Google's application credentials …). A
``pipe:COMMAND`` input is webdataset's: a shard read from the command's standard output.

Objects are read by ranges, never downloaded whole: a shard's headers through a read-ahead buffer, an
image by one ranged request. A request that the store throttles or a connection that drops is tried
again with backoff, a bounded number of times (``RETRIES``); then it fails with one line. fsspec and the
store's package (s3fs, gcsfs, adlfs) are optional; without them a URL is refused in one line naming
the extra to install.
"""

from __future__ import annotations

import errno
import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import suppress
from itertools import takewhile
from pathlib import Path
from typing import TypeVar

OPTIONS_ENV = "FLORENCE_STORAGE_OPTIONS"  # decode processes inherit the run's storage options from it
PIPE = "pipe:"
RETRIES = 5  # tries after the first, for a throttled or dropped request
BACKOFF_S = 0.2  # the first wait; doubled each time, with jitter
HEADER_BLOCK = 1 << 20  # read-ahead while listing a shard's headers: one request per MiB, not per header
LIST_AHEAD = 100  # objects named in one folder from which listing it once beats a request for each
# The package each scheme needs, and the extra of florence-cli that installs it.
_PACKAGES = {"s3": ("s3fs", "storage"), "s3a": ("s3fs", "storage"), "gs": ("gcsfs", "gcs"),
             "gcs": ("gcsfs", "gcs"), "az": ("adlfs", "azure"), "abfs": ("adlfs", "azure"),
             "abfss": ("adlfs", "azure"), "http": ("aiohttp", "storage"),
             "https": ("aiohttp", "storage")}  # fmt: skip
# Transient failures by class name, wherever they come from (botocore, aiohttp, urllib3): the store is
# busy or the connection dropped; anything else (no such object, access denied) is not retried.
_TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
                    "ConnectTimeoutError", "ClientPayloadError", "ServerDisconnectedError",
                    "ClientConnectionError", "ResponseStreamingError", "IncompleteReadError"}  # fmt: skip
_TRANSIENT_ERRNOS = {errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.EREMOTEIO}

T = TypeVar("T")


class StorageError(OSError):
    """A URL that cannot be read or written as asked: ``what`` (the URL), the one-line ``reason``, and
    whether the store says there is no such bucket or object (``missing``)."""

    def __init__(self, what: str, reason: str, missing: bool = False):
        super().__init__(f"{what}: {reason}")
        self.reason = reason
        self.missing = missing


def is_url(path: str) -> bool:
    """Whether ``path`` names an object by URL (``scheme://…``) or a ``pipe:`` command."""
    return path.startswith(PIPE) or ("://" in path and path.split("://", 1)[0].isalnum())


def is_pipe(path: str) -> bool:
    return path.startswith(PIPE)


def use_options(options: dict | None) -> None:
    """Give every file system built from now on (here and in decode processes, which inherit the
    environment) these keyword arguments: an endpoint, a profile, a token … Called at the start of each
    run, it also forgets the file systems of earlier runs, and with them what they cached of the store
    (an object replaced since is seen as it is now)."""
    _FILESYSTEMS.clear()
    _KNOWN.clear()
    if options:
        os.environ[OPTIONS_ENV] = json.dumps(options)
    else:
        os.environ.pop(OPTIONS_ENV, None)


_FILESYSTEMS: dict[str, object] = {}  # this run's, by scheme
_KNOWN: dict[tuple[str, str], dict] = {}  # what the store said of each object this run, by scheme and path


def filesystem(url: str):
    """The fsspec file system of ``url`` (one per scheme and run) and the object's path in it."""
    try:
        import fsspec.core
    except ImportError:
        raise StorageError(url, _missing(url)) from None
    scheme = _scheme(url)
    fs = _FILESYSTEMS.get(scheme)
    if fs is None:
        options = json.loads(os.environ.get(OPTIONS_ENV, "{}"))
        try:
            fs = fsspec.core.url_to_fs(url, skip_instance_cache=True, **options)[0]
        except ImportError:
            raise StorageError(url, _missing(url)) from None
        except (ValueError, TypeError) as exc:
            raise StorageError(url, f"cannot open it: {exc}") from None
        _FILESYSTEMS[scheme] = fs
    return fs, fs._strip_protocol(url)


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower()


def _missing(url: str) -> str:
    """What to install for ``url`` (fsspec comes with each extra)."""
    package, extra = _PACKAGES.get(_scheme(url), ("its fsspec implementation", "storage"))
    return f"{_scheme(url)}:// URLs need fsspec and {package}: pip install 'florence-cli[{extra}]'"


def retried(action: Callable[[], T], what: str) -> T:
    """``action()``, tried again with backoff while it fails for a transient reason (``RETRIES`` times at
    most); a failure is a ``StorageError`` naming ``what``."""
    for attempt in range(RETRIES + 1):
        try:
            return action()
        except Exception as exc:
            if not is_transient(exc) or attempt == RETRIES:
                raise StorageError(what, describe(exc), isinstance(exc, FileNotFoundError)) from None
        # Full jitter: many workers throttled at once do not come back at once.
        time.sleep(random.uniform(0, BACKOFF_S * 2**attempt))
    raise AssertionError("unreachable")


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` says the store is busy or the connection dropped (worth another try)."""
    if isinstance(exc, (FileNotFoundError, PermissionError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if any(kind.__name__ in _TRANSIENT_NAMES for kind in type(exc).__mro__):
        return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


def describe(exc: BaseException) -> str:
    """One line for a storage failure, in the store's terms where they are clear."""
    if isinstance(exc, FileNotFoundError):
        return "no such bucket or object"
    if isinstance(exc, PermissionError):
        return "access denied"
    if is_transient(exc):
        return f"the store did not answer after {RETRIES + 1} tries ({_first_line(exc)})"
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc.strerror if isinstance(exc, OSError) and exc.strerror else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def info(url: str) -> dict:
    """What the store says about the object or folder at ``url`` (``StorageError``: why not)."""
    fs, path = filesystem(url)
    key = (_scheme(url), path)
    if key not in _KNOWN:  # asked once a run (discovery and its read-ahead both ask)
        _KNOWN[key] = retried(lambda: fs.info(path), url)
    return _KNOWN[key]


def list_ahead(urls: Iterable[str]) -> None:
    """Many objects named in one folder (a brace pattern's 10,000 shards): list the folder once, so that
    what is asked of each is answered from the listing, which the run's file system keeps, not by a
    request each (nor by a round trip to the file system's event loop). A folder that cannot be listed
    is left to those requests to report."""
    folders = Counter(url.rsplit("/", 1)[0] for url in urls if is_url(url) and not is_pipe(url))
    for folder, count in folders.items():
        if count >= LIST_AHEAD:
            fs, path = filesystem(folder)
            with suppress(StorageError):
                listed = retried(lambda fs=fs, path=path: fs.ls(path, detail=True), folder)
                _KNOWN.update(((_scheme(folder), found["name"]), found) for found in listed)


def identity_of(path: str) -> str:
    """What tells this version of a file or object from another, for resume: a local file's size and
    mtime, an object's version as its store gives it (``identity_from``); a ``pipe:`` command's stream is
    known by its command alone. "missing": there is none."""
    try:
        if is_pipe(path):
            return "stream"
        if is_url(path):
            return identity_from(info(path))
        stat = os.stat(path)
    except OSError:
        return "missing"
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def identity_from(info: dict) -> str:
    """An object's identity from what the store says of it: its version (version id, generation, ETag)
    and size; a replaced object has another."""
    for key in ("VersionId", "generation", "version_id", "ETag", "etag", "ETAG", "LastModified", "mtime"):
        if info.get(key):
            return f"{info.get('size')}:{key}={info[key]}"
    return f"{info.get('size')}"


def read_range(url: str, start: int, size: int) -> bytes:
    """``size`` bytes of the object at ``url`` from ``start``, in one ranged request (fewer: it ends)."""
    fs, path = filesystem(url)
    return retried(lambda: fs.cat_file(path, start=start, end=start + size), url)


def read_ranges(ranges: list[tuple[str, int, int]]) -> list[bytes | None]:
    """Each (URL, start, size) read by ranged requests at once (a latency for them all, not one each);
    None where a request failed, or for all where they are not of one store (``read_range`` then reads
    each alone, with retries)."""
    if len({_scheme(url) for url, _, _ in ranges}) > 1:
        return [None] * len(ranges)
    fs, _ = filesystem(ranges[0][0])
    paths = [fs._strip_protocol(url) for url, _, _ in ranges]
    try:
        found = fs.cat_ranges(
            paths, [s for _, s, _ in ranges], [s + n for _, s, n in ranges], on_error="return"
        )
    except Exception:  # (the store's failure is said by the requests tried alone)
        return [None] * len(ranges)
    return [data if isinstance(data, bytes) else None for data in found]


def read_all(url: str) -> bytes:
    """The whole object at ``url`` (an image: small)."""
    fs, path = filesystem(url)
    return retried(lambda: fs.cat_file(path), url)


def open_headers(url: str, size: int | None = None) -> RetriedReads:
    """The object at ``url`` opened to read front to back by ranges, a MiB ahead at a time (``size``:
    its size, where the store said it already)."""
    fs, path = filesystem(url)
    known = {"size": size} if size is not None else {}
    opened = retried(
        lambda: fs.open(path, "rb", block_size=HEADER_BLOCK, cache_type="readahead", **known), url
    )
    return RetriedReads(opened, url)


class RetriedReads:
    """An object opened for reading whose every read is ``retried``: a connection dropped in the middle
    of a shard costs that request again, not the shard."""

    def __init__(self, file, url: str):
        self.file = file
        self.url = url
        self.size = file.size

    def read(self, size: int = -1) -> bytes:
        start = self.file.tell()

        def attempt() -> bytes:
            self.file.seek(start)
            return self.file.read(size)

        return retried(attempt, self.url)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> RetriedReads:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


def glob(pattern: str) -> list[str]:
    """The URLs a glob pattern matches, sorted."""
    fs, path = filesystem(pattern)
    return sorted(fs.unstrip_protocol(found) for found in retried(lambda: fs.glob(path), pattern))


def walk(url: str) -> list[tuple[str, dict]]:
    """Every object under the folder ``url``, sorted by path: its URL and what the store says of it."""
    fs, path = filesystem(url)
    found = retried(lambda: fs.find(path, detail=True), url)
    return [(fs.unstrip_protocol(name), found[name]) for name in sorted(found)]


def object_name(url: str) -> str:
    """A URL's object as an output name: its bucket (or host) and path, as a local absolute path is named
    without its root (``s3://data/shards/00000.tar``: ``data/shards/00000.tar``)."""
    return url.split("://", 1)[1].strip("/")


def output_cache(url: str) -> Path:
    """The local folder of an output URL: its journal and files before they are uploaded
    (``$XDG_CACHE_HOME/florence-cli/outputs/<bucket>/<path>``), the same for the same URL."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache, "florence-cli", "outputs", _scheme(url), object_name(url))


def under(target: str, folder: Path, paths: Iterable[Path]) -> list[tuple[str, str]]:
    """Each local file under ``folder`` with its URL at the same path under ``target``: what ``upload``
    and ``not_held`` take."""
    return [(str(path), f"{target.rstrip('/')}/{path.relative_to(folder).as_posix()}") for path in paths]


def upload(files: list[tuple[str, str]]) -> None:
    """Put finished local files at their URLs (of one store), several at once where the store allows.
    An object store makes an object visible only once its upload is complete, so no partial object is
    ever seen under the final name."""
    if files:
        fs, _ = filesystem(files[0][1])
        local, remote = [path for path, _ in files], [fs._strip_protocol(url) for _, url in files]
        urls = [url for _, url in files]
        where = urls[0] if len(urls) == 1 else f"{_common_folder(urls)}/ ({len(urls)} files)"
        retried(lambda: fs.put(local, remote), where)


def not_held(files: list[tuple[str, str]], folder: str) -> list[tuple[str, str]]:
    """Those of ``files`` (a local path, its URL under ``folder``) that the store does not hold at their
    size: what a run that stopped before its uploads (or after some) has still to put. One listing."""
    fs, path = filesystem(folder)
    held = retried(lambda: fs.find(path, detail=True), folder)
    return [
        (local, url)
        for local, url in files
        if held.get(fs._strip_protocol(url), {}).get("size") != os.path.getsize(local)
    ]


def _common_folder(urls: list[str]) -> str:
    """The folder URL that holds them all."""
    folders = zip(*(url.split("/")[:-1] for url in urls), strict=False)  # as deep as the shallowest
    return "/".join(parts[0] for parts in takewhile(lambda parts: len(set(parts)) == 1, folders))
