"""The Ray engine: decode tasks on CPUs, one model replica per GPU, on Ray Data, across a node or a cluster.

The driver is the local one (``runner.run``: discovery, journal, writers, errors). This engine
numbers the work items it is given and hands Ray one row per model batch — the batches a local run
makes, ``{idx, path, jobs}`` of each image — and yields the results in submission order
(``Reorder``), so the outputs equal a local run's. Rows are read (decoded) by one read task per tar
shard — the batches that start in it — or per batch of files (``BatchSource``), so a cluster splits
the reading by shard. A batch that a crash took with it is tried again,
then its images one at a time; those still missing become ``lost`` errors, which are never journaled,
so a re-run retries them. Each pass's replicas live in a placement group that ends with the pass.

Only ``--engine ray`` imports this module; it imports neither torch nor transformers at the top, so
decode tasks stay light.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import socket
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from itertools import groupby
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import ray.data
import ray.exceptions
from ray.data.exceptions import ExecutionTimeoutError
from ray.util.annotations import RayDeprecationWarning
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .answer import AnswererBuilder
from .config import RunConfig
from .decode import DecodedImage, ResizeSpec, decode_or_reason
from .device_errors import DeviceFailure
from .discover import Input
from .engine import ItemResult, batches
from .jobs import ImageFailure, TaskRequest, WorkItem
from .outdir import OutputFolder
from .runner import RunSummary, run_into
from .tarshards import Member

LOST = "lost: worker crashed"
# A replica's device failed: its images carry this, then the error, and the driver stops the run on it.
DEVICE_FAILED = "device failed: "


class RayEngineError(Exception):
    """The Ray job cannot run as asked; the message is one line for the user."""


@dataclass(frozen=True)
class RayOptions:
    """How the job uses Ray."""

    address: str | None = None  # None: start Ray on this machine; "auto" or HOST:PORT: join a cluster
    gpu_workers: int | None = None  # model replicas; default: one per GPU (one on CPUs without GPUs)
    decode_cpus: int | None = None  # decode tasks at once; default: the CPUs the replicas leave
    no_progress_timeout_s: float = 600.0  # a pass that moves nothing this long ends (a hang); -1: never
    reorder_window: int = 4096  # results held back to keep submission order


@dataclass(frozen=True)
class Placement:
    """How the job sits on the cluster."""

    replicas: int
    replica_gpus: int  # 1, or 0 for replicas on CPUs
    replica_cpus: float
    decode_cpus: int
    device: str  # where each replica builds its answerer


def plan_placement(nodes: list[dict[str, float]], device: str, options: RayOptions) -> Placement:
    """Size the job from the alive nodes' resources: one replica per GPU unless told otherwise; on a GPU
    node a replica never takes the CPU that decoding needs, or decode tasks would wait forever."""
    if device.startswith("cuda:"):
        raise RayEngineError("with --engine ray every model replica has one GPU: use --device auto or cuda")
    cpus = int(sum(node.get("CPU", 0) for node in nodes))
    gpus = int(sum(node.get("GPU", 0) for node in nodes))
    on_gpu = gpus > 0 and device != "cpu"
    if device == "cuda" and not on_gpu:
        raise RayEngineError("--device cuda asked for, but the Ray cluster has no GPUs")
    replicas = options.gpu_workers or (gpus if on_gpu else 1)
    if on_gpu and replicas > gpus:
        raise RayEngineError(f"{replicas} GPU workers asked for, but the Ray cluster has {gpus} GPUs")
    if options.decode_cpus and options.decode_cpus > cpus:
        raise RayEngineError(f"{options.decode_cpus} decode CPUs asked for, but the Ray cluster has {cpus}")
    if on_gpu:
        share = min((node.get("CPU", 0) - 1) / node["GPU"] for node in nodes if node.get("GPU", 0) >= 1)
        replica_cpus = max(0.0, min(1.0, share))
        decode_cpus = options.decode_cpus or max(1, math.floor(cpus - replicas * replica_cpus))
        return Placement(replicas, 1, replica_cpus, decode_cpus, device)
    decode_cpus = options.decode_cpus or replicas
    if cpus - decode_cpus <= 0:
        raise RayEngineError(f"no CPU left for the model: the Ray cluster has {cpus}; lower --decode-cpus")
    return Placement(replicas, 0, (cpus - decode_cpus) / replicas, decode_cpus, "cpu")


def driver_resize_spec(model: str, allow_pickle: bool = False) -> ResizeSpec:
    """The decode stage's resize, from the checkpoint's image-processor settings (no weights loaded; the
    folder is checked and its processor built as the replicas' models will be)."""
    from .checkpoint import locate_model
    from .model import _fast_pixels, load_processor

    processor = load_processor(locate_model(model, allow_pickle=allow_pickle))
    return _fast_pixels(processor.image_processor)[0]


# -- stages: these run on Ray workers -------------------------------------------------------------------
# A row is one model batch, the very batch a local run makes (CPU and CUDA kernels round differently with
# the batch's make-up, so the same batches give the same bytes): lists of idx, path, jobs (pickled), and
# the source each image is read from (its file, or its member of a tar shard).


class BatchSource(ray.data.Datasource):
    """The decode stage, as a datasource: one read task per group of rows (``read_groups``: the model
    batches that start in one tar shard, or one batch of files), yielding a block per row."""

    def __init__(self, groups: list[list[dict]], spec: ResizeSpec):
        super().__init__()
        self.groups = groups
        self.spec = spec

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, **_options) -> list[ray.data.ReadTask]:
        from ray.data.block import BlockMetadata

        return [
            ray.data.ReadTask(
                partial(_decode_rows, group, self.spec), BlockMetadata(len(group), None, None, None)
            )
            for group in self.groups
        ]


