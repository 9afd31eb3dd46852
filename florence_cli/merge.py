"""``florence merge``: the output folders of ``--shard I/N`` runs combined into the files one run over all
their images writes (an image's shard is a hash of its name: ``config.Shard``).

The merged folder is an output folder like any other (``OutputFolder``): the shards' journals are
joined into its journal, and its COCO files are rebuilt from that by the code a run's final write
uses, so they are a single run's files byte for byte, and ``florence annotate`` resumes in it.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .captions import join_ledgers
from .config import Shard
from .discover import name_order
from .formats.parquet import file_task, is_shard_file, write_shard_files
from .journal import read_journal
from .outdir import STATE, OutputError, OutputFolder, read_errors, read_settings, settings_differences
from .tasks import Task, resolve_task
from .writers import atomic_writer

_CHUNK = 10_000  # journal answers appended at once


class MergeError(Exception):
    """Folders that cannot be merged into one run's output; the message is one line for the user."""


@dataclass
class MergeSummary:
    """What a merge wrote."""

    folders: int
    images: dict[str, int]  # per COCO file
    text_files: int

    def line(self) -> str:
        coco = ", ".join(f"{name}: {count} images" for name, count in self.images.items())
        return f"merged {self.folders} folders: {coco or 'no COCO files'}; {self.text_files} text files"


def merge(folders: list[Path], output: Path) -> MergeSummary:
    """Write into ``output`` the files a single run over all the shards' images writes.

    COCO and Parquet files, tar shards' own included (``--per-shard``), are rebuilt from the joined
    journals (images in name order, categories as one run lists them); text files are copied; JSONL
    files in the folders are merged in name order, and ``errors.jsonl`` is sorted as a run sorts its own
    at its end. The caption files the shards wrote
    stay florence-cli's (their ledgers are joined), so a rerun on the merged folder may update them.
    """
    folders = [Path(f) for f in folders]
    settings = _common_settings(folders)
    if output.exists() and any(output.iterdir()):
        raise MergeError(f"{output} is not empty; merge into a new folder")
    coco = [_coco_task(folders, name) for name in _same_files(folders, "*.json")]
    wholes = [folders[0] / name for name in _same_files(folders, "*.parquet")]
    parquet = [file_task(path) for path in wholes if not is_shard_file(path)]
    per_shard = _per_shard_tasks(folders)
    target = OutputFolder(output, settings)
    try:
        _join_journals(folders, target)
        join_ledgers([folder / STATE for folder in folders], target.state)
        with target.journal.sorted() as answers:
            images = target.rebuild_files(coco, settings["model"], parquet, answers)
            for task in per_shard:
                write_shard_files(output, task, answers(task.name))
        text_files = _copy_text_files(folders, output)
        for name in _same_files(folders, "*.jsonl"):
            if name != "errors.jsonl":
                _merge_jsonl([f / name for f in folders], output / name)
        for folder in folders:
            for record in read_errors(folder / "errors.jsonl"):
                target.log_error(record)
        target.sort_errors()
    finally:
        target.close()
    return MergeSummary(len(folders), images, text_files)


def _common_settings(folders: list[Path]) -> dict:
    """The settings every folder was made with (less the shard); a full set of shards when sharded."""
    shards, common, inputs = [], None, []
    for folder in folders:
        try:
            settings = read_settings(folder)
        except OutputError as exc:
            raise MergeError(str(exc)) from None
        if "shard" in settings:
            shards.append(Shard.parse(settings.pop("shard")))
        inputs.append(settings.pop("inputs", None))
        differences = settings_differences(common, settings) if common is not None else []
        if differences:
            raise MergeError(
                f"{folder} was made with other settings than {folders[0]}: {'; '.join(differences)}"
            )
        common = settings
    if shards:
        counts = {s.count for s in shards}
        indices = sorted(s.index for s in shards)
        if len(shards) != len(folders) or len(counts) != 1 or indices != list(range(counts.pop())):
            have = ", ".join(str(s) for s in shards) or "none"
            raise MergeError(f"the folders must be every shard of one split, exactly once; they hold {have}")
    if inputs[0] is not None and inputs.count(inputs[0]) == len(inputs):  # shards run elsewhere see
        common = {**(common or {}), "inputs": inputs[0]}  # other paths: their merge records none
    return common or {}


def _per_shard_tasks(folders: list[Path]) -> list[Task]:
    """The tasks whose answers the folders hold in tar shards' own files (``--per-shard``): the merged
    folder gets each shard's file, of all its samples whichever folder answered them."""
    tasks = {}
    for folder in folders:
        for path in folder.rglob("*.parquet"):
            if STATE not in path.parts and is_shard_file(path):
                task = file_task(path)
                tasks[task.name] = task
    return [tasks[name] for name in sorted(tasks)]


def _same_files(folders: list[Path], pattern: str) -> list[str]:
    found = [sorted(p.name for p in folder.glob(pattern)) for folder in folders]
    for folder, files in zip(folders[1:], found[1:], strict=True):
        if files != found[0]:
            raise MergeError(f"{folder} holds {files}, {folders[0]} holds {found[0]}: not shards of one run")
    return found[0]


def _coco_task(folders: list[Path], name: str) -> tuple[Task, list[str] | None]:
    """A COCO file's task, and the classes it was asked for: where every shard lists the same
    categories, that list (it is the classes given, or the sorted labels of them all); else none, and
    the labels of all the answers are listed, sorted, as one run lists them."""
    shards = [json.loads((folder / name).read_text(encoding="utf-8")) for folder in folders]
    if any(shard["info"] != shards[0]["info"] for shard in shards):
        raise MergeError(f"{name}: the shards were made by different tasks or models")
    lists = [[c["name"] for c in sorted(shard["categories"], key=lambda c: c["id"])] for shard in shards]
    return resolve_task(shards[0]["info"]["task"]), lists[0] if all(n == lists[0] for n in lists) else None


def _join_journals(folders: list[Path], target: OutputFolder) -> None:
    """Append every folder's journal to ``target``'s; an image in two shards is refused."""
    owner: dict[str, Path] = {}
    for folder in folders:
        answers = read_journal(folder / STATE / "journal.jsonl")
        while chunk := list(itertools.islice(answers, _CHUNK)):
            for answer in chunk:
                if owner.setdefault(answer.file, folder) != folder:
                    raise MergeError(f"{answer.file} is in both {owner[answer.file]} and {folder}")
            target.journal.append(chunk)


def _copy_text_files(folders: list[Path], output: Path) -> int:
    """Copy every answer file under the folders' task folders; one name in two shards must agree."""
    copied: dict[Path, Path] = {}
    for folder in folders:
        for source in _answer_files(folder):
            relative = source.relative_to(folder)
            target = output / relative
            if relative in copied:
                if source.read_bytes() != target.read_bytes():
                    raise MergeError(f"{relative} differs between {copied[relative]} and {folder}")
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            copied[relative] = folder
    return len(copied)


def _answer_files(folder: Path) -> Iterator[Path]:
    for task_folder in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        # (tar shards' own Parquet files are rebuilt from the journals, not copied)
        files = task_folder.rglob("*")
        yield from sorted(
            p for p in files if p.is_file() and not p.name.startswith(".") and p.suffix != ".parquet"
        )


def _merge_jsonl(paths: list[Path], output: Path) -> None:
    """One line per record, in name order (a stable sort keeps task order)."""
    lines = [line for path in paths for line in path.read_text(encoding="utf-8").splitlines(keepends=True)]
    lines.sort(key=lambda line: name_order(json.loads(line)["file"]))
    with atomic_writer(output) as file:
        file.writelines(lines)
