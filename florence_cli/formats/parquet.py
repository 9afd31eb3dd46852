"""``--parquet``: a task's answers as ``OUT/<task>.parquet``, one row per image and query, in row groups.

Rebuilt from the journal at the end of each run that asks for it (as the COCO files are), so it holds
every answer the folder has, in name order, and a resumed or interrupted run leaves a whole file. It
streams: a row group is written every ``ROWS`` answers, so memory stays flat however many there are.

Columns: ``name`` (the output name), ``shard`` and ``key`` (a tar shard's sample: ``name`` is
``<shard>/<key>``; a file: no shard, and its name as key), ``query`` (the job's text input, if any),
``width``, ``height``, ``raw`` (the generated text), then the parsed answer: ``text`` for text tasks;
else one list entry per instance — ``labels``, ``scores``, and ``bboxes`` (``[x1, y1, x2, y2]``),
``polygons`` (each ``[x1, y1, x2, y2, ...]``) or ``quads`` (OCR: four corners), as the task gives.

``--per-shard`` writes each tar shard's rows to a file of its own, ``<shard>.<task>.parquet``, when the
shard is finished (``shard_file``); its schema names the shard.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from pathlib import Path

from ..records import Answer, Instance
from ..tasks import Output, Task, resolve_task
from ..writers import atomic_writer

TASK_KEY = "florence_task"  # schema metadata: the task a file holds
SHARD_KEY = "florence_shard"  # schema metadata of a shard's own file (``--per-shard``): the shard

ROWS = 10_000  # rows per row group


def require_pyarrow() -> None:
    """Raise ``ImportError`` with what to install, where pyarrow is missing."""
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ImportError("--parquet needs pyarrow: pip install 'florence-cli[parquet]'") from None


# The located columns of each kind of answer, besides labels and scores; and each column's value for one
# instance (the lists of a row run parallel: entry k of each is instance k).
_LOCATED: dict[Output, tuple[str, ...]] = {
    Output.BOXES: ("bboxes",),
    Output.POLYGONS: ("polygons",),
    Output.OCR_REGIONS: ("quads",),
    Output.BOXES_OR_POLYGONS: ("bboxes", "polygons"),
}
_INSTANCE: dict[str, Callable[[Instance], object]] = {
    "labels": lambda i: i.label,
    "scores": lambda i: i.score,
    "bboxes": lambda i: i.bbox,
    "polygons": lambda i: i.polygons,
    "quads": lambda i: i.quad,
}


def schema(task: Task, shard: str | None = None):
    """The Arrow schema of ``task``'s file (a tar shard's own, if ``shard`` is given)."""
    import pyarrow as pa

    floats = pa.list_(pa.float64())
    types = {"labels": pa.list_(pa.string()), "scores": floats, "bboxes": pa.list_(floats),
             "polygons": pa.list_(pa.list_(floats)), "quads": pa.list_(floats)}  # fmt: skip
    common = [("name", pa.string()), ("shard", pa.string()), ("key", pa.string()), ("query", pa.string()),
              ("width", pa.int32()), ("height", pa.int32()), ("raw", pa.string())]  # fmt: skip
    parsed = (
        [("text", pa.string())]
        if task.output is Output.TEXT
        else [(c, types[c]) for c in _parsed_columns(task)]
    )
    metadata = {TASK_KEY: task.name, **({SHARD_KEY: shard} if shard is not None else {})}
    return pa.schema([*common, *parsed], metadata=metadata)  # the task (and shard), for florence merge


def file_task(path: Path) -> Task:
    """The task a Parquet file of ours holds (its name alone does not tell a free prompt's)."""
    return resolve_task(_metadata(path)[TASK_KEY.encode()].decode("utf-8"))


def is_shard_file(path: Path) -> bool:
    """Whether ``path`` is one tar shard's file (``--per-shard``), not a whole folder's."""
    return SHARD_KEY.encode() in _metadata(path)


def _metadata(path: Path) -> dict:
    import pyarrow.parquet as pq

    return pq.read_schema(path).metadata or {}


def shard_file(folder: Path, shard: str, task: Task) -> Path:
    """Where ``--per-shard`` writes a tar shard's answers to ``task``: ``<shard>.<task>.parquet``, so a
    dataset's labels lie beside its shards as img2dataset lays out its own Parquet files."""
    return folder / f"{shard}.{task.slug}.parquet"


def write_shard_files(folder: Path, task: Task, answers: Iterable[Answer]) -> list[Path]:
    """Each tar shard's file of ``task`` from ``answers`` in name order (a shard's answers are adjacent
    in it, as its samples' names share their first parts); answers of no shard are left out."""
    written = []
    for shard, group in itertools.groupby(answers, key=lambda a: a.shard):
        if shard is not None:
            written.append(shard_file(folder, shard, task))
            write_parquet(written[-1], task, group, shard)
    return written


def _parsed_columns(task: Task) -> tuple[str, ...]:
    return ("labels", "scores", *_LOCATED[task.output])


def row(answer: Answer) -> dict:
    """One answer as a row of its task's file."""
    key = answer.file[len(answer.shard) + 1 :] if answer.shard is not None else answer.file
    values = {"name": answer.file, "shard": answer.shard, "key": key, "query": answer.query,
              "width": answer.width, "height": answer.height, "raw": answer.raw}  # fmt: skip
    if answer.task.output is Output.TEXT:
        return {**values, "text": answer.text}
    parsed = {c: [_INSTANCE[c](i) for i in answer.instances] for c in _parsed_columns(answer.task)}
    return {**values, **parsed}


def write_parquet(path: Path, task: Task, answers: Iterable[Answer], shard: str | None = None) -> int:
    """Write ``task``'s answers (in the order given) to ``path``, atomically; returns the rows written.
    ``shard``: the file is that tar shard's own (``--per-shard``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table_schema = schema(task, shard)
    written = 0
    with atomic_writer(path, "wb") as file, pq.ParquetWriter(file, table_schema) as writer:
        rows: list[dict] = []
        for answer in answers:
            rows.append(row(answer))
            if len(rows) == ROWS:
                writer.write_table(pa.Table.from_pylist(rows, schema=table_schema))
                written, rows = written + len(rows), []
        if rows or not written:  # an empty file still has its schema
            writer.write_table(pa.Table.from_pylist(rows, schema=table_schema))
            written += len(rows)
    return written
