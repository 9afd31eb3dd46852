"""What a run tells its user on stderr while it goes: a tqdm bar on a terminal; anywhere else (nohup, a
Slurm log, a pipe) one line every ``FLORENCE_PROGRESS_EVERY`` seconds (30 by default), img2dataset's way,
so a log shows progress without a line per image. Both give a total, a percentage and an ETA once the
inputs are counted (``count_in_background``); shards by URL and streams, which would be read through
again to count their samples, are counted as shards (``set_shards``), with an ETA by shards."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from .records import counted


class Progress:
    """Progress of one run; ``enabled`` False (``-q``) says nothing."""

    def __init__(self, enabled: bool, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.total: int | None = None
        self.done = 0
        self.done_before = 0  # of ``done``: found done by earlier runs (no part of the rate)
        self.shards_total: int | None = None  # where the images are not counted, the shards are
        self.shards_done = 0
        self.shards_before = 0
        self.started = time.monotonic()
        self.every_s = float(os.environ.get("FLORENCE_PROGRESS_EVERY", "30"))
        self._said_at = self.started
        self._terminal = enabled and self.stream.isatty()
        self._bar = None

    def start(self) -> None:
        """The images start now (the model is loaded): rates and ETAs count from here; a terminal's bar
        appears."""
        self.started = self._said_at = time.monotonic()
        if self._terminal:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total, unit="img", file=self.stream, dynamic_ncols=True, smoothing=0.1
            )

    def note(self, text: str) -> None:
        """One line on a terminal, where silence would leave the user wondering (``loading the model…``);
        a log gets the progress lines alone (a refusal stays one line there)."""
        if self._terminal:
            print(text, file=self.stream, flush=True)

    def count_in_background(self, count: Callable[[], int | None]) -> None:
        """Learn the total from ``count`` (a walk of the inputs) in a thread, while the run goes on."""
        if self.enabled:
            counting = threading.Thread(target=lambda: self.set_total(count()), name="count", daemon=True)
            counting.start()

    def set_total(self, total: int | None) -> None:
        self.total = total
        if self._bar is not None and total is not None:
            self._bar.total = total
            self._bar.refresh()

    def set_shards(self, total: int) -> None:
        """The run's inputs are ``total`` tar shards (or hold them): their progress is said too, with an ETA
        by shards where the images themselves are not counted (shards by URL, streams)."""
        self.shards_total = total or None

    def shard_done(self, before: bool = False) -> None:
        """A shard's samples are all back, or (``before``) an earlier run finished it."""
        self.shards_done += 1
        self.shards_before += before
        if self._bar is not None and self.shards_total and not self.total:
            self._bar.set_postfix_str(self._shards(), refresh=False)

    def _shards(self) -> str:
        """``12/2,000 shards, ETA 1:02:03``: the shards done and the time the rest take at this pace."""
        elapsed = time.monotonic() - self.started
        left = max(self.shards_total - self.shards_done, 0)
        now = self.shards_done - self.shards_before  # this run's: its pace
        eta = timedelta(seconds=round(elapsed / now * left)) if now else "unknown"
        return f"{self.shards_done}/{self.shards_total} shards, ETA {eta}"

    def update(self, images: int, before: bool = False) -> None:
        """``images`` more are done: answered or failed, or (``before``) found done by an earlier run,
        which moves the count but not the rate (a resumed run's ETA is the work left at this run's pace)."""
        self.done += images
        self.done_before += images if before else 0
        if self._bar is not None:
            if before:  # counted, but no part of tqdm's rate: it rates what moved since it last drew
                self._bar.n += images
                self._bar.last_print_n += images
            else:
                self._bar.update(images)
        elif self.enabled and time.monotonic() - self._said_at >= self.every_s:
            self._said_at = time.monotonic()
            print(f"florence: {self.line()}", file=self.stream, flush=True)

    def line(self) -> str:
        """``120/400 images (30%), 31.4 images/s, ETA 0:00:09``, or without a total, the count and rate."""
        rate = (self.done - self.done_before) / max(time.monotonic() - self.started, 1e-9)
        if not self.total:
            shards = f", {self._shards()}" if self.shards_total else ""
            return f"{counted(self.done, 'image')}, {rate:.1f} images/s{shards}"
        left = max(self.total - self.done, 0)
        eta = timedelta(seconds=round(left / rate)) if rate > 0 else "unknown"
        percent = 100 * self.done / self.total
        return f"{self.done}/{counted(self.total, 'image')} ({percent:.0f}%), {rate:.1f} images/s, ETA {eta}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
