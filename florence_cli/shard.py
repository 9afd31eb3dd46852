"""Shards for batch schedulers: ``--shard I/N`` takes a deterministic share of the images, and
``florence merge`` combines the shards' output folders into the files one run would have written.

An image's shard is a hash of its output name, so it never depends on the other images: a file added
or removed between two shards' runs cannot move images from one shard to another.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click

from .discover import name_order
from .journal import read_record
from .outdir import STATE
from .writers import atomic_writer


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``I/N`` with ``0 <= I < N``; raises ``ValueError`` with a message for the user."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"--shard is I/N, e.g. 0/4; got {text!r}") from None
        if not 0 <= index < count:
            raise ValueError(f"--shard I/N needs 0 <= I < N; got {text!r}")
        return cls(index, count)

    def takes(self, name: str) -> bool:
        """Whether the image (or named input) ``name`` belongs to this shard."""
        digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


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

    COCO files: images in name order, image and annotation ids renumbered, categories unified by name.
    Text files are copied; JSONL files in the folders are merged in name order; ``errors.jsonl`` is
    the shards' errors one after the other. The journals are concatenated,
    so ``florence annotate`` resumes in ``output`` as it would in a single run's folder.
    """
    folders = [Path(f) for f in folders]
    settings = _common_settings(folders)
    if output.exists() and any(output.iterdir()):
        raise MergeError(f"{output} is not empty; merge into a new folder")
    journaled = {record["file"] for folder in folders for _, record in _journal(folder)}
    coco_names = _same_files(folders, lambda folder: (p.name for p in folder.glob("*.json")))
    images = {name: _merge_coco([f / name for f in folders], output / name, journaled) for name in coco_names}
    text_files = _copy_text_files(folders, output)
    for name in _same_files(folders, lambda folder: (p.name for p in folder.glob("*.jsonl"))):
        _merge_jsonl([f / name for f in folders], output / name, sort=name != "errors.jsonl")
    with atomic_writer(output / STATE / "journal.jsonl") as file:
        for folder in folders:
            file.writelines(line for line, _ in _journal(folder))
    (output / STATE / "settings.json").write_text(json.dumps(settings, indent=1))
    return MergeSummary(len(folders), images, text_files)


def _common_settings(folders: list[Path]) -> dict:
    """The settings every folder was made with (less the shard); a full set of shards when sharded."""
    shards, common = [], None
    for folder in folders:
        path = folder / STATE / "settings.json"
        if not path.exists() or not (folder / STATE / "journal.jsonl").exists():
            raise MergeError(f"{folder} is not a florence annotate output folder (no {STATE}/settings.json)")
        settings = json.loads(path.read_text())
        if "shard" in settings:
            shards.append(Shard.parse(settings.pop("shard")))
        if common is not None and settings != common:
            raise MergeError(f"{folder} was made with other settings than {folders[0]}: {settings}, {common}")
        common = settings
    if shards:
        counts = {s.count for s in shards}
        indices = sorted(s.index for s in shards)
        if len(shards) != len(folders) or len(counts) != 1 or indices != list(range(counts.pop())):
            have = ", ".join(str(s) for s in shards) or "none"
            raise MergeError(f"the folders must be every shard of one split, exactly once; they hold {have}")
    return common or {}


def _journal(folder: Path) -> Iterator[tuple[str, dict]]:
    """A folder's journal lines and records: damaged lines and a last line that a killed run cut short
    are skipped."""
    with open(folder / STATE / "journal.jsonl", encoding="utf-8", errors="replace") as journal:
        for line in journal:
            record = read_record(line) if line.endswith("\n") else None
            if record is not None:
                yield line, record


def _same_files(folders: list[Path], names) -> list[str]:
    found = [sorted(names(folder)) for folder in folders]
    for folder, files in zip(folders[1:], found[1:], strict=True):
        if files != found[0]:
            raise MergeError(f"{folder} holds {files}, {folders[0]} holds {found[0]}: not shards of one run")
    return found[0]


def _merge_coco(paths: list[Path], output: Path, journaled: set[str]) -> int:
    shards = [json.loads(path.read_text(encoding="utf-8")) for path in paths]
    if any(shard["info"] != shards[0]["info"] for shard in shards):
        raise MergeError(f"{output.name}: the shards were made by different tasks or models")
    lists = [[c["name"] for c in sorted(shard["categories"], key=lambda c: c["id"])] for shard in shards]
    # one run lists the classes it was given, in their order, or else every label seen, sorted
    names = lists[0] if all(names == lists[0] for names in lists) else sorted({n for ns in lists for n in ns})
    category_ids = {name: number for number, name in enumerate(names, start=1)}
    supercategory = next((c["supercategory"] for shard in shards for c in shard["categories"]), None)
    entries = []  # (input order, image, its annotations)
    seen: dict[str, Path] = {}
    for path, shard in zip(paths, shards, strict=True):
        names_by_id = {c["id"]: c["name"] for c in shard["categories"]}
        annotations: dict[int, list[dict]] = {}
        for annotation in sorted(shard["annotations"], key=lambda a: a["id"]):
            annotation["category_id"] = category_ids[names_by_id[annotation["category_id"]]]
            annotations.setdefault(annotation["image_id"], []).append(annotation)
        for image in shard["images"]:
            name = image["file_name"]
            if seen.setdefault(name, path) != path:  # (one image has a record per query of a task)
                raise MergeError(f"{name} is in both {seen[name]} and {path}")
            if name not in journaled:
                raise MergeError(f"{path}: {name} has no record in its folder's journal")
            entries.append((name_order(name), image, annotations.get(image["id"], [])))
    entries.sort(key=lambda entry: entry[0])  # stable: an image's records keep their order
    merged = {"info": shards[0]["info"], "images": [], "annotations": [], "categories": []}
    for image_id, (_, image, annotations) in enumerate(entries, start=1):
        merged["images"].append({**image, "id": image_id})
        for annotation in annotations:
            annotation.update(id=len(merged["annotations"]) + 1, image_id=image_id)
            merged["annotations"].append(annotation)
    merged["categories"] = [
        {"id": number, "name": name, "supercategory": supercategory} for name, number in category_ids.items()
    ]
    with atomic_writer(output) as file:  # the layout write_coco gives
        file.write(json.dumps(merged, ensure_ascii=False) + "\n")
    return len(seen)


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
        yield from sorted(p for p in task_folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def _merge_jsonl(paths: list[Path], output: Path, sort: bool) -> None:
    """One line per record; in name order when ``sort`` (a stable sort keeps task order)."""
    lines = [line for path in paths for line in path.read_text(encoding="utf-8").splitlines(keepends=True)]
    if sort:
        lines.sort(key=lambda line: name_order(json.loads(line)["file"]))
    with atomic_writer(output) as file:
        file.writelines(lines)


@click.command("merge")
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="A new folder.")
def merge_command(folders: tuple[str, ...], output: str) -> None:
    """Combine the output FOLDERS of `florence annotate --shard I/N` runs into the files one run writes."""
    try:
        summary = merge([Path(f) for f in folders], Path(output))
    except MergeError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(summary.line(), err=True)
