"""Shards: ``--shard I/N`` splits the images by name; ``florence merge`` gives back one run's files."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from florence_cli.cli import main
from florence_cli.config import Shard
from florence_cli.jobs import parse_requests
from florence_cli.merge import MergeError, merge

from .conftest import MAX_NEW_TOKENS, write_images
from .helpers import read_jsonl


def _files(out: Path) -> dict[str, bytes]:
    """Everything but the journal (a merge appends the shards' journals one after the other)."""
    files = [p for p in out.rglob("*") if p.is_file() and p.name != "journal.jsonl"]
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


def test_shard_parses_and_splits_names_once_and_evenly():
    assert Shard.parse("2/5") == Shard(2, 5) and str(Shard(2, 5)) == "2/5"
    for bad in ("5/5", "-1/3", "1", "a/b", "1/0"):
        with pytest.raises(ValueError, match="--shard"):
            Shard.parse(bad)
    names = [f"dir{i % 7}/img{i:05d}.jpg" for i in range(3000)]
    shards = [Shard(i, 3) for i in range(3)]
    taken = [[name for name in names if shard.takes(name)] for shard in shards]
    assert sorted(name for part in taken for name in part) == sorted(names)  # each name exactly once
    assert all(900 < len(part) < 1100 for part in taken)


@pytest.fixture(scope="module")
def annotator(florence_model):
    """Batches of one: the float scores in the outputs depend on the batches' make-up, which a shard
    changes (the answers themselves do not)."""
    from florence_cli.annotate import Annotator, GenerationSettings, RunConfig

    config = RunConfig(batch_size=3, generation=GenerationSettings(max_new_tokens=MAX_NEW_TOKENS))
    return Annotator(config, model=florence_model)


@pytest.fixture
def folder(tmp_path) -> Path:
    images = tmp_path / "imgs"
    write_images(images, 6)
    write_images(images / "sub", 3, start_seed=10, ext="jpg")
    for bad in ("a.png", "broken.png", "empty.png", "sub/broken.jpg"):  # in shards 2, 0, 0 and 2 of 3
        (images / bad).write_bytes(b"not an image" if bad != "empty.png" else b"")
    return images


def test_three_shards_merged_equal_one_run(annotator, folder, tmp_path):
    requests = parse_requests(["OD", "CAPTION", "OPEN_VOCABULARY_DETECTION"], classes="car,person")
    single = tmp_path / "single"
    annotator.run([str(folder)], single, requests, jsonl=str(single / "answers.jsonl"), parquet=True)
    shards = [tmp_path / f"shard{index}" for index in range(3)]
    seen = [
        annotator.run(
            [str(folder)],
            out,
            requests,
            jsonl=str(out / "answers.jsonl"),
            shard=Shard(index, 3),
            parquet=True,
        )
        for index, out in enumerate(shards)
    ]
    assert sum(summary.images for summary in seen) == 13 and all(summary.images < 13 for summary in seen)
    assert sum(summary.failed > 0 for summary in seen) == 2  # failures in two shards, interleaved by name
    merged = tmp_path / "merged"
    assert merge(shards, merged).images == {"od.json": 9, "open_vocabulary_detection.json": 9}
    assert _files(merged) == _files(single)  # errors.jsonl too, byte for byte
    errors = [e["file"] for e in read_jsonl(single / "errors.jsonl")]
    assert errors == ["a.png", "broken.png", "empty.png", "sub/broken.jpg"]
    again = annotator.run([str(folder)], merged, requests)  # a merged folder resumes as one run's
    assert (again.annotated, again.skipped) == (0, 9)
    assert _files(merged) == _files(single)


def test_merge_refuses_what_is_not_one_split(annotator, folder, tmp_path):
    outs = {}
    for name, shard in [("a", Shard(0, 2)), ("b", Shard(1, 2)), ("c", Shard(1, 3)), ("plain", None)]:
        outs[name] = tmp_path / name
        annotator.run([str(folder / "sub")], outs[name], ["CAPTION"], shard=shard)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    for folders, output, message in [
        ([outs["a"]], tmp_path / "m1", "every shard of one split"),
        ([outs["a"], outs["c"]], tmp_path / "m2", "every shard of one split"),
        ([outs["a"], outs["plain"]], tmp_path / "m3", "every shard of one split"),
        ([outs["a"], outs["b"]], tmp_path / "full", "not empty"),
        ([outs["a"], tmp_path / "full"], tmp_path / "m4", "not a florence annotate output folder"),
    ]:
        with pytest.raises(MergeError, match=message):
            merge(folders, output)


def test_a_shard_folder_refuses_another_shard(annotator, folder, tmp_path):
    from florence_cli.annotate import SettingsMismatch

    annotator.run([str(folder / "sub")], tmp_path / "out", ["CAPTION"], shard=Shard(0, 2))
    with pytest.raises(SettingsMismatch):
        annotator.run([str(folder / "sub")], tmp_path / "out", ["CAPTION"], shard=Shard(1, 2))


def test_merge_command(annotator, folder, tmp_path):
    outs = [tmp_path / f"s{i}" for i in range(2)]
    for index, out in enumerate(outs):
        annotator.run([str(folder / "sub")], out, ["OD"], shard=Shard(index, 2))
    result = CliRunner().invoke(main, ["merge", *map(str, outs), "-o", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "od.json: 3 images" in result.stderr
    refused = CliRunner().invoke(main, ["merge", str(outs[0]), "-o", str(tmp_path / "m2")])
    assert refused.exit_code == 1 and "every shard" in refused.output
