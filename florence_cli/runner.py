"""The driver of a run, for every engine and the Python API alike: ``preflight`` refuses what needs no
image, discovery and the journal plan the work, an engine answers it, and every batch that comes back is
written and journaled at once. Imports no torch: engines bring the model.

How a run ends is data (``RunSummary``): its exit status tells images that failed (1) from a run that
stopped — a full disk (3), a failed device (4), Ctrl-C (130), SIGTERM (143), a closed standard
output (141) — and in every case the files in the output folder agree with its journal, so the same
command finishes.
"""

from __future__ import annotations

import errno
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

from .captions import CaptionClash, CaptionFiles, caption_task, metadata_folder
from .checkpoint import ModelLoadError, locate_model, model_identity
from .config import RunConfig, Shard
from .device_errors import DeviceFailure
from .discover import Duplicate, ImageRef, Input, InputError, discover, name_roots, printable, shard_inputs
from .engine import Engine, Started
from .formats.parquet import require_pyarrow
from .interrupts import Interrupted, critical, interruptible, raise_if_lost
from .jobs import Job, TaskRequest, WorkItem, plan_jobs, requests_identity
from .journal import ShardProgress, work_key
from .outdir import OutputFolder, describe_os_error, refuse_other_settings, stops_the_run
from .progress import Progress
from .records import Answer, ImageFailure, ItemResult, counted
from .shardfiles import ShardFiles
from .storage import StorageError, filesystem, is_pipe, is_url, not_held, under, upload, use_options
from .tarshards import ShardEnd, reads_through
from .tasks import resolve_task
from .writers import JsonlSink, StdoutClosed

EXIT_OK = 0
EXIT_IMAGES_FAILED = 1
EXIT_OUTPUT_FAILED = 3  # the output folder could not be written mid-run (a full disk)
EXIT_DEVICE_FAILED = 4  # the device failed mid-run (a kernel that cannot compile or launch, a CUDA error)


@dataclass
class RunSummary:
    """What a run did, and how it ended."""

    images: int = 0  # images found
    annotated: int = 0  # images answered in this run
    skipped: int = 0  # images whose tasks were all done already
    failed: int = 0  # images (or named inputs) with an error
    answers: int = 0  # (image, task) answers written in this run
    duplicates: int = 0  # files found again under another name, annotated once
    missing_shards: int = 0  # tar shards a pattern names that are not there
    total: int | None = None  # images the inputs hold, where they could be counted
    damaged_journal_lines: int = 0  # journal lines that hold no record, skipped
    seconds: float = 0.0
    failures: list[ImageFailure] = field(default_factory=list)  # the first few, for display
    stopped_by: int | None = None  # the signal that stopped the run (SIGPIPE: standard output closed)
    output_error: str | None = None  # why the output folder could not be written
    device_error: str | None = None  # the device's error that stopped the run (device_errors)
    captions_empty: int = 0  # images whose answer was empty: no caption file written
    captions_kept: int = 0  # caption files not florence-cli's (or edited since), left as they were
    kept_captions: list[str] = field(default_factory=list)  # the first few, for display
    products: str | None = None  # how the model's products met the batch (config.PRODUCTS)

    @property
    def images_per_second(self) -> float:
        return self.annotated / self.seconds if self.seconds else 0.0

    @property
    def exit_code(self) -> int:
        if self.output_error:
            return EXIT_OUTPUT_FAILED
        if self.device_error:
            return EXIT_DEVICE_FAILED
        if self.stopped_by:
            return 128 + self.stopped_by
        return EXIT_IMAGES_FAILED if self.failed or self.missing_shards else EXIT_OK

    def line(self) -> str:
        """One line for the user: the counts, or why the run stopped and how far it got."""
        finished = self.annotated + self.skipped
        done = (
            f"{finished} of {counted(self.total, 'image')} are done"
            if self.total is not None
            else f"{finished} of {counted(self.images, 'image')} found so far are done"
        )
        if self.output_error:
            return f"error: {self.output_error}; {done}; once fixed, run the same command to finish"
        if self.device_error:
            return f"error: the device failed: {self.device_error}; {done}; run the same command to resume"
        if self.stopped_by == signal.SIGPIPE:
            return f"standard output was closed: {done}; run the same command to finish"
        if self.stopped_by:
            return f"interrupted: {done}; run the same command to finish"
        duplicates = f", {self.duplicates} found twice (annotated once)" if self.duplicates else ""
        if self.missing_shards:
            duplicates += f", {counted(self.missing_shards, 'shard')} missing"
        kept = (
            f", {counted(self.captions_kept, 'caption file')} kept as found (not written by florence-cli, "
            "or edited since; --overwrite-captions replaces them)"
            if self.captions_kept else ""
        )  # fmt: skip
        if self.captions_empty:
            kept += f", {counted(self.captions_empty, 'empty answer')} with no caption file"
        products = f", {self.products} products" if self.products else ""
        return (
            f"{counted(self.images, 'image')}: {self.annotated} annotated, {self.skipped} already done, "
            f"{self.failed} failed{duplicates}, {counted(self.answers, 'answer')} in {self.seconds:.1f} s "
            f"({self.images_per_second:.2f} images/s{products}){kept}"
        )


