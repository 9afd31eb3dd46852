"""WebDataset tar shards in: samples named <shard>/<key>, decoded from the tar, failing alone, resumed
by shard; Parquet and CSV lists of paths in."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from florence_cli import tarshards
from florence_cli.cli import main
from florence_cli.discover import ImageRef, InputError, discover
from florence_cli.pathlist import PathList
from florence_cli.tarshards import ShardEnd, expand_braces, read_member

from .conftest import random_image, write_images
from .helpers import image_bytes, output_files, read_jsonl, write_shard

TASKS = ["CAPTION", "OD"]


def _sample(seed: int, form: str = "PNG") -> dict[str, bytes]:
    """An img2dataset sample: the image, its caption and its metadata."""
    extension = "jpg" if form == "JPEG" else "png"
    image = image_bytes(random_image(seed, size=(64 + 8 * (seed % 3), 48)), form)
    return {extension: image, "txt": f"caption {seed}".encode(), "json": json.dumps({"seed": seed}).encode()}


@pytest.fixture
def shards(tmp_path, monkeypatch) -> list[Path]:
    """Two shards of three samples in ``shards/`` under the working directory (a tmp folder)."""
    monkeypatch.chdir(tmp_path)
    return [
        write_shard(
            Path("shards") / f"{s:05d}.tar", [(f"k{s}{k}", _sample(10 * s + k, form)) for k in range(3)]
        )
        for s, form in ((0, "PNG"), (1, "JPEG"))
    ]


def _journal(out: Path) -> list[dict]:
    return [r for r in read_jsonl(out / ".florence" / "journal.jsonl") if "file" in r]


def _raw_by_key(out: Path) -> dict[tuple[str, str], str]:
    """Each (key, task)'s raw answer, a key being a sample's key or a file's stem."""
    return {(r["file"].rsplit("/", 1)[-1].split(".")[0], r["task"]): r["raw"] for r in _journal(out)}


# -- discovery ---------------------------------------------------------------------------------------------
def test_samples_are_grouped_and_keyed_as_the_webdataset_package_reads_them(tmp_path, monkeypatch):
    webdataset = pytest.importorskip("webdataset")
    monkeypatch.chdir(tmp_path)
    tar = write_shard(Path("a.tar"), [
        ("x/000", _sample(0)), ("x/001", {"seg.png": b"mask", "jpg": image_bytes(random_image(1), "JPEG")}),
        ("002", {"json": b"{}", "webp": image_bytes(random_image(2), "WEBP"), "png": b"second image"}),
        ("003", {"txt": b"no image here"}),
    ])  # fmt: skip
    found = list(tarshards.samples(str(tar), "a"))
    theirs = list(webdataset.WebDataset(str(tar), shardshuffle=False))
    assert [key for key, _ in found] == [s["__key__"] for s in theirs] == ["x/000", "x/001", "002", "003"]
    images = [read_member(member) if member else None for _, member in found]
    assert images == [theirs[0]["png"], theirs[1]["jpg"], theirs[2]["webp"], None]  # first image member
    refs = list(discover([str(tar)]))
    assert [r.name for r in refs if isinstance(r, ImageRef)] == ["a/x/000", "a/x/001", "a/002"]
    assert [(r.path, r.reason) for r in refs if isinstance(r, InputError)] == [
        ("a/003", "no image member (jpg, jpeg, png or webp) in this sample")
    ]
    assert refs[-1] == ShardEnd(str(tar), "a", clean=False)


def test_braces_and_globs_expand_without_a_shell(shards):
    assert expand_braces("s/{00008..00011}.tar") == [f"s/{n:05d}.tar" for n in (8, 9, 10, 11)]
    assert expand_braces("{a,b{1..2}}-{x,y}") == ["a-x", "a-y", "b1-x", "b1-y", "b2-x", "b2-y"]
    assert expand_braces("{3..1}{}{lit}") == ["3{}{lit}", "2{}{lit}", "1{}{lit}"]
    names = ["shards/00000/k00", "shards/00000/k01", "shards/00000/k02", "shards/00001/k10"]
    for pattern in ("shards/{00000..00001}.tar", "shards/*.tar", "shards/0000[01].tar"):
        found = [r.name for r in discover([pattern]) if isinstance(r, ImageRef)]
        assert found[:4] == names and len(found) == 6, pattern
    missing = list(discover(["shards/{00001..00002}.tar"]))
    assert InputError("shards/00002.tar", "no such file or directory", shard=True) in missing
    assert sum(isinstance(r, ImageRef) for r in missing) == 3
    assert [type(r).__name__ for r in discover(["shards/00000.tar", "shards/*.tar"])].count("Duplicate") == 1


