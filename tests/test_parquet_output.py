"""--parquet: OUT/<task>.parquet, a row per image and query, rebuilt from the journal in row groups."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from florence_cli.formats import parquet
from florence_cli.records import Answer, Instance
from florence_cli.tasks import resolve_task

from .conftest import write_images
from .helpers import image_bytes, read_jsonl, write_shard

pq = pytest.importorskip("pyarrow.parquet")


def _answer(task: str, name: str, shard: str | None = None, **fields) -> Answer:
    return Answer(resolve_task(task), 64, 48, f"raw {name}", file=name, shard=shard, **fields)


def test_every_kind_of_answer_has_typed_columns_one_entry_per_instance(tmp_path, monkeypatch):
    monkeypatch.setattr(parquet, "ROWS", 2)
    box = Instance("car", bbox=[1.5, 2.5, 30.5, 40.5], score=0.9)
    polygon = Instance("cat", polygons=[[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]], score=None)
    quad = Instance("EXIT", quad=[1.0, 1.0, 9.0, 1.0, 9.0, 5.0, 1.0, 5.0], score=0.5)
    cases = {
        "CAPTION": ([_answer("CAPTION", f"s/k{i}", "s", text=f"a cat {i}") for i in range(5)],
                    {"text": "a cat 0"}),
        "OD": ([_answer("OD", "a.jpg", instances=[box, box])],
               {"labels": ["car", "car"], "scores": [0.9, 0.9], "bboxes": [box.bbox, box.bbox]}),
        "REFERRING_EXPRESSION_SEGMENTATION": (
            [_answer("REFERRING_EXPRESSION_SEGMENTATION", "a.jpg", query="the cat", instances=[polygon])],
            {"labels": ["cat"], "scores": [None], "polygons": [polygon.polygons]}),
        "OCR_WITH_REGION": ([_answer("OCR_WITH_REGION", "a.jpg", instances=[quad])],
                            {"labels": ["EXIT"], "scores": [0.5], "quads": [quad.quad]}),
        "OPEN_VOCABULARY_DETECTION": (
            [_answer("OPEN_VOCABULARY_DETECTION", "a.jpg", query="car", instances=[box, polygon])],
            {"labels": ["car", "cat"], "scores": [0.9, None], "bboxes": [box.bbox, None],
             "polygons": [[], polygon.polygons]}),
    }  # fmt: skip
    for task, (answers, parsed) in cases.items():
        path = tmp_path / f"{task}.parquet"
        assert parquet.write_parquet(path, resolve_task(task), iter(answers)) == len(answers)
        table = pq.read_table(path)
        first = table.to_pylist()[0]
        shard = answers[0].shard
        assert first == {"name": answers[0].file, "shard": shard, "key": "k0" if shard else "a.jpg",
                         "query": answers[0].query, "width": 64, "height": 48, "raw": answers[0].raw,
                         **parsed}, task  # fmt: skip
        assert table.num_rows == len(answers)
    assert pq.ParquetFile(tmp_path / "CAPTION.parquet").num_row_groups == 3  # 2 + 2 + 1 rows
    assert str(pq.read_schema(tmp_path / "OPEN_VOCABULARY_DETECTION.parquet").field("polygons").type) == (
        "list<element: list<element: list<element: double>>>"
    )
    empty = tmp_path / "empty.parquet"
    assert parquet.write_parquet(empty, resolve_task("OD"), iter([])) == 0
    assert pq.read_table(empty).num_rows == 0 and "bboxes" in pq.read_schema(empty).names


def test_a_run_writes_every_answer_of_the_folder_readable_by_pandas_datasets_and_duckdb(
    annotator, tmp_path, monkeypatch
):
    from .conftest import random_image

    monkeypatch.chdir(tmp_path)
    write_images(Path("imgs"), 3)
    write_shard(
        Path("shards/00000.tar"), [(f"k{i}", {"png": image_bytes(random_image(40 + i))}) for i in range(3)]
    )
    first = annotator.run(["imgs", "shards/00000.tar"], "out", ["OD", "CAPTION"], parquet=True)
    assert first.annotated == 6
    write_images(Path("imgs/more"), 1, start_seed=9)  # the rerun adds it, and the file holds all seven
    assert annotator.run(["imgs", "shards/00000.tar"], "out", ["OD", "CAPTION"], parquet=True).annotated == 1
    journal = {
        (r["file"], r["task"]): r for r in read_jsonl(Path("out/.florence/journal.jsonl")) if "file" in r
    }
    od = pq.read_table("out/od.parquet").to_pylist()
    names = ["imgs/img00.png", "imgs/img01.png", "imgs/img02.png", "imgs/more/img00.png",
             "shards/00000/k0", "shards/00000/k1", "shards/00000/k2"]  # fmt: skip
    assert [row["name"] for row in od] == names  # name order, as the COCO file lists them
    assert [(row["shard"], row["key"]) for row in od][3:5] == [
        (None, "imgs/more/img00.png"),
        ("shards/00000", "k0"),
    ]
    for row in od:
        instances = journal[(row["name"], "OD")]["instances"]  # (the tiny model's answers may have none)
        for column, field in (("bboxes", "bbox"), ("labels", "label"), ("scores", "score")):
            assert row[column] == [instance[field] for instance in instances]
        assert row["raw"] == journal[(row["name"], "OD")]["raw"]
    coco = json.loads(Path("out/od.json").read_text())
    assert [image["file_name"] for image in coco["images"]] == names
    captions = pq.read_table("out/caption.parquet", columns=["name", "text"]).to_pylist()
    assert captions == [{"name": n, "text": Path("out/caption", f"{n}.txt").read_text()} for n in names]
    pandas = pytest.importorskip("pandas")
    assert list(pandas.read_parquet("out/caption.parquet")["name"]) == names
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    loaded = datasets.load_dataset(
        "parquet", data_files="out/od.parquet", split="train", cache_dir="hf-cache"
    )
    assert loaded.num_rows == 7 and loaded[4]["key"] == "k0" and loaded[0]["bboxes"] == od[0]["bboxes"]
    duckdb = pytest.importorskip("duckdb")
    rows = duckdb.sql(
        "SELECT o.name, o.key, o.bboxes, c.text FROM 'out/od.parquet' o JOIN 'out/caption.parquet' c "
        "USING (name) ORDER BY o.name"
    ).fetchall()  # the join a user makes: detections and captions of each sample, on its name
    assert [(name, key) for name, key, _, _ in rows] == [(row["name"], row["key"]) for row in od]
    assert [(bboxes, text) for _, _, bboxes, text in rows] == [
        (row["bboxes"], caption["text"]) for row, caption in zip(od, captions, strict=True)
    ]


def test_the_docs_join_img2dataset_metadata_with_the_captions(tmp_path, monkeypatch):
    """docs/datasets.md's snippet, run as written, on a folder laid out as img2dataset's (a .tar beside
    each .parquet): it reads only the .parquet files."""
    pandas = pytest.importorskip("pandas")
    monkeypatch.chdir(tmp_path)
    keys = ["000000000", "000000001", "000010000"]
    for shard, shard_keys in (("00000", keys[:2]), ("00001", keys[2:])):
        write_shard(Path(f"shards/{shard}.tar"), [(k, {"jpg": b"x"}) for k in shard_keys])
        pandas.DataFrame({"key": shard_keys, "url": [f"https://x/{k}.jpg" for k in shard_keys]}).to_parquet(
            f"shards/{shard}.parquet"
        )
    task = resolve_task("MORE_DETAILED_CAPTION")
    answers = [
        _answer("MORE_DETAILED_CAPTION", f"shards/{k[:5]}/{k}", f"shards/{k[:5]}", text=f"t{k}") for k in keys
    ]
    Path("labels").mkdir()
    parquet.write_parquet(Path("labels/more_detailed_caption.parquet"), task, answers)
    readme = (Path(__file__).resolve().parents[1] / "docs" / "datasets.md").read_text(encoding="utf-8")
    snippet = readme.split("```python\nimport glob\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec("import glob\n" + snippet, scope)
    joined = scope["joined"]
    assert sorted(joined["key"]) == keys and list(joined.sort_values("key")["text"]) == [
        f"t{k}" for k in keys
    ]