class _OutputStopped(Exception):
    """A write that no later write would get past (a full or read-only file system)."""


@dataclass
class Preflight:
    """What the checks before any image is read leave a run: its output folder (opened and locked), its
    caption files, its tar shards' progress, and — where caption files had to be claimed ahead — every
    input found, so that the inputs are discovered once."""

    folder: OutputFolder
    shards: ShardProgress
    known: dict  # what the folder's settings add to the config's: the checkpoint's id, the inputs' roots
    captions: CaptionFiles | None = None
    found: list | None = None

    def close(self) -> None:
        """Release the folder, for a run that ends before its first image."""
        if self.captions:
            self.captions.close()
        self.folder.close()


def preflight(
    inputs: list[Input],
    requests: list[TaskRequest],
    config: RunConfig,
    engine: Engine,
    note: Callable[[str], None] = lambda text: None,
) -> Preflight:
    """Every refusal that needs no image, in this order, each an exception with one line for the user:

    1. the options themselves, and against the tasks: batch size, decode processes, caption files
       (``OptionError``);
    2. ``parquet`` or ``per_shard`` without pyarrow (``ImportError``); a URL input or ``upload`` whose
       scheme's package (fsspec, s3fs …) is missing (``storage.StorageError``);
    3. ``captions.hf_metadata`` without one input folder (``OptionError``);
    4. where the checkpoint is found on this machine (its id needs no torch), the output folder's
       settings, read only, as 6 checks them: a mismatch is said at once, not after torch's import;
    5. the checkpoint, without its weights: found, usable, on a device there is, and holding every text
       and ``generation.max_new_tokens`` (``engine.check``: ``ModelLoadError``, ``TaskError``); ``note``
       hears that it loads, as this is where a run first takes seconds;
    6. the output folder: a folder, writable, not in use, holding answers made with the same settings —
       the same model by what it is, however named, and the same dataset: inputs whose names start
       where the folder's do (``discover.name_roots``), so that no name ever stands for two files
       (``OutputError``);
    7. caption files that two images would share (``CaptionClash``; the inputs are discovered here, once;
       paths on standard input are checked as they come).
    """
    config.check()
    use_options(config.storage_options)
    task = caption_task(config.captions, [request.task for request in requests])
    if config.parquet or config.per_shard:
        require_pyarrow()
    for url in [*(i for i in inputs if isinstance(i, str) and is_url(i) and not is_pipe(i)), config.upload]:
        if url:
            filesystem(url)  # a scheme without its package; nothing is asked of the store yet
    root = metadata_folder(inputs) if task and config.captions.hf_metadata else None
    roots = name_roots(inputs)  # one dataset per output folder
    if not config.overwrite and (found_here := identify_model(config.model.name)):
        settings = {**config.settings(), "model_id": found_here, "inputs": roots}
        refuse_other_settings(config.output, settings, identify_model)
    note(f"florence: loading {config.model.name}…")
    model_id = engine.check(requests, config.generation.max_new_tokens)
    known = {"model_id": model_id} if model_id else {}
    known["inputs"] = roots
    folder = OutputFolder(config.output, {**config.settings(), **known}, config.overwrite, identify_model)
    checked = Preflight(folder, ShardProgress(folder.journal, requests_identity(requests)), known)
    if task is None:
        return checked
    checked.captions = CaptionFiles(config.captions, task, folder.state, root)
    if config.captions.sidecars and "-" not in inputs:
        try:
            checked.found = list(discover(inputs, (), checked.shards.finished))
            for found in checked.found:
                if isinstance(found, ImageRef):
                    checked.captions.claim(found)
        except BaseException:
            checked.close()
            raise
        checked.captions.claimed_ahead = True
    return checked


