"""``florence annotate`` at its edges: a terminal, odd names, stops of every kind, and what is refused
before anything loads. Each run leaves an output folder whose files agree with its journal."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from florence_cli.cli import main
from florence_cli.config import GenerationSettings
from florence_cli.outdir import OutputFolder

from .conftest import MAX_NEW_TOKENS, Reference, random_image, write_images
from .helpers import line_count, output_files, read_jsonl, wait_until

REPO = Path(__file__).resolve().parent.parent


def _annotate(model, *args, input=None):
    argv = ["annotate", *args, "-m", str(model), "--device", "cpu", "--max-new-tokens", str(MAX_NEW_TOKENS),
            "--workers", "0"]  # fmt: skip
    return CliRunner().invoke(main, argv, input=input, catch_exceptions=False)


def _command(model, *args) -> list[str]:
    return [sys.executable, "-m", "florence_cli", "annotate", *args, "-m", str(model), "--device", "cpu",
            "--max-new-tokens", str(MAX_NEW_TOKENS)]  # fmt: skip


def _journal(out: Path) -> list[dict]:
    return read_jsonl(out / ".florence" / "journal.jsonl")


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.fixture
def folder(tmp_path) -> Path:
    write_images(tmp_path / "imgs", 4)
    return tmp_path / "imgs"


# -- a terminal ---------------------------------------------------------------------------------------


def _in_terminal(argv: list[str], umask: int = 0o022) -> tuple[int, str]:
    """Run ``argv`` with a pseudo-terminal as its stdin, stdout and stderr, as a user at a prompt does.
    Reads until the command has ended (not until every process holding the terminal has)."""
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once
        os.umask(umask)
        os.execv(argv[0], argv)
    output, status = b"", None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: every process closed the terminal
                chunk = b""
            output += chunk
            if chunk:
                continue
        if status is not None:  # ended, and nothing more to read
            break
        ended, status = os.waitpid(pid, os.WNOHANG)
        status = status if ended else None
    if status is None:
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), output.decode("utf-8", "replace")


@pytest.mark.parametrize("quiet", [False, True])
def test_a_run_at_a_terminal_writes_its_files(tiny_model, folder, tmp_path, quiet):
    out = tmp_path / "out"
    argv = _command(tiny_model, str(folder), "-t", "OD", "-t", "CAPTION", "-o", str(out), "-b", "2")
    code, shown = _in_terminal(argv + (["-q"] if quiet else []), umask=0o027)
    assert code == 0, shown
    assert "Traceback" not in shown
    assert ("4 images: 4 annotated" in shown) != quiet
    coco = json.loads((out / "od.json").read_text())
    assert [image["file_name"] for image in coco["images"]] == [f"img0{i}.png" for i in range(4)]
    assert len(list((out / "caption").glob("*.txt"))) == 4
    for path in [out / "od.json", *(out / "caption").glob("*.txt")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path  # the user's umask, as open() gives


# -- refused before anything loads --------------------------------------------------------------------

TWO_TEXT_TASKS = ["-t", "CAPTION_TO_PHRASE_GROUNDING", "-t", "REGION_TO_DESCRIPTION"]
USAGE_ERRORS = [
    (["-t", "DETECT"], "unknown task"),
    (["-t", "CAPTON"], "did you mean CAPTION?"),
    (["-t", "CAPTION_TO_PHRASE_GROUNDING"], "needs a text input"),
    (["-t", "OD", "-b", "0"], "'-b' / '--batch-size': must be at least 1"),
    (["-t", "REGION_TO_CATEGORY", "--text", "1,2,3"], "four location bins"),
    (["-t", "REGION_TO_CATEGORY", "--text", "<loc_1><loc_2><loc_3><loc_1000>"], "four location tokens"),
    (["-t", "REGION_TO_CATEGORY", "--text", "<loc_a><loc_2><loc_3><loc_4>"], "four location tokens"),
    (["-t", "REGION_TO_CATEGORY", "--region", "nan,0,10,10"], "--region is x1,y1,x2,y2"),
    (["-t", "OD", "--min-score", "nan"], "'--min-score': must be a number from 0 to 1"),
    (["-t", "OD", "--device", "tpu"], "'--device': 'tpu' is not one of"),
    ([*TWO_TEXT_TASKS, "--text", "a red house", "--text", "100,100,500,600"], "name the task of each"),
    ([*TWO_TEXT_TASKS, "--text", "a red house"], "give each its own"),
    (["-t", "OD", "--text", "a car"], "none of the tasks takes it"),
    (["-t", "OD", "--text", "OD=a car"], "which takes no text"),
    (["-t", "OD", "NO_SUCH_INPUT"], "NO_SUCH_INPUT: no such file or folder"),
    (["-t", "OD", "-m", "./no_such_model"], "model folder ./no_such_model does not exist"),
    (["-t", "OD", "-m", "no_such_model"], "model folder no_such_model does not exist"),  # not the Hub
]


def test_usage_errors_are_one_line_exit_2_and_import_no_torch(tiny_model, folder, tmp_path):
    """All in one fresh process, which must never import torch or transformers to refuse them."""
    code = f"""
