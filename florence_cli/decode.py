"""Stage 2: decode images (EXIF orientation, RGB, resize to the model's input) in worker processes.

Workers import only Pillow and NumPy and send back uint8 pixels at the model's input size, so the
main process never touches a full-size image and the model never waits for JPEG decoding. A tar
shard's image is read in the worker, from its offset in the tar (``tarshards.read_member``); an object
by URL, from its store (``storage``).
"""

from __future__ import annotations

import ast
import io
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .discover import ImageRef
from .orderedpool import OrderedPool, PoolBroken
from .storage import is_url, read_all
from .tarshards import Member, fetch_members, read_member


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


def open_rgb(source: str | Member):
    """Open a file or a tar shard's image as the reference does: first frame, EXIF orientation
    applied, converted to RGB."""
    from PIL import Image, ImageOps

    if isinstance(source, Member):
        source = io.BytesIO(read_member(source))
    elif is_url(source):
        source = io.BytesIO(read_all(source))
        if not source.getbuffer().nbytes:
            raise ValueError("empty file (0 bytes)")
    elif os.path.getsize(source) == 0:
        raise ValueError("empty file (0 bytes)")
    with Image.open(source) as image:
        image.load()
        oriented = ImageOps.exif_transpose(image)
        return oriented.convert("RGB")


def decode_image(source: str | Member, spec: ResizeSpec) -> tuple[int, int, np.ndarray]:
    """Decode one image: its displayed (width, height) and its pixels resized as ``spec`` says."""
    return model_pixels(open_rgb(source), spec)


def model_pixels(image, spec: ResizeSpec) -> tuple[int, int, np.ndarray]:
    """An RGB PIL image's (width, height) and its uint8 pixels resized as ``spec`` says."""
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
    return text or "the image decoder failed"  # the library's own words; never a class name


def decode_or_reason(source: str | Member, spec: ResizeSpec) -> tuple[int, int, np.ndarray] | str:
    """``decode_image``, or the one-line reason it failed: a decoder failure is data, never a crash."""
    try:
        return decode_image(source, spec)
    except Exception as exc:
        return describe_error(exc)


Decoder = Callable[["str | Member", ResizeSpec], "tuple[int, int, np.ndarray] | str"]


def _result(ref: ImageRef, outcome: tuple[int, int, np.ndarray] | str) -> DecodedImage | DecodeFailure:
    if isinstance(outcome, str):
        return DecodeFailure(ref, outcome)
    width, height, pixels = outcome
    return DecodedImage(ref, width, height, pixels)


def decode_stream(
    refs: Iterable[ImageRef],
    spec: ResizeSpec,
    workers: int = 0,
    decoder: Decoder = decode_or_reason,
) -> Iterator[DecodedImage | DecodeFailure]:
    """Decode ``refs`` in order, with ``workers`` processes (0: in this process).

    Images go to the processes in chunks (``LOCAL_CHUNK`` or ``STORE_CHUNK`` images), two chunks a
    process in flight, so memory stays flat (a trickle of inputs, paths on standard input, is answered
    once that many have come). A worker that dies (a decoder crash) is replaced; the images it may have
    held are retried one at a time and the one that kills a worker on its own is reported as a failure.
    """
    if workers <= 0:
        for ref in refs:
            yield _result(ref, decoder(ref.source, spec))
        return
    pool = _WorkerPool(spec, workers, decoder)
    try:
        for ref in refs:
            pool.add(ref)
            while len(pool.pending) >= 2 * workers:
                yield from pool.emit_oldest()
        while pool.pending or pool.waiting:
            yield from pool.emit_oldest()
    finally:
        pool.close()


def unguarded_main_script() -> str | None:
    """The script this process runs, if decode processes would run its top level again: they start with
    "spawn", which imports the main script in each of them, so a script that annotates outside an
    ``if __name__ == "__main__":`` block would start its run once per decode process."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if getattr(main, "__spec__", None) is not None or not path or not os.path.isfile(path):
        return None  # python -m module, an interactive session or a notebook: nothing is re-run
    try:
        tree = ast.parse(Path(path).read_bytes())
    except (OSError, SyntaxError, ValueError):
        return None
    tests = [ast.unparse(node.test) for node in tree.body if isinstance(node, ast.If)]
    return None if any("__name__" in test and "__main__" in test for test in tests) else path


# Images sent to a decode process at a time. Every answer wakes the driver, and a driver woken often pays
# more CPU for the same work: on this machine 43 % more where answers come at a store's pace, with no store
# at all (docs/scaling.md). Images from a store come slowly, so they go 8 at a time; local ones 4 at
# a time, which answers a trickle of paths on standard input sooner.
LOCAL_CHUNK, STORE_CHUNK = 4, 8


def _chunk_size(ref: ImageRef) -> int:
    source = ref.source.tar if isinstance(ref.source, Member) else ref.source
    return STORE_CHUNK if is_url(source) else LOCAL_CHUNK


def _decode_chunk(decoder: Decoder, sources: list[str | Member], spec: ResizeSpec) -> list:
    return [decoder(source, spec) for source in fetch_members(sources)]


class _WorkerPool:
    """Decode processes with a queue of in-flight chunks of images, replaced whole if one dies."""

    def __init__(self, spec: ResizeSpec, workers: int, decoder: Decoder):
        self.spec, self.workers, self.decoder = spec, workers, decoder
        self.helpers = OrderedPool(workers)
        self.pending: deque[list[ImageRef]] = deque()  # chunks sent, oldest first
        self.waiting: list[ImageRef] = []  # the next chunk, not sent yet

    def add(self, ref: ImageRef) -> None:
        self.waiting.append(ref)
        if len(self.waiting) == _chunk_size(self.waiting[0]):
            self._send()

    def _send(self) -> None:
        self.helpers.submit(_decode_chunk, self.decoder, [ref.source for ref in self.waiting], self.spec)
        self.pending.append(self.waiting)
        self.waiting = []

    def emit_oldest(self) -> Iterator[DecodedImage | DecodeFailure]:
        """The oldest chunk's images, decoded or failed, in order."""
        if not self.pending:
            self._send()
        try:
            outcomes = self.helpers.result()
        except PoolBroken:
            # What was in flight went down with the pool: isolate each image in a fresh process.
            self.close()
            while self.pending:
                for ref in self.pending.popleft():
                    yield self._isolated(ref)
            self.helpers = OrderedPool(self.workers)
            return
        refs = self.pending.popleft()
        for ref, outcome in zip(refs, outcomes, strict=True):
            yield _result(ref, outcome)

    def _isolated(self, ref: ImageRef) -> DecodedImage | DecodeFailure:
        solo = OrderedPool(1)
        try:
            solo.submit(self.decoder, ref.source, self.spec)
            return _result(ref, solo.result())
        except PoolBroken:
            return DecodeFailure(ref, "decoder process crashed on this file")
        finally:
            solo.close()

    def close(self) -> None:
        self.helpers.close()
