"""``per_shard``: each tar shard's answers in files of its own, ``OUT/<shard>.<task>.parquet``, written as
soon as the shard is finished — every sample back — and, with an output URL, uploaded then, whole, with
the text files of its answers (``OUT/<task>/<shard>/<key>.txt``).

A dataset's labels then lie beside its shards, one file per shard as img2dataset, clip-retrieval and
DataComp lay out theirs, and a shard that a run finished is never written again (a later run skips it
unopened). The rows are those the whole folder's ``<task>.parquet`` holds for the shard, in its order.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from .discover import name_order
from .formats.parquet import shard_file, write_parquet
from .journal import Journal, latest_in_order
from .records import Answer
from .storage import under, upload
from .tasks import Task
from .writers import text_path


class ShardFiles:
    """The files of the tar shards a run is working through, written when each is finished."""

    def __init__(self, folder: Path, tasks: list[Task], journal: Journal, upload_to: str | None = None):
        """``upload_to``: a URL under which each file is put once written (at its path in ``folder``)."""
        self.folder = folder
        self.tasks = tasks
        self.journal = journal
        self.upload_to = upload_to.rstrip("/") if upload_to else None
        # Shards with answers from earlier runs: their files are built from the journal, not from memory.
        self.earlier = {name for name, count in journal.shard_answers.items() if name is not None and count}
        self.records: dict[str, list[dict]] = defaultdict(list)  # this run's answers, by shard

    def add(self, answers: Iterable[Answer]) -> None:
        """Answers just journaled."""
        for answer in answers:
            if answer.shard is not None:
                self.records[answer.shard].append(answer.record())

    def finish(self, shard: str) -> None:
        """Write the files of ``shard``, whose samples are all back, and upload them (``OSError``,
        ``storage.StorageError``: one could not be written or uploaded)."""
        records = self.records.pop(shard, [])
        if shard in self.earlier:
            records = list(self.journal.shard_records(shard))  # this run's answers are in it too
        ordered = list(latest_in_order(sorted(records, key=lambda r: name_order(r["file"]))))
        written = []
        for task in self.tasks:
            written.append(shard_file(self.folder, shard, task))
            answers = (Answer.from_record(r) for r in ordered if r["task"] == task.name)
            write_parquet(written[-1], task, answers, shard)
            if not task.writes_coco:  # its answers' text files, written as they came
                written += [
                    text_path(self.folder, task, r["file"]) for r in ordered if r["task"] == task.name
                ]
        if self.upload_to:
            upload(under(self.upload_to, self.folder, written))
