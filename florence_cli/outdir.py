"""The output folder a run owns: its lock, settings, journal, errors log and answer files.

Everything that can be known about the folder is checked when it is opened — before a model loads: it
can be created and written, has room, is not in use by another run, and holds no answers made with
other settings. Write errors later in the run are told apart: one that concerns one file (a name too
long, a clash with a folder) fails that image; one that concerns the folder (a full or read-only
file system) stops the run with the journal intact.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .formats.coco import write_coco
from .formats.parquet import write_parquet
from .journal import AnswerReader, Journal, sort_by_name
from .tasks import Task
from .writers import atomic_writer, text_path

STATE = ".florence"
# Errors that stop every later write too; any other write error is the file's own.
_FOLDER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock
    fcntl = None  # type: ignore[assignment]


class OutputError(Exception):
    """The output folder cannot be used or written; the message is one line for the user."""


class SettingsMismatch(OutputError):
    """The output folder holds results made with other settings."""


class FolderInUse(OutputError):
    """Another run holds the output folder's lock."""


def stops_the_run(exc: OSError) -> bool:
    """Whether a write error concerns the whole folder (a full or read-only file system)."""
    return exc.errno in _FOLDER_ERRNOS


def describe_os_error(exc: OSError) -> str:
    return exc.strerror or str(exc)


class OutputFolder:
    """An output folder opened for one run; ``close`` releases it."""

    def __init__(
        self,
        path: str | Path,
        settings: dict,
        overwrite: bool = False,
        identify: Callable[[str], str | None] | None = None,
    ):
        """``settings``: what its answers depend on (``RunConfig.settings``, with the checkpoint's
        ``model_id`` where known); ``identify``: a model name's id, for folders made before ids were
        recorded."""
        self.path = Path(path)
        self.state = self.path / STATE
        self._lock: int | None = None
        try:
            self._open(settings, overwrite, identify)
        except OSError as exc:
            self.close()
            raise self._cannot_write(exc) from None
        except OutputError:
            self.close()
            raise

    def _open(self, settings: dict, overwrite: bool, identify: Callable[[str], str | None] | None) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"{self.path} is not a folder")
        self.state.mkdir(parents=True, exist_ok=True)
        self._lock = _take_lock(self.state, self.path)
        if overwrite:
            for name in ("journal.jsonl", "settings.json"):
                (self.state / name).unlink(missing_ok=True)
        if shutil.disk_usage(self.path).free == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.journal = Journal(self.state / "journal.jsonl")
        _check_settings(self.state / "settings.json", settings, bool(self.journal.done), identify)
        self.errors = open(self.path / "errors.jsonl", "w", encoding="utf-8")  # noqa: SIM115

    def check_settings(self, settings: dict) -> None:
        """Check the folder against the run's settings again, once they are known better than when it was
        opened (say, auto products that turned out batched): as when it was opened."""
        try:
            _check_settings(self.state / "settings.json", settings, bool(self.journal.done), None)
        except OSError as exc:
            raise self._cannot_write(exc) from None

    def _cannot_write(self, exc: OSError) -> OutputError:
        return OutputError(f"cannot write to {self.path}: {describe_os_error(exc)}")

    def text_path(self, task: Task, name: str) -> Path:
        return text_path(self.path, task, name)

    def write_text(self, task: Task, name: str, text: str) -> None:
        with atomic_writer(self.text_path(task, name)) as file:
            file.write(text)

    def rebuild_files(
        self,
        tasks: list[tuple[Task, list[str] | None]],
        model_name: str,
        parquet: list[Task] | None = None,
        answers: AnswerReader | None = None,
    ) -> dict[str, int]:
        """Rebuild the COCO file of each (task, its classes or None), and the Parquet file of each task
        in ``parquet``, from everything the journal holds (``answers``: a reader of the journal sorted
        already, else it is sorted once for all of them); returns each COCO file's number of images."""
        if answers is None:
            with self.journal.sorted() as reader:
                return self.rebuild_files(tasks, model_name, parquet, reader)
        written = {}
        for task, classes in tasks:
            path = self.path / f"{task.slug}.json"
            info = {"description": f"florence-cli {task.name}", "task": task.name, "model": model_name}
            written[path.name] = write_coco(path, task, lambda t=task: answers(t.name), info, classes)
        for task in parquet or ():
            write_parquet(self.path / f"{task.slug}.parquet", task, answers(task.name))
        return written

    def log_error(self, record: dict) -> None:
        self.errors.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.errors.flush()

    def sort_errors(self) -> None:
        """Rewrite the errors log in name order (an image's errors keep theirs) and close it: errors are
        logged as they come, which depends on timing and engine; sorted, a run's log is the same
        whatever ran it, and merged shards' is a single run's."""
        self.errors.close()
        path = self.path / "errors.jsonl"
        with tempfile.TemporaryDirectory(dir=self.state) as scratch:
            records = sort_by_name(read_errors(path), Path(scratch))
            with atomic_writer(path) as file:
                file.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)

    def close(self) -> None:
        for name in ("journal", "errors"):
            if hasattr(self, name):
                getattr(self, name).close()
        if self._lock is not None:
            os.close(self._lock)  # releases the lock
            self._lock = None


