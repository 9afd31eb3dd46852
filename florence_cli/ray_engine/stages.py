"""What runs on Ray workers: the decode stage (a datasource with one read task per tar shard, or per batch
of files) and the model stage (an actor per GPU), and the typed rows that pass between them and the driver.

A row is one model batch, the very batch a local run makes (CPU and CUDA kernels round differently with
the batch's make-up, so the same batches give the same bytes). Arrow carries the rows' jobs, pixels and
answers as pickled bytes; only this module packs and unpacks them.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from itertools import groupby

import numpy as np
import pyarrow as pa
import ray.data

from ..answer import AnswererBuilder
from ..decode import DecodedImage, ResizeSpec, decode_or_reason
from ..device_errors import DeviceFailure
from ..engine import batches
from ..jobs import Job, WorkItem
from ..records import Answer, ImageFailure
from ..storage import is_url, use_options
from ..tarshards import Member
from .cluster import RayEngineError

# A replica's device failed: its images carry this, then the error, and the driver stops the run on it.
DEVICE_FAILED = "device failed: "


@dataclass(frozen=True)
class BatchRow:
    """One model batch, as the driver hands it to a read task: each image's place in the work list, its
    path, where a worker reads it (its file made absolute, or its member of a tar shard) and its jobs."""

    idx: tuple[int, ...]
    path: tuple[str, ...]
    source: tuple[str | Member, ...]
    jobs: tuple[tuple[Job, ...], ...]

    @classmethod
    def of(cls, work: list[WorkItem], indices: list[int]) -> BatchRow:
        items = [work[i] for i in indices]
        return cls(
            tuple(indices), tuple(item.path for item in items), tuple(_source(item) for item in items),
            tuple(item.jobs for item in items),
        )  # fmt: skip

    @property
    def tar(self) -> str | None:
        """The tar shard its first image is a sample of, if any."""
        return getattr(self.source[0], "tar", None)


def batch_rows(work: list[WorkItem], indices: list[int], size: int) -> list[BatchRow]:
    """The rows Ray gets: one per model batch of ``size`` images, in submission order."""
    return [BatchRow.of(work, indices[start : start + size]) for start in range(0, len(indices), size)]


def _source(item: WorkItem) -> str | Member:
    """Where a worker reads the image: the driver's paths, made absolute (a worker's working directory is
    not the driver's); a URL as it is, so that workers read from the store, with no shared file system."""
    if item.member is None:
        return _absolute(item.path)
    return replace(item.member, tar=_absolute(item.member.tar))


def _absolute(path: str) -> str:
    return path if is_url(path) else os.path.abspath(path)


def read_groups(rows: list[BatchRow]) -> list[list[BatchRow]]:
    """Consecutive rows whose first image is in the same tar shard, together (one read task reads them,
    in the shard's order); a row of files alone."""
    return [list(group) for _, group in groupby(rows, key=lambda row: row.tar or id(row))]


@dataclass
class DecodedRow:
    """A batch row decoded: each image's displayed size and its uint8 pixels at the model's input size, or
    why it has none (``error``; a bad file never fails the task)."""

    row: BatchRow
    width: list[int]
    height: list[int]
    error: list[str]
    pixels: list[np.ndarray | None]

    @classmethod
    def decode(cls, row: BatchRow, spec: ResizeSpec) -> DecodedRow:
        outcomes = [decode_or_reason(source, spec) for source in row.source]
        decoded = [(0, 0, None) if isinstance(outcome, str) else outcome for outcome in outcomes]
        return cls(
            row, [width for width, _, _ in decoded], [height for _, height, _ in decoded],
            [outcome if isinstance(outcome, str) else "" for outcome in outcomes],
            [pixels for _, _, pixels in decoded],
        )  # fmt: skip

    def block(self) -> pa.Table:
        """The row as Ray Data's block: the row and pixels pickled (protocol 5: a plain copy)."""
        packed = {"row": pickle.dumps(self.row), "width": self.width, "height": self.height,
                  "error": self.error, "pixels": pickle.dumps(self.pixels, protocol=5)}  # fmt: skip
        return pa.Table.from_pylist([packed])

    @classmethod
    def unpack(cls, batch: dict[str, np.ndarray], k: int) -> DecodedRow:
        """Row ``k`` of a block as the model stage receives it."""
        return cls(
            pickle.loads(batch["row"][k]), [int(w) for w in batch["width"][k]],
            [int(h) for h in batch["height"][k]], [str(e) for e in batch["error"][k]],
            pickle.loads(batch["pixels"][k]),
        )  # fmt: skip


