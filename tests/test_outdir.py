"""The output folder: one run at a time, one set of settings per folder's answers, files as open()
makes them."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from florence_cli.outdir import FolderInUse, OutputError, OutputFolder, SettingsMismatch
from florence_cli.records import Answer
from florence_cli.tasks import TASKS
from florence_cli.writers import atomic_writer

SETTINGS = {"model": "m", "generation": {"num_beams": 3}, "min_score": None}


def test_a_second_run_on_the_same_folder_is_refused_until_the_first_ends(tmp_path):
    first = OutputFolder(tmp_path / "out", SETTINGS)
    with pytest.raises(FolderInUse, match="in use by another florence annotate run"):
        OutputFolder(tmp_path / "out", SETTINGS)
    first.close()
    OutputFolder(tmp_path / "out", SETTINGS).close()


def test_other_settings_are_refused_only_where_answers_were_made_with_the_first(tmp_path):
    OutputFolder(tmp_path / "out", SETTINGS).close()  # say, a run whose model then failed to load
    other = {**SETTINGS, "model": "fixed-typo"}
    folder = OutputFolder(tmp_path / "out", other)
    folder.journal.append([Answer(TASKS["OD"], 64, 48, "", file="a.png", key=bytes(12))])
    folder.close()
    with pytest.raises(SettingsMismatch, match="other settings"):
        OutputFolder(tmp_path / "out", SETTINGS)
    OutputFolder(tmp_path / "out", SETTINGS, overwrite=True).close()


def test_an_output_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(OutputError, match="is not a folder"):
        OutputFolder(tmp_path / "out", SETTINGS)


def test_files_get_the_users_umask_and_fit_names_near_the_length_limit(tmp_path):
    code = (
        "import os, sys; os.umask(0o027)\n"
        "from pathlib import Path\nfrom florence_cli.writers import atomic_writer\n"
        "with atomic_writer(Path(sys.argv[1])) as f:\n    f.write('x')\n"
    )
    target = tmp_path / ("n" * 251 + ".txt")  # 255 bytes: a temporary name built on it would not fit
    subprocess.run([sys.executable, "-c", code, str(target)], check=True)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert os.listdir(tmp_path) == [target.name]  # no temporary file left behind


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(tmp_path):
    with pytest.raises(RuntimeError), atomic_writer(tmp_path / "a.txt") as file:
        file.write("half")
        raise RuntimeError("killed mid-write")
    assert os.listdir(tmp_path) == []


def test_paths_named_from_elsewhere_are_told_where_to_run_to_add_to_the_folders_dataset(
    tmp_path, monkeypatch
):
    from florence_cli.discover import name_roots

    imgs, other = tmp_path / "imgs", tmp_path / "other"
    imgs.mkdir(), other.mkdir()
    monkeypatch.chdir(tmp_path)
    folder = OutputFolder(tmp_path / "out", {**SETTINGS, "inputs": name_roots(["imgs"])})
    folder.journal.append([Answer(TASKS["OD"], 64, 48, "", file="a.png", key=bytes(12))])
    folder.close()
    with pytest.raises(SettingsMismatch) as refused:  # `find imgs -newer x | florence annotate -`
        OutputFolder(tmp_path / "out", {**SETTINGS, "inputs": name_roots(["-"])})
    assert f"to add to it, run from {imgs.resolve()}" in str(refused.value)
    assert "another output folder" in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(SettingsMismatch) as refused:  # another folder: nothing to add from here
        OutputFolder(tmp_path / "out", {**SETTINGS, "inputs": name_roots(["other"])})
    assert "run from" not in str(refused.value)
    monkeypatch.chdir(imgs)  # `cd imgs && find . -newer x | florence annotate -`: the same dataset
    OutputFolder(tmp_path / "out", {**SETTINGS, "inputs": name_roots(["-"])}).close()