def read_errors(path: Path) -> Iterator[dict]:
    """The records of an errors log; a last line that a killed run cut short is skipped."""
    with open(path, encoding="utf-8") as file:
        for line in file:
            if line.endswith("\n"):
                yield json.loads(line)


def read_settings(folder: Path) -> dict:
    """The settings an output folder's answers were made with (``OutputError`` if it is not one)."""
    path = Path(folder) / STATE / "settings.json"
    if not path.is_file() or not (path.parent / "journal.jsonl").is_file():
        raise OutputError(f"{folder} is not a florence annotate output folder (no {STATE}/settings.json)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise OutputError(f"{path} is damaged") from None


def _take_lock(state: Path, folder: Path) -> int | None:
    """Lock the state folder itself (no lock file to leave behind); the lock dies with the process."""
    if fcntl is None:
        return None
    handle = os.open(state, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(handle)
        raise FolderInUse(
            f"{folder} is in use by another florence annotate run; wait for it to end, or use another "
            "output folder"
        ) from None
    return handle


def _check_settings(
    path: Path, settings: dict, holds_answers: bool, identify: Callable[[str], str | None] | None
) -> None:
    """Refuse other settings than those the folder's answers were made with, naming each that differs;
    a folder without answers (say, a run whose model failed to load) takes the new ones."""
    if path.exists() and holds_answers:
        _refuse_other_settings(path, settings, identify)
    else:
        with atomic_writer(path) as file:
            file.write(json.dumps(settings, indent=1))


def refuse_other_settings(
    folder: str | Path, settings: dict, identify: Callable[[str], str | None] | None = None
) -> None:
    """What opening the output folder would refuse for its settings (``SettingsMismatch``), found by
    reading alone — nothing made, nothing locked — so that a run can say it before anything slow (a
    folder without answers, or none yet, refuses nothing)."""
    state = Path(folder) / STATE
    journal = state / "journal.jsonl"
    if (state / "settings.json").is_file() and journal.is_file() and journal.stat().st_size:
        _refuse_other_settings(state / "settings.json", settings, identify)


def _refuse_other_settings(path: Path, settings: dict, identify: Callable[[str], str | None] | None) -> None:
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise OutputError(f"{path} is damaged; use --overwrite or another output folder") from None
    if "inputs" in earlier and earlier["inputs"] != settings.get("inputs", earlier["inputs"]):
        raise SettingsMismatch(_another_dataset(path.parent.parent, earlier["inputs"], settings["inputs"]))
    differences = settings_differences(earlier, settings, identify)
    if differences:
        raise SettingsMismatch(
            f"{path.parent.parent} holds answers made with other settings: {'; '.join(differences)}. "
            "To add to them, run with the earlier settings; to keep both, write to another output "
            "folder; --overwrite starts over (its answers are lost)"
        )


def _another_dataset(folder: Path, earlier: list[str], now: list[str]) -> str:
    """The refusal of inputs whose names start elsewhere than the folder's (``discover.name_roots``).
    Files named directly and paths on standard input are named from the working directory: where the
    folder's names start in one folder, running from there adds to it (``find . -newer ...``)."""
    added_from = ""
    if now == [f"paths from {os.path.realpath(os.getcwd())}"] and len(earlier) == 1:
        start = earlier[0].removeprefix("paths from ")
        if start != earlier[0]:
            added_from = (
                f"to add to it, run from {start} (files named directly and paths on standard input are "
                "named from the working directory); "
            )
    return (
        f"{folder} annotates another dataset ({'; '.join(earlier)}), and these inputs ({'; '.join(now)}) "
        f"could give other files the same names: {added_from}to keep both, write to another output folder "
        "(--overwrite starts this one over, its answers lost)"
    )


def settings_differences(
    earlier: dict, now: dict, identify: Callable[[str], str | None] | None = None
) -> list[str]:
    """Each setting that differs, as ``name: old → new``. A model is compared by what it is
    (``model_id``), not by how it was named; a folder made before ids were recorded names its model only,
    which ``identify`` turns into an id where it can."""
    differences = []
    earlier_id = earlier.get("model_id")
    if earlier_id is None and identify and earlier.get("model") != now.get("model"):
        earlier_id = identify(earlier["model"])
    same_model = earlier_id == now.get("model_id") if earlier_id and now.get("model_id") else None
    if same_model is False or (same_model is None and earlier.get("model") != now.get("model")):
        differences.append(f"model: {earlier.get('model')} → {now.get('model')}")
    for key in sorted((set(earlier) | set(now)) - {"model", "model_id", "inputs"}):
        old, new = earlier.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differences += [
                f"{key}.{name}: {_shown(old.get(name))} → {_shown(new.get(name))}"
                for name in sorted(set(old) | set(new))
                if old.get(name) != new.get(name)
            ]
        elif old != new:
            differences.append(_difference(key, old, new))
    return differences


def _difference(key: str, old, new) -> str:
    if key == "exact":  # recorded (False) for batched products only
        batched = "batched"
        other = "per-image or invariant"
        return f"products: {batched if old is False else other} → {batched if new is False else other}"
    if key == "cuda_graphs":
        return f"cuda_graphs: {'on' if old else 'off'} → {'on' if new else 'off'}"
    return f"{key}: {_shown(old)} → {_shown(new)}"


def _shown(value) -> str:
    return "none" if value is None else str(value)
