"""The runner through its seam: a fake engine answers from literal Florence-2 outputs, so resume, the
journal, the errors log, captions, the rebuilt COCO and Parquet files and how a run ends are tested
with no model loaded."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest

from florence_cli import runner
from florence_cli.captions import CaptionClash
from florence_cli.config import CaptionOptions, RunConfig
from florence_cli.engine import Started, batches
from florence_cli.jobs import parse_requests
from florence_cli.journal import Journal
from florence_cli.parse import parse_answer
from florence_cli.records import ImageFailure, ItemResult
from florence_cli.tasks import OptionError

from .conftest import write_images
from .helpers import output_files, read_jsonl

RAW = {
    "OD": "</s><s>car<loc_53><loc_334><loc_147><loc_582>door handle<loc_10><loc_20><loc_30><loc_40></s>",
    "CAPTION": "</s><s>A green car parked in front of a yellow building.</s>",
    "CAPTION_TO_PHRASE_GROUNDING": "</s><s>a car<loc_10><loc_20><loc_30><loc_40></s>",
}
POSITIONS = 1024  # the fake checkpoint's limit on generated tokens


class FakeEngine:
    """Answers each job with ``RAW``'s text for its task, parsed as the model's answers are; images named
    in ``failing`` fail; ``on_batch(number)`` runs after each batch is handed over. Records what it was
    asked, in order."""

    def __init__(
        self, failing=(), on_batch=None, batch_size: int = 2, model_id="fake", captions: dict | None = None
    ):
        """``captions``: the CAPTION answers of some images, by name, instead of ``RAW``'s."""
        self.failing = failing
        self.captions = captions or {}
        self.model_id = model_id
        self.on_batch = on_batch or (lambda number: None)
        self.batch_size = batch_size
        self.calls: list[str] = []
        self.sent: list[str] = []

    def check(self, requests, max_new_tokens):
        self.calls.append("check")
        if max_new_tokens is not None and max_new_tokens > POSITIONS:
            raise OptionError(f"`generation.max_new_tokens` {max_new_tokens} is more than {POSITIONS}")
        return self.model_id

    def start(self) -> Started:
        self.calls.append("start")
        return Started("per-image")

    def close(self) -> None:
        self.calls.append("close")

    def results(self, items):
        for number, batch in enumerate(batches(items, self.batch_size)):
            self.sent += [item.name for item in batch]
            yield [self._answer(item) for item in batch]
            self.on_batch(number)

    def _answer(self, item) -> ItemResult:
        if item.name in self.failing:
            return ItemResult(item, failure=ImageFailure(item.name, "generation failed: bad"))
        raw = {**RAW, "CAPTION": self.captions.get(item.name, RAW["CAPTION"])}
        answers = [parse_answer(job.task, raw[job.task.name], 640, 480) for job in item.jobs]
        return ItemResult(item, 640, 480, answers=answers)


@pytest.fixture
def images(tmp_path) -> Path:
    write_images(tmp_path / "imgs", 5)
    return tmp_path / "imgs"


def _run(inputs, out: Path, engine: FakeEngine, tasks=("OD", "CAPTION"), **options) -> runner.RunSummary:
    config = replace(RunConfig(output=out), **options)
    return runner.run([str(i) for i in inputs], parse_requests(list(tasks)), config, engine)


def test_answers_become_coco_text_parquet_and_jsonl(images, tmp_path):
    from pycocotools.coco import COCO

    engine = FakeEngine()
    out = tmp_path / "out"
    summary = _run([images], out, engine, parquet=True, jsonl=str(tmp_path / "a.jsonl"))
    assert (summary.images, summary.annotated, summary.answers, summary.exit_code) == (5, 5, 10, 0)
    assert engine.calls == ["check", "start", "close"]
    coco = COCO(str(out / "od.json"))
    assert len(coco.getImgIds()) == 5 and len(coco.getAnnIds()) == 10
    [car] = [a for a in coco.loadAnns(coco.getAnnIds()) if a["image_id"] == 1][:1]
    assert coco.loadCats(car["category_id"])[0]["name"] == "car"
    assert car["bbox"] == pytest.approx([53.5 * 0.64, 334.5 * 0.48, 94 * 0.64, 248 * 0.48])
    assert (out / "caption" / "img00.png.txt").read_text() == RAW["CAPTION"][7:-4]
    import pyarrow.parquet as pq

    assert pq.read_table(out / "caption.parquet").num_rows == 5
    assert len(read_jsonl(tmp_path / "a.jsonl")) == 10


