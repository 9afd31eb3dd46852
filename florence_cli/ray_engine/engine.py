"""The Ray engine: decode tasks on CPUs, one model replica per GPU, on Ray Data, across a node or a cluster.

The driver is the local one (``runner.run``: preflight, discovery, journal, writers, errors). This engine
numbers the work items it is given and hands Ray one row per model batch (``stages.BatchRow``: the
batches a local run makes) and yields the results in submission order (``Reorder``), so the outputs equal
a local run's. A batch that a crash took with it is tried again, then its images one at a time; those
still missing become ``lost`` errors, which are never journaled, so a re-run retries them. Each pass's
replicas live in a placement group that ends with the pass.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator

import ray
import ray.data
import ray.exceptions
from ray.data.exceptions import ExecutionTimeoutError
from ray.util.annotations import RayDeprecationWarning
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..answer import AnswererBuilder
from ..config import RunConfig
from ..decode import ResizeSpec, unguarded_main_script
from ..device_errors import DeviceFailure
from ..engine import MAX_LISTERS, Started
from ..jobs import TaskRequest, WorkItem
from ..records import ImageFailure, ItemResult
from . import cluster
from .cluster import RayEngineError
from .placement import Placement, RayOptions, plan_placement, reserve
from .stages import DEVICE_FAILED, BatchRow, BatchSource, ModelStage, batch_rows, read_groups, unpack_answered

LOST = "lost: worker crashed"


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
    """Answers work items on Ray Data, behind the driver every run uses:

    >>> config = RunConfig(ModelConfig("microsoft/Florence-2-large-ft"), output=Path("/shared/out"))
    >>> summary = runner.run(["/shared/imgs"], parse_requests(["OD"]), config, RayEngine(config))
    >>> summary.line()  # doctest: +SKIP
    """

    def __init__(
        self, config: RunConfig, options: RayOptions | None = None, build: AnswererBuilder | None = None
    ):
        """``build``: how each replica builds its answerer (default: from ``config``)."""
        self.config = config
        self.options = options or RayOptions()
        self.build = build or AnswererBuilder(config)
        self.resize: ResizeSpec | None = None
        self.placement: Placement | None = None
        self.threads = 0  # set by ``check``: the CPU threads a local run computes with
        self._started_ray = False

    def check(self, requests: list[TaskRequest], max_new_tokens: int | None) -> str | None:
        """The checkpoint's preprocessing, read on the driver (no weights): it refuses what the replicas'
        models could not hold, and tells the decode tasks how to resize. Returns the checkpoint's id."""
        from ..checkpoint import locate_model, model_identity
        from ..model import Preprocessing, compute_threads

        folder = locate_model(self.config.model.name, self.config.model.allow_pickle)
        preprocessing = Preprocessing.load(folder)
        preprocessing.check(requests, max_new_tokens)
        self.resize = preprocessing.resize_spec
        self.threads = compute_threads()  # CPU replicas use as many, for the same bytes
        return model_identity(folder)

    def start(self) -> Started:
        """Join the cluster (or start Ray here) and size the job; idempotent. The products mode is the one
        ``auto`` comes to on the replicas' device."""
        if self.placement is None:
            self._started_ray = cluster.join(self.options.address) or self._started_ray
            self.placement = plan_placement(cluster.alive_nodes(), self.config.model.device, self.options)
        # the driver reads shards by URL ahead in processes of its own (which would rerun an unguarded script)
        listers = 0 if unguarded_main_script() else MAX_LISTERS
        return Started(self.config.model.products_on(self.placement.device_type), listers=listers)

    def close(self) -> None:
        """Leave Ray (stopping it when this engine started it)."""
        if self._started_ray:
            cluster.leave()
            self._started_ray = False
        self.placement = None

    def results(self, items: Iterable[WorkItem]) -> Iterator[list[ItemResult]]:
        self.start()
        if self.resize is None:
            self.check([], None)
        placement = self.placement
        work = list(items)
        outstanding = set(range(len(work)))
        order = Reorder(self.options.reorder_window)
        size = self.config.batch_size_on(placement.device_type)
        for alone in (False, True):  # the model batches; then, one at a time, the images still missing
            if not outstanding:
                break
            rows = batch_rows(work, sorted(outstanding), 1 if alone else size)
            replicas = reserve(placement, min(placement.replicas, len(rows)))
            reason = LOST
            try:
                for batch in self._dataset(rows, placement, replicas).iter_batches(
                    batch_size=None, batch_format="numpy"
                ):
                    released = []
                    for image in unpack_answered(batch):
                        if image.error.startswith(DEVICE_FAILED):  # as in a local run: the run stops
                            raise DeviceFailure(image.error.removeprefix(DEVICE_FAILED))
                        if image.idx in outstanding:  # a retried batch may come twice; keep the first
                            outstanding.discard(image.idx)
                            item = work[image.idx]
                            failure = ImageFailure(item.name, image.error) if image.error else None
                            result = ItemResult(item, image.width, image.height, image.answers, failure)
                            released += order.add(image.idx, result)
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

    def _dataset(
        self, rows: list[BatchRow], placement: Placement, replicas: PlacementGroup
    ) -> ray.data.Dataset:
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
                BatchSource(groups, self.resize, self.config.storage_options),
                override_num_blocks=len(groups), num_cpus=1,
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
