"""Caption files for training sets: a sidecar beside each image (``a.jpg`` → ``a.txt``, as kohya-ss
sd-scripts and OneTrainer read them) or under another root, and Hugging Face's ``metadata.jsonl``.

These files live among the user's own, so nothing of theirs is ever replaced: a file florence-cli did
not write, or wrote and the user edited since, is kept (``--overwrite-captions`` replaces it). What
was written is known from a ledger beside the captions (``.florence-captions.jsonl`` in each folder
that holds some: each file's name and the SHA-256 of what was written there, added once the file is in
place), so a run into another output folder knows them too; ledgers that older runs kept in their
output folder's state (``captions.jsonl``, by absolute path) are read as well.

A caption is one line (kohya-ss reads only a caption's first line): the line breaks of an answer become
spaces. An empty answer writes no caption file (kohya-ss stops on an empty one); it is counted.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from .config import CaptionOptions
from .discover import IMAGE_EXTENSIONS, ImageRef, short_digest
from .records import Answer
from .storage import is_url
from .tasks import OptionError, Output, Task
from .writers import atomic_writer

LEDGER = "captions.jsonl"  # in an output folder's state: older runs' ledger
FOLDER_LEDGER = ".florence-captions.jsonl"  # beside the caption files
_CAPTION_FILES = "`captions.sidecar`, `captions.sidecar_dir` or `captions.hf_metadata`"
METADATA = "metadata.jsonl"  # the name Hugging Face's imagefolder loader looks for


class CaptionClash(OptionError):
    """An image's caption file cannot be had: another image takes it, or a shard's sample has no folder."""


def caption_task(options: CaptionOptions, tasks: list[Task]) -> Task | None:
    """The text task whose answer feeds the caption files: ``options.task``, else the only text task.
    Refuses (``TaskError``) what cannot be meant."""
    texts = [task for task in tasks if task.output is Output.TEXT]
    if not options.enabled:
        given = {"task": options.task, "prefix": options.prefix, "suffix": options.suffix,
                 "overwrite": options.overwrite}  # fmt: skip
        for name, value in given.items():
            if value:
                raise OptionError(f"`captions.{name}` needs {_CAPTION_FILES}")
        return None
    if options.sidecar_dir is not None and _is_url_folder(options.sidecar_dir):
        raise OptionError(
            f"`captions.sidecar_dir` is a folder on this machine, not a URL ({options.sidecar_dir}); "
            "captions by URL: an `-o` URL takes the text files of the run's answers"
        )
    if options.task is not None:
        chosen = [task for task in texts if options.task in (task.name, task.token, task.prompt, task.slug)]
        if not chosen:
            names = ", ".join(task.name for task in texts) or "none"
            raise OptionError(
                f"`captions.task` {options.task} is not among the text tasks asked for ({names})"
            )
        return chosen[0]
    if len(texts) == 1:
        return texts[0]
    if not texts:
        raise OptionError(f"{_CAPTION_FILES} need a text task (a caption, OCR or a `prompts` prompt)")
    names = ", ".join(task.name for task in texts)
    raise OptionError(f"several text tasks ({names}): name the one captions come from with `captions.task`")


def _is_url_folder(folder: Path | str) -> bool:
    """A folder given as a URL (``s3://b/x``, which a ``Path`` has made ``s3:/b/x`` already)."""
    head = str(folder).split("/", 1)[0]
    return is_url(str(folder)) or (len(head) > 2 and head.endswith(":") and head[:-1].isalnum())


def check_extension(extension: str) -> str:
    """``--caption-extension`` as a suffix with its dot (``txt`` → ``.txt``); not an image's."""
    suffix = extension if extension.startswith(".") else f".{extension}"
    if suffix == "." or "/" in suffix or os.sep in suffix:
        raise OptionError(f"`captions.extension` {extension!r} is not a file name extension")
    if suffix.lower() in IMAGE_EXTENSIONS:
        raise OptionError(
            f"`captions.extension` {suffix} is an image extension: captions would replace images"
        )
    return suffix


class CaptionFiles:
    """Writes the caption files of one run, never over a file that is not florence-cli's."""

    def __init__(self, options: CaptionOptions, task: Task, state: Path, metadata_root: Path | None = None):
        self.options = options
        self.task = task
        self.metadata_root = metadata_root  # --hf-metadata: the input folder metadata.jsonl describes
        self.claimed_ahead = False  # every image's sidecar claimed before the run (see ``claim``)
        self.kept: list[str] = []  # files kept as they were, the first few (for the user)
        self.kept_count = 0
        self.empty_count = 0  # images whose answer was empty: no caption file
        self._written = set()  # digests of (path, SHA-256) written by florence-cli
        self._read_ledger(state / LEDGER, None)
        self._ledgers: dict[str, IO[str] | None] = {}  # by folder (resolved): read, then appended to
        self._claimed: set[bytes] = set()

    def _read_ledger(self, path: Path, folder: str | None) -> None:
        """Add a ledger's entries: by absolute path (an output folder's), or by name in ``folder``."""
        if not path.is_file():
            return
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
                where = entry["path"] if folder is None else os.path.join(folder, entry["name"])
                self._written.add(_entry_digest(where, entry["sha256"]))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a crash: that file is treated as the user's

    # -- where --------------------------------------------------------------------------------
    def sidecar_path(self, image: ImageRef) -> Path:
        """Where ``image``'s caption goes: beside it, or at its output name under ``--sidecar-dir``."""
        base = (
            Path(self.options.sidecar_dir, image.name)
            if self.options.sidecar_dir is not None
            else Path(image.path)
        )
        if self.options.naming == "full":
            return base.with_name(base.name + self.options.extension)
        return base.with_suffix(self.options.extension)

    def claim(self, image: ImageRef) -> None:
        """Refuse (``CaptionClash``) an image whose caption file another image of this run has taken
        (``a.jpg`` and ``a.png``: both ``a.txt``)."""
        if (image.member is not None or is_url(image.path)) and self.options.sidecar_dir is None:
            what = "a sample of a tar shard" if image.member is not None else "an object by URL"
            raise CaptionClash(
                f"{image.name} is {what}, with no folder to put its caption beside: "
                "write captions under a folder of their own with `captions.sidecar_dir`"
            )
        target = self.sidecar_path(image)
        key = short_digest(os.fsencode(os.path.abspath(target)))
        if key in self._claimed:
            raise CaptionClash(
                f"{_clashing(image, target)} would share the caption file {target}: rename one, or name "
                "captions by the whole file name with `captions.naming` full"
            )
        self._claimed.add(key)

    def caption(self, text: str) -> str:
        """The caption as written to files: the model's answer between the prefix and the suffix, on one
        line (each line break, with the spaces around it, becomes one space)."""
        return _LINE_BREAKS.sub(" ", f"{self.options.prefix}{text}{self.options.suffix}")

    # -- writing ------------------------------------------------------------------------------
    def write_sidecar(self, image: ImageRef, text: str) -> None:
        """Write ``image``'s caption file, unless a file that is not florence-cli's is there (kept) or the
        answer is empty (counted). A file that cannot be written is an ``OSError`` naming it."""
        if not text.strip():
            self.empty_count += 1
            return
        data = self.caption(text).encode("utf-8")
        target = self.sidecar_path(image)
        existing = _sha256_of(target)
        new = hashlib.sha256(data).hexdigest()
        try:
            if existing == new:
                self._record(target, new)  # the same text: ours from now on, nothing to write
            elif self._may_replace(target, existing):
                with atomic_writer(target, "wb") as file:
                    file.write(data)
                self._record(target, new)  # once in place: the ledger lists only files written
        except OSError as exc:  # named by the caption file, not by a temporary file beside it
            raise OSError(exc.errno, exc.strerror or str(exc), str(target)) from None

    def write_metadata(self, answers: Iterable[Answer]) -> None:
        """Write ``metadata.jsonl`` into the input folder from the journal's ``answers`` (in name order):
        a row per image with a caption, ``file_name`` relative to the folder, a column per text task
        (its folder name: ``more_detailed_caption``, ``prompt-…``) and the caption file's text as
        ``text`` — unless a file that is not florence-cli's is there (kept)."""
        target = self.metadata_root / METADATA
        if not self._may_replace(target, _sha256_of(target)):
            return
        digest = hashlib.sha256()
        with atomic_writer(target, "wb") as file:
            for row in self._metadata_rows(answers):
                line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
                digest.update(line)
                file.write(line)
        self._record(target, digest.hexdigest())

    def _metadata_rows(self, answers: Iterable[Answer]) -> Iterator[dict]:
        for name, group in itertools.groupby(answers, key=lambda answer: answer.file):
            texts = {a.task.slug: a.text for a in group if a.task.output is Output.TEXT}
            caption = texts.get(self.task.slug)
            # answers of earlier runs on other inputs may share the journal: only this folder's images
            if caption is not None and (self.metadata_root / name).is_file():
                yield {"file_name": name, **texts, "text": self.caption(caption)}

    def _may_replace(self, target: Path, existing: str | None) -> bool:
        if existing is None and not target.is_symlink():
            return True
        mine = existing is not None and self._mine(target, existing)
        if mine or self.options.overwrite:
            return True
        self.kept_count += 1
        if len(self.kept) < 20:
            self.kept.append(str(target))
        return False

    def _folder(self, target: Path) -> str:
        """``target``'s folder (links resolved), its ledger read the first time it is asked for."""
        folder = os.path.realpath(target.parent)
        if folder not in self._ledgers:
            self._read_ledger(Path(folder, FOLDER_LEDGER), folder)
            self._ledgers[folder] = None  # read; opened for appending when a file is written here
        return folder

    def _mine(self, target: Path, sha256: str) -> bool:
        self._folder(target)
        return _entry_digest(_key(target), sha256) in self._written

    def _record(self, target: Path, sha256: str) -> None:
        folder = self._folder(target)  # its earlier entries first
        entry = _entry_digest(_key(target), sha256)
        if entry in self._written:
            return
        if self._ledgers[folder] is None:
            self._ledgers[folder] = open(Path(folder, FOLDER_LEDGER), "a", encoding="utf-8")  # noqa: SIM115
        # ASCII escapes: a name that is not UTF-8 (surrogates) still makes a line
        self._ledgers[folder].write(json.dumps({"name": target.name, "sha256": sha256}) + "\n")
        self._ledgers[folder].flush()
        self._written.add(entry)

    def close(self) -> None:
        for ledger in self._ledgers.values():
            if ledger is not None:
                ledger.close()


def join_ledgers(states: list[Path], target: Path) -> None:
    """Append the caption ledgers of output folders' ``states`` to ``target``'s (``florence merge``);
    none is made where no folder wrote captions."""
    for state in states:
        lines = (state / LEDGER).read_bytes() if (state / LEDGER).is_file() else b""
        if lines:
            with open(target / LEDGER, "ab") as joined:
                joined.write(lines if lines.endswith(b"\n") else lines + b"\n")


def metadata_folder(inputs: list) -> Path:
    """The folder ``--hf-metadata`` describes: the run's one input, which must be a folder (file names
    in ``metadata.jsonl`` are relative to the folder it is in; a list of paths has none)."""
    folder = inputs[0] if len(inputs) == 1 else None
    if not isinstance(folder, str) or folder == "-" or not os.path.isdir(folder):
        raise OptionError(
            "`captions.hf_metadata` needs exactly one input, a folder: metadata.jsonl goes in it"
        )
    return Path(folder)


_LINE_BREAKS = re.compile(r"[ \t]*[\r\n]+[ \t]*")


def _key(target: Path) -> str:
    """A caption file's path in the ledger: absolute, its folder's links resolved."""
    return os.path.join(os.path.realpath(target.parent), target.name)


def _entry_digest(path: str, sha256: str) -> bytes:
    return short_digest(f"{path}\0{sha256}".encode("utf-8", "surrogateescape"))


def _sha256_of(path: Path) -> str | None:
    """The SHA-256 of a regular file's bytes; None when there is none (a link or a folder counts as
    the user's: it is never followed nor replaced)."""
    if path.is_symlink() or not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _clashing(image: ImageRef, target: Path) -> str:
    """``image`` and the other image of its folder whose caption would be ``target``, as one phrase."""
    folder = Path(image.path).parent
    mine = Path(image.path).name
    try:
        others = sorted(
            entry for entry in os.listdir(folder)
            if entry != mine and os.path.splitext(entry)[1].lower() in IMAGE_EXTENSIONS
            and (folder / entry).with_suffix(target.suffix).name == target.name
        )  # fmt: skip
    except OSError:
        others = []
    return f"{folder / others[0]} and {image.path}" if others else f"{image.path} and another image"