def test_resume_sends_only_what_is_missing_and_ends_with_one_runs_files(images, tmp_path):
    once = tmp_path / "once"
    _run([images], once, FakeEngine())
    out = tmp_path / "out"
    first = _run([images], out, FakeEngine(failing=("img03.png",)))
    assert (first.exit_code, first.failed) == (1, 1)
    again = FakeEngine()
    second = _run([images], out, again)
    assert again.sent == ["img03.png"] and (second.skipped, second.annotated) == (4, 1)
    subset = FakeEngine()
    third = _run([images], out, subset, tasks=("OD",))  # a rerun of a subset of the tasks adds nothing
    assert subset.sent == [] and third.skipped == 5
    assert output_files(out) == output_files(once)


def test_a_damaged_journal_line_is_skipped_and_its_answer_done_again(images, tmp_path):
    out = tmp_path / "out"
    _run([images], out, FakeEngine(), tasks=("OD",))
    journal = out / ".florence" / "journal.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join([lines[0], b'{"file": "img01.png", "ta\n', *lines[2:]]))
    engine = FakeEngine()
    summary = _run([images], out, engine, tasks=("OD",))
    assert summary.damaged_journal_lines == 1 and engine.sent == ["img01.png"]
    assert len(json.loads((out / "od.json").read_text())["images"]) == 5


def test_the_errors_log_is_in_name_order_whatever_order_failures_came(images, tmp_path):
    out = tmp_path / "out"
    engine = FakeEngine(failing=("img04.png", "img00.png", "img02.png"), batch_size=5)
    engine.results = lambda items, results=engine.results: (batch[::-1] for batch in results(items))
    _run([images], out, engine)
    assert [e["file"] for e in read_jsonl(out / "errors.jsonl")] == ["img00.png", "img02.png", "img04.png"]


def test_caption_files_of_earlier_answers_are_written_at_the_end_without_the_engine(images, tmp_path):
    out, side = tmp_path / "out", tmp_path / "side"
    _run([images], out, FakeEngine(), tasks=("CAPTION",))
    engine = FakeEngine()
    captions = CaptionOptions(sidecar_dir=side, prefix="ohwx, ")
    summary = _run([images], out, engine, tasks=("CAPTION",), captions=captions)
    assert engine.sent == [] and summary.skipped == 5
    assert (side / "img02.txt").read_text() == "ohwx, A green car parked in front of a yellow building."
    ledger = read_jsonl(side / ".florence-captions.jsonl")  # beside the captions
    assert sorted(r["name"] for r in ledger) == [f"img0{i}.txt" for i in range(5)]


def test_inputs_are_discovered_once_with_caption_files(images, tmp_path, monkeypatch):
    calls = []
    discover = runner.discover
    monkeypatch.setattr(runner, "discover", lambda *a: calls.append(a) or discover(*a))
    captions = CaptionOptions(sidecar_dir=tmp_path / "side")
    summary = _run([images], tmp_path / "out", FakeEngine(), tasks=("CAPTION",), captions=captions)
    assert summary.annotated == 5 and len(calls) == 1


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"generation": replace(RunConfig().generation, max_new_tokens=5000)}, "max_new_tokens"),
        ({"batch_size": 0}, "`batch_size`"),
        ({"workers": -1}, "`workers`"),
        ({"captions": CaptionOptions(prefix="x")}, "`captions.prefix` needs"),
    ],
)
def test_preflight_refuses_before_the_output_folder_or_the_model(images, tmp_path, options, error):
    engine = FakeEngine()
    with pytest.raises(OptionError, match=error):
        _run([images], tmp_path / "out", engine, **options)
    assert "start" not in engine.calls and not (tmp_path / "out").exists()


