"""Resume and crash safety: every finished (image, task) answer is appended to a journal.

The journal is the source of truth: final COCO files are rebuilt from it, in input order, so a run
that was killed and resumed ends with exactly the files an uninterrupted run writes. Done work is
keyed on identity (name, size, mtime, task, prompt), never on position.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .discover import ImageRef

_SORT_CHUNK = 50_000  # records sorted in memory at once when rebuilding outputs


def work_key(ref: ImageRef, job_identity: str) -> bytes:
    """Identity of one piece of work: the file's name, size and mtime, and the job (task + text input)."""
    try:
        stat = os.stat(ref.path)
        identity = f"{stat.st_size}:{stat.st_mtime_ns}"
    except OSError:
        identity = "missing"
    return hashlib.blake2b(f"{ref.name}\0{identity}\0{job_identity}".encode(), digest_size=12).digest()


class Journal:
    """An append-only JSONL file of finished records, each carrying its work key and sort order."""

    def __init__(self, path: Path):
        self.path = path
        self.done: set[bytes] = set()
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            self._recover()
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the run's lifetime

    def _recover(self) -> None:
        """Read what earlier runs finished; drop a last line cut short by a crash."""
        good_bytes = 0
        with open(self.path, "rb") as file:
            for line in file:
                try:
                    record = json.loads(line)
                except ValueError:
                    break
                if not line.endswith(b"\n"):
                    break
                self.done.add(bytes.fromhex(record["key"]))
                good_bytes += len(line)
        if good_bytes != self.path.stat().st_size:
            with open(self.path, "r+b") as file:
                file.truncate(good_bytes)

    def append(self, records: list[dict]) -> None:
        """Commit finished records (a batch at a time): written and flushed before it returns."""
        self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done.update(bytes.fromhex(r["key"]) for r in records)

    def close(self) -> None:
        self._file.close()

    def sorted_records(self, keep: set[bytes] | None = None) -> Iterator[dict]:
        """All records in input order (then task order), the latest per key, limited to ``keep``.

        Sorted in chunks on disk and merged, so memory stays flat however long the journal is.
        """
        with tempfile.TemporaryDirectory(dir=self.path.parent) as scratch:
            chunks = list(self._sorted_chunks(Path(scratch), keep))
            readers = [_read_chunk(c) for c in chunks]
            previous = None
            for sort_key, record in heapq.merge(*readers, key=lambda item: item[0]):
                identity = sort_key[:2]
                if previous is not None and previous[0][:2] != identity:
                    yield previous[1]
                previous = (sort_key, record)
            if previous is not None:
                yield previous[1]

    def _sorted_chunks(self, scratch: Path, keep: set[bytes] | None) -> Iterator[Path]:
        chunk: list[tuple[list, dict]] = []
        with open(self.path, encoding="utf-8") as file:
            for line_number, line in enumerate(file):
                record = json.loads(line)
                if keep is not None and bytes.fromhex(record["key"]) not in keep:
                    continue
                chunk.append(([record["order"], record["job_index"], line_number], record))
                if len(chunk) >= _SORT_CHUNK:
                    yield _write_chunk(scratch, chunk)
                    chunk = []
        if chunk:
            yield _write_chunk(scratch, chunk)


def _write_chunk(scratch: Path, chunk: list[tuple[list, dict]]) -> Path:
    chunk.sort(key=lambda item: item[0])
    path = scratch / f"chunk{len(list(scratch.iterdir()))}.jsonl"
    with open(path, "w", encoding="utf-8") as file:
        for sort_key, record in chunk:
            file.write(json.dumps([sort_key, record], ensure_ascii=False) + "\n")
    return path


def _read_chunk(path: Path) -> Iterator[tuple[list, dict]]:
    with open(path, encoding="utf-8") as file:
        for line in file:
            sort_key, record = json.loads(line)
            yield sort_key, record
