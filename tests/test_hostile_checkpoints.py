"""Hostile and broken checkpoints are refused in one line, and a checkpoint's own code never runs.

Every hostile folder carries ``evil.py`` (and the module names Microsoft's ``auto_map`` uses), whose
import writes a marker file; the CLI runs as a subprocess with ``y`` on stdin, the answer that
transformers' "run the custom code?" prompt would take.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file, save_file

import florence_cli
from florence_cli.testing.original_twin import write_original_twin

from .conftest import random_image

ROOT = str(Path(florence_cli.__file__).resolve().parents[1])
MARKER = "marker"
EVIL = """\
from pathlib import Path

Path({marker!r}).write_text("ran")

from transformers import BartTokenizer, CLIPImageProcessorPil, Florence2Processor


class EvilImageProcessor(CLIPImageProcessorPil):
    pass


class EvilProcessor(Florence2Processor):
    pass


class EvilTokenizer(BartTokenizer):
    pass
"""
EVIL_MAPS = {
    "processor_config.json": {"AutoProcessor": "evil.EvilProcessor"},
    "preprocessor_config.json": {"AutoImageProcessor": "evil.EvilImageProcessor"},
    "tokenizer_config.json": {"AutoTokenizer": ["evil.EvilTokenizer", None]},
}
# A tensor of the tiny model that is stored (the tied lm_head.weight is not).
TENSOR = "model.language_model.decoder.layers.0.fc1.bias"


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("image") / "img.png"
    random_image(0).save(path)
    return path


def hostile_copy(native: Path, dst: Path, modules: tuple[str, ...] = ("evil",)) -> Path:
    """A copy of ``native`` (or an original twin) carrying modules whose import writes ``dst/../marker``."""
    if native != dst:
        shutil.copytree(native, dst)
    for module in modules:
        (dst / f"{module}.py").write_text(EVIL.format(marker=str(dst.parent / MARKER)))
    return dst


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    edit(data)
    path.write_text(json.dumps(data))


def edit_weights(folder: Path, edit) -> None:
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def florence(*args: str, tmp: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m florence_cli ARGS`` with ``y`` on stdin, offline, with its own Hugging Face folders."""
    environment = {
        **os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
        "HF_HOME": str(tmp / "hf-home"), "HF_MODULES_CACHE": str(tmp / "hf-modules"), "HF_HUB_OFFLINE": "1",
        **(env or {}),
    }  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "florence_cli", *args], input="y\n", capture_output=True, text=True,
        env=environment, cwd=tmp, timeout=300,
    )  # fmt: skip


def annotate(model: str, image: Path, tmp: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    args = ["annotate", str(image), "-t", "OD", "-m", model, "--device", "cpu", "-o", str(tmp / "out")]
    return florence(*args, "--max-new-tokens", "4", tmp=tmp, env=env)


def assert_refused(result: subprocess.CompletedProcess, tmp: Path, *words: str) -> str:
    """Exit 2, no marker, no traceback, nothing on stdout; stderr's last line is ``Error:`` with ``words``."""
    assert not (tmp / MARKER).exists(), "the checkpoint's code ran"
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: "), result.stderr
    for word in words:
        assert word in last, last
    return last


# --- the CLI ----------------------------------------------------------------------------------------


def unknown_model_type(tiny_model: Path, dst: Path) -> Path:
    folder = hostile_copy(tiny_model, dst)
    edit_json(folder / "config.json", lambda config: config.update(model_type="evil"))
    for name, auto_map in EVIL_MAPS.items():
        edit_json(folder / name, lambda data, auto_map=auto_map: data.update(auto_map=auto_map))
    return folder


def test_unknown_model_type_with_auto_maps_is_refused(tiny_model, image, tmp_path):
    folder = unknown_model_type(tiny_model, tmp_path / "evil-type")
    assert_refused(annotate(str(folder), image, tmp_path), tmp_path, str(folder), "model_type 'evil'")


def custom_image_processor(data: dict) -> None:
    data.update(auto_map=EVIL_MAPS["preprocessor_config.json"], image_processor_type="EvilImageProcessor")


@pytest.mark.parametrize(
    "where",
    ["preprocessor_config.json", "processor_config.json", "tokenizer_config.json"],
)
def test_native_folder_naming_custom_code_is_refused(tiny_model, image, tmp_path, where):
    folder = hostile_copy(tiny_model, tmp_path / "custom")
    if where == "preprocessor_config.json":  # the older layout: image settings in a file of their own
        image_processor = {}
        edit_json(
            folder / "processor_config.json", lambda data: image_processor.update(data.pop("image_processor"))
        )
        custom_image_processor(image_processor)
        edit_json(folder / where, lambda data: data.update(image_processor))
    elif where == "processor_config.json":
        edit_json(folder / where, lambda data: custom_image_processor(data["image_processor"]))
    else:
        edit_json(
            folder / where,
            lambda data: data.update(auto_map=EVIL_MAPS[where], tokenizer_class="EvilTokenizer"),
        )
    last = assert_refused(annotate(str(folder), image, tmp_path), tmp_path, str(folder), where, "custom code")
    assert "auto_map" in last


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda state: state.pop(TENSOR), ["missing", TENSOR]),
        (lambda state: state.update({"evil.weight": torch.zeros(3)}), ["unexpected", "evil.weight"]),
        (lambda state: state.update({TENSOR: torch.zeros(5)}), ["misshaped", TENSOR, "[5]"]),
    ],
    ids=["missing", "unexpected", "misshaped"],
)
def test_weights_that_do_not_fit_are_refused(tiny_model, image, tmp_path, edit, words):
    folder = hostile_copy(tiny_model, tmp_path / "unfit")
    edit_weights(folder, edit)
    assert_refused(annotate(str(folder), image, tmp_path), tmp_path, str(folder), *words)