def identify_model(name: str) -> str | None:
    """The id of the checkpoint ``name`` names here, if it can be found (``checkpoint.model_identity``)."""
    try:
        return model_identity(locate_model(name))
    except ModelLoadError:
        return None


def run(
    inputs: Iterable[Input],
    requests: list[TaskRequest],
    config: RunConfig,
    engine: Engine,
    stdin_lines: Iterable[str] = (),
    on_error: Callable[[ImageFailure], None] | None = None,
    on_notice: Callable[[str], None] | None = None,
) -> RunSummary:
    """Annotate every image under ``inputs`` with ``requests`` into ``config.output``, resuming earlier
    work there, with ``engine`` answering: the one driver of the CLI, the Python API, local and Ray runs.
    Refuses (``preflight``) before any image is read; ``on_error`` hears of each image that fails,
    ``on_notice`` of a products mode other than the one asked for (auto's fallback)."""
    inputs = list(inputs)
    progress = Progress(config.progress)
    checked = preflight(inputs, requests, config, engine, progress.note)
    try:
        started = engine.start()
        if started.fallback:  # batch-dependent answers now: the folder must take them
            if on_notice:
                on_notice(started.fallback)
            config = replace(config, model=replace(config.model, products=started.products))
            checked.folder.check_settings({**config.settings(), **checked.known})
    except BaseException:
        progress.close()
        checked.close()
        engine.close()
        raise
    if checked.found is not None:
        progress.set_total(_images_among(checked.found, config.shard))
    elif "-" not in inputs:  # paths on standard input cannot be counted ahead
        shards = shard_inputs(inputs)
        progress.set_shards(len(shards))
        if not any(reads_through(shard) for shard in shards):  # counted as shards, not read twice
            progress.count_in_background(lambda: _images_among(discover(inputs), config.shard))
    progress.start()
    try:
        run = _Run(requests, checked, config, on_error, started, progress)
        return run.execute(inputs, stdin_lines, engine)
    finally:
        engine.close()


