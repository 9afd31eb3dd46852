"""The journal: what a crash, a full disk or a hand edit leaves in it is never allowed to lose the rest."""

from __future__ import annotations

import errno
import json
import os

import pytest

from florence_cli.journal import Journal
from florence_cli.records import Answer
from florence_cli.tasks import resolve_task


def record(name: str, task: str = "OD", job: str | None = None, index: int = 0, raw: str = "") -> Answer:
    return Answer(resolve_task(task), 64, 48, raw, file=name, key=os.urandom(12), job=job or f"{task}\0",
                  job_index=index)  # fmt: skip


def sorted_answers(path) -> list[Answer]:
    with Journal(path).sorted() as answers:
        return list(answers())


def test_a_damaged_line_in_the_middle_is_skipped_and_what_follows_is_kept(tmp_path):
    path = tmp_path / "journal.jsonl"
    first, second, third = record("a.png"), record("b.png"), record("c.png")
    lines = [json.dumps(first.record()), '{"file": "x.png", "task": "OD", "ke', "\x00\xff garbage",
             json.dumps(second.record())]  # fmt: skip
    path.write_text("\n".join(lines) + "\n" + json.dumps(third.record())[:-5], encoding="latin-1")  # cut
    journal = Journal(path)
    assert journal.damaged_lines == 2
    assert journal.done == {first.key, second.key}  # c.png was cut short
    journal.append([third])
    journal.close()
    assert [a.file for a in sorted_answers(path)] == ["a.png", "b.png", "c.png"]
    assert path.read_bytes().count(b"\n") == 5  # the damaged lines stay; only the cut last line went


def test_records_come_in_name_order_the_latest_per_job_in_job_order(tmp_path):
    journal = Journal(tmp_path / "journal.jsonl")
    journal.append([record("b.png", raw="old"), record("sub/a.png"), record("a.png", raw="old")])
    journal.append([record("b.png", raw="new"), record("a.png", "OD", "OD\0car", 1)])
    journal.append([record("a.png", "OD", "OD\0bus", 0), record("a.png", "CAPTION", "CAPTION\0", 0)])
    journal.close()
    found = [(a.file, a.job, a.raw) for a in sorted_answers(tmp_path / "journal.jsonl")]
    assert found == [
        ("a.png", "CAPTION\0", ""), ("a.png", "OD\0", "old"), ("a.png", "OD\0bus", ""),
        ("a.png", "OD\0car", ""), ("b.png", "OD\0", "new"), ("sub/a.png", "OD\0", ""),
    ]  # fmt: skip


def test_a_batch_that_cannot_be_written_leaves_the_journal_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    journal.append([record("a.png")])
    before = path.read_bytes()

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        journal.append([record("b.png"), record("c.png")])
    assert path.read_bytes() == before
    monkeypatch.undo()
    journal.append([record("d.png")])  # the disk has room again: the run could go on
    journal.close()
    assert [a.file for a in sorted_answers(path)] == ["a.png", "d.png"]
