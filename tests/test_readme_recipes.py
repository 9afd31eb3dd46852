"""The README's commands on local folders, run as written in a shell, in the README's order in one
scratch folder (so a command meets the output folders the earlier ones made), on tiny models."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import write_images

REPO = Path(__file__).resolve().parent.parent


def _block(heading: str) -> list[str]:
    """The command lines of the README's first code block under ``heading``, comments dropped."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(rf"## {heading}\n.*?```\n(.*?)```", readme, re.S).group(1)
    return [re.split(r"\s+# ", line)[0].strip() for line in block.splitlines() if line.strip()]


def _run(command: str, cwd: Path, model: Path) -> subprocess.CompletedProcess:
    """``command`` in bash, ``florence`` being this checkout's; an annotate that names no model runs on
    ``model`` with short answers (what it names otherwise is as written)."""
    florence = f"{shlex.quote(sys.executable)} -m florence_cli"
    if " -m " not in command:
        command = re.sub(
            r"\bflorence annotate ", f"florence annotate -m {model} --max-new-tokens 8 ", command
        )
    command = re.sub(r"\bflorence (?=[a-z])", f"{florence} ", command)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True)


def _recipe(words: str) -> str:
    return next(recipe for recipe in _block("Recipes") if words in recipe)


def test_the_readme_in_its_order_never_meets_an_output_folder_of_another_dataset(tiny_model, tmp_path):
    shutil.copytree(REPO / "sample_images", tmp_path / "sample_images")
    write_images(tmp_path / "imgs", 3, ext="jpg")
    install = next(line for line in _block("Install") if line.startswith("pip install"))
    readme = [
        *install.split(" && ")[1:],  # the install command's run on the sample images
        *_block("Quickstart"),
        _recipe("annotate imgs -t OD -o out"),
        _recipe("--sidecar"),  # the default output folder
    ]
    for command in readme:
        ran = _run(command, tmp_path, tiny_model)
        assert ran.returncode == 0, f"{command}: {ran.stderr}"
    (tmp_path / "last-run").touch()
    new = write_images(tmp_path / "new", 1, start_seed=9, ext="jpg")[0].rename(tmp_path / "imgs" / "new.jpg")
    later = (tmp_path / "last-run").stat().st_mtime + 10
    os.utime(new, (later, later))  # the one image newer than last-run
    added = _run(_recipe("-newer"), tmp_path, tiny_model)
    assert added.returncode == 0, added.stderr
    names = [image["file_name"] for image in json.loads((tmp_path / "out" / "od.json").read_text())["images"]]
    assert sorted(names) == ["img00.jpg", "img01.jpg", "img02.jpg", "new.jpg"]  # one name per file


def test_the_shard_recipe_runs_as_written(tiny_model, tmp_path):
    write_images(tmp_path / "imgs", 8, ext="jpg")
    shard = _run(_recipe("--shard"), tmp_path, tiny_model)
    assert shard.returncode == 0, shard.stderr
    assert len(json.loads((tmp_path / "part3" / "od.json").read_text())["images"]) == 1


# What `pip install -e .` installs (setup.cfg's install_requires), as modules.
BASE_MODULES = {"florence_cli", "click", "torch", "transformers", "PIL", "numpy", "tqdm", "pycocotools",
                "safetensors", "huggingface_hub"}  # fmt: skip


def test_python_one_liners_in_the_docs_install_what_the_base_install_lacks():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    lacking = []
    for page in pages:
        for line in page.read_text(encoding="utf-8").splitlines():
            for module in re.findall(r"python -c \"import (\w+)", line):
                if module not in BASE_MODULES and f"pip install {module}" not in line:
                    lacking.append(f"{page.name}: {line.strip()}")
    assert not lacking
