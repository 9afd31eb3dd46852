"""Headers of shards in object storage, read ahead in helper processes while discovery goes on.

A shard by URL costs a request for its headers, and the store's client (s3fs over botocore) spends
milliseconds of CPU on each: read by the driver itself, 10,000 shards of 10 images cost it more than
their images do, and one request after another leaves it waiting on the store's latency. A
``ShardListing`` reads the headers of the next shards discovery will ask for, a bounded number ahead
(memory stays flat), in a few processes of their own; the driver only takes each shard's samples, in
order. Where a helper process cannot serve (it crashed, or a shard comes out of order), discovery reads
the shard itself, as it does local and ``pipe:`` shards.
"""

from __future__ import annotations

import multiprocessing
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from .interrupts import helper_process_setup
from .tarshards import Member, ShardError, samples

AHEAD_PER_PROCESS = 4  # shards listed ahead per helper process: enough to hide a store's latency

Listed = tuple[list[tuple[str, Member | None]], str | None]  # a shard's samples, and why it stopped early


def read_samples(url: str, shard: str, size: int | None) -> Listed:
    """Every sample of a shard (``tarshards.samples``), and the ``ShardError``'s reason where its tar
    stops being readable (None: read to its end); what a helper process returns."""
    found: list[tuple[str, Member | None]] = []
    try:
        found.extend(samples(url, shard, size))
    except ShardError as exc:
        return found, str(exc)
    return found, None


class ShardListing:
    """The samples of ``planned`` shards — (URL, output name, size) in the order discovery will ask for
    them — read ahead by ``processes`` helper processes."""

    def __init__(self, planned: Iterable[tuple[str, str, int | None]], processes: int):
        self.planned = iter(planned)
        self.ahead = AHEAD_PER_PROCESS * processes
        self.pending: OrderedDict[str, Future] = OrderedDict()
        self.executor = ProcessPoolExecutor(
            max_workers=processes,
            mp_context=multiprocessing.get_context("spawn"),  # never fork a process holding threads
            initializer=helper_process_setup,
        )

    def samples(self, url: str, shard: str, size: int | None) -> Iterator[tuple[str, Member | None]]:
        """``tarshards.samples(url, shard, size)``, from a helper process where one read it ahead."""
        self._fill()
        if url not in self.pending:
            yield from samples(url, shard, size)
            return
        while (earlier := next(iter(self.pending))) != url:  # planned, then not asked for (a duplicate)
            self.pending.pop(earlier).cancel()
        future = self.pending.pop(url)
        try:
            found, stopped = future.result()
        except BrokenProcessPool:  # a helper died (the machine's memory, say): read it here
            found, stopped = read_samples(url, shard, size)
        self._fill()
        yield from found
        if stopped is not None:
            raise ShardError(stopped)

    def _fill(self) -> None:
        while len(self.pending) < self.ahead:
            planned = next(self.planned, None)
            if planned is None:
                return
            url = planned[0]
            if url not in self.pending:
                try:
                    self.pending[url] = self.executor.submit(read_samples, *planned)
                except RuntimeError:  # the pool broke: what is not read ahead is read by discovery
                    self.planned = iter(())
                    return

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