def test_headers_are_read_as_tarfile_reads_them_in_every_format(tmp_path):
    import io
    import tarfile

    long = "a/" + "long-folder-name/" * 8 + "ünïcode-key.png"  # past ustar's 100 bytes: a prefix, or more
    for form in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        path = tmp_path / f"{form}.tar"
        with tarfile.open(path, "w", format=form) as tar:
            folder = tarfile.TarInfo("folder")
            folder.type = tarfile.DIRTYPE
            tar.addfile(folder)
            for name, data in (("k0.png", b"x" * 700), (long, b"y" * 1024), ("k2.txt", b"")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        with tarfile.open(path) as tar:
            theirs = [(i.name, i.offset_data, i.size) for i in tar if i.isfile()]
        assert list(tarshards.members(str(path))) == theirs, form
        assert theirs[1][0] == long
    data = bytearray((tmp_path / f"{tarfile.PAX_FORMAT}.tar").read_bytes())
    data[512 + 10] ^= 1  # k0.png's header (after the folder's)
    (tmp_path / "damaged.tar").write_bytes(bytes(data))
    with pytest.raises(tarshards.ShardError, match="a damaged member header at byte 512"):
        list(tarshards.members(str(tmp_path / "damaged.tar")))
    (tmp_path / "not-a-tar.tar").write_bytes(b"PK\x03\x04" + bytes(600))
    with pytest.raises(tarshards.ShardError, match="a damaged member header at byte 0"):
        list(tarshards.members(str(tmp_path / "not-a-tar.tar")))


# -- runs --------------------------------------------------------------------------------------------------
def test_a_run_on_shards_answers_as_on_the_same_images_as_files(annotator, shards, tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    for shard, extension in zip(shards, ("png", "jpg"), strict=True):
        for key, member in tarshards.samples(str(shard), shard.stem):
            (files / f"{key}.{extension}").write_bytes(read_member(member))
    out = tmp_path / "out"
    summary = annotator.run([str(s) for s in shards], out, TASKS, jsonl=str(tmp_path / "a.jsonl"))
    assert (summary.images, summary.annotated, summary.failed) == (6, 6, 0)
    annotator.run([str(files)], tmp_path / "as-files", TASKS)
    assert _raw_by_key(out) == _raw_by_key(tmp_path / "as-files")  # the same pixels went in
    names = [f"shards/{s:05d}/k{s}{k}" for s in (0, 1) for k in range(3)]
    coco = json.loads((out / "od.json").read_text())
    assert [image["file_name"] for image in coco["images"]] == names
    captions = sorted(p.relative_to(out / "caption").as_posix() for p in (out / "caption").rglob("*.txt"))
    assert captions == [f"{n}.txt" for n in names]
    assert {r["file"] for r in read_jsonl(tmp_path / "a.jsonl")} == set(names)


def test_a_corrupt_member_or_a_cut_tar_fails_only_the_samples_it_holds(annotator, shards, tmp_path):
    corrupt = _sample(30)
    corrupt["png"] = corrupt["png"][:40] + b"\0" * 200  # a header, then nothing an image can be made of
    write_shard(Path("shards/bad.tar"), [("b0", _sample(31)), ("b1", corrupt), ("b2", _sample(32))])
    data = shards[1].read_bytes()
    second_image = data.index(b"k11.jpg")  # its header; its data starts one block later
    Path("shards/cut.tar").write_bytes(data[: second_image + 512 + 100])  # cut inside k11's image
    Path("shards/cut-at-block.tar").write_bytes(data[:second_image])  # cut right before k11's header
    out = tmp_path / "out"
    summary = annotator.run(["shards/bad.tar", "shards/cut.tar", "shards/cut-at-block.tar"], out, ["CAPTION"])
    errors = {e["file"]: e["error"] for e in read_jsonl(out / "errors.jsonl")}
    size = len(_member_bytes(shards[1], "k11"))
    assert errors == {
        "shards/bad/b1": "not a readable image",
        "shards/cut/k11": f"the tar shard ends inside this image (100 of {size} bytes)",
        "shards/cut.tar": "cannot read the tar shard past its sample 2: truncated inside k11.jpg",
        "shards/cut-at-block.tar": "cannot read the tar shard past its sample 1: truncated: the "
        "end-of-archive block is missing",
    }
    assert sorted(r["file"] for r in _journal(out)) == [
        "shards/bad/b0", "shards/bad/b2", "shards/cut-at-block/k10", "shards/cut/k10"
    ]  # fmt: skip
    assert (summary.annotated, summary.failed) == (4, 4)
    assert not [r for r in read_jsonl(out / ".florence" / "journal.jsonl") if "done" in r]  # none finished


def _member_bytes(tar: Path, key: str) -> bytes:
    return next(read_member(member) for k, member in tarshards.samples(str(tar), "s") if k == key)


def _opened(monkeypatch) -> list[str]:
    """The tars discovery lists from now on."""
    opened: list[str] = []
    real_samples = tarshards.samples

    def spy(tar, shard, size=None):
        opened.append(tar)
        return real_samples(tar, shard, size)

    monkeypatch.setattr("florence_cli.discover.samples", spy)
    return opened


def test_resume_finishes_a_cut_shard_and_skips_finished_ones(annotator, shards, tmp_path, monkeypatch):
    whole, out = tmp_path / "whole", tmp_path / "out"
    annotator.run(["shards/*.tar"], whole, TASKS)
    lines = (whole / ".florence" / "journal.jsonl").read_text().splitlines(keepends=True)
    done = [json.loads(line) for line in lines if '"done"' in line]
    assert [(d["shard"], d["samples"], d["answers"]) for d in done] == [
        ("shards/00000", 3, 6), ("shards/00001", 3, 6)
    ]  # fmt: skip
    # a run killed once shard 0 was done and one sample of shard 1 was journaled
    first_done = next(i for i, line in enumerate(lines) if '"done"' in line)
    kept = lines[: first_done + 1]
    assert sum('"shards/00001/' in line for line in kept) == 2  # k10: CAPTION and OD
    shutil.copytree(whole, out)
    (out / ".florence" / "journal.jsonl").write_text("".join(kept))
    for key in ("k11", "k12"):  # not written yet either
        (out / "caption" / "shards" / "00001" / f"{key}.txt").unlink()
    opened = _opened(monkeypatch)
    summary = annotator.run(["shards/*.tar"], out, TASKS)
    assert opened == ["shards/00001.tar"]
    assert (summary.images, summary.skipped, summary.annotated) == (6, 4, 2)
    assert output_files(out) == output_files(whole)
    opened.clear()
    summary = annotator.run(["shards/*.tar"], out, TASKS)
    assert opened == [] and (summary.images, summary.skipped, summary.annotated) == (6, 6, 0)
    # another task, a changed shard, a damaged line: opened again, only what is missing is done
    assert annotator.run(["shards/*.tar"], out, ["CAPTION"]).skipped == 6 and len(opened) == 2
    opened.clear()
    os.utime(shards[0], ns=(1, 1))
    journal = out / ".florence" / "journal.jsonl"
    text = journal.read_text().splitlines(keepends=True)
    damaged = next(i for i, line in enumerate(text) if '"shards/00001/k12"' in line)
    journal.write_text("".join([*text[:damaged], "{damaged\n", *text[damaged + 1 :]]))
    summary = annotator.run(["shards/*.tar"], out, TASKS)
    assert opened == ["shards/00000.tar", "shards/00001.tar"]
    assert (summary.annotated, summary.skipped, summary.damaged_journal_lines) == (4, 2, 1)


def test_cli_reads_shard_patterns_and_refuses_one_that_matches_nothing(tiny_model, shards, tmp_path):
    model = ["-m", str(tiny_model), "--max-new-tokens", "8", "-q"]
    result = CliRunner().invoke(main, ["annotate", "shards/*.tar", "-t", "CAPTION", "-o", "out", *model])
    assert result.exit_code == 0, result.output
    assert len(list(Path("out/caption/shards/00001").glob("*.txt"))) == 3
    result = CliRunner().invoke(main, ["annotate", "nothing/*.tar", "-t", "CAPTION", *model])
    assert result.exit_code == 2 and "nothing/*.tar: no such file or folder" in result.output


# -- lists of paths --------------------------------------------------------------------------------------
@pytest.fixture
def listed(tmp_path) -> Path:
    """Four images in ``data/imgs``, beside which lists name them."""
    write_images(tmp_path / "data" / "imgs", 4)
    return tmp_path / "data"


def test_a_parquet_or_csv_list_names_images_by_key_or_by_path(listed, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    absolute = str(listed / "imgs" / "img03.png")
    pq.write_table(pa.table({"url": ["imgs/img00.png", "imgs/img01.png", None, absolute],
                             "key": ["000", None, "002", "003"]}), listed / "list.parquet")  # fmt: skip
    (listed / "list.csv").write_text(f"path,key\nimgs/img00.png,a\n{absolute},../up\n", encoding="utf-8")
    found = list(discover([PathList(str(listed / "list.parquet"), "url", "key")]))
    assert [(r.path, r.name) for r in found if isinstance(r, ImageRef)] == [
        (str(listed / "imgs" / "img00.png"), "000"),
        (str(listed / "imgs" / "img01.png"), "imgs/img01.png"),
        (absolute, "003"),
    ]
    assert found[2] == InputError(f"{listed / 'list.parquet'} row 3", "no path in column url")
    found = list(discover([PathList(str(listed / "list.csv"))]))
    assert [r.name for r in found if isinstance(r, ImageRef)] == ["imgs/img00.png", absolute.lstrip("/")]
    found = list(discover([PathList(str(listed / "list.csv"), key_column="key")]))
    assert found[0].name == "a"
    assert found[1] == InputError(f"{listed / 'list.csv'} row 2", "its key '../up' cannot name a file inside "
                                  "the output folder")  # fmt: skip


def test_cli_from_parquet_annotates_the_list_and_refuses_a_missing_column(tiny_model, listed, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": ["imgs/img00.png", "imgs/img02.png"], "id": ["a", "b"]}),
                   listed / "list.parquet")  # fmt: skip
    base = ["annotate", "-t", "OD", "-m", str(tiny_model), "--max-new-tokens", "8", "-q"]
    out = tmp_path / "out"
    args = [*base, "--from-parquet", str(listed / "list.parquet"), "--key-column", "id", "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert [i["file_name"] for i in json.loads((out / "od.json").read_text())["images"]] == ["a", "b"]
    result = CliRunner().invoke(main, [*base, "--from-parquet", str(listed / "list.parquet"), "--path-column",
                                       "file", "-o", str(tmp_path / "o2")])  # fmt: skip
    assert result.exit_code == 2
    assert f"{listed / 'list.parquet'} has no column 'file' (its columns: path, id)" in result.output
    result = CliRunner().invoke(main, [*base, "--key-column", "id"])
    assert result.exit_code == 2 and "--key-column needs --from-parquet" in result.output
    result = CliRunner().invoke(main, base)
    assert result.exit_code == 2 and "nothing to annotate" in result.output


def test_without_pyarrow_parquet_lists_and_parquet_output_are_one_line(listed, monkeypatch):
    from florence_cli.formats.parquet import require_pyarrow
    from florence_cli.pathlist import PathListError

    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    with pytest.raises(PathListError, match=r"needs pyarrow: pip install 'florence-cli\[parquet\]'"):
        PathList(str(listed / "list.parquet")).check()
    with pytest.raises(ImportError, match=r"--parquet needs pyarrow"):
        require_pyarrow()