import json, sys
from click.testing import CliRunner
from florence_cli.cli import main
results = []
for args, _ in {USAGE_ERRORS!r}:
    argv = ["annotate", {str(folder)!r}, *args, "-o", {str(tmp_path / "out")!r}]
    if "-m" not in args:
        argv += ["-m", {str(tiny_model)!r}]
    result = CliRunner().invoke(main, argv)
    results.append([result.exit_code, result.output])
print(json.dumps([results, "torch" in sys.modules, "transformers" in sys.modules]))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    results, torch_imported, transformers_imported = json.loads(run.stdout)
    for (args, message), (exit_code, output) in zip(USAGE_ERRORS, results, strict=True):
        assert exit_code == 2, (args, output)
        assert message in output, (args, output)
        assert len(output.strip().splitlines()) == 1 and output.startswith("Error:"), (args, output)
    assert not torch_imported and not transformers_imported
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-t", "CAPTION_TO_PHRASE_GROUNDING", "--text", "car " * 1200], "the text input is too long"),
        (["-t", "OD", "--max-new-tokens", "5000"], "--max-new-tokens 5000 is more than this model generates"),
    ],
)
def test_limits_of_the_model_are_usage_errors_before_any_image_is_read(tiny_model, folder, tmp_path,
                                                                       args, message):  # fmt: skip
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["annotate", str(folder), "-m", str(tiny_model), "--device", "cpu",
                                       "-o", str(out), *args])  # fmt: skip
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()  # refused before the output folder is made


def test_a_device_this_machine_lacks_is_refused_before_the_output_folder(tiny_model, folder, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["annotate", str(folder), "-t", "OD", "-m", str(tiny_model),
                                       "--device", "cuda", "-o", str(out)])  # fmt: skip
    assert result.exit_code == 2 and "CUDA is not available" in result.output, result.output
    assert not out.exists()


def test_closed_stdin_is_a_usage_error(tiny_model, tmp_path):
    command = " ".join(_command(tiny_model, "-", "-t", "OD", "-o", str(tmp_path / "out")))
    run = subprocess.run(["sh", "-c", f"exec {command} <&-"], capture_output=True, text=True)
    assert run.returncode == 2 and "standard input is closed" in run.stderr, run.stderr


def test_a_folder_in_use_by_another_run_is_refused(tiny_model, folder, tmp_path):
    held = OutputFolder(tmp_path / "out", {"model": "another run"})
    try:
        result = _annotate(tiny_model, str(folder), "-t", "OD", "-o", str(tmp_path / "out"))
    finally:
        held.close()
    assert result.exit_code == 2 and "is in use by another florence annotate run" in result.output


def test_a_read_only_output_folder_is_refused_before_the_model_loads(tiny_model, folder, tmp_path,
                                                                      monkeypatch):  # fmt: skip
    out = tmp_path / "out"
    mkdir = Path.mkdir

    def read_only(path, *args, **kwargs):
        if out in (path, *path.parents):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    monkeypatch.setattr("florence_cli.annotate.Annotator.__init__", lambda *a, **k: pytest.fail("loaded"))
    result = _annotate(tiny_model, str(folder), "-t", "OD", "-o", str(out))
    assert result.exit_code == 2
    assert result.output.strip() == f"Error: cannot write to {out}: Read-only file system"