class _Run:
    """One run of the driver into a checked output folder, which it closes at the end."""

    def __init__(
        self,
        requests: list[TaskRequest],
        checked: Preflight,
        config: RunConfig,
        on_error: Callable[[ImageFailure], None] | None,
        started: Started,
        progress: Progress,
    ):
        self.requests = requests
        self.captions = checked.captions
        # Caption files per image, as answered (``metadata.jsonl`` alone is written at the end).
        self.sidecars = self.captions if self.captions and self.captions.options.sidecars else None
        self.found = checked.found
        self.folder = checked.folder
        self.shards = checked.shards  # tar shards
        self.config = config
        self.on_error = on_error
        self.summary = RunSummary(
            damaged_journal_lines=self.folder.journal.damaged_lines, products=started.products
        )
        self.listers = started.listers
        self.sink = JsonlSink(config.jsonl) if config.jsonl else None
        self.progress = progress
        self.captioned_earlier: dict[str, ImageRef] = {}  # images whose caption comes from the journal
        self.earlier_keys: set[bytes] = set()  # answers of earlier runs to stream at the end
        tasks = list(dict.fromkeys(r.task for r in requests))
        self.shard_files = (
            ShardFiles(self.folder.path, tasks, self.folder.journal, config.upload)
            if config.per_shard
            else None
        )

    def execute(self, inputs: Iterable[Input], stdin_lines: Iterable[str], engine: Engine) -> RunSummary:
        """Feed ``engine`` the work not done yet and write what comes back; stops cleanly on SIGINT,
        SIGTERM, a closed standard output, a full disk or a failed device."""
        started = time.perf_counter()
        with interruptible():
            results = engine.results(self.work(inputs, stdin_lines))
            try:
                for batch in results:
                    raise_if_lost()
                    with critical():
                        self.write(batch)
            except Interrupted as exc:
                self.summary.stopped_by = exc.signum
            except StdoutClosed:
                self.summary.stopped_by = signal.SIGPIPE
            except _OutputStopped as exc:
                self.summary.output_error = str(exc)
            except DeviceFailure as exc:
                self.summary.device_error = str(exc)
            finally:
                try:
                    with critical():  # a second Ctrl-C waits for the files to agree with the journal
                        _end(results)
                        self.close()
                except Interrupted as exc:
                    self.summary.stopped_by = self.summary.stopped_by or exc.signum
        self.summary.seconds = time.perf_counter() - started
        return self.summary

    def fail(self, failure: ImageFailure) -> None:
        self.summary.failed += 1
        self._log_error(failure)

    def _log_error(self, failure: ImageFailure) -> None:
        """The errors log's line and the user's, for a failed image or a missing shard."""
        if len(self.summary.failures) < 20:
            self.summary.failures.append(failure)
        try:
            self.folder.log_error(failure.record())
        except OSError as exc:
            raise _OutputStopped(_cannot_write(self.folder.path / "errors.jsonl", exc)) from exc
        if self.on_error:
            self.on_error(failure)

    def work(self, inputs: Iterable[Input], stdin_lines: Iterable[str]) -> Iterator[WorkItem]:
        """Images with the jobs not yet done on them; images with nothing to do are counted, not sent."""
        found_all = self.found
        if found_all is None:
            found_all = discover(inputs, stdin_lines, self.shards.finished, self.listers)
        for found in found_all:
            if isinstance(found, ShardEnd):  # a tar shard's samples are all found (or were done earlier)
                self.summary.images += found.skipped
                self.summary.skipped += found.skipped
                self.progress.update(found.skipped, before=True)
                if found.skipped:
                    self.progress.shard_done(before=True)
                self.shards.ended(found)
                continue
            if not _takes(self.config.shard, found):
                continue
            if isinstance(found, Duplicate):
                self.summary.duplicates += 1
                continue
            if isinstance(found, InputError) and found.shard:
                self.summary.missing_shards += 1
                self.progress.shard_done()
                self._log_error(ImageFailure(found.path, found.reason))
                continue
            self.summary.images += 1
            if isinstance(found, InputError):
                self.fail(ImageFailure(found.path, found.reason))
                self.progress.update(1)
                continue
            if not self._claim_caption(found):
                self.progress.update(1)
                continue
            planned, failures = plan_jobs(found, self.requests)
            for failure in failures:
                self.fail(failure)
            jobs = []
            for job in planned:
                key = work_key(found, job.identity())
                if key not in self.folder.journal.done:
                    jobs.append(replace(job, key=key, text=self._chained_text(found.name, job)))
                else:
                    if self.sidecars and job.task == self.sidecars.task:
                        self.captioned_earlier[found.name] = found  # its caption file is written at the end
                    if self.sink and self.config.streams_earlier:
                        self.earlier_keys.add(key)  # its answer is streamed at the end
            self.shards.planned(found, len(planned), pending=bool(jobs), failed=bool(failures))
            if jobs:
                yield WorkItem(found.path, found.name, found.order, tuple(jobs), member=found.member)
                continue
            if not failures:
                self.summary.skipped += 1
            self.progress.update(1, before=not failures)  # not sent: done earlier, or failed in planning

    def _claim_caption(self, image: ImageRef) -> bool:
        """Paths read from standard input were not checked ahead: the second image of a pair that would
        share a sidecar fails, and the first keeps its caption."""
        if not self.sidecars or self.sidecars.claimed_ahead:
            return True
        try:
            self.sidecars.claim(image)
        except CaptionClash as exc:
            self.fail(ImageFailure(image.name, str(exc)))
            return False
        return True

    def _caption_earlier_answers(self, answers: Iterable[Answer]) -> None:
        """Images answered by an earlier run get their caption files too (say, on the first run with
        --sidecar, or with another prefix), from the journal's answers."""
        for answer in answers:
            image = self.captioned_earlier.get(answer.file)
            if image is not None:
                self._write_caption(image, answer)

    def _write_caption(self, image: ImageRef, answer: Answer) -> None:
        """``image``'s caption file, from its answer of the caption task."""
        try:
            self.sidecars.write_sidecar(image, answer.text)
        except OSError as exc:
            self._cannot_write_caption(image.name, exc)

    def _cannot_write_caption(self, name: str, exc: OSError) -> None:
        """A caption file that cannot be written: the image fails with one line naming the file, or, when
        its folder cannot be written at all (read-only, full, not ours), the run stops once — its answers
        are journaled, and the same command writes the caption files."""
        if stops_the_run(exc) or exc.errno in (errno.EACCES, errno.EPERM):
            raise _OutputStopped(_cannot_write(exc.filename, exc)) from exc
        self.fail(ImageFailure(name, _cannot_write(exc.filename, exc), self.sidecars.task.name))

    def _cannot_write_for(self, name: str, exc: OSError) -> None:
        """A write error while writing an image's files: the image fails, or the run stops when the
        error is the whole folder's."""
        if stops_the_run(exc):
            raise _OutputStopped(_cannot_write(exc.filename or self.folder.path, exc)) from exc
        where = exc.filename if isinstance(exc.filename, str) else name
        self.fail(ImageFailure(name, _cannot_write(where, exc)))

    def _chained_text(self, name: str, job: Job) -> str | None:
        """A chained job's text when its source answer was written by an earlier run."""
        if not job.ground_from:
            return job.text
        source = self.folder.text_path(resolve_task(job.ground_from), name)
        return source.read_text(encoding="utf-8") if source.exists() else None

    def write(self, results: list[ItemResult]) -> None:
        """Write a batch's answer files, then journal it, then stream it: what is journaled is on disk."""
        journaled: list[Answer] = []
        answered = 0
        for result in results:
            if result.failure:
                self.fail(result.failure)
                continue
            try:
                for answer in result.answers:
                    if not answer.task.writes_coco:
                        self.folder.write_text(answer.task, result.item.name, answer.text)
            except OSError as exc:
                self._cannot_write_for(result.item.name, exc)
                continue
            answered += 1
            for job, answer in zip(result.item.jobs, result.answers, strict=True):
                journaled.append(
                    replace(answer, file=result.item.name, query=job.text, key=job.key, job=job.identity(),
                            job_index=job.index, shard=result.item.shard)
                )  # fmt: skip
        try:
            self.folder.journal.append(journaled)
            if self.shard_files:
                self.shard_files.add(journaled)
            items = (result.item for result in results)
            self.shards.returned(items, {a.file for a in journaled}, self._finish_shard)
        except OSError as exc:
            raise _OutputStopped(_cannot_write(self.folder.journal.path, exc)) from exc
        self.summary.annotated += answered
        self.summary.answers += len(journaled)
        if self.sidecars:  # after the journal: a caption file that cannot be written loses no answer
            for result in results:
                for answer in result.answers or ():
                    if answer.task == self.sidecars.task:
                        self._write_caption(result.item, answer)
        self.progress.update(len(results))
        if self.sink:
            try:
                self.sink.write(answer.public() for answer in journaled)
            except OSError as exc:  # (a closed stdout is StdoutClosed, no OSError: it ends the run quietly)
                raise _OutputStopped(_cannot_write(self.sink.target, exc)) from exc

    def _text_files_not_held(self, target: str) -> list[tuple[str, str]]:
        """The text files of the run's text tasks (``OUT/<task>/<image>.txt``) that the store under
        ``target`` lacks: this run's, and those of a run that stopped before it put them (a shard's
        went up with its ``per_shard`` files, and are held already)."""
        missing = []
        for task in dict.fromkeys(r.task for r in self.requests if not r.task.writes_coco):
            files = under(target, self.folder.path, sorted((self.folder.path / task.slug).rglob("*.txt")))
            missing += not_held(files, f"{target}/{task.slug}") if files else []
        return missing

    def _stream_earlier(self, answers: Iterable[Answer]) -> None:
        """Stream the answers earlier runs made for this run's inputs (``RunConfig.jsonl_all``), so a
        pipeline sees every answer, not only the new ones."""
        try:
            self.sink.write(answer.public() for answer in answers if answer.key in self.earlier_keys)
        except StdoutClosed:
            self.summary.stopped_by = signal.SIGPIPE
        except OSError as exc:
            raise _OutputStopped(_cannot_write(self.sink.target, exc)) from exc

    def _finish_shard(self, name: str) -> bool:
        """A tar shard's samples are all back: write its own files (``per_shard``). One that cannot be
        written or uploaded fails the shard (a later run writes them), and the run goes on."""
        self.progress.shard_done()
        if self.shard_files is None:
            return True
        try:
            self.shard_files.finish(name)
        except StorageError as exc:
            self.fail(ImageFailure(name, str(exc)))
            return False
        except OSError as exc:
            self._cannot_write_for(name, exc)
            return False
        return True

    def close(self) -> None:
        """Sort the errors log, rebuild the COCO files from everything the journal holds, stream earlier
        answers and upload the files where asked, and release the folder."""
        self.progress.close()
        self.summary.total = self.progress.total
        try:
            self.shards.commit(self._finish_shard)  # shards whose samples were all done before this run
        except _OutputStopped as exc:  # a shard's own file on a full disk
            self.summary.output_error = str(exc)
        except OSError as exc:
            self.summary.output_error = _cannot_write(self.folder.journal.path, exc)
        self.folder.journal.close()
        coco = [(r.task, list(r.classes) or None) for r in self.requests if r.task.writes_coco]
        parquet = list(dict.fromkeys(r.task for r in self.requests)) if self.config.parquet else []
        try:
            with self.folder.journal.sorted() as answers:
                if self.captioned_earlier:
                    self._caption_earlier_answers(answers(self.sidecars.task.name))
                self.folder.sort_errors()
                self.folder.rebuild_files(coco, self.config.model.name, parquet, answers)
                if self.captions and self.captions.metadata_root:
                    self.captions.write_metadata(answers(None))
                if self.earlier_keys and not (self.summary.stopped_by or self.summary.output_error):
                    self._stream_earlier(answers(None))
            if self.config.upload:
                rebuilt = [f"{task.slug}.json" for task, _ in coco] + [f"{t.slug}.parquet" for t in parquet]
                target = self.config.upload.rstrip("/")
                files = under(
                    target, self.folder.path, [self.folder.path / n for n in [*rebuilt, "errors.jsonl"]]
                )
                upload(files + self._text_files_not_held(target))
        except _OutputStopped as exc:
            self.summary.output_error = str(exc)
        except OSError as exc:
            self.summary.output_error = _cannot_write(exc.filename or self.folder.path, exc)
        finally:
            if self.sink:
                self.sink.close()
            if self.captions:
                self.captions.close()
                self.summary.captions_kept = self.captions.kept_count
                self.summary.captions_empty = self.captions.empty_count
                self.summary.kept_captions = self.captions.kept
            self.folder.close()


def _images_among(found: Iterable, shard: Shard | None) -> int | None:
    """How many images (and unusable inputs, which count as images) ``found`` holds for this shard; None
    where they cannot be listed."""

    def counts(item) -> bool:
        if isinstance(item, InputError):  # a missing shard is no image
            return not item.shard and _takes(shard, item)
        return isinstance(item, ImageRef) and _takes(shard, item)

    try:
        return sum(1 for item in found if counts(item))
    except OSError:
        return None


def _takes(shard: Shard | None, found) -> bool:
    """Whether ``--shard``'s share holds what discovery found: an image by its name, an unusable input by
    its path (the run's only, without a shard)."""
    return shard is None or shard.takes(found.name if isinstance(found, ImageRef) else found.path)


def _cannot_write(path, exc: OSError) -> str:
    return f"cannot write {printable(str(path))}: {describe_os_error(exc)}"


def _end(results: Iterator) -> None:
    """End the engine's generator now (its decode workers), not whenever it is collected."""
    close = getattr(results, "close", None)
    if close is not None:
        close()
