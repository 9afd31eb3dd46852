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

import contextlib
from collections import deque
from collections.abc import Iterable, Iterator

from .orderedpool import OrderedPool, PoolBroken
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
        self.pending: deque[str] = deque()  # the URLs sent to be read, in order
        self.helpers = OrderedPool(processes)

    def samples(self, url: str, shard: str, size: int | None) -> Iterator[tuple[str, Member | None]]:
        """``tarshards.samples(url, shard, size)``, from a helper process where one read it ahead."""
        self._fill()
        if url not in self.pending:
            yield from samples(url, shard, size)
            return
        while self.pending.popleft() != url:  # planned, then not asked for (a duplicate): its answer goes
            with contextlib.suppress(PoolBroken):
                self.helpers.result()
        try:
            found, stopped = self.helpers.result()
        except PoolBroken:  # a helper died (the machine's memory, say): read it here
            found, stopped = read_samples(url, shard, size)
        self._fill()
        yield from found
        if stopped is not None:
            raise ShardError(stopped)

    def _fill(self) -> None:
        while len(self.pending) < self.ahead and not self.helpers.broken:
            planned = next(self.planned, None)
            if planned is None:
                return
            if planned[0] not in self.pending:
                self.helpers.submit(read_samples, *planned)
                self.pending.append(planned[0])

    def close(self) -> None:
        self.helpers.close()