# -- texts per task -----------------------------------------------------------------------------------


def test_each_task_gets_its_own_text(tiny_model, reference, folder, tmp_path):
    out = tmp_path / "out"
    result = _annotate(
        tiny_model, str(folder), "-o", str(out), "-q", "--jsonl", str(tmp_path / "all.jsonl"),
        "-t", "CAPTION_TO_PHRASE_GROUNDING", "--text", "CAPTION_TO_PHRASE_GROUNDING=a red house",
        "-t", "region_to_description", "--text", "<REGION_TO_DESCRIPTION>=100,100,500,600",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    records = {(r["file"], r["task"]): r for r in read_jsonl(tmp_path / "all.jsonl")}
    region = "<REGION_TO_DESCRIPTION><loc_100><loc_100><loc_500><loc_600>"
    prompts = {
        "CAPTION_TO_PHRASE_GROUNDING": ("a red house", "<CAPTION_TO_PHRASE_GROUNDING>a red house"),
        "REGION_TO_DESCRIPTION": ("100,100,500,600", region),
    }
    for task, (text, prompt) in prompts.items():
        record = records[("img00.png", task)]
        with Image.open(folder / "img00.png") as image:
            raw, _ = reference.run(image.convert("RGB"), prompt)
        assert record["text"] == text and record["raw"] == raw


# -- the tiny model of the README's first command -----------------------------------------------------


def test_make_tiny_model_ends_its_answers_as_the_reference_does(tmp_path):
    from transformers import AutoTokenizer

    model = tmp_path / "tiny-model"
    assert CliRunner().invoke(main, ["make-tiny-model", str(model)]).exit_code == 0
    result = CliRunner().invoke(main, ["annotate", str(REPO / "sample_images"), "-t", "OD", "-t", "CAPTION",
                                       "-m", str(model), "-o", str(tmp_path / "out"), "-q",
                                       "--jsonl", str(tmp_path / "all.jsonl")])  # fmt: skip
    # (no --max-new-tokens: the default 1024 applies, and the answers still end early)
    assert result.exit_code == 0, result.output
    tokenizer = AutoTokenizer.from_pretrained(model)
    records = read_jsonl(tmp_path / "all.jsonl")
    assert len(records) == 2 * len(list((REPO / "sample_images").iterdir()))
    assert all(len(tokenizer(r["raw"], add_special_tokens=False).input_ids) < 64 for r in records)
    reference = Reference(model)
    with Image.open(REPO / "sample_images" / "street.jpg") as image:
        raw, _ = reference.run(image.convert("RGB"), "<OD>", max_new_tokens=1024)
    assert raw == next(r["raw"] for r in records if (r["file"], r["task"]) == ("street.jpg", "OD"))


# -- odd names ----------------------------------------------------------------------------------------


def test_names_near_the_length_limit(tiny_model, folder, tmp_path):
    near = "l" * 246 + ".png"  # 250 bytes: its caption file's name is 254
    over = "m" * 251 + ".png"  # 255 bytes: no caption file can be named after it
    for name, seed in ((near, 7), (over, 8)):
        random_image(seed).save(folder / name)
    out = tmp_path / "out"
    result = _annotate(tiny_model, str(folder), "-t", "CAPTION", "-t", "OD", "-o", str(out))
    assert result.exit_code == 1, result.output
    assert (out / "caption" / f"{near}.txt").exists()
    errors = read_jsonl(out / "errors.jsonl")
    assert [e["file"] for e in errors] == [over] and "File name too long" in errors[0]["error"]
    assert len(_error_lines(result.stderr)) == 1
    assert len(list((out / "caption").glob("*.txt"))) == 5


def test_names_that_are_not_utf8_or_hold_a_newline(tiny_model, folder, tmp_path):
    random_image(9).save(folder / os.fsdecode(b"\xff\xfe.png"), format="PNG")
    (folder / "bad\nname.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    result = _annotate(tiny_model, str(folder), "-t", "OD", "-o", str(out))
    assert result.exit_code == 1
    lines = _error_lines(result.stderr)
    assert len(lines) == 2 and len(result.stderr.splitlines()) == 3  # two errors and the summary
    assert any("bad\\nname.png: not a readable image" in line for line in lines)
    assert any("\\xff\\xfe.png: file name is not valid UTF-8" in line for line in lines)
    files = {e["file"] for e in read_jsonl(out / "errors.jsonl")}  # printable: valid UTF-8 JSON
    assert files == {"bad\nname.png", f"{folder}/\\xff\\xfe.png"}
    assert len(json.loads((out / "od.json").read_text())["images"]) == 4


def test_an_output_name_that_clashes_with_a_folder_fails_that_image_alone(tiny_model, tmp_path):
    folder = tmp_path / "imgs"
    (folder / "a.jpg.txt").mkdir(parents=True)
    random_image(1).save(folder / "a.jpg")  # caption/a.jpg.txt is its answer file...
    random_image(2).save(folder / "a.jpg.txt" / "b.jpg")  # ...and caption/a.jpg.txt/ this one's folder
    out = tmp_path / "out"
    result = _annotate(tiny_model, str(folder), "-t", "CAPTION", "-o", str(out))
    assert result.exit_code == 1
    assert (out / "caption" / "a.jpg.txt").is_file()
    assert [e["file"] for e in read_jsonl(out / "errors.jsonl")] == ["a.jpg.txt/b.jpg"]
    assert len(_error_lines(result.stderr)) == 1


def test_loops_and_files_found_twice_are_annotated_once(tiny_model, folder, tmp_path, monkeypatch):
    os.symlink(".", folder / "loop")
    monkeypatch.chdir(folder.parent)
    out = tmp_path / "out"
    result = _annotate(tiny_model, "imgs", "imgs/img00.png", "-t", "OD", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "4 images: 4 annotated" in result.stderr and "1 found twice" in result.stderr
    names = [image["file_name"] for image in json.loads((out / "od.json").read_text())["images"]]
    assert names == [f"imgs/img0{i}.png" for i in range(4)]


def test_two_folders_of_one_name_are_kept_apart(tiny_model, tmp_path):
    write_images(tmp_path / "a" / "img", 2)
    write_images(tmp_path / "b" / "img", 2, start_seed=5)
    out = tmp_path / "out"
    result = _annotate(tiny_model, str(tmp_path / "a" / "img"), str(tmp_path / "b" / "img"), "-t", "OD",
                       "-t", "CAPTION", "-o", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    coco = json.loads((out / "od.json").read_text())
    assert [i["file_name"] for i in coco["images"]] == ["a/img/img00.png", "a/img/img01.png",
                                                         "b/img/img00.png", "b/img/img01.png"]  # fmt: skip
    with Image.open(tmp_path / "b" / "img" / "img01.png") as image:
        assert (coco["images"][3]["width"], coco["images"][3]["height"]) == image.size
    assert len(list((out / "caption").rglob("*.txt"))) == 4


# -- the output folder is the source of truth ---------------------------------------------------------


def test_a_rerun_on_new_files_only_adds_to_the_outputs(tiny_model, tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    write_images(folder, 5)
    everything = tmp_path / "everything"
    tasks = ("-t", "OD", "-t", "CAPTION")
    assert _annotate(tiny_model, str(folder), *tasks, "-o", str(everything)).exit_code == 0
    shutil.move(folder / "img04.png", tmp_path / "later.png")  # the first run lacks the last image
    monkeypatch.chdir(folder)
    out = tmp_path / "out"
    assert _annotate(tiny_model, ".", *tasks, "-o", str(out)).exit_code == 0
    shutil.move(tmp_path / "later.png", folder / "img04.png")
    # as the README's pipeline does: only the new files, by path, on stdin
    result = _annotate(tiny_model, "-", *tasks, "-o", str(out), input="img04.png\n")
    assert result.exit_code == 0 and "1 image: 1 annotated" in result.stderr
    assert output_files(out) == output_files(everything)


def test_a_damaged_journal_line_costs_only_its_own_answer(tiny_model, folder, tmp_path):
    out = tmp_path / "out"
    assert _annotate(tiny_model, str(folder), "-t", "OD", "-o", str(out)).exit_code == 0
    clean = output_files(out)
    journal = out / ".florence" / "journal.jsonl"
    lines = journal.read_text(encoding="utf-8").splitlines(keepends=True)
    journal.write_text(lines[0] + "#### a damaged line\n" + "".join(lines[1:]), encoding="utf-8")
    again = _annotate(tiny_model, str(folder), "-t", "OD", "-o", str(out))
    assert again.exit_code == 0 and "4 already done" in again.stderr
    assert "skipped 1 damaged line(s) of the journal" in again.stderr
    lines = journal.read_text(encoding="utf-8").splitlines(keepends=True)
    journal.write_text(lines[0] + "{ cut\n" + "".join(lines[3:]), encoding="utf-8")  # img01's record lost
    third = _annotate(tiny_model, str(folder), "-t", "OD", "-o", str(out))
    assert third.exit_code == 0 and "1 annotated, 3 already done" in third.stderr
    assert output_files(out) == clean


# -- stops: a full disk, a closed stdout, signals ------------------------------------------------------


def test_a_full_disk_stops_the_run_with_the_journal_intact_and_a_rerun_completes(tiny_model, tmp_path,
                                                                                 monkeypatch):  # fmt: skip
    folder = tmp_path / "imgs"
    write_images(folder, 6)
    clean = tmp_path / "clean"
    assert _annotate(tiny_model, str(folder), "-t", "OD", "-t", "CAPTION", "-o", str(clean)).exit_code == 0
    calls = []
    fsync = os.fsync

    def filling_disk(fd):  # the second batch finds the disk full
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", filling_disk)
    out = tmp_path / "out"
    result = _annotate(tiny_model, str(folder), "-t", "OD", "-t", "CAPTION", "-o", str(out), "-b", "2")
    assert result.exit_code == 3
    assert re.fullmatch(
        # the inputs are counted while the run goes: 6 once counted, else those found so far
        f"error: cannot write {out}/.florence/journal.jsonl: No space left on device; 2 of (6 images are "
        "done|[46] images found so far are done); once fixed, run the same command to finish\n",
        result.stderr,
    ), result.stderr
    journaled = _journal(out)
    assert len(journaled) == 4  # the first batch, whole; nothing of the second
    od = json.loads((out / "od.json").read_text())  # the files agree with the journal
    assert [i["file_name"] for i in od["images"]] == ["img00.png", "img01.png"]
    monkeypatch.undo()
    rerun = _annotate(tiny_model, str(folder), "-t", "OD", "-t", "CAPTION", "-o", str(out), "-b", "2")
    assert rerun.exit_code == 0 and "4 annotated, 2 already done" in rerun.stderr
    assert output_files(out) == output_files(clean)


def _paths_on_stdin(command: list[str], **popen) -> subprocess.Popen:
    """``command`` (reading image paths from its standard input, ``-``) started with a pipe to feed it:
    the run cannot end before the test closes that pipe, so a stop the test makes lands mid-run."""
    return subprocess.Popen(command, stdin=subprocess.PIPE, **popen)


def _feed(process: subprocess.Popen, paths: list[Path]) -> None:
    process.stdin.write(b"".join(bytes(path) + b"\n" for path in paths))
    process.stdin.flush()


@pytest.mark.slow
def test_a_closed_stdout_ends_the_run_quietly_with_what_was_done_journaled(tiny_model, tmp_path):
    paths = write_images(tmp_path / "imgs", 8)
    out = tmp_path / "out"
    args = ("-", "-t", "CAPTION", "-o", str(out), "-b", "2", "--workers", "0")
    with open(tmp_path / "stderr", "w+b") as log:  # a file: nothing left holding a pipe can hang the test
        process = _paths_on_stdin(_command(tiny_model, *args, "--jsonl", "-"), stdout=subprocess.PIPE,
                                  stderr=log)  # fmt: skip
        _feed(process, paths[:2])
        first = json.loads(process.stdout.readline())  # as `| head -1` does
        process.stdout.close()
        _feed(process, paths[2:])  # the answers to these meet a closed standard output
        process.stdin.close()
        code = process.wait(timeout=600)
    stderr = (tmp_path / "stderr").read_text()
    assert code == 141, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    assert "standard output was closed" in stderr
    journaled = {r["file"] for r in _journal(out)}
    assert first["file"] in journaled and len(journaled) < 8
    assert len(list((out / "caption").rglob("*.txt"))) == len(journaled)
    stdin = b"".join(bytes(path) + b"\n" for path in paths)
    rerun = subprocess.run(_command(tiny_model, *args, "-q"), input=stdin, capture_output=True)
    assert rerun.returncode == 0 and len(_journal(out)) == 8


@pytest.mark.slow
@pytest.mark.parametrize(("stop", "code"), [("ctrl-c", 130), ("SIGTERM", 143)])
def test_a_stopped_run_leaves_files_that_agree_with_the_journal(tiny_model, tmp_path, stop, code):
    paths = write_images(tmp_path / "imgs", 16)
    stdin = b"".join(bytes(path) + b"\n" for path in paths)
    args = ("-", "-t", "OD", "-t", "CAPTION", "-b", "2", "--workers", "1")
    clean, out = tmp_path / "clean", tmp_path / "out"
    subprocess.run(_command(tiny_model, *args, "-o", str(clean), "-q"), input=stdin, check=True,
                   capture_output=True)  # fmt: skip
    with open(tmp_path / "stderr", "w+b") as log:
        process = _paths_on_stdin(_command(tiny_model, *args, "-o", str(out)), stderr=log,
                                  start_new_session=True)  # fmt: skip
        # the decode process holds 8 images in flight: a chunk is answered, then the run waits for paths
        _feed(process, paths[:10])
        wait_until(lambda: process.poll() is not None or line_count(out / ".florence" / "journal.jsonl") >= 2)
        if stop == "ctrl-c":  # a terminal sends it to every process of the job, decode workers too
            os.killpg(process.pid, signal.SIGINT)
        else:
            os.kill(process.pid, signal.SIGTERM)
        exit_code = process.wait(timeout=600)
        process.stdin.close()
    stderr = (tmp_path / "stderr").read_text()
    assert exit_code == code, stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("interrupted: ")
    assert stderr.strip().endswith("run the same command to finish")
    journaled = _journal(out)
    od = json.loads((out / "od.json").read_text())
    assert {i["file_name"] for i in od["images"]} == {r["file"] for r in journaled if r["task"] == "OD"}
    captions = {
        str(p.relative_to(out / "caption")).removesuffix(".txt") for p in (out / "caption").rglob("*.txt")
    }
    assert captions == {r["file"] for r in journaled if r["task"] == "CAPTION"}
    assert 0 < len(journaled) <= 12
    rerun = subprocess.run(
        _command(tiny_model, *args, "-o", str(out), "-q"), input=stdin, capture_output=True
    )
    assert rerun.returncode == 0, rerun.stderr
    assert output_files(out) == output_files(clean)


def _wait_for_lines(path: Path, count: int, process: subprocess.Popen) -> None:
    wait_until(lambda: process.poll() is not None or line_count(path) >= count, timeout_s=300)
    assert line_count(path) >= count, "the run ended before it was stopped"


def _session_processes(session: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError, ValueError):
            continue
        if entry.isdigit() and int(fields[3]) == session:  # field 6 of stat: the session id
            found.append(int(entry))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_decode_processes_end_with_a_run_killed_by_sigkill(tiny_model, tmp_path):
    folder = tmp_path / "imgs"
    write_images(folder, 12)
    out = tmp_path / "out"
    process = subprocess.Popen(
        _command(tiny_model, str(folder), "-t", "OD", "-o", str(out), "-b", "2", "--workers", "1", "-q"),
        start_new_session=True, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    _wait_for_lines(out / ".florence" / "journal.jsonl", 1, process)
    assert len(_session_processes(process.pid)) >= 2  # the run and its decode process (and tracker)
    process.kill()
    process.wait()
    wait_until(lambda: not _session_processes(process.pid), timeout_s=120)
    assert _session_processes(process.pid) == []


def test_generation_settings_of_the_output_folder_come_from_flags(tiny_model, folder, tmp_path):
    """The settings recorded before the model loads are those the run uses (written and read alike)."""
    out = tmp_path / "out"
    assert _annotate(tiny_model, str(folder), "-t", "OD", "-o", str(out), "--num-beams", "2").exit_code == 0
    recorded = json.loads((out / ".florence" / "settings.json").read_text())
    assert recorded["generation"] == GenerationSettings(2, MAX_NEW_TOKENS).kwargs()
