"""The Ray engine on WebDataset shards: one read task per shard, and the files of a local run."""

from __future__ import annotations

from pathlib import Path

import pytest

from florence_cli.discover import ImageRef
from florence_cli.jobs import WorkItem
from florence_cli.tarshards import Member

from .conftest import MAX_NEW_TOKENS, random_image
from .helpers import image_bytes, output_files, read_jsonl, write_shard
from .test_ray import BATCH, TASKS, _engine, _run, cluster, ray_home  # noqa: F401 - the simulated cluster, in its own Ray home

pytest.importorskip("ray")

pytestmark = pytest.mark.ray


def _item(name: str, tar: str | None = None) -> WorkItem:
    member = Member(tar, 512, 10, tar[:-4]) if tar else None
    ref = ImageRef(tar or name, name, (name,), member=member)
    return WorkItem(ref.path, ref.name, ref.order, (), member=ref.member)


def test_each_shard_is_read_by_one_task_and_files_batch_by_batch():
    from florence_cli.ray_engine.stages import batch_rows, read_groups

    work = [*(_item(f"a/{i}", "a.tar") for i in range(5)), _item("f0.png"), _item("f1.png"),
            *(_item(f"b/{i}", "b.tar") for i in range(3))]  # fmt: skip
    groups = read_groups(batch_rows(work, list(range(len(work))), 3))
    assert [[list(row.idx) for row in group] for group in groups] == [
        [[0, 1, 2], [3, 4, 5]],  # the batches that start in shard a (one ends with a file)
        [[6, 7, 8]],  # a batch that starts with a file: read alone
        [[9]],  # the rest of shard b
    ]
    first = groups[0][0].source[0]
    assert isinstance(first, Member) and Path(first.tar).is_absolute()  # a worker's cwd is not ours


def test_ray_on_shards_writes_the_files_of_a_local_run(cluster, tiny_model, tmp_path, monkeypatch):  # noqa: F811
    from florence_cli.annotate import Annotator, GenerationSettings, ModelConfig, RunConfig

    monkeypatch.chdir(tmp_path)
    corrupt = {"png": b"\x89PNG\r\n\x1a\n" + bytes(100)}
    for s in range(2):
        samples = [(f"k{s}{k}", {"png": image_bytes(random_image(10 * s + k)), "txt": b"a caption"})
                   for k in range(4)]  # fmt: skip
        samples = [*samples[:2], ("bad", corrupt), *samples[2:]] if s else samples
        write_shard(Path(f"shards/{s:05d}.tar"), samples)
    local = Annotator(RunConfig(ModelConfig(str(tiny_model), device="cpu"), batch_size=BATCH,
                                generation=GenerationSettings(max_new_tokens=MAX_NEW_TOKENS)))  # fmt: skip
    local.run(["shards/*.tar"], "local", TASKS, parquet=True)
    summary = _run(_engine(tiny_model, tmp_path / "probes"), ["shards/*.tar"], "ray", TASKS, parquet=True)
    assert (summary.annotated, summary.failed) == (8, 1)
    assert output_files(Path("ray")) == output_files(Path("local"))  # COCO, captions and Parquet files
    errors = read_jsonl(Path("ray/errors.jsonl"))
    assert errors == [{"file": "shards/00001/bad", "error": "not a readable image"}]
    done = [r["shard"] for r in read_jsonl(Path("ray/.florence/journal.jsonl")) if "done" in r]
    assert done == ["shards/00000"]  # the shard with a failed sample is opened again by a rerun


def test_ray_reads_shards_from_the_store_with_nothing_shared(cluster, s3, tiny_model, tmp_path, monkeypatch):  # noqa: F811
    """Workers get the URLs and the run's storage options, and read from the store themselves."""
    from dataclasses import replace

    monkeypatch.chdir(tmp_path)
    bucket = f"ray-{tmp_path.name[-12:].lower().replace('_', '-')}"
    for s in range(2):
        samples = [(f"k{s}{k}", {"jpg": image_bytes(random_image(10 * s + k), "JPEG")}) for k in range(4)]
        write_shard(Path(f"{bucket}/shards/{s:05d}.tar"), samples)
    url = s3.bucket(bucket)
    s3.filesystem().put(f"{bucket}/", f"{bucket}/", recursive=True)
    engine = _engine(tiny_model, tmp_path / "probes")
    local = _run(engine, [f"{bucket}/shards/*.tar"], "local", TASKS, parquet=True)
    # the nodes started before the store's credentials were in this environment: they travel as options
    options = {**s3.options, "key": "testing", "secret": "testing"}
    engine = _engine(tiny_model, tmp_path / "probes")
    engine.config = replace(engine.config, storage_options=options)  # as the CLI builds both from one
    remote = _run(engine, [f"{url}/shards/*.tar"], "remote", TASKS, parquet=True, storage_options=options)
    assert (remote.annotated, remote.failed) == (local.annotated, local.failed) == (8, 0)
    assert output_files(Path("remote")) == output_files(Path("local"))


def test_workers_get_urls_as_they_are():
    from florence_cli.ray_engine.stages import batch_rows

    work = [_item("b/s/0", "s3://b/s.tar"), _item("b/s/1", "s3://b/s.tar")]
    [row] = batch_rows(work, [0, 1], 2)
    assert [source.tar for source in row.source] == ["s3://b/s.tar"] * 2