def test_preflight_refuses_two_images_sharing_a_caption_file_before_the_model(images, tmp_path):
    (images / "img00.png").rename(images / "same.png")
    (images / "img01.png").rename(images / "same.jpg")
    engine = FakeEngine()
    with pytest.raises(CaptionClash, match="would share the caption file"):
        _run([images], tmp_path / "out", engine, tasks=("CAPTION",), captions=CaptionOptions(sidecar=True))
    assert engine.calls == ["check"] and engine.sent == []


def test_a_ctrl_c_swallowed_where_it_landed_still_stops_the_run(images, tmp_path):
    from florence_cli.interrupts import Interrupted

    def swallowed(number: int) -> None:  # as Python swallows an exception raised in a __del__
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # (the handler runs at the next instruction, or ends this sleep at once)
        except Interrupted:
            pass

    engine = FakeEngine(on_batch=swallowed, batch_size=2)
    summary = _run([images], tmp_path / "out", engine, tasks=("OD",))
    assert (summary.exit_code, summary.annotated) == (130, 2)  # stopped at the next batch, not at the end
    assert engine.sent == ["img00.png", "img01.png", "img02.png", "img03.png"]


def test_ctrl_c_stops_with_the_files_agreeing_with_the_journal(images, tmp_path):
    out = tmp_path / "out"
    engine = FakeEngine(on_batch=lambda number: os.kill(os.getpid(), signal.SIGINT), batch_size=2)
    summary = _run([images], out, engine, tasks=("OD",))
    assert summary.exit_code == 130 and summary.annotated == 2
    journaled = {r["file"] for r in read_jsonl(out / ".florence" / "journal.jsonl")}
    coco = json.loads((out / "od.json").read_text())
    assert {image["file_name"] for image in coco["images"]} == journaled == {"img00.png", "img01.png"}
    rerun = FakeEngine()
    assert _run([images], out, rerun, tasks=("OD",)).exit_code == 0
    assert rerun.sent == ["img02.png", "img03.png", "img04.png"]


