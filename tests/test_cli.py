"""The ``florence`` command end to end on the tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from florence_cli.cli import main
from florence_cli.config import PRODUCTS

from .conftest import MAX_NEW_TOKENS, random_image, write_images
from .helpers import kill_mid_run, output_files, read_jsonl


def _annotate(model, *args, input=None):
    runner = CliRunner()
    argv = ["annotate", *args, "-m", str(model), "--device", "cpu", "--max-new-tokens", str(MAX_NEW_TOKENS)]
    return runner.invoke(main, argv, input=input, catch_exceptions=False)


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "imgs"
    write_images(images, 3)
    write_images(images / "sub", 2, start_seed=10, ext="jpg")
    (images / "notes.txt").write_text("not an image, silently ignored in folders")
    return images


def test_annotate_writes_coco_and_text_files(tiny_model, folder, tmp_path):
    out = tmp_path / "out"
    result = _annotate(tiny_model, str(folder), "-t", "OD", "-t", "caption", "-t", "<OCR_WITH_REGION>",
                       "-o", str(out), "-b", "2", "--workers", "0")  # fmt: skip
    assert result.exit_code == 0, result.output
    names = ["img00.png", "img01.png", "img02.png", "sub/img00.jpg", "sub/img01.jpg"]
    for name in names:
        assert (out / "caption" / f"{name}.txt").read_text(encoding="utf-8") != ""
    coco = json.loads((out / "od.json").read_text())
    assert [i["file_name"] for i in coco["images"]] == names
    sizes = {i["file_name"]: (i["width"], i["height"]) for i in coco["images"]}
    with Image.open(folder / "sub" / "img01.jpg") as image:
        assert sizes["sub/img01.jpg"] == image.size
    for annotation in coco["annotations"]:
        _x, _y, w, h = annotation["bbox"]
        assert w >= 0 and h >= 0 and 0 <= annotation["score"] <= 1
        assert {c["id"]: c["name"] for c in coco["categories"]}[annotation["category_id"]] == annotation[
            "label"
        ]
    assert (out / "ocr_with_region.json").exists()
    assert "5 annotated" in result.stderr


def test_coco_loads_and_evaluates_with_pycocotools(tiny_model, folder, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out = tmp_path / "out"
    for task in ["OD", "OCR_WITH_REGION"]:
        assert _annotate(tiny_model, str(folder), "-t", task, "-o", str(out), "--workers", "0").exit_code == 0
        coco_file = out / f"{task.lower()}.json"
        truth = COCO(str(coco_file))
        data = json.loads(coco_file.read_text())
        if not data["annotations"]:
            continue
        iou_types = ["bbox"] + (["segm"] if "segmentation" in data["annotations"][0] else [])
        detections = truth.loadRes(data["annotations"])  # scored annotations are a valid result file
        for iou_type in iou_types:
            evaluator = COCOeval(truth, detections, iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            assert evaluator.stats[0] >= 0


def test_bad_input_is_reported_and_the_run_goes_on(tiny_model, folder, tmp_path):
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "junk.png").write_bytes(b"garbage")
    out = tmp_path / "out"
    missing = str(tmp_path / "missing.png")  # a path on stdin (one on the command line is a usage error)
    notes = str(folder / "notes.txt")
    result = _annotate(tiny_model, str(folder), "-", notes, "-t", "OD", "-o", str(out),
                       "--workers", "0", input=missing + "\n")  # fmt: skip
    assert result.exit_code == 1
    errors = read_jsonl(out / "errors.jsonl")
    assert {Path(e["file"]).name for e in errors} == {"zero.jpg", "junk.png", "missing.png", "notes.txt"}
    for error in errors:
        assert f"{error['file']}: {error['error']}" in result.stderr
    coco = json.loads((out / "od.json").read_text())
    assert len(coco["images"]) == 5  # every good image answered


def test_usage_errors_come_before_loading_the_model(tmp_path, folder):
    missing_model = tmp_path / "no-model-here"
    runner = CliRunner()
    for args, message in [
        (["-t", "CAPTION_TO_PHRASE_GROUNDING"], "needs a text input"),
        (["-t", "REGION_TO_CATEGORY", "--text", "1,2,3"], "four location bins"),
        (["-t", "DETECT"], "unknown task"),
        (["-t", "OD", "-b", "0"], "at least 1"),
    ]:
        result = runner.invoke(main, ["annotate", str(folder), *args, "-m", str(missing_model)])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output


def test_missing_model_is_one_clear_line(tmp_path, folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(main, ["annotate", str(folder), "-t", "OD", "-m", "nobody/no-such-model"])
    assert result.exit_code == 2
    assert "cannot find model 'nobody/no-such-model'" in result.output
    assert "Traceback" not in result.output


def test_stdin_paths_and_jsonl_on_stdout(tiny_model, folder, tmp_path):
    paths = "\n".join(str(p) for p in sorted(folder.glob("*.png"))) + "\n"
    result = _annotate(
        tiny_model, "-", "-t", "OD", "-o", str(tmp_path / "out"), "--jsonl", "-", "-q", input=paths
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 3
    assert set(lines[0]) == {"file", "task", "width", "height", "result", "raw"}
    assert result.stderr == ""


@pytest.mark.slow
def test_resume_skips_done_work_and_overwrite_redoes_it(tiny_model, folder, tmp_path):
    out = tmp_path / "out"
    first = _annotate(tiny_model, str(folder), "-t", "OD", "-o", str(out), "--workers", "0")
    before = (out / "od.json").read_bytes()
    again = _annotate(tiny_model, str(folder), "-t", "OD", "-t", "CAPTION", "-o", str(out), "--workers", "0")
    assert first.exit_code == again.exit_code == 0
    assert "0 annotated" not in again.stderr and "5 answers" in again.stderr  # only CAPTION was new
    assert (out / "od.json").read_bytes() == before
    third = _annotate(tiny_model, str(folder), "-t", "OD", "-o", str(out), "--workers", "0")
    assert "5 already done" in third.stderr
    redo = _annotate(tiny_model, str(folder), "-t", "OD", "-o", str(out), "--overwrite", "--workers", "0")
    assert "5 annotated" in redo.stderr and (out / "od.json").read_bytes() == before


def test_other_settings_in_the_same_output_folder_are_refused(tiny_model, folder, tmp_path):
    out = tmp_path / "out"
    assert _annotate(tiny_model, str(folder), "-t", "OD", "-o", str(out)).exit_code == 0
    result = _annotate(tiny_model, str(folder), "-t", "OD", "-o", str(out), "--num-beams", "2")
    assert result.exit_code == 2 and "other settings" in result.output


def _cli(model, folder, out, *extra):
    return [sys.executable, "-m", "florence_cli", "annotate", str(folder), "-t", "OD", "-t", "CAPTION",
            "-m", str(model), "--device", "cpu", "-o", str(out), "-b", "3", "--workers", "1", "-q",
            "--max-new-tokens", str(MAX_NEW_TOKENS), *extra]  # fmt: skip


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_uninterrupted_output(tiny_model, tmp_path):
    paths = [bytes(path) + b"\n" for path in write_images(tmp_path / "many", 12)]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    everything = b"".join(paths)
    subprocess.run(_cli(tiny_model, "-", clean), input=everything, check=True, capture_output=True)
    # 9 paths: the first batch of 3 is journaled, then the run waits for paths that never come
    journal = killed / ".florence" / "journal.jsonl"
    done_before = kill_mid_run(_cli(tiny_model, "-", killed), journal, 6, stdin=b"".join(paths[:9]))
    assert 6 <= done_before < 24
    rerun = subprocess.run(_cli(tiny_model, "-", killed), input=everything, capture_output=True)
    assert rerun.returncode == 0, rerun.stderr
    assert output_files(killed) == output_files(clean)


def test_help_does_not_import_torch():
    code = "import sys\nfrom florence_cli.cli import main\n"
    code += "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
    code += "print('torch' in sys.modules, 'transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("False False")


def test_tasks_command_lists_all_tasks():
    result = CliRunner().invoke(main, ["tasks"])
    assert result.exit_code == 0 and len(result.output.strip().splitlines()) == 15
    assert "CAPTION_TO_PHRASE_GROUNDING" in result.output and "needs --text" in result.output


def test_make_tiny_model_command(tmp_path):
    result = CliRunner().invoke(main, ["make-tiny-model", str(tmp_path / "m")])
    assert result.exit_code == 0
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    ids = tokenizer("Locate the objects with category name in the image.", add_special_tokens=False)[
        "input_ids"
    ]
    assert len(ids) > 5 and tokenizer.unk_token_id not in ids
    assert tokenizer.convert_tokens_to_ids("<loc_0>") == tokenizer.convert_tokens_to_ids("<od>") + 4
    assert tokenizer.image_token_id == len(tokenizer) - 1


def test_exif_rotated_image_gets_displayed_size(tiny_model, tmp_path):
    folder = tmp_path / "exif"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 8
    random_image(5, size=(80, 50)).save(folder / "r.jpg", exif=exif)
    out = tmp_path / "out"
    assert _annotate(tiny_model, str(folder), "-t", "OD", "-o", str(out), "--workers", "0").exit_code == 0
    image = json.loads((out / "od.json").read_text())["images"][0]
    assert (image["width"], image["height"]) == (50, 80)


def test_hub_id_loads_from_the_offline_cache(tiny_model, folder, tmp_path, monkeypatch):
    # lay the tiny checkpoint out as the Hugging Face cache stores a downloaded repo
    cache = tmp_path / "hf-cache" / "hub"
    repo = cache / "models--someone--tiny-florence"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for file in tiny_model.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = _annotate("someone/tiny-florence", str(folder), "-t", "OD", "-o", str(tmp_path / "out"), "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "od.json").read_text())["info"]["model"] == "someone/tiny-florence"


def test_batched_products_flag_is_a_setting_of_the_output_folder(tiny_model, folder, tmp_path):
    """Per-image products are CPU's default; batched ones are recorded, as before the modes existed, and
    resuming a folder in the other kind of mode is refused rather than mixing answers made both ways.
    The summary names the mode."""
    out = tmp_path / "out"
    fast = _annotate(
        tiny_model, str(folder), "-t", "OD", "-o", str(out), "--workers", "0", "--batched-products"
    )
    assert fast.exit_code == 0, fast.output
    assert "batched products" in fast.stderr
    assert json.loads((out / ".florence" / "settings.json").read_text())["exact"] is False
    exact = _annotate(tiny_model, str(folder), "-t", "OD", "-o", str(out), "--workers", "0")
    assert exact.exit_code == 2 and "other settings" in exact.stderr
    same = _annotate(tiny_model, str(folder), "-t", "OD", "-o", str(out), "--products", "batched")
    assert same.exit_code == 0 and "5 already done" in same.stderr  # the long flag's folder is the same
    fresh = _annotate(tiny_model, str(folder), "-t", "OD", "-o", str(tmp_path / "exact"), "--workers", "0")
    assert fresh.exit_code == 0 and "per-image products" in fresh.stderr
    assert "exact" not in json.loads((tmp_path / "exact" / ".florence" / "settings.json").read_text())
    both = _annotate(tiny_model, str(folder), "-t", "OD", "-o", str(tmp_path / "x"), "--products",
                     "invariant", "--batched-products")  # fmt: skip
    assert both.exit_code == 2 and "--batched-products contradicts --products invariant" in both.stderr


def test_products_auto_is_per_image_on_cpu_and_invariant_on_cuda():
    """Only batch-dependent answers set a folder apart: per-image and invariant answers differ in rounding
    alone, as a CPU's and a GPU's do, and the folder records neither the device nor those modes."""
    from florence_cli.config import ModelConfig, RunConfig

    assert ModelConfig().products_on("cpu") == "per-image"
    assert ModelConfig().products_on("cuda") == "invariant"
    assert ModelConfig(products="batched").products_on("cuda") == "batched"
    with pytest.raises(ValueError, match="unknown products 'exact'"):
        ModelConfig(products="exact").products_on("cpu")
    settings = {mode: RunConfig(ModelConfig(products=mode)).settings() for mode in PRODUCTS}
    assert settings["batched"]["exact"] is False
    assert settings["auto"] == settings["per-image"] == settings["invariant"]
    assert "exact" not in settings["auto"]


def test_cuda_graphs_flag_runs_the_static_steps_on_cpu_and_is_a_setting(
    tiny_model, folder, tmp_path, monkeypatch
):
    """--cuda-graphs on CPU runs the steps a graph would replay, uncaptured: the same files as without
    it here; the opt-in is recorded, and resuming without it is refused."""
    from florence_cli.graphs import StaticDecoder

    graphed, plain = tmp_path / "graphed", tmp_path / "plain"
    started = []
    start = StaticDecoder.start
    monkeypatch.setattr(
        StaticDecoder, "start", lambda decoder, *args: started.append(decoder) or start(decoder, *args)
    )
    result = _annotate(tiny_model, str(folder), "-t", "OD", "-o", str(graphed), "--cuda-graphs", "-q")
    assert result.exit_code == 0, result.output
    assert started and not any(decoder.capture for decoder in started)  # taken over, uncaptured on CPU
    assert json.loads((graphed / ".florence" / "settings.json").read_text())["cuda_graphs"] is True
    assert _annotate(tiny_model, str(folder), "-t", "OD", "-o", str(plain), "-q").exit_code == 0
    assert "cuda_graphs" not in json.loads((plain / ".florence" / "settings.json").read_text())
    assert output_files(graphed) == output_files(plain)
    resumed = _annotate(tiny_model, str(folder), "-t", "OD", "-o", str(graphed), "-q")
    assert resumed.exit_code == 2 and "other settings" in resumed.stderr


def test_decode_processes_by_default_only_feed_a_gpu(tiny_model, folder, tmp_path, monkeypatch):
    """On CPU the model's threads use every core, so by default images decode in the main process; on
    CUDA the spare CPUs (at most 8) feed the GPU."""
    from florence_cli import config, engine

    for cpus, expected in [(1, 0), (4, 3), (32, 8)]:
        monkeypatch.setattr(config.os, "cpu_count", lambda cpus=cpus: cpus)
        assert (config.default_workers("cuda"), config.default_workers("cpu")) == (expected, 0)
    monkeypatch.undo()
    asked = []
    stream = engine.decode_stream
    monkeypatch.setattr(
        engine, "decode_stream", lambda *a, workers: asked.append(workers) or stream(*a, workers=workers)
    )
    default = _annotate(tiny_model, str(folder), "-t", "OD", "-o", str(tmp_path / "a"))
    two = _annotate(tiny_model, str(folder), "-t", "OD", "-o", str(tmp_path / "b"), "--workers", "2")
    assert default.exit_code == 0 and two.exit_code == 0
    assert asked == [0, 2]
