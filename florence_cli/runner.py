"""The driver of a run: discovery and the journal plan the work, an engine answers it, and every
batch that comes back is written and journaled at once. Imports no torch: engines bring the model.

How a run ends is data (``RunSummary``): its exit status tells images that failed (1) from a run that
stopped — a full disk (3), a failed device (4), Ctrl-C (130), SIGTERM (143), a closed standard
output (141) — and in every case the files in the output folder agree with its journal, so the same
command finishes.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from .captions import CaptionClash, CaptionFiles, caption_task, metadata_folder
from .config import RunConfig
from .device_errors import DeviceFailure
from .discover import Duplicate, ImageRef, Input, InputError, discover, printable
from .engine import Engine, ItemResult
from .formats.parquet import require_pyarrow
from .interrupts import Interrupted, critical, interruptible
from .jobs import ImageFailure, Job, TaskRequest, WorkItem, as_requests, plan_jobs, requests_identity
from .journal import ShardProgress, work_key
from .outdir import OutputFolder, describe_os_error, stops_the_run
from .records import Answer
from .tarshards import ShardEnd
from .tasks import resolve_task
from .writers import JsonlSink, StdoutClosed

EXIT_OK = 0
EXIT_IMAGES_FAILED = 1
EXIT_USAGE = 2  # refused before any image was read
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
    damaged_journal_lines: int = 0  # journal lines that hold no record, skipped
    seconds: float = 0.0
    failures: list[ImageFailure] = field(default_factory=list)  # the first few, for display
    stopped_by: int | None = None  # the signal that stopped the run (SIGPIPE: standard output closed)
    output_error: str | None = None  # why the output folder could not be written
    device_error: str | None = None  # the device's error that stopped the run (device_errors)
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
        return EXIT_IMAGES_FAILED if self.failed else EXIT_OK

    def line(self) -> str:
        """One line for the user: the counts, or why the run stopped and how far it got."""
        done = f"{self.annotated + self.skipped} of {self.images} images found so far are done"
        if self.output_error:
            return f"error: {self.output_error}; {done}; once fixed, run the same command to finish"
        if self.device_error:
            return f"error: the device failed: {self.device_error}; {done}; run the same command to resume"
        if self.stopped_by == signal.SIGPIPE:
            return f"standard output was closed: {done}; run the same command to finish"
        if self.stopped_by:
            return f"interrupted: {done}; run the same command to finish"
        duplicates = f", {self.duplicates} found twice (annotated once)" if self.duplicates else ""
        kept = (
            f", {self.captions_kept} caption files kept as they were (not written by florence-cli, or "
            "edited since; --overwrite-captions replaces them)"
            if self.captions_kept else ""
        )  # fmt: skip
        products = f", {self.products} products" if self.products else ""
        return (
            f"{self.images} images: {self.annotated} annotated, {self.skipped} already done, "
            f"{self.failed} failed{duplicates}, {self.answers} answers in {self.seconds:.1f} s "
            f"({self.images_per_second:.2f} images/s{products}){kept}"
        )


class _OutputStopped(Exception):
    """A write that no later write would get past (a full or read-only file system)."""


def run(
    inputs: Iterable[Input],
    requests: list[TaskRequest],
    config: RunConfig,
    engine: Engine,
    stdin_lines: Iterable[str] = (),
    on_error: Callable[[ImageFailure], None] | None = None,
    folder: OutputFolder | None = None,
) -> RunSummary:
    """Annotate every image under ``inputs`` with ``requests`` into ``config.output``, resuming earlier
    work there, with ``engine`` answering; the one driver of local and Ray runs. ``folder``: the output
    folder, if already opened (the CLI opens it before a model loads)."""
    if config.parquet:
        require_pyarrow()  # refused before any work, not at the end
    inputs = list(inputs)
    folder = folder or OutputFolder(config.output, config.settings(), config.overwrite)
    try:
        captions = _caption_files(inputs, requests, config, folder)
    except BaseException:
        folder.close()
        raise
    return _Run(requests, folder, config, on_error, captions).execute(inputs, stdin_lines, engine)


def _caption_files(
    inputs: list[str], requests: list[TaskRequest], config: RunConfig, folder: OutputFolder
) -> CaptionFiles | None:
    """The run's caption files, if asked for; two images that would share a sidecar are refused here,
    before any image is read (paths on standard input are checked as they come)."""
    options = config.captions
    task = caption_task(options, [request.task for request in requests])
    if task is None:
        return None
    root = metadata_folder(inputs) if options.hf_metadata else None
    captions = CaptionFiles(options, task, folder.state, root)
    if options.sidecars and "-" not in inputs:
        try:
            for found in discover(inputs):
                if isinstance(found, ImageRef):
                    captions.claim(found)
        except CaptionClash:
            captions.close()
            raise
        captions.claimed_ahead = True
    return captions


def run_into(
    output: str | Path | OutputFolder,
    inputs: Iterable[Input],
    tasks: list[str] | list[TaskRequest],
    config: RunConfig,
    engine: Engine,
    text: str | None = None,
    stdin_lines: Iterable[str] = (),
    on_error: Callable[[ImageFailure], None] | None = None,
    **options,
) -> RunSummary:
    """``run`` into ``output`` (a path, or a folder already opened), with ``tasks`` as names (``text`` for
    those that need one) or requests, and ``options`` setting ``config``'s fields (``overwrite``,
    ``jsonl``, ``parquet``, ``progress``, ``shard``, ``workers``): what the Python API's ``run`` methods
    share."""
    folder = output if isinstance(output, OutputFolder) else None
    config = replace(config, output=folder.path if folder else Path(output), **options)
    return run(inputs, as_requests(tasks, text), config, engine, stdin_lines, on_error, folder)


class _Run:
    """One run of the driver into an opened output folder, which it closes at the end."""

    def __init__(
        self,
        requests: list[TaskRequest],
        folder: OutputFolder,
        config: RunConfig,
        on_error: Callable[[ImageFailure], None] | None,
        captions: CaptionFiles | None = None,
    ):
        self.requests = requests
        self.captions = captions
        self.sidecars = captions if captions and captions.options.sidecars else None  # per image, as answered
        self.folder = folder
        self.config = config
        self.on_error = on_error
        self.summary = RunSummary(
            damaged_journal_lines=folder.journal.damaged_lines, products=config.model.products
        )
        self.sink = JsonlSink(config.jsonl) if config.jsonl else None
        self.bar = _progress_bar(config.progress)
        self.shards = ShardProgress(folder.journal, requests_identity(requests))  # tar shards

    def execute(self, inputs: Iterable[Input], stdin_lines: Iterable[str], engine: Engine) -> RunSummary:
        """Feed ``engine`` the work not done yet and write what comes back; stops cleanly on SIGINT,
        SIGTERM, a closed standard output, a full disk or a failed device."""
        started = time.perf_counter()
        with interruptible():
            results = engine.results(self.work(inputs, stdin_lines))
            try:
                for batch in results:
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
        for found in discover(inputs, stdin_lines, self.shards.finished):
            if isinstance(found, ShardEnd):  # a tar shard's samples are all found (or were done earlier)
                self.summary.images += found.skipped
                self.summary.skipped += found.skipped
                self.shards.ended(found)
                continue
            shard = self.config.shard
            if shard and not shard.takes(found.name if isinstance(found, ImageRef) else found.path):
                continue
            if isinstance(found, Duplicate):
                self.summary.duplicates += 1
                continue
            self.summary.images += 1
            if isinstance(found, InputError):
                self.fail(ImageFailure(found.path, found.reason))
                continue
            if not self._claim_caption(found):
                continue
            planned, failures = plan_jobs(found, self.requests)
            for failure in failures:
                self.fail(failure)
            jobs = []
            for job in planned:
                key = work_key(found, job.identity())
                if key not in self.folder.journal.done:
                    jobs.append(replace(job, key=key, text=self._chained_text(found.name, job)))
                elif self.sidecars and job.task == self.sidecars.task:
                    self._caption_done_image(found)
            self.shards.planned(found, len(planned), pending=bool(jobs), failed=bool(failures))
            if jobs:
                yield WorkItem(found.path, found.name, found.order, tuple(jobs), member=found.member)
            elif not failures:
                self.summary.skipped += 1

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

    def _caption_done_image(self, image: ImageRef) -> None:
        """An image answered by an earlier run gets its sidecar too (say, on the first run with
        --sidecar, or with another --prefix), from the answer's text file."""
        source = self.folder.text_path(self.sidecars.task, image.name)
        try:
            text = source.read_text(encoding="utf-8")
        except OSError:
            return  # its text file is gone: the sidecar of a later rerun with --overwrite
        try:
            self.sidecars.write_sidecar(image, text)
        except OSError as exc:
            self._cannot_write_for(image.name, exc)

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
                    if self.sidecars and answer.task == self.sidecars.task:
                        self.sidecars.write_sidecar(result.item, answer.text)
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
            self.shards.returned((result.item for result in results), {a.file for a in journaled})
        except OSError as exc:
            raise _OutputStopped(_cannot_write(self.folder.journal.path, exc)) from exc
        self.summary.annotated += answered
        self.summary.answers += len(journaled)
        if self.bar is not None:
            self.bar.update(len(results))
        if self.sink:
            try:
                self.sink.write(answer.public() for answer in journaled)
            except OSError as exc:  # (a closed stdout is StdoutClosed, no OSError: it ends the run quietly)
                raise _OutputStopped(_cannot_write(self.sink.target, exc)) from exc

    def close(self) -> None:
        """Sort the errors log, rebuild the COCO files from everything the journal holds, and release the
        folder."""
        if self.bar is not None:
            self.bar.close()
        try:
            self.shards.commit()  # shards whose samples were all done before this run
        except OSError as exc:
            self.summary.output_error = _cannot_write(self.folder.journal.path, exc)
        self.folder.journal.close()
        if self.sink:
            self.sink.close()
        coco = [(r.task, list(r.classes) or None) for r in self.requests if r.task.writes_coco]
        parquet = list(dict.fromkeys(r.task for r in self.requests)) if self.config.parquet else []
        try:
            self.folder.sort_errors()
            with self.folder.journal.sorted() as answers:
                self.folder.rebuild_files(coco, self.config.model.name, parquet, answers)
                if self.captions and self.captions.metadata_root:
                    self.captions.write_metadata(answers(None))
        except OSError as exc:
            self.summary.output_error = _cannot_write(exc.filename or self.folder.path, exc)
        finally:
            if self.captions:
                self.captions.close()
                self.summary.captions_kept = self.captions.kept_count
                self.summary.kept_captions = self.captions.kept
            self.folder.close()


def _cannot_write(path, exc: OSError) -> str:
    return f"cannot write {printable(str(path))}: {describe_os_error(exc)}"


def _end(results: Iterator) -> None:
    """End the engine's generator now (its decode workers), not whenever it is collected."""
    close = getattr(results, "close", None)
    if close is not None:
        close()


def _progress_bar(enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(unit="img", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