def read_groups(rows: list[dict]) -> list[list[dict]]:
    """Consecutive rows whose first image is in the same tar shard, together (one read task reads them,
    in the shard's order); a row of files alone."""

    def shard(row: dict) -> object:
        return getattr(row["source"][0], "tar", None) or id(row)

    return [list(group) for _, group in groupby(rows, key=shard)]


def _decode_rows(rows: list[dict], spec: ResizeSpec) -> Iterator[pa.Table]:
    for row in rows:
        yield pa.Table.from_pylist([decode_group(row, spec)])


def decode_group(row: dict, spec: ResizeSpec) -> dict:
    """Decode one row: each image's displayed size and its uint8 pixels at the model's input size
    (pickled, protocol 5: a plain copy). A bad file gets its reason in ``error``; it never fails the
    task."""
    outcomes = [decode_or_reason(source, spec) for source in row["source"]]
    decoded = [(0, 0, None) if isinstance(outcome, str) else outcome for outcome in outcomes]
    return {
        "idx": row["idx"], "path": row["path"], "jobs": row["jobs"],
        "width": [width for width, _, _ in decoded], "height": [height for _, height, _ in decoded],
        "error": [outcome if isinstance(outcome, str) else "" for outcome in outcomes],
        "pixels": pickle.dumps([pixels for _, _, pixels in decoded], protocol=5),
    }  # fmt: skip


