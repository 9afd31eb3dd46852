"""Resume and crash safety: every finished (image, task) answer is appended to a journal.

The journal is the source of truth: final COCO files are rebuilt from everything it holds, in name
order, so a run that was killed and resumed ends with exactly the files an uninterrupted run writes,
and a run on a subset of the images adds to the files instead of replacing them. Done work is keyed on
identity (name, size, mtime, task, prompt), never on position.

A tar shard whose every sample is journaled gets a line of its own (``ShardProgress``), keyed on the
shard's name, size and mtime and what was asked of it, so a later run skips it without opening it.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from .discover import ImageRef, name_order
from .records import Answer, job_identity
from .storage import identity_of
from .tarshards import ShardEnd

_SORT_CHUNK = 50_000  # records sorted in memory at once when rebuilding outputs
# A sorted journal's reader: the answers of one task (by name), or of all tasks (None), in name order.
AnswerReader = Callable[[str | None], Iterator[Answer]]


def work_key(ref: ImageRef, job: str) -> bytes:
    """Identity of one piece of work: the file's name, size and mtime (an object's: its version as the
    store gives it, ``storage.identity_of``), and the job (task + text input). A shard's sample: its name
    (``<shard>/<key>``), the tar's identity, and the job."""
    return _key(ref.name, ref.identity or identity_of(ref.path), job)


def shard_key(identity: str, name: str, jobs: str) -> bytes:
    """Identity of a finished tar shard: its name, its identity (``storage.identity_of``), and what was
    asked of its samples."""
    return _key(name, identity, jobs)


def _key(name: str, identity: str, job: str) -> bytes:
    return hashlib.blake2b(f"{name}\0{identity}\0{job}".encode(), digest_size=12).digest()


def read_record(line: bytes | str) -> dict | None:
    """A journal line's record, or None for a line that is not one (damaged by a crash or by hand)."""
    try:
        record = json.loads(line)
        bytes.fromhex(record["key"])
    except (ValueError, TypeError, KeyError):
        return None
    return record if isinstance(record.get("file"), str) and isinstance(record.get("task"), str) else None


def read_shard_record(line: bytes) -> dict | None:
    """A finished tar shard's line (``{"shard", "done", "samples", "answers"}``), or None."""
    try:
        record = json.loads(line)
        bytes.fromhex(record["done"])
        numbers = isinstance(record["samples"], int) and isinstance(record["answers"], int)
        return record if numbers and isinstance(record["shard"], str) else None
    except (ValueError, TypeError, KeyError):
        return None


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
        self.shards: dict[bytes, dict] = {}  # finished tar shards' lines, by their key
        self.shard_answers: Counter[str | None] = Counter()  # answers journaled, by tar shard
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
                if record is not None:
                    self.done.add(bytes.fromhex(record["key"]))
                    self.shard_answers[record.get("shard")] += 1
                elif (shard := read_shard_record(line)) is not None:
                    self.shards[bytes.fromhex(shard["done"])] = shard
                else:
                    self.damaged_lines += 1
        if good_bytes != self.path.stat().st_size:
            with open(self.path, "r+b") as file:
                file.truncate(good_bytes)

    def append(self, answers: list[Answer]) -> None:
        """Commit finished answers (a batch at a time): on disk before it returns. If writing fails
        (a full disk), the journal is cut back to what it held, so it never keeps half a batch."""
        self._write(a.record() for a in answers)
        self.done.update(a.key for a in answers)
        self.shard_answers.update(a.shard for a in answers)

    def finished_shard(self, key: bytes) -> int | None:
        """The samples of the finished tar shard ``key``, if its line is here and so are its answers (a
        damaged line loses one: the shard is opened again, and the answer done again)."""
        record = self.shards.get(key)
        if record is None or self.shard_answers[record["shard"]] < record["answers"]:
            return None
        return record["samples"]

    def mark_shards(self, records: list[dict]) -> None:
        """Commit finished tar shards' lines (after their answers)."""
        self._write(records)
        self.shards.update((bytes.fromhex(r["done"]), r) for r in records)

    def _write(self, records: Iterable[dict]) -> None:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        size = self._file.tell()
        try:
            self._file.write(data)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError:
            self._file = _reopen_at(self.path, self._file, size)
            raise

    def close(self) -> None:
        self._file.close()

    @contextmanager
    def sorted(self) -> Iterator[AnswerReader]:
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
            yield from latest_in_order(sort_by_name(records, scratch))

    def shard_records(self, shard: str) -> Iterator[dict]:
        """The records of one tar shard's samples, in the order they were written (read from the whole
        journal: for a shard that an earlier run left half done)."""
        with open(self.path, "rb") as file:
            for line in file:
                record = read_record(line) if line.endswith(b"\n") else None
                if record is not None and record.get("shard") == shard:
                    yield record