def test_truncated_weights_are_refused(tiny_model, image, tmp_path):
    folder = hostile_copy(tiny_model, tmp_path / "truncated")
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    words = [str(weights), "truncated", f"{size // 2:,} of {size:,} bytes"]
    assert_refused(annotate(str(folder), image, tmp_path), tmp_path, *words)


def test_missing_folder_is_refused(image, tmp_path):
    assert_refused(annotate("./no_such_model", image, tmp_path), tmp_path, "./no_such_model does not exist")


def test_hub_id_offline_and_not_cached_is_one_clear_line(image, tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    last = assert_refused(
        annotate("nobody/no-such-model", image, tmp_path, env), tmp_path,
        "nobody/no-such-model", "not in the Hugging Face cache", "HF_HUB_OFFLINE is set",
    )  # fmt: skip
    for internal in ("ConnectError", "LocalEntryNotFoundError", "OfflineModeIsEnabled", "snapshot folder"):
        assert internal not in last


def test_convert_refuses_a_hostile_folder(tiny_model, tmp_path):
    folder = unknown_model_type(tiny_model, tmp_path / "evil-type")
    result = florence("convert", str(folder), str(tmp_path / "converted"), tmp=tmp_path)
    assert_refused(result, tmp_path, str(folder), "model_type 'evil'")
    assert not (tmp_path / "converted").exists()


def test_original_twin_with_auto_map_still_annotates(tiny_model, image, tmp_path):
    twin = write_original_twin(tiny_model, tmp_path / "twin")
    assert "auto_map" in json.loads((twin / "config.json").read_text())
    hostile_copy(
        twin, twin, ("evil", "configuration_florence2", "modeling_florence2", "processing_florence2")
    )
    result = annotate(str(twin), image, tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / MARKER).exists()
    assert (tmp_path / "out" / "od.json").is_file()


# --- the checkpoint module --------------------------------------------------------------------------


def test_checkpoint_module_imports_no_heavy_library():
    code = (
        "import sys, florence_cli.checkpoint; "
        "print([m for m in ('torch', 'transformers', 'numpy', 'huggingface_hub') if m in sys.modules])"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_loading_writes_nothing_on_stdout_and_reads_no_stdin(capsys):
    from florence_cli.checkpoint import console_shielded

    stdin, stdout = sys.stdin, sys.stdout
    with console_shielded():
        print("a loader's chatter")
        with pytest.raises(OSError):
            input("Do you wish to run the custom code? [y/N] ")
    assert sys.stdin is stdin and sys.stdout is stdout
    captured = capsys.readouterr()
    assert captured.out == "" and "a loader's chatter" in captured.err


def test_layouts_and_what_is_not_florence2(tiny_model, tmp_path):
    from florence_cli.checkpoint import ModelLoadError, checkpoint_layout

    assert checkpoint_layout(tiny_model) == "native"
    assert checkpoint_layout(write_original_twin(tiny_model, tmp_path / "twin")) == "original"
    cases = {
        "empty": (lambda folder: (folder / "config.json").unlink(), "has no config.json"),
        "broken": (lambda folder: (folder / "config.json").write_text("{"), "config.json is not valid JSON"),
        "list": (
            lambda folder: (folder / "config.json").write_text("[]"),
            "config.json is not a JSON object",
        ),
        "neither": (
            lambda folder: edit_json(folder / "config.json", lambda config: config.pop("vision_config")),
            "neither",
        ),
        "no-weights": (lambda folder: (folder / "model.safetensors").unlink(), "no weights"),
        "class": (
            lambda folder: edit_json(
                folder / "tokenizer_config.json", lambda data: data.update(tokenizer_class="EvilTokenizer")
            ),
            "tokenizer_class 'EvilTokenizer' in tokenizer_config.json",
        ),
    }
    for name, (edit, words) in cases.items():
        folder = shutil.copytree(tiny_model, tmp_path / name)
        edit(folder)
        with pytest.raises(ModelLoadError) as refused:
            checkpoint_layout(folder)
        message = str(refused.value)
        assert "\n" not in message and str(folder) in message and words in message, (name, message)


def test_sharded_weights_are_checked_shard_by_shard(tiny_model, tmp_path):
    from florence_cli.checkpoint import ModelLoadError, checkpoint_layout

    folder = shutil.copytree(tiny_model, tmp_path / "sharded")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    halves = {
        "model-1.safetensors": names[: len(names) // 2],
        "model-2.safetensors": names[len(names) // 2 :],
    }
    for shard, keys in halves.items():
        save_file({key: state[key] for key in keys}, folder / shard, metadata={"format": "pt"})
    weight_map = {key: shard for shard, keys in halves.items() for key in keys}
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    assert checkpoint_layout(folder) == "native"
    shard = folder / "model-2.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ModelLoadError, match=r"model-2\.safetensors is truncated"):
        checkpoint_layout(folder)
    index.write_text(json.dumps({"weight_map": {**weight_map, names[0]: "../elsewhere.safetensors"}}))
    with pytest.raises(ModelLoadError, match="outside the folder"):
        checkpoint_layout(folder)


def test_local_paths_are_never_hub_ids(tmp_path, monkeypatch):
    from florence_cli.checkpoint import ModelLoadError, locate_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    (tmp_path / "folder").mkdir()
    assert locate_model("folder") == Path("folder")
    for model, words in [
        ("./no_such_model", "model folder ./no_such_model does not exist"),
        ("~/no/such/model", "does not exist"),
        ("a/b/c", "model folder a/b/c does not exist"),
        ("weights.bin", "is not a folder"),
    ]:
        with pytest.raises(ModelLoadError) as refused:
            locate_model(model)
        message = str(refused.value)
        assert "\n" not in message and words in message, (model, message)


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers the Hub's repo-info call: 404 not found, 403 gated, 401 unauthorized, 500 otherwise."""

    ANSWERS: ClassVar[dict[str, tuple[int, str | None]]] = {
        "missing": (404, "RepoNotFound"),
        "gated": (403, "GatedRepo"),
        "private": (401, None),
    }

    def do_GET(self):
        name = self.path.split("/")[4] if self.path.startswith("/api/models/") else ""
        status, error_code = self.ANSWERS.get(name, (500, None))
        self.send_response(status)
        if error_code:
            self.send_header("X-Error-Code", error_code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_hub_failures_are_one_clear_line(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoints = {
        f"http://127.0.0.1:{server.server_address[1]}": ["missing", "gated", "private", "down"],
        f"http://127.0.0.1:{closed_port()}": ["unreachable"],
    }
    code = (
        "import sys\nfrom florence_cli.checkpoint import ModelLoadError, locate_model\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n        locate_model('nobody/' + name)\n"
        "    except ModelLoadError as error:\n        print(error)\n"
    )
    messages = {}
    for endpoint, names in endpoints.items():
        env = {
            **os.environ, "PYTHONPATH": ROOT, "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0",
            "HF_HUB_CACHE": str(tmp_path / "cache"), "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1",
        }  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-c", code, *names], capture_output=True, text=True, env=env, timeout=120
        )
        assert result.returncode == 0, result.stderr
        messages.update(zip(names, result.stdout.splitlines(), strict=True))
    server.shutdown()
    assert "no such repository on the Hugging Face Hub" in messages["missing"]
    assert "gated" in messages["gated"]
    assert "HTTP 401" in messages["private"] and "log in" in messages["private"]
    assert "HTTP 500" in messages["down"] and "not in the Hugging Face cache" in messages["down"]
    assert "cannot be reached" in messages["unreachable"]
    assert "not in the Hugging Face cache" in messages["unreachable"]
    for name, message in messages.items():
        assert message.startswith(f"cannot find model 'nobody/{name}': "), message
        for internal in ("Error", "httpx", "Got:", "http://"):
            assert internal not in message, message


def closed_port() -> int:
    """A local port that nothing listens on (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
