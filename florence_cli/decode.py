"""Stage 2: decode images (EXIF orientation, RGB, resize to the model's input) in worker processes.

Workers import only Pillow and NumPy and send back uint8 pixels at the model's input size, so the
main process never touches a full-size image and the model never waits for JPEG decoding.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np

from .discover import ImageRef


@dataclass(frozen=True)
class ResizeSpec:
    """How the model's processor resizes: to ``size`` (width, height) with a PIL filter; None keeps size."""

    size: tuple[int, int] | None
    resample: int = 3  # PIL bicubic


@dataclass
class DecodedImage:
    """An image ready for the model: displayed size and uint8 RGB pixels (H, W, 3)."""

    ref: ImageRef
    width: int
    height: int
    pixels: np.ndarray


@dataclass
class DecodeFailure:
    """An image that could not be decoded, and why (one line)."""

    ref: ImageRef
    reason: str


def open_rgb(path: str):
    """Open ``path`` as the reference does: first frame, EXIF orientation applied, converted to RGB."""
    from PIL import Image, ImageOps

    if os.path.getsize(path) == 0:
        raise ValueError("empty file (0 bytes)")
    with Image.open(path) as image:
        image.load()
        oriented = ImageOps.exif_transpose(image)
        return oriented.convert("RGB")


def decode_image(path: str, spec: ResizeSpec) -> tuple[int, int, np.ndarray]:
    """Decode one image: its displayed (width, height) and its pixels resized as ``spec`` says."""
    image = open_rgb(path)
    width, height = image.size
    if spec.size is not None and image.size != spec.size:
        image = image.resize(spec.size, resample=spec.resample)
    return width, height, np.asarray(image, dtype=np.uint8)


def describe_error(exc: BaseException) -> str:
    """A one-line reason for a failed decode."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    if type(exc).__name__ == "UnidentifiedImageError":
        return "not a readable image"
    if isinstance(exc, ValueError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _decode_task(path: str, spec: ResizeSpec) -> tuple[int, int, np.ndarray] | str:
    try:
        return decode_image(path, spec)
    except Exception as exc:  # any decoder failure is data, never a crash of the run
        return describe_error(exc)


def _result(ref: ImageRef, outcome: tuple[int, int, np.ndarray] | str) -> DecodedImage | DecodeFailure:
    if isinstance(outcome, str):
        return DecodeFailure(ref, outcome)
    width, height, pixels = outcome
    return DecodedImage(ref, width, height, pixels)


def decode_stream(
    refs: Iterable[ImageRef], spec: ResizeSpec, workers: int = 0, prefetch: int = 0
) -> Iterator[DecodedImage | DecodeFailure]:
    """Decode ``refs`` in order, with ``workers`` processes (0: in this process).

    At most ``prefetch`` images (default ``4 * workers``) are in flight, so memory stays flat. A worker
    that dies (a decoder crash) is replaced; the images it may have held are retried one at a time and
    the one that kills a worker on its own is reported as a failure.
    """
    if workers <= 0:
        for ref in refs:
            yield _result(ref, _decode_task(ref.path, spec))
        return
    window = max(prefetch, 4 * workers)
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold CUDA/threads
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
    pending: deque[tuple[ImageRef, Future]] = deque()
    try:
        for ref in refs:
            pending.append((ref, pool.submit(_decode_task, ref.path, spec)))
            while len(pending) >= window:
                pool = yield from _emit_oldest(pending, pool, spec, workers, context)
        while pending:
            pool = yield from _emit_oldest(pending, pool, spec, workers, context)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _emit_oldest(pending, pool, spec, workers, context):
    ref, future = pending[0]
    try:
        outcome = future.result()
    except BrokenProcessPool:
        # The pool is gone with everything in flight: isolate each image in a fresh pool.
        pool.shutdown(wait=False, cancel_futures=True)
        for ref, _ in list(pending):
            pending.popleft()
            yield _isolated(ref, spec, context)
        return ProcessPoolExecutor(max_workers=workers, mp_context=context)
    pending.popleft()
    yield _result(ref, outcome)
    return pool


def _isolated(ref: ImageRef, spec: ResizeSpec, context) -> DecodedImage | DecodeFailure:
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as solo:
        try:
            return _result(ref, solo.submit(_decode_task, ref.path, spec).result())
        except BrokenProcessPool:
            return DecodeFailure(ref, "decoder process crashed on this file")
