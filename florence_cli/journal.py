"""Resume and crash safety: every finished (image, task) answer is appended to a journal.

The journal is the source of truth: final COCO files are rebuilt from everything it holds, in name
order, so a run that was killed and resumed ends with exactly the files an uninterrupted run writes,
and a run on a subset of the images adds to the files instead of replacing them. Done work is keyed on
identity (name, size, mtime, task, prompt), never on position.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .discover import ImageRef, name_order
from .records import Answer, job_identity

_SORT_CHUNK = 50_000  # records sorted in memory at once when rebuilding outputs


def work_key(ref: ImageRef, job: str) -> bytes:
    """Identity of one piece of work: the file's name, size and mtime, and the job (task + text input)."""
    try:
        stat = os.stat(ref.path)
        identity = f"{stat.st_size}:{stat.st_mtime_ns}"
    except OSError:
        identity = "missing"
    return hashlib.blake2b(f"{ref.name}\0{identity}\0{job}".encode(), digest_size=12).digest()


def read_record(line: bytes | str) -> dict | None:
    """A journal line's record, or None for a line that is not one (damaged by a crash or by hand)."""
    try:
        record = json.loads(line)
        bytes.fromhex(record["key"])
    except (ValueError, TypeError, KeyError):
        return None
    return record if isinstance(record.get("file"), str) and isinstance(record.get("task"), str) else None


def read_journal(path: Path) -> Iterator[Answer]:
    """The answers of the journal at ``path``, in the order they were written; damaged lines and a last
    line that a killed run cut short are skipped."""
    with open(path, "rb") as file:
        for line in file:
            record = read_record(line) if line.endswith(b"\n") else None
            if record is not None:
                yield Answer.from_record(record)


class Journal:
    """An append-only JSONL file of finished records, each carrying its work key and output name."""

    def __init__(self, path: Path):
        self.path = path
        self.done: set[bytes] = set()
        self.damaged_lines = 0  # lines that hold no record; skipped, never dropped with what follows
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            self._recover()
        self._file = open(path, "ab")  # noqa: SIM115 - open for the run's lifetime

    def _recover(self) -> None:
        """Read what earlier runs finished; cut off a last line that a crash left without its end."""
        good_bytes = 0
        with open(self.path, "rb") as file:
            for line in file:
                if not line.endswith(b"\n"):
                    break
                good_bytes += len(line)
                record = read_record(line)
                if record is None:
                    self.damaged_lines += 1
                else:
                    self.done.add(bytes.fromhex(record["key"]))
        if good_bytes != self.path.stat().st_size:
            with open(self.path, "r+b") as file:
                file.truncate(good_bytes)

    def append(self, answers: list[Answer]) -> None:
        """Commit finished answers (a batch at a time): on disk before it returns. If writing fails
        (a full disk), the journal is cut back to what it held, so it never keeps half a batch."""
        data = "".join(json.dumps(a.record(), ensure_ascii=False) + "\n" for a in answers).encode("utf-8")
        size = self._file.tell()
        try:
            self._file.write(data)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError:
            self._file = _reopen_at(self.path, self._file, size)
            raise
        self.done.update(a.key for a in answers)

    def close(self) -> None:
        self._file.close()

    @contextmanager
    def sorted(self) -> Iterator[Callable[[str | None], Iterator[Answer]]]:
        """Sort the journal once, for every file built from it: yields a reader of its answers (those of
        one task, or all) in name order — per job the latest, in the order of the jobs.

        Sorted in chunks on disk and merged, so memory stays flat however long the journal is.
        """
        with tempfile.TemporaryDirectory(dir=self.path.parent) as scratch:
            sorted_path = Path(scratch) / "sorted.jsonl"
            with open(sorted_path, "w", encoding="utf-8") as out:
                for record in self._sorted_records(Path(scratch)):
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")

            def answers(task: str | None = None) -> Iterator[Answer]:
                with open(sorted_path, encoding="utf-8") as file:
                    for line in file:
                        record = json.loads(line)
                        if task is None or record["task"] == task:
                            yield Answer.from_record(record)

            yield answers

    def _sorted_records(self, scratch: Path) -> Iterator[dict]:
        with open(self.path, "rb") as file:
            records = (record for record in map(read_record, file) if record is not None)
            in_order = sort_by_name(records, scratch)
            for _, group in itertools.groupby(in_order, key=lambda r: r["file"]):
                latest = {job_identity(record): record for record in group}  # later lines win
                yield from sorted(latest.values(), key=lambda r: (r.get("job_index", 0), job_identity(r)))


def sort_by_name(records: Iterable[dict], scratch: Path) -> Iterator[dict]:
    """``records`` in name order of their ``file``, stable (one name's records keep their order): sorted
    in chunks written under ``scratch`` and merged, so memory stays flat however many there are."""
    chunks: list[Path] = []
    chunk: list[tuple[list, dict]] = []
    for position, record in enumerate(records):
        chunk.append(([name_order(record["file"]), position], record))
        if len(chunk) >= _SORT_CHUNK:
            chunks.append(_write_chunk(scratch, chunk))
            chunk = []
    if chunk:
        chunks.append(_write_chunk(scratch, chunk))
    merged = heapq.merge(*(_read_chunk(c) for c in chunks), key=lambda item: item[0])
    return (record for _, record in merged)


def _reopen_at(path: Path, file, size: int):
    """Close ``file`` (its unwritten buffer is lost), cut ``path`` back to ``size``, open it to append."""
    with suppress(OSError):  # the flush of a full disk fails again
        file.close()
    with open(path, "r+b") as cut:
        cut.truncate(size)
    return open(path, "ab")


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