class ModelStage:
    """Model stage (an actor, one GPU): builds its answerer once, answers batches, passes error rows
    through.

    ``BatchAnswerer.answer_safely`` retries a failing batch until only the guilty image fails; an image
    that makes the model call ``sys.exit`` fails alone too, instead of ending the actor (which Ray Data
    would wait for forever). On CPU it computes with ``threads`` threads, as a local run does.
    """

    def __init__(self, build: AnswererBuilder, device: str, resize: ResizeSpec, threads: int):
        import torch
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
        self.answerer = build(device)
        if self.answerer.resize_spec != resize:
            raise RayEngineError(f"the model resizes to {self.answerer.resize_spec}, the driver to {resize}")
        if self.answerer.model.device.type == "cpu":
            torch.set_num_threads(threads)  # float sums depend on it; Ray would set the replica's CPU share

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One output row per image of every model batch (input row)."""
        rows = [
            self._answer_row({name: column[k] for name, column in batch.items()})
            for k in range(len(batch["idx"]))
        ]
        columns = {
            name: [value for row in rows for value in row[name]] for name in ("idx", "width", "height")
        }
        return {
            **{name: np.array(values, dtype=np.int64) for name, values in columns.items()},
            "answers": np.array([value for row in rows for value in row["answers"]], dtype=object),
            "error": np.array([value for row in rows for value in row["error"]], dtype=object),
        }

    def _answer_row(self, row: dict) -> dict[str, list]:
        pixels = pickle.loads(row["pixels"])
        images: dict[int, DecodedImage] = {}  # by position in the row; failed decodes have no pixels
        columns = (row["path"], row["jobs"], row["width"], row["height"], pixels)
        for k, (path, jobs, width, height, image) in enumerate(zip(*columns, strict=True)):
            if image is not None:
                ref = WorkItem(str(path), str(path), (), pickle.loads(jobs))
                images[k] = DecodedImage(ref, int(width), int(height), image)
        size_now = lambda: self.answerer.batch_size  # noqa: E731 - it shrinks after out-of-memory
        answered = [
            outcome for chunk in batches(images.values(), size_now) for outcome in self._answer(chunk)
        ]
        outcomes = dict(zip(images, answered, strict=True))
        answers, errors = [], []
        for k, error in enumerate(row["error"]):
            outcome = outcomes.get(k)
            failed = isinstance(outcome, ImageFailure)
            answers.append(pickle.dumps(outcome) if outcome is not None and not failed else b"")
            errors.append(outcome.reason if failed else str(error))
        return {"idx": row["idx"], "width": row["width"], "height": row["height"], "answers": answers,
                "error": errors}  # fmt: skip

    def _answer(self, images: list[DecodedImage]) -> list:
        try:
            return self.answerer.answer_safely(images)
        except DeviceFailure as exc:  # no image is guilty: the driver stops the run (``_item_results``)
            return [ImageFailure(image.ref.name, f"{DEVICE_FAILED}{exc}") for image in images]
        except SystemExit as exc:
            if len(images) == 1:
                return [ImageFailure(images[0].ref.name, f"generation tried to end the worker ({exc!r})")]
            return [outcome for image in images for outcome in self._answer([image])]


# -- the driver's side ----------------------------------------------------------------------------------
class Reorder:
    """Releases results in submission order, holding at most ``window`` that came early. Past that (a
    straggler: a batch retried after its worker died) it releases what it holds, and the straggler
    follows when it comes, so memory stays bounded and nothing waits forever."""

    def __init__(self, window: int):
        self.window = window
        self.next = 0
        self.held: dict[int, ItemResult] = {}

    def add(self, idx: int, result: ItemResult) -> list[ItemResult]:
        if idx < self.next:
            return [result]
        self.held[idx] = result
        released = []
        while self.next in self.held:
            released.append(self.held.pop(self.next))
            self.next += 1
        if len(self.held) > self.window:
            last = max(self.held)
            released += [self.held.pop(i) for i in sorted(self.held)]
            self.next = last + 1
        return released


class RayEngine:
    """Answers work items on Ray Data; ``run`` is ``Annotator.run`` with the model on Ray workers.

    >>> config = RunConfig(ModelConfig("microsoft/Florence-2-large-ft"), batch_size=16)   # doctest: +SKIP
    >>> RayEngine(config).run(["/shared/imgs"], "/shared/out", ["OD", "CAPTION"]).line()  # doctest: +SKIP
    """

    def __init__(
        self, config: RunConfig, options: RayOptions | None = None, build: AnswererBuilder | None = None
    ):
        """``build``: how each replica builds its answerer (default: from ``config``)."""
        self.config = config
        self.options = options or RayOptions()
        self.build = build or AnswererBuilder(config)
        self.resize = driver_resize_spec(config.model.name, config.model.allow_pickle)
        self.placement: Placement | None = None
        self.threads = _local_threads()
        self._started_ray = False

    def run(
        self, inputs: Iterable[Input], output: str | Path | OutputFolder,
        tasks: list[str] | list[TaskRequest], **options,
    ) -> RunSummary:  # fmt: skip
        """Annotate every image under ``inputs`` into ``output``, as ``Annotator.run`` does (``options``:
        ``text``, ``stdin_lines``, ``on_error``, ``overwrite``, ``jsonl``, ``progress``, ``shard``)."""
        try:
            placement = self.connect()
            model = self.config.model  # the summary names the mode auto comes to on the replicas' device
            products = model.products_on("cuda" if placement.replica_gpus else "cpu")
            config = replace(self.config, model=replace(model, products=products))
            return run_into(output, inputs, tasks, config, self, **options)
        finally:
            if isinstance(output, OutputFolder):
                output.close()
            self.close()

    def connect(self) -> Placement:
        """Join the cluster (or start Ray here) and size the job; idempotent."""
        if self.placement:
            return self.placement
        if not ray.is_initialized():
            address = self.options.address
            local = {} if address else {"include_dashboard": False}
            try:
                _check_reachable(address)
                if address:
                    _present_token_at_hand()
                ray.init(address=address or "local", logging_level=logging.ERROR, **local)
            except (OSError, RuntimeError, ValueError, ray.exceptions.AuthenticationError) as exc:
                raise RayEngineError(_cannot_join(address, exc)) from None
            self._started_ray = True
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        self.placement = plan_placement(nodes, self.config.model.device, self.options)
        return self.placement

    def close(self) -> None:
        """Leave Ray (stopping it when this engine started it)."""
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
        self.placement = None

    def results(self, items: Iterable[WorkItem]) -> Iterator[list[ItemResult]]:
        placement = self.connect()
        work = list(items)
        outstanding = set(range(len(work)))
        order = Reorder(self.options.reorder_window)
        size = self.config.batch_size_on("cuda" if placement.replica_gpus else "cpu")
        for alone in (False, True):  # the model batches; then, one at a time, the images still missing
            if not outstanding:
                break
            rows = _rows(work, sorted(outstanding), 1 if alone else size)
            replicas = _reserve(placement, min(placement.replicas, len(rows)))
            reason = LOST
            try:
                for batch in self._dataset(rows, placement, replicas).iter_batches(
                    batch_size=None, batch_format="numpy"
                ):
                    released = []
                    for idx, result in _item_results(batch, work):
                        if idx in outstanding:  # a retried batch may come twice; keep the first
                            outstanding.discard(idx)
                            released += order.add(idx, result)
                    if released:
                        yield released
            except ExecutionTimeoutError:  # no proof of guilt: what is missing is tried alone, then reported
                reason = f"lost: no progress for {self.options.no_progress_timeout_s:g} s"
            except ray.exceptions.ActorDiedError as exc:  # its __init__ failed: every replica would
                last_line = str(exc).strip().splitlines()[-1]
                raise RayEngineError(f"a model replica could not start: {last_line}") from None
            finally:
                # Ray Data lets a pass's replicas go by dropping its handles, and one that is restarting
                # after a crash then comes back and holds its GPU until the driver exits, starving the
                # next pass; removing the group ends every replica of the pass, restarting or not.
                ray.util.remove_placement_group(replicas)
        lost: list[ItemResult] = []
        for idx in sorted(outstanding):
            lost += order.add(idx, ItemResult(work[idx], failure=ImageFailure(work[idx].name, reason)))
        if lost:
            yield lost

    def _dataset(self, rows: list[dict], placement: Placement, replicas: PlacementGroup) -> ray.data.Dataset:
        """Decode (read) tasks → model actors in the placement group ``replicas``, a row (a model
        batch) per block. One call in flight per replica, so a crash takes no other batch with it. A
        replica restarts after every crash (reloading the model) and its call is tried once more, for
        one death may be another process's doing (the OOM killer, a lost node). Restarts are not
        capped: the retries bound them (a file that crashes every time costs four), and a replica used
        up by other files' crashes would leave its pass waiting for good."""
        groups = read_groups(rows)
        with warnings.catch_warnings():  # Ray 2.60 deprecates these retry arguments but has no replacement
            warnings.simplefilter("ignore", RayDeprecationWarning)
            dataset = ray.data.read_datasource(
                BatchSource(groups, self.resize), override_num_blocks=len(groups), num_cpus=1,
                concurrency=min(placement.decode_cpus, len(groups)), ray_remote_args={"max_retries": 1},
            )  # fmt: skip
        context = dataset.context
        context.enable_progress_bars = False  # the driver shows its own
        context.max_errored_blocks = -1  # a block whose worker crashed is reconciled, not fatal
        context.execution_no_progress_timeout_s = self.options.no_progress_timeout_s
        pool = ray.data.ActorPoolStrategy(size=replicas.bundle_count, max_tasks_in_flight_per_actor=1)
        with warnings.catch_warnings():  # as above
            warnings.simplefilter("ignore", RayDeprecationWarning)
            return dataset.map_batches(
                ModelStage, fn_constructor_kwargs={"build": self.build, "device": placement.device,
                "resize": self.resize, "threads": self.threads}, batch_size=1, batch_format="numpy",
                compute=pool, scheduling_strategy=PlacementGroupSchedulingStrategy(replicas),
                num_gpus=placement.replica_gpus, num_cpus=placement.replica_cpus,
                max_restarts=-1, max_task_retries=1,
            )  # fmt: skip


