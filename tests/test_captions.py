"""Caption files for training sets: sidecars, trigger words, ownership, clashes, metadata.jsonl."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from florence_cli.cli import main
from florence_cli.config import CaptionOptions
from florence_cli.tasks import TaskError
from florence_cli.writers import FILE_MODE

from .conftest import MAX_NEW_TOKENS, random_image, write_images
from .helpers import image_bytes, read_jsonl, write_shard


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "imgs"
    write_images(folder, 2)
    write_images(folder / "sub", 1, start_seed=10, ext="jpg")
    return folder


NAMES = ["img00.png", "img01.png", "sub/img00.jpg"]


def _run(annotator, inputs, out, tasks=("CAPTION",), **captions):
    inputs = inputs if isinstance(inputs, list) else [str(inputs)]
    return annotator.run(inputs, out, list(tasks), captions=CaptionOptions(**captions))


def _answers(out: Path, slug: str = "caption") -> dict[str, str]:
    return {name: (out / slug / f"{name}.txt").read_text(encoding="utf-8") for name in NAMES}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sidecars_beside_images_carry_trigger_words_that_the_journal_does_not(annotator, images, tmp_path):
    out = tmp_path / "out"
    summary = annotator.run(
        [str(images)], out, ["CAPTION"], jsonl=str(tmp_path / "a.jsonl"),
        captions=CaptionOptions(sidecar=True, prefix="ohwx 人, ", suffix=", best"),
    )  # fmt: skip
    assert summary.exit_code == 0 and summary.annotated == 3
    answers = _answers(out)
    for name, answer in answers.items():
        sidecar = (images / name).with_suffix(".txt")
        assert sidecar.read_bytes() == f"ohwx 人, {answer}, best".encode()
        assert stat.S_IMODE(sidecar.stat().st_mode) == FILE_MODE  # the user's umask, not mkstemp's 0600
    streamed = {r["file"]: r["result"] for r in read_jsonl(tmp_path / "a.jsonl")}
    assert streamed == answers  # the model's own answer, without trigger words


def test_sidecar_dir_writes_the_tree_elsewhere_and_leaves_the_image_folder_alone(annotator, images, tmp_path):
    before = _snapshot(images)
    captions = tmp_path / "captions"
    _run(annotator, images, tmp_path / "out", sidecar_dir=captions, extension=".caption")
    assert _snapshot(images) == before
    answers = _answers(tmp_path / "out")
    written = {name: (captions / name).with_suffix(".caption").read_text(encoding="utf-8") for name in NAMES}
    assert written == answers


def test_a_caption_file_florence_did_not_write_is_kept_unless_overwrite_captions(annotator, images, tmp_path):
    mine = images / "img00.txt"
    mine.write_text("a hand-written caption", encoding="utf-8")
    summary = _run(annotator, images, tmp_path / "out", sidecar=True)
    assert mine.read_text(encoding="utf-8") == "a hand-written caption"
    assert summary.captions_kept == 1 and summary.kept_captions == [str(mine)]
    assert "1 caption file kept" in summary.line()
    assert (images / "img01.txt").read_text(encoding="utf-8") == _answers(tmp_path / "out")["img01.png"]
    summary = _run(annotator, images, tmp_path / "out", sidecar=True, overwrite=True)
    assert summary.captions_kept == 0
    assert mine.read_text(encoding="utf-8") == _answers(tmp_path / "out")["img00.png"]


def test_reruns_keep_edits_and_rewrite_only_florences_own_captions(annotator, images, tmp_path):
    out = tmp_path / "out"
    _run(annotator, images, out, sidecar=True, prefix="old, ")
    edited = images / "img01.txt"
    edited.write_text("fixed by hand", encoding="utf-8")
    summary = _run(annotator, images, out, sidecar=True, prefix="new, ")  # every image is done already
    assert summary.annotated == 0 and summary.skipped == 3
    assert edited.read_text(encoding="utf-8") == "fixed by hand" and summary.captions_kept == 1
    answers = _answers(out)
    for name in ("img00.png", "sub/img00.jpg"):
        assert (images / name).with_suffix(".txt").read_text(encoding="utf-8") == "new, " + answers[name]


def test_sidecars_asked_for_after_the_run_are_written_from_its_answers(annotator, images, tmp_path):
    out = tmp_path / "out"
    _run(annotator, images, out)
    assert not list(images.rglob("*.txt"))
    summary = _run(annotator, images, out, sidecar=True)
    assert summary.annotated == 0
    assert {n: (images / n).with_suffix(".txt").read_text(encoding="utf-8") for n in NAMES} == _answers(out)


def _cli(model, *args, input=None):
    argv = ["annotate", *args, "-m", str(model), "--device", "cpu", "--max-new-tokens", str(MAX_NEW_TOKENS),
            "--workers", "0"]  # fmt: skip
    return CliRunner().invoke(main, argv, input=input, catch_exceptions=False)


def test_two_images_that_would_share_a_caption_are_refused_before_any_image_is_read(tiny_model, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    random_image(1).save(folder / "a.jpg")
    random_image(2).save(folder / "a.png")
    random_image(3).save(folder / "b.png")
    out = tmp_path / "out"
    result = _cli(tiny_model, str(folder), "-t", "CAPTION", "--sidecar", "-o", str(out))
    assert result.exit_code == 2
    assert f"{folder / 'a.jpg'} and {folder / 'a.png'} would share the caption file {folder / 'a.txt'}" in (
        result.stderr
    )
    assert "--sidecar-naming full" in result.stderr
    assert not list(folder.glob("*.txt")) and not (out / "caption").exists()
    result = _cli(
        tiny_model, str(folder), "-t", "CAPTION", "--sidecar", "--sidecar-naming", "full", "-o", str(out)
    )
    assert result.exit_code == 0, result.output
    for name in ("a.jpg", "a.png", "b.png"):
        assert (folder / f"{name}.txt").read_text(encoding="utf-8") == (
            out / "caption" / f"{name}.txt"
        ).read_text(encoding="utf-8")


def test_paths_on_stdin_that_would_share_a_caption_fail_the_second_image_only(tiny_model, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    random_image(1).save(folder / "a.jpg")
    random_image(2).save(folder / "a.png")
    out = tmp_path / "out"
    paths = f"{folder / 'a.jpg'}\n{folder / 'a.png'}\n"
    result = _cli(tiny_model, "-", "-t", "CAPTION", "--sidecar", "-o", str(out), input=paths)
    assert result.exit_code == 1
    assert "would share the caption file" in result.stderr
    first = (out / "caption").rglob("a.jpg.txt")
    assert (folder / "a.txt").read_text(encoding="utf-8") == next(first).read_text(encoding="utf-8")
    assert not list((out / "caption").rglob("a.png.txt"))


def test_captions_come_from_one_named_text_task(annotator, images, tmp_path):
    with pytest.raises(TaskError, match=r"`captions\.task`"):
        _run(annotator, images, tmp_path / "out", ["CAPTION", "OCR"], sidecar=True)
    with pytest.raises(TaskError, match="not among the text tasks"):
        _run(annotator, images, tmp_path / "out", ["CAPTION", "OD"], sidecar=True, task="OCR")
    with pytest.raises(TaskError, match="need a text task"):
        _run(annotator, images, tmp_path / "out", ["OD"], sidecar=True)
    with pytest.raises(TaskError, match=r"`captions\.prefix` needs `captions\.sidecar`"):
        _run(annotator, images, tmp_path / "out", ["CAPTION"], prefix="ohwx, ")
    out = tmp_path / "out"
    _run(annotator, images, out, ["CAPTION", "OCR", "OD"], sidecar=True, task="ocr")
    assert {n: (images / n).with_suffix(".txt").read_text(encoding="utf-8") for n in NAMES} == _answers(
        out, "ocr"
    )


@pytest.mark.parametrize(("flag", "message"), [
    (["--sidecar", "--caption-extension", ".png"], "is an image extension"),
    (["-t", "CAPTION", "--prefix", "x"], "--prefix needs --sidecar"),
    (["--sidecar", "--sidecar-task", "OD"], "is not among the text tasks"),
    (["--hf-metadata", "-t", "CAPTION"], "--hf-metadata needs exactly one input, a folder"),
    (["--sidecar"], "need a text task"),
])  # fmt: skip
def test_caption_flags_that_cannot_work_are_refused_in_one_line(tiny_model, images, tmp_path, flag, message):
    extra = [str(images / "img00.png")] if "--hf-metadata" in flag else []
    result = _cli(tiny_model, str(images), *extra, "-t", "OD", *flag, "-o", str(tmp_path / "o"))
    assert result.exit_code == 2 and message in result.stderr
    assert not (tmp_path / "o").exists()


def test_hf_metadata_loads_with_datasets_imagefolder(annotator, images, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    (images / "broken.png").write_bytes(b"not a png")  # fails: no row, and datasets is told to skip it
    out = tmp_path / "out"
    summary = _run(
        annotator, images, out, ["CAPTION", "OCR"], task="CAPTION", hf_metadata=True, prefix="ohwx, "
    )
    assert summary.failed == 1
    (images / "broken.png").unlink()
    dataset = datasets.load_dataset("imagefolder", data_dir=str(images), split="train")
    assert set(dataset.column_names) == {"image", "caption", "ocr", "text"}
    captions, ocr = _answers(out), _answers(out, "ocr")
    rows = sorted(dataset, key=lambda row: row["caption"] + row["ocr"])
    assert len(rows) == 3
    by_caption = {captions[n] + ocr[n]: n for n in NAMES}
    for row in rows:
        name = by_caption[row["caption"] + row["ocr"]]
        assert row["text"] == "ohwx, " + captions[name]
        assert row["image"].size == random_image_size(images / name)


def random_image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def test_metadata_jsonl_not_written_by_florence_is_kept(annotator, images, tmp_path):
    (images / "metadata.jsonl").write_text('{"file_name": "img00.png", "text": "mine"}\n', encoding="utf-8")
    summary = _run(annotator, images, tmp_path / "out", hf_metadata=True)
    assert summary.captions_kept == 1
    assert (images / "metadata.jsonl").read_text(encoding="utf-8").count("\n") == 1
    _run(annotator, images, tmp_path / "out", hf_metadata=True, overwrite=True)
    assert (images / "metadata.jsonl").read_text(encoding="utf-8").count("\n") == 3


def test_a_caption_that_is_a_link_is_never_followed(annotator, images, tmp_path):
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("someone else's file", encoding="utf-8")
    os.symlink(elsewhere, images / "img00.txt")
    summary = _run(annotator, images, tmp_path / "out", sidecar=True)
    assert summary.captions_kept == 1 and elsewhere.read_text(encoding="utf-8") == "someone else's file"


def test_shard_samples_take_captions_under_sidecar_dir_only(annotator, tmp_path):
    samples = [(f"{n:06d}", {"jpg": image_bytes(random_image(n), "JPEG"), "txt": b"alt"}) for n in range(2)]
    shard = write_shard(tmp_path / "shards" / "00000.tar", samples)
    with pytest.raises(TaskError, match=r"`captions\.sidecar_dir`"):
        _run(annotator, shard, tmp_path / "out", sidecar=True)
    captions = tmp_path / "captions"
    summary = _run(annotator, shard, tmp_path / "out", sidecar_dir=captions)
    assert summary.exit_code == 0 and summary.annotated == 2
    answers = {p.relative_to(tmp_path / "out" / "caption"): p.read_text(encoding="utf-8")
               for p in (tmp_path / "out" / "caption").rglob("*.txt")}  # fmt: skip
    sidecars = {p.relative_to(captions): p.read_text(encoding="utf-8") for p in captions.rglob("*.txt")}
    assert len(answers) == 2 and sidecars == answers  # a sample's name: <shard>/<key>, so <key>.txt


def test_merged_shards_keep_their_captions_and_prompt_files(annotator, images, tmp_path):
    """Caption files written by --shard runs stay florence-cli's in the merged folder (a rerun with
    another prefix updates them), and a free prompt's Parquet file merges like a task's."""
    pytest.importorskip("pyarrow")
    from florence_cli.config import Shard
    from florence_cli.merge import merge

    tasks = ["prompt:<GENERATE_TAGS>"]
    for index in range(2):
        annotator.run([str(images)], tmp_path / f"part{index}", tasks, shard=Shard.parse(f"{index}/2"),
                      parquet=True, captions=CaptionOptions(sidecar=True, prefix="a, "))  # fmt: skip
    merge([tmp_path / "part0", tmp_path / "part1"], tmp_path / "merged")
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "merged" / "prompt-generate_tags.parquet")
    assert sorted(table.column("name").to_pylist()) == sorted(NAMES)
    summary = _run(annotator, images, tmp_path / "merged", tasks, sidecar=True, prefix="b, ")
    assert summary.annotated == 0 and summary.captions_kept == 0
    answers = _answers(tmp_path / "merged", "prompt-generate_tags")
    assert {n: (images / n).with_suffix(".txt").read_text(encoding="utf-8") for n in NAMES} == {
        n: "b, " + a for n, a in answers.items()
    }