def test_a_full_disk_stops_the_run_and_the_same_command_finishes_it(images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    append = Journal.append

    def full_after_one(journal, answers):
        if journal.path.read_bytes().count(b"\n") >= 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        append(journal, answers)

    monkeypatch.setattr(Journal, "append", full_after_one)
    summary = _run([images], out, FakeEngine(), tasks=("OD",))
    assert summary.exit_code == runner.EXIT_OUTPUT_FAILED and "No space left" in summary.line()
    assert len(json.loads((out / "od.json").read_text())["images"]) == 2  # what the journal holds
    monkeypatch.undo()
    rerun = FakeEngine()
    assert _run([images], out, rerun, tasks=("OD",)).exit_code == 0 and len(rerun.sent) == 3


def test_the_engine_is_closed_when_the_run_fails(images, tmp_path):
    engine = FakeEngine()
    engine.results = lambda items: (_ for _ in ()).throw(RuntimeError("lost device"))
    with pytest.raises(RuntimeError, match="lost device"):
        _run([images], tmp_path / "out", engine)
    assert engine.calls[-1] == "close"


def _forget_setting(out: Path, key: str) -> None:
    settings = out / ".florence" / "settings.json"
    settings.write_text(json.dumps({k: v for k, v in json.loads(settings.read_text()).items() if k != key}))


def test_a_model_is_recognised_however_it_is_named(images, tmp_path, monkeypatch):
    from florence_cli.checkpoint import model_identity
    from florence_cli.config import ModelConfig

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    out, model_id = tmp_path / "out", model_identity(model)
    sent = []
    for name in ("model", "./model/", str(model)):
        engine = FakeEngine(model_id=model_id)
        assert _run([images], out, engine, tasks=("OD",), model=ModelConfig(name)).exit_code == 0
        sent.append(len(engine.sent))
    assert sent == [5, 0, 0]  # the same model, three ways: resumed
    _forget_setting(out, "model_id")  # as a folder made before models had ids records it
    summary = _run([images], out, FakeEngine(model_id=model_id), tasks=("OD",), model=ModelConfig(str(model)))
    assert summary.skipped == 5


def test_other_settings_are_refused_naming_each_difference_and_what_keeps_the_work(images, tmp_path):
    from florence_cli.config import ModelConfig
    from florence_cli.outdir import SettingsMismatch

    out = tmp_path / "out"
    _run([images], out, FakeEngine(), tasks=("OD",))
    generation = replace(RunConfig().generation, max_new_tokens=30)
    with pytest.raises(SettingsMismatch) as refused:
        _run([images], out, FakeEngine(model_id="other"), tasks=("OD",), generation=generation,
             model=ModelConfig("other-model", products="batched"))  # fmt: skip
    message = str(refused.value)
    assert "generation.max_new_tokens: 1024 → 30" in message
    assert "products: per-image or invariant → batched" in message
    assert "model: mrhendrey/Florence-2-large-ft-safetensors → other-model" in message
    assert (
        message.index("run with the earlier settings")
        < message.index("another output folder")
        < message.index("--overwrite")
    )


def test_an_output_folder_annotates_one_dataset(images, tmp_path, monkeypatch):
    from florence_cli.outdir import SettingsMismatch

    other = tmp_path / "other"
    write_images(other, 2, start_seed=40)  # img00.png, img01.png: the names of images in imgs too
    out = tmp_path / "out"
    _run([images], out, FakeEngine(), tasks=("OD",))
    engine = FakeEngine()
    with pytest.raises(SettingsMismatch, match="annotates another dataset") as refused:
        _run([other], out, engine, tasks=("OD",))
    assert str(other) in str(refused.value) and "another output folder" in str(refused.value)
    assert "start" not in engine.calls  # refused before the model loads
    monkeypatch.chdir(tmp_path)
    again = FakeEngine()  # the same folder, named otherwise, and other tasks: the same dataset
    assert _run(["imgs/"], out, again, tasks=("CAPTION",)).exit_code == 0 and len(again.sent) == 5
    _forget_setting(out, "inputs")  # as a folder made before it recorded its inputs
    assert _run([other], out, FakeEngine(), tasks=("OD",)).exit_code == 0


def test_caption_files_are_one_line_and_an_empty_answer_writes_none(images, tmp_path):
    side = tmp_path / "side"
    answers = {"img01.png": "</s><s>a cat\n on a mat \r\nsleeping</s>", "img02.png": "</s><s></s>"}
    engine = FakeEngine(captions=answers)
    summary = _run(
        [images], tmp_path / "out", engine, tasks=("CAPTION",), captions=CaptionOptions(sidecar_dir=side)
    )
    assert (side / "img01.txt").read_text() == "a cat on a mat sleeping"  # kohya reads a first line only
    assert not (side / "img02.txt").exists() and summary.captions_empty == 1
    assert "1 empty answer with no caption file" in summary.line() and summary.exit_code == 0


def test_caption_files_stay_florence_clis_in_a_run_into_another_output_folder(images, tmp_path):
    side = tmp_path / "side"
    _run(
        [images],
        tmp_path / "one",
        FakeEngine(),
        tasks=("CAPTION",),
        captions=CaptionOptions(sidecar_dir=side),
    )
    captions = CaptionOptions(sidecar_dir=side, prefix="ohwx, ")
    summary = _run([images], tmp_path / "two", FakeEngine(), tasks=("CAPTION",), captions=captions)
    assert summary.captions_kept == 0 and (side / "img03.txt").read_text().startswith("ohwx, A green car")


def test_a_caption_folder_that_cannot_be_written_stops_the_run_once_and_loses_no_answer(
    images, tmp_path, monkeypatch
):
    from florence_cli import captions

    def read_only(path, mode="w"):  # as a read-only folder answers (root would write there anyway)
        raise PermissionError(errno.EACCES, "Permission denied", str(path.parent / ".florence-x.tmp"))

    side, out = tmp_path / "side", tmp_path / "out"
    options = CaptionOptions(sidecar_dir=side)
    monkeypatch.setattr(captions, "atomic_writer", read_only)
    summary = _run([images], out, FakeEngine(), tasks=("CAPTION",), captions=options)
    assert summary.exit_code == runner.EXIT_OUTPUT_FAILED and summary.failed == 0
    assert f"cannot write {side / 'img00.txt'}: Permission denied" in summary.line()  # the caption file
    assert len(read_jsonl(out / ".florence" / "journal.jsonl")) == 2  # the batch's answers are kept
    monkeypatch.undo()
    rerun = FakeEngine()
    assert _run([images], out, rerun, tasks=("CAPTION",), captions=options).exit_code == 0
    assert len(rerun.sent) == 3 and sorted(p.name for p in side.glob("*.txt")) == [
        f"img0{i}.txt" for i in range(5)
    ]


def test_a_caption_file_that_cannot_be_written_fails_its_image_naming_the_file(images, tmp_path):
    side = tmp_path / "side"
    (side / "img02.txt").mkdir(parents=True)  # a folder where the caption file would go
    failures = []
    config = replace(RunConfig(output=tmp_path / "out"), captions=CaptionOptions(sidecar_dir=side))
    summary = runner.run(
        [str(images)], parse_requests(["CAPTION"]), config, FakeEngine(), on_error=failures.append
    )
    assert summary.exit_code == 1 and summary.annotated == 5  # answered and journaled all the same
    [failure] = failures
    assert (failure.name, failure.task) == ("img02.png", "CAPTION") and str(
        side / "img02.txt"
    ) in failure.reason
    assert len(read_jsonl(tmp_path / "out" / ".florence" / "journal.jsonl")) == 5
    ledger = {r["name"] for r in read_jsonl(side / ".florence-captions.jsonl")}
    assert "img02.txt" not in ledger and len(ledger) == 4  # only files written


def test_a_rerun_streams_the_answers_already_there_to_standard_output_by_default(images, tmp_path, capsys):
    out = tmp_path / "out"
    _run([images], out, FakeEngine(failing=("img03.png",)), tasks=("OD",), jsonl=str(tmp_path / "a.jsonl"))
    assert len(read_jsonl(tmp_path / "a.jsonl")) == 4
    _run([images], out, FakeEngine(), tasks=("OD",), jsonl=str(tmp_path / "a.jsonl"))  # a file: new ones only
    assert [r["file"] for r in read_jsonl(tmp_path / "a.jsonl")][4:] == ["img03.png"]
    capsys.readouterr()
    summary = _run([images], out, FakeEngine(), tasks=("OD",), jsonl="-")  # as `... --jsonl - | jq`
    streamed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert summary.skipped == 5 and [r["file"] for r in streamed] == [f"img0{i}.png" for i in range(5)]
    assert streamed[0]["result"]["labels"] == ["car", "door handle"]
    _run([images], out, FakeEngine(), tasks=("OD",), jsonl="-", jsonl_all=False)
    assert capsys.readouterr().out == ""


def test_progress_off_a_terminal_is_a_line_at_a_time_with_a_total(images, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLORENCE_PROGRESS_EVERY", "0")  # a line per batch (30 s by default)
    captions = CaptionOptions(sidecar_dir=tmp_path / "side")  # the inputs are listed ahead: a total now
    _run([images], tmp_path / "out", FakeEngine(), tasks=("CAPTION",), captions=captions, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["florence: 2/5 images", "florence: 4/5 images",
                                                           "florence: 5/5 images"]  # fmt: skip
    assert "(100%)" in lines[-1] and "ETA 0:00:00" in lines[-1]


def test_ctrl_c_counts_the_inputs_and_missing_shards_count_as_shards(images, tmp_path, monkeypatch):
    from .conftest import random_image
    from .helpers import image_bytes, write_shard

    engine = FakeEngine(on_batch=lambda number: os.kill(os.getpid(), signal.SIGINT))
    captions = CaptionOptions(sidecar_dir=tmp_path / "side")
    summary = _run([images], tmp_path / "out", engine, tasks=("CAPTION",), captions=captions, progress=True)
    assert "interrupted: 2 of 5 images are done" in summary.line()
    monkeypatch.chdir(tmp_path)
    write_shard(Path("shards/00000.tar"), [("a", {"png": image_bytes(random_image(1))})])
    summary = _run(["shards/{00000..00002}.tar"], tmp_path / "shards-out", FakeEngine(), tasks=("OD",))
    assert (summary.images, summary.missing_shards, summary.exit_code) == (1, 2, 1)
    assert "1 image: 1 annotated" in summary.line() and "2 shards missing" in summary.line()
    errors = read_jsonl(tmp_path / "shards-out" / "errors.jsonl")
    assert [e["file"] for e in errors] == ["shards/00001.tar", "shards/00002.tar"]


def test_a_terminal_hears_that_the_model_loads_before_the_bar(tmp_path):
    from florence_cli.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    progress = Progress(True, terminal)
    progress.note("florence: loading tiny-model…")
    progress.set_total(4)
    progress.start()
    progress.update(1)
    progress.close()
    shown = terminal.getvalue()
    assert "florence: loading tiny-model…\n" in shown and shown.index("loading") < shown.index("1/4")


def test_progress_counts_images_that_fail_before_they_are_sent(images, tmp_path, monkeypatch, capsys):
    from florence_cli.progress import Progress

    monkeypatch.setenv("FLORENCE_PROGRESS_EVERY", "0")
    monkeypatch.setattr(Progress, "count_in_background", lambda progress, count: progress.set_total(count()))
    texts = tmp_path / "texts.csv"
    texts.write_text("".join(f"img0{i}.png,a car\n" for i in range(4)))  # img04.png has no text
    requests = parse_requests(["CAPTION_TO_PHRASE_GROUNDING"], text_file=texts)
    config = replace(RunConfig(output=tmp_path / "out"), progress=True)
    summary = runner.run([str(images)], requests, config, FakeEngine(failing=("img00.png",)))
    assert (summary.failed, summary.annotated, summary.total) == (2, 3, 5)  # img04.png failed in planning
    assert capsys.readouterr().err.splitlines()[-1].startswith("florence: 5/5 images (100%)")


def test_a_resumed_run_rates_and_times_only_its_own_work(monkeypatch):
    from types import SimpleNamespace

    from florence_cli import progress as progress_module

    clock = [100.0]
    monkeypatch.setattr(progress_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    progress = progress_module.Progress(True, io.StringIO())
    progress.set_total(400)
    progress.start()
    progress.update(240, before=True)  # done by an earlier run: found in no time
    progress.update(4)
    clock[0] += 10.0
    assert progress.line() == "244/400 images (61%), 0.4 images/s, ETA 0:06:30"
    progress.set_shards(10)
    progress.shard_done(before=True)
    progress.shard_done()
    assert progress._shards() == "2/10 shards, ETA 0:01:20"


def test_a_folder_of_other_settings_is_refused_before_the_checkpoint_is_checked(images, tmp_path, tiny_model):
    from florence_cli.config import ModelConfig
    from florence_cli.outdir import SettingsMismatch

    model = ModelConfig(str(tiny_model))
    identity = runner.identify_model(str(tiny_model))
    assert _run([images], tmp_path / "out", FakeEngine(model_id=identity), model=model).annotated == 5
    engine = FakeEngine(model_id=identity)
    other = replace(RunConfig().generation, num_beams=1)
    with pytest.raises(SettingsMismatch, match=r"generation\.num_beams: 3 → 1"):
        _run([images], tmp_path / "out", engine, model=model, generation=other)
    assert engine.calls == []  # said before the slow checks (torch's import), nothing opened
    again = FakeEngine(model_id=identity)
    assert _run([images], tmp_path / "out", again, model=ModelConfig(f"{tiny_model}/")).skipped == 5
    assert again.calls[0] == "check"
