"""The README's recipes on a local folder, run as written in a shell (one scratch folder, in the README's
order, so a recipe that builds on an earlier one's output folder meets it), on the tiny model."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from .conftest import write_images

REPO = Path(__file__).resolve().parent.parent


def _recipes() -> list[str]:
    """The Recipes section's command lines, comments dropped."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Recipes\n\n```\n(.*?)```", readme, re.S).group(1)
    return [re.split(r"\s+# ", line)[0].strip() for line in block.splitlines() if line.strip()]


def _run(recipe: str, cwd: Path, model: Path) -> subprocess.CompletedProcess:
    """``recipe`` in bash, ``florence`` being this checkout's, every annotate on ``model`` with short
    answers (what it names otherwise is as written)."""
    florence = f"{shlex.quote(sys.executable)} -m florence_cli"
    command = re.sub(r"\bflorence annotate ", f"{florence} annotate -m {model} --max-new-tokens 8 ", recipe)
    command = re.sub(r"\bflorence (?=merge )", f"{florence} ", command)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True)


def _recipe(words: str) -> str:
    return next(recipe for recipe in _recipes() if words in recipe)


def test_the_new_files_recipe_adds_to_the_folder_recipes_output(tiny_model, tmp_path):
    write_images(tmp_path / "imgs", 3, ext="jpg")
    first = _run(_recipe("annotate imgs -t OD -o out"), tmp_path, tiny_model)
    assert first.returncode == 0, first.stderr
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
