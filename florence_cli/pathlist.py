"""Image paths listed in a column of a Parquet or CSV file (``--from-parquet``), read as a stream.

A path is relative to the list file's folder (so a list travels with the dataset it sits beside),
absolute, or a URL; the list itself may be a URL too (``storage``). An image is named by the key column
when one is given, else by its path as the list writes it (an absolute one without its root, a URL
without its scheme). pyarrow is needed for Parquet only, and imported when read.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .storage import filesystem, is_url, object_name, retried

_ROWS = 10_000  # Parquet rows read at once


class PathListError(Exception):
    """A list that cannot be read as asked; the message is one line naming the file."""


@dataclass(frozen=True)
class PathList:
    """The images a Parquet (``.parquet``) or CSV file lists in ``path_column``, named by ``key_column``."""

    file: str
    path_column: str = "path"
    key_column: str | None = None

    @property
    def columns(self) -> list[str]:
        return [self.path_column] + ([self.key_column] if self.key_column else [])

    def check(self) -> None:
        """Refuse, before any image is read, a list that cannot be opened or lacks a column."""
        for _ in self._rows(check_only=True):
            pass

    def entries(self) -> Iterator[tuple[int, str | None, str | None]]:
        """Each row's number (from 1), the image's path (None: the row has none) and its name."""
        folder = os.path.dirname(self.file)
        for row, (path, key) in enumerate(self._rows(), start=1):
            if path is None or str(path) == "":
                yield row, None, None
                continue
            path = os.fsdecode(path) if isinstance(path, bytes) else str(path)
            full = _beside(folder, path)
            name = str(key) if key is not None and str(key) != "" else _path_name(path, full)
            yield row, full, name

    def _rows(self, check_only: bool = False) -> Iterator[tuple[object, object]]:
        try:
            if self.file.lower().endswith(".csv"):
                yield from self._csv_rows(check_only)
            else:
                yield from self._parquet_rows(check_only)
        except OSError as exc:
            raise PathListError(f"cannot read {self.file}: {exc.strerror or exc}") from None

    def _open(self):
        """The list file, in binary: local, or an object by URL (read by ranges, as pyarrow asks)."""
        if not is_url(self.file):
            return open(self.file, "rb")
        fs, path = filesystem(self.file)
        return retried(lambda: fs.open(path, "rb"), self.file)

    def _csv_rows(self, check_only: bool) -> Iterator[tuple[object, object]]:
        with self._open() as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as file:
            reader = csv.DictReader(file)
            self._require(reader.fieldnames or [])
            if check_only:
                return
            try:
                for record in reader:
                    yield record.get(self.path_column), record.get(self.key_column or "")
            except (csv.Error, UnicodeDecodeError) as exc:
                raise PathListError(f"{self.file} line {reader.line_num}: {exc}") from None

    def _parquet_rows(self, check_only: bool) -> Iterator[tuple[object, object]]:
        parquet = _pyarrow_parquet()
        try:
            with self._open() as raw:
                table = parquet.ParquetFile(raw)
                self._require(table.schema_arrow.names)
                if check_only:
                    return
                for batch in table.iter_batches(batch_size=_ROWS, columns=self.columns):
                    paths = batch.column(0).to_pylist()
                    keys = batch.column(1).to_pylist() if self.key_column else [None] * len(paths)
                    yield from zip(paths, keys, strict=True)
        except (ValueError, TypeError) as exc:  # pyarrow's errors on a file that is not Parquet
            raise PathListError(f"cannot read {self.file} as Parquet: {exc}") from None

    def _require(self, names: list[str]) -> None:
        for column in self.columns:
            if column not in names:
                listed = ", ".join(names) or "none"
                raise PathListError(f"{self.file} has no column {column!r} (its columns: {listed})")


def _pyarrow_parquet():
    try:
        import pyarrow.parquet
    except ImportError:
        raise PathListError("reading Parquet needs pyarrow: pip install 'florence-cli[parquet]'") from None
    return pyarrow.parquet


def _beside(folder: str, path: str) -> str:
    """A listed path as found from the list's folder (a URL stays as it is)."""
    if is_url(path):
        return path
    return f"{folder}/{path}" if is_url(folder) else os.path.join(folder, path)


def _path_name(path: str, full: str) -> str:
    """A listed path as a name: as written (POSIX separators); one that is absolute or climbs out of the
    list's folder: its absolute path without the root; a URL: its bucket (or host) and path."""
    if is_url(full):
        return object_name(full) if is_url(path) or path.startswith("../") else Path(path).as_posix()
    relative = os.path.normpath(path)
    if os.path.isabs(relative) or relative.split(os.sep)[0] == "..":
        relative = os.path.splitdrive(os.path.abspath(full))[1].lstrip("/\\")
    return Path(relative).as_posix()