def _reserve(placement: Placement, replicas: int) -> PlacementGroup:
    """A placement group of one bundle per replica (its GPU and CPU share), for one pass."""
    bundle = {"GPU": placement.replica_gpus, "CPU": placement.replica_cpus}
    return ray.util.placement_group([{k: v for k, v in bundle.items() if v}] * replicas)


def _check_reachable(address: str | None) -> None:
    """Fail in seconds on a HOST:PORT nobody listens on (``ray.init`` retries for minutes)."""
    host, _, port = (address or "").rpartition(":")
    if host and port.isdigit():
        socket.create_connection((host, int(port)), timeout=10).close()


_TOKEN_HELP = (
    "set RAY_AUTH_TOKEN to the cluster's token (the head node's ~/.ray/auth_token), or copy that file here"
)


def _present_token_at_hand() -> None:
    """Join with this machine's Ray auth token, if it has one. Ray 2.60 sends it by itself only to
    ``auto``; yet ``ray start`` turns token authentication on wherever a token exists (any local Ray
    run writes ``~/.ray/auth_token``), and a cluster without it ignores one. ``RAY_AUTH_MODE`` set by
    the user is obeyed."""
    from ray._private.authentication import authentication_token_setup as auth

    logging.getLogger(auth.__name__).setLevel(logging.ERROR)  # not its note that the cluster uses tokens
    auth.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _token_source() -> str | None:
    """Where this machine's Ray auth token is, looked for in Ray's order; None: nowhere."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return str(path) if path.read_text(encoding="utf-8").strip() else None
    except (OSError, UnicodeDecodeError):
        return None


def _cannot_join(address: str | None, exc: BaseException) -> str:
    """Why joining failed, in one line; a token the cluster refused or wants is named as the cause."""
    causes: list[BaseException] = []
    while exc is not None and exc not in causes:
        causes.append(exc)
        exc = exc.__cause__ or exc.__context__
    refused = any(
        isinstance(c, ray.exceptions.AuthenticationError) or "InvalidAuthToken" in str(c) for c in causes
    )
    if not refused:
        return f"cannot reach the Ray cluster at {address}: {causes[0]}"
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return f"the Ray cluster at {address} wants an auth token, which RAY_AUTH_MODE=disabled withholds"
    source = _token_source()
    if source is None:
        return f"the Ray cluster at {address} wants an auth token, and this machine has none: {_TOKEN_HELP}"
    return f"the Ray cluster at {address} refused the auth token in {source}: {_TOKEN_HELP}"


def _rows(work: list[WorkItem], indices: list[int], size: int) -> list[dict]:
    """The rows Ray gets: one per model batch of ``size`` images, in submission order."""
    rows = []
    for start in range(0, len(indices), size):
        chunk = indices[start : start + size]
        sources = [_absolute(work[i]) for i in chunk]
        rows.append({
            "idx": chunk, "path": [work[i].path for i in chunk], "source": sources,
            "jobs": [pickle.dumps(work[i].jobs) for i in chunk],
        })  # fmt: skip
    return rows


def _absolute(item: WorkItem) -> str | Member:
    """Where a worker reads the image: the driver's paths, made absolute (a worker's working directory is
    not the driver's)."""
    if item.member is None:
        return os.path.abspath(item.path)
    return replace(item.member, tar=os.path.abspath(item.member.tar))


def _local_threads() -> int:
    """The CPU threads a local run computes with (CPU replicas use as many, for the same bytes)."""
    import torch

    return torch.get_num_threads()


def _item_results(batch: dict[str, np.ndarray], work: list[WorkItem]) -> Iterator[tuple[int, ItemResult]]:
    """The work items' results in a batch of the model stage's rows; a replica's failed device raises
    ``DeviceFailure``, as in a local run."""
    for idx, width, height, answers, error in zip(
        batch["idx"], batch["width"], batch["height"], batch["answers"], batch["error"], strict=True
    ):
        item = work[int(idx)]
        size = {"width": int(width), "height": int(height)}
        if str(error).startswith(DEVICE_FAILED):
            raise DeviceFailure(str(error).removeprefix(DEVICE_FAILED))
        if error:
            yield int(idx), ItemResult(item, **size, failure=ImageFailure(item.name, str(error)))
        else:
            yield int(idx), ItemResult(item, **size, answers=pickle.loads(answers))