def latest_in_order(records: Iterable[dict]) -> Iterator[dict]:
    """Records sorted by name (stable), each image's latest per job, in the order of its jobs: the
    answers a run's files hold."""
    for _, group in itertools.groupby(records, key=lambda r: r["file"]):
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


@dataclass
class _Shard:
    """A tar shard on its way through a run."""

    identity: str  # the tar's, when it was opened (``storage.identity_of``)
    samples: int = 0  # listed (and taken by ``--shard``)
    answers: int = 0  # answers its samples have, journaled earlier or to be
    pending: int = 0  # samples sent to the engine, not back yet
    clean: bool = True  # no sample has failed, and every one was listed
    ended: bool = False  # discovery is past it


class ShardProgress:
    """Which tar shards a run finishes: once every sample of a shard that was listed whole is journaled,
    the shard's line is; a later run that asks the same of it (``jobs``) skips it without opening it."""

    def __init__(self, journal: Journal, jobs: str):
        self.journal = journal
        self.jobs = jobs
        self.shards: dict[str, _Shard] = {}  # by name, until they end and are back

    def finished(self, identity: str, name: str) -> int | None:
        """The samples of the shard ``name`` (as ``storage.identity_of`` knows it) if an earlier run
        finished it (discovery's question)."""
        return self.journal.finished_shard(shard_key(identity, name, self.jobs))

    def planned(self, ref: ImageRef, answers: int, pending: bool, failed: bool) -> None:
        """A sample was planned: ``answers`` in all, sent to the engine if ``pending``."""
        if ref.member is not None:
            shard = self.shards.setdefault(ref.member.shard, _Shard(ref.identity or identity_of(ref.path)))
            shard.samples += 1
            shard.answers += answers
            shard.pending += pending
            shard.clean = shard.clean and not failed

    def ended(self, end: ShardEnd) -> None:
        if not end.skipped:
            shard = self.shards.setdefault(end.name, _Shard(end.identity))
            shard.ended = True
            shard.clean = shard.clean and end.clean

    def returned(
        self, items: Iterable[ImageRef], journaled: set[str], finish: Callable[[str], bool] | None = None
    ) -> None:
        """Samples came back; those named in ``journaled`` are journaled. Commits the shards now done
        (``commit``)."""
        for item in items:
            if item.member is not None:
                shard = self.shards[item.member.shard]
                shard.pending -= 1
                shard.clean = shard.clean and item.name in journaled
        self.commit(finish)

    def commit(self, finish: Callable[[str], bool] | None = None) -> None:
        """Journal the shards that ended with every sample back and none failed. ``finish(name)`` is
        told of each shard that ended (its files are written then): one it returns False for is not
        journaled as finished, so that a later run opens it again."""
        over = [name for name, shard in self.shards.items() if shard.ended and not shard.pending]
        records = []
        for name in over:
            shard = self.shards.pop(name)
            finished = finish(name) if finish else True
            if shard.clean and finished:
                done = shard_key(shard.identity, name, self.jobs).hex()
                records.append(
                    {"shard": name, "done": done, "samples": shard.samples, "answers": shard.answers}
                )
        if records:
            self.journal.mark_shards(records)