@dataclass
class AnsweredImage:
    """One image's outcome as the model stage returns it: its answers, or why it failed."""

    idx: int
    width: int
    height: int
    answers: list[Answer] | None = None
    error: str = ""


def pack_answered(images: list[AnsweredImage]) -> dict[str, np.ndarray]:
    """Answered images as the model stage's output columns."""
    return {
        **{name: np.array([getattr(i, name) for i in images], dtype=np.int64) for name in ("idx", "width",
           "height")},
        "answers": np.array([pickle.dumps(i.answers) if i.answers is not None else b"" for i in images],
                            dtype=object),
        "error": np.array([i.error for i in images], dtype=object),
    }  # fmt: skip


def unpack_answered(batch: dict[str, np.ndarray]) -> Iterator[AnsweredImage]:
    """The answered images in a batch of the model stage's output (the driver's side)."""
    for idx, width, height, answers, error in zip(
        batch["idx"], batch["width"], batch["height"], batch["answers"], batch["error"], strict=True
    ):
        outcome = None if error else pickle.loads(answers)
        yield AnsweredImage(int(idx), int(width), int(height), outcome, str(error))


class BatchSource(ray.data.Datasource):
    """The decode stage, as a datasource: one read task per group of rows (``read_groups``: the model
    batches that start in one tar shard, or one batch of files), yielding a block per row."""

    def __init__(self, groups: list[list[BatchRow]], spec: ResizeSpec, storage_options: dict | None = None):
        super().__init__()
        self.groups = groups
        self.spec = spec
        self.storage_options = storage_options  # the run's, for the URLs a worker reads

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, **_options) -> list[ray.data.ReadTask]:
        from ray.data.block import BlockMetadata

        return [
            ray.data.ReadTask(
                partial(_decode_rows, group, self.spec, self.storage_options),
                BlockMetadata(len(group), None, None, None),
            )
            for group in self.groups
        ]


def _decode_rows(rows: list[BatchRow], spec: ResizeSpec, storage_options: dict | None) -> Iterator[pa.Table]:
    use_options(storage_options)  # a worker on another node has not the driver's environment
    for row in rows:
        yield DecodedRow.decode(row, spec).block()


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
        rows = [DecodedRow.unpack(batch, k) for k in range(len(batch["row"]))]
        return pack_answered([image for row in rows for image in self._answer_row(row)])

    def _answer_row(self, decoded: DecodedRow) -> list[AnsweredImage]:
        row = decoded.row
        images: dict[int, DecodedImage] = {}  # by position in the row; failed decodes have no pixels
        for k, (path, jobs, pixels) in enumerate(zip(row.path, row.jobs, decoded.pixels, strict=True)):
            if pixels is not None:
                ref = WorkItem(path, path, (), jobs)
                images[k] = DecodedImage(ref, decoded.width[k], decoded.height[k], pixels)
        size_now = lambda: self.answerer.batch_size  # noqa: E731 - it shrinks after out-of-memory
        answered = [
            outcome for chunk in batches(images.values(), size_now) for outcome in self._answer(chunk)
        ]
        outcomes = dict(zip(images, answered, strict=True))
        results = []
        for k, idx in enumerate(row.idx):
            outcome = outcomes.get(k)
            size = (idx, decoded.width[k], decoded.height[k])
            if isinstance(outcome, ImageFailure):
                results.append(AnsweredImage(*size, error=outcome.reason))
            else:
                results.append(AnsweredImage(*size, outcome, decoded.error[k]))
        return results

    def _answer(self, images: list[DecodedImage]) -> list:
        try:
            return self.answerer.answer_safely(images)
        except DeviceFailure as exc:  # no image is guilty: the driver stops the run (``RayEngine.results``)
            return [ImageFailure(image.ref.name, f"{DEVICE_FAILED}{exc}") for image in images]
        except SystemExit as exc:
            if len(images) == 1:
                return [ImageFailure(images[0].ref.name, f"generation tried to end the worker ({exc!r})")]
            return [outcome for image in images for outcome in self._answer([image])]
