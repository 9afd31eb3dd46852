"""Shards read ahead in helper processes (``ShardListing``) give exactly what discovery reads itself: every
sample in order, a cut shard's samples then its reason; a shard asked for out of the planned order, or
a helper pool that broke, is read by the caller instead."""

from __future__ import annotations

import pytest

from florence_cli.shardlisting import ShardListing
from florence_cli.tarshards import ShardError, samples

from .helpers import write_shard


def _listed(read, path: str, name: str) -> tuple[list, str | None]:
    found = []
    try:
        for sample in read(path, name, None):
            found.append(sample)
    except ShardError as exc:
        return found, str(exc)
    return found, None


@pytest.fixture
def shards(tmp_path) -> list[tuple[str, str, None]]:
    made = []
    for number in range(5):
        members = [(f"{number}{i:03d}", {"jpg": bytes(100 + i), "txt": b"a caption"}) for i in range(4)]
        members.insert(2, (f"{number}-no-image", {"txt": b"no image"}))
        path = write_shard(tmp_path / f"{number:05d}.tar", members)
        made.append((str(path), f"shards/{number:05d}", None))
    whole = (tmp_path / "00004.tar").read_bytes()
    (tmp_path / "00004.tar").write_bytes(whole[: len(whole) // 2])  # cut short
    return made


def test_read_ahead_equals_reading_here_in_order_and_out_of_it(shards):
    expected = [_listed(samples, path, name) for path, name, _ in shards]
    assert expected[4][1].startswith("truncated") and expected[0][0][2] == ("0-no-image", None)
    listing = ShardListing(shards, processes=2)
    try:
        assert _listed(listing.samples, *shards[0][:2]) == expected[0]
        assert (
            _listed(listing.samples, *shards[2][:2]) == expected[2]
        )  # 00001 skipped: dropped from the queue
        assert _listed(listing.samples, *shards[1][:2]) == expected[1]  # out of order: read here
        assert [_listed(listing.samples, *shard[:2]) for shard in shards[3:]] == expected[3:]
    finally:
        listing.close()


def test_a_broken_helper_pool_leaves_the_reading_to_the_caller(shards):
    listing = ShardListing(shards, processes=1)
    try:
        helper = listing.helpers.helpers[0].process
        helper.kill()  # as the machine's memory would
        helper.join()
        assert [_listed(listing.samples, *shard[:2]) for shard in shards] == [
            _listed(samples, *shard[:2]) for shard in shards
        ]
        assert listing.helpers.broken
    finally:
        listing.close()
