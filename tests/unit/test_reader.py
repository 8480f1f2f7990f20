"""The mount's read path without a mount: the chunk cache and per-handle access patterns.

A fake blob store serves numbered chunks and counts how often each one is read,
so the tests can say exactly which chunks were fetched, kept and evicted.
"""

from __future__ import annotations

import functools
import logging
import threading

import pytest
import trio

from daemon import reader
from daemon.reader import ChunkCache, FileReader
from vfs.errors import Corruption
from vfs.tree import FILE, Entry

KB = 1000


class FakeBlobs:
    """Chunk ``i`` is ``sizes[i]`` copies of byte ``i``; damaged chunks raise Corruption."""

    def __init__(self, sizes: list[int], damaged: frozenset[int] = frozenset()) -> None:
        self.chunks = {digest(i): bytes([i]) * size for i, size in enumerate(sizes)}
        self.damaged = {digest(i) for i in damaged}
        self.reads: dict[bytes, int] = {}
        self._lock = threading.Lock()

    def read(self, key: bytes) -> bytes:
        with self._lock:
            self.reads[key] = self.reads.get(key, 0) + 1
        if key in self.damaged:
            raise Corruption(f"blob {key.hex()} does not match its hash")
        return self.chunks[key]

    def has(self, key: bytes) -> bool:
        """Stored and not known to be damaged (as the index says)."""
        return key in self.chunks and key not in self.damaged

    def fetched(self) -> list[int]:
        """Chunk numbers read at least once, in order."""
        return sorted(key[0] for key in self.reads)


def digest(i: int) -> bytes:
    return bytes([i]) * 32


def make_cache(blobs: FakeBlobs, *, memory: int = 1 << 30, stream: int = 1 << 30) -> ChunkCache:
    return ChunkCache(blobs, None, limiter=trio.CapacityLimiter(2),  # type: ignore[arg-type]
                      memory_limit=memory, stream_limit=stream)


def make_reader(sizes: list[int]) -> FileReader:
    entry = Entry("f", FILE, 0o644, sum(sizes), 0, "m:")
    return FileReader(entry, [(digest(i), size) for i, size in enumerate(sizes)], None)


@functools.cache
def content(sizes: tuple[int, ...]) -> bytes:
    return b"".join(bytes([i]) * n for i, n in enumerate(sizes))


def expected(sizes: list[int], offset: int, size: int) -> bytes:
    return content(tuple(sizes))[offset : offset + size]


async def settle(nursery: trio.Nursery) -> None:
    """Wait until the read-ahead started so far has finished."""
    while nursery.child_tasks:
        await trio.sleep(0.001)


# -- the memory budget -------------------------------------------------------------------


@pytest.mark.trio
async def test_random_chunks_are_kept_within_a_byte_budget_least_recently_used_first() -> None:
    blobs = FakeBlobs([400 * KB, 400 * KB, 400 * KB, 100 * KB, 100 * KB])
    cache = make_cache(blobs, memory=1000 * KB)
    for i in (0, 1):
        await cache.get(digest(i))
    await cache.get(digest(0))  # 0 is now the most recently used
    await cache.get(digest(2))  # 1200 KB > 1000 KB: 1 goes
    assert cache.cached(digest(1)) is None
    assert cache.cached(digest(0)) is not None and cache.cached(digest(2)) is not None
    assert cache.used == 800 * KB
    # Small chunks fit beside the big ones; the budget is bytes, not a count.
    await cache.get(digest(3))
    await cache.get(digest(4))
    assert cache.used == 1000 * KB
    kept = [cache.cached(digest(i)) is not None for i in range(5)]
    assert kept == [True, False, True, True, True]


@pytest.mark.trio
async def test_a_chunk_larger_than_the_budget_is_returned_but_not_kept() -> None:
    blobs = FakeBlobs([100 * KB, 2000 * KB])
    cache = make_cache(blobs, memory=1000 * KB)
    await cache.get(digest(0))
    view = await cache.get(digest(1))
    assert bytes(view) == bytes([1]) * 2000 * KB
    assert cache.cached(digest(1)) is None
    assert cache.cached(digest(0)) is not None, "and it evicted nothing"


@pytest.mark.trio
async def test_a_cached_read_within_one_chunk_is_a_slice_without_a_fetch() -> None:
    sizes = [100 * KB, 100 * KB]
    blobs = FakeBlobs(sizes)
    cache = make_cache(blobs)
    file = make_reader(sizes)
    await file.read(cache, 150 * KB, 4 * KB, None)
    assert blobs.reads == {digest(1): 1}
    for offset in (101 * KB, 190 * KB, 123 * KB):
        data = await file.read(cache, offset, 4 * KB, None)
        assert isinstance(data, memoryview)
        assert bytes(data) == expected(sizes, offset, 4 * KB)
    assert blobs.reads == {digest(1): 1}


@pytest.mark.trio
async def test_reads_across_chunks_and_at_the_end_of_the_file() -> None:
    sizes = [100 * KB, 50 * KB, 100 * KB]
    blobs = FakeBlobs(sizes)
    cache = make_cache(blobs)
    file = make_reader(sizes)
    assert await file.read(cache, 90 * KB, 100 * KB, None) == expected(sizes, 90 * KB, 100 * KB)
    assert bytes(await file.read(cache, 240 * KB, 64 * KB, None)) == bytes([2]) * 10 * KB
    assert await file.read(cache, 250 * KB, 64 * KB, None) == b""


# -- sequential and random readers -------------------------------------------------------


@pytest.mark.trio
async def test_a_sequential_reader_gets_read_ahead_growing_with_its_run() -> None:
    sizes = [1 << 20] * 40
    blobs = FakeBlobs(sizes)
    cache = make_cache(blobs)
    file = make_reader(sizes)
    async with trio.open_nursery() as nursery:
        await file.read(cache, 0, 128 << 10, nursery)
        await settle(nursery)
        assert blobs.fetched() == [0], "a 128 KiB read asks for 256 KiB more: still chunk 0"
        offset = 128 << 10
        while offset < 4 << 20:
            data = await file.read(cache, offset, 128 << 10, nursery)
            assert bytes(data) == expected(sizes, offset, 128 << 10)
            offset += 128 << 10
        await settle(nursery)
        # 4 MiB read: the window is 8 MiB (the most), so chunks up to 12 MiB are there.
        assert blobs.fetched() == list(range(12))
        while offset < 40 << 20:
            await file.read(cache, offset, 1 << 20, nursery)
            offset += 1 << 20
    assert blobs.fetched() == list(range(40))
    assert set(blobs.reads.values()) == {1}, "every chunk was fetched once"


@pytest.mark.trio
async def test_a_random_reader_gets_no_read_ahead() -> None:
    sizes = [1 << 20] * 40
    blobs = FakeBlobs(sizes)
    cache = make_cache(blobs)
    file = make_reader(sizes)
    async with trio.open_nursery() as nursery:
        for chunk in (12, 5, 30, 3, 21, 38):  # each read far from where the last one ended
            offset = (chunk << 20) + 1000
            data = await file.read(cache, offset, 4096, nursery)
            assert bytes(data) == expected(sizes, offset, 4096)
        await settle(nursery)
    assert blobs.fetched() == [3, 5, 12, 21, 30, 38]


@pytest.mark.trio
async def test_a_reader_moving_forward_over_holes_streams() -> None:
    """The kernel asks only for what its page cache lacks: a re-read of a partly cached
    file arrives as forward reads with holes, and must not flood the random readers' LRU."""
    sizes = [100 * KB] * 60
    blobs = FakeBlobs(sizes)
    cache = make_cache(blobs, memory=100 * KB, stream=5000 * KB)
    random_reader, rereader = make_reader(sizes), make_reader(sizes)
    async with trio.open_nursery() as nursery:
        await random_reader.read(cache, 5950 * KB, 4 * KB, nursery)  # chunk 59
        for offset in range(0, 5000 * KB, 250 * KB):
            data = await rereader.read(cache, offset, 8 * KB, nursery)
            assert bytes(data) == expected(sizes, offset, 8 * KB)
        await settle(nursery)
    assert cache.cached(digest(59)) is not None
    assert len(blobs.reads) <= 25, "read-ahead stays small when the reads are not contiguous"


@pytest.mark.trio
async def test_streaming_a_file_keeps_the_random_readers_chunks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader, "_READ_AHEAD", 200 * KB)  # the streaming part holds a window
    sizes = [100 * KB] * 50
    blobs = FakeBlobs(sizes)
    cache = make_cache(blobs, memory=300 * KB, stream=500 * KB)
    random_reader, streamer = make_reader(sizes), make_reader(sizes)
    async with trio.open_nursery() as nursery:
        for offset in (4730 * KB, 4520 * KB, 4010 * KB):  # chunks 47, 45, 40: backwards
            await random_reader.read(cache, offset, 4 * KB, nursery)
        for offset in range(0, 3000 * KB, 64 * KB):  # a sequential run over chunks 0-29
            await streamer.read(cache, offset, 64 * KB, nursery)
        await settle(nursery)
        assert all(cache.cached(digest(i)) is not None for i in (40, 45, 47))
        assert cache.cached(digest(0), sequential=True) is None, "the stream's memory is bounded"
        assert cache.used <= 800 * KB
        # The random reader hits what it read, and moves a streamed chunk it reads to its LRU.
        reads = dict(blobs.reads)
        await random_reader.read(cache, 4520 * KB, 4 * KB, nursery)
        await random_reader.read(cache, 2910 * KB, 4 * KB, nursery)
        assert blobs.reads == reads
        assert digest(29) in cache._memory


@pytest.mark.trio
async def test_chunks_a_sequential_reader_passed_are_evicted_before_its_read_ahead(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader, "_READ_AHEAD", 300 * KB)
    sizes = [100 * KB] * 20
    blobs = FakeBlobs(sizes)
    cache = make_cache(blobs, stream=1000 * KB)
    file = make_reader(sizes)
    async with trio.open_nursery() as nursery:
        for offset in range(0, 1200 * KB, 100 * KB):
            await file.read(cache, offset, 100 * KB, nursery)
            await settle(nursery)
    # The reader is in chunk 11 and its read-ahead reached chunk 14: 15 chunks went
    # through a part that holds 10, and chunks it had passed made the room.
    assert blobs.fetched() == list(range(15))
    assert set(blobs.reads.values()) == {1}, "no chunk was evicted before it was read"
    kept = [i for i in range(20) if cache.cached(digest(i), sequential=True) is not None]
    assert kept == list(range(5, 15)), "the chunks passed longest ago went first"


# -- damage ------------------------------------------------------------------------------


@pytest.mark.trio
@pytest.mark.expect_warnings  # corruption reports
async def test_a_damaged_chunk_fails_every_read_of_it_and_only_those() -> None:
    sizes = [100 * KB] * 6
    blobs = FakeBlobs(sizes, damaged=frozenset({3}))
    cache = make_cache(blobs)
    file = make_reader(sizes)
    async with trio.open_nursery() as nursery:
        for offset in range(0, 300 * KB, 50 * KB):  # read-ahead reaches chunk 3 and fails
            assert bytes(await file.read(cache, offset, 50 * KB, nursery)) == \
                expected(sizes, offset, 50 * KB)
        await settle(nursery)
        for _ in range(2):
            with pytest.raises(Corruption):
                await file.read(cache, 300 * KB, 50 * KB, nursery)
        with pytest.raises(Corruption):  # a read across the damage fails as a whole
            await file.read(cache, 250 * KB, 100 * KB, nursery)
        assert bytes(await file.read(cache, 400 * KB, 50 * KB, nursery)) == \
            expected(sizes, 400 * KB, 50 * KB)
    assert cache.cached(digest(3)) is None


@pytest.mark.trio
@pytest.mark.expect_warnings  # corruption reports
async def test_a_damaged_chunk_is_fetched_and_reported_once(
        caplog: pytest.LogCaptureFixture) -> None:
    sizes = [100 * KB] * 4
    blobs = FakeBlobs(sizes, damaged=frozenset({2}))
    cache = make_cache(blobs)
    file, other = make_reader(sizes), make_reader(sizes)

    async def fails(reader_: FileReader) -> None:
        with pytest.raises(Corruption):
            await reader_.read(cache, 200 * KB, 10 * KB, None)

    with caplog.at_level(logging.ERROR, logger="daemon.reader"):
        async with trio.open_nursery() as nursery:  # three at once: one fetch
            for _ in range(3):
                nursery.start_soon(fails, file)
        for reader_ in (file, file, other):  # later: the same handle, then another one
            await fails(reader_)
    assert blobs.reads[digest(2)] == 1
    reports = [r for r in caplog.records if "corruption report" in r.getMessage()]
    assert len(reports) == 1 and digest(2).hex() in reports[0].getMessage()


@pytest.mark.trio
@pytest.mark.expect_warnings  # corruption reports
async def test_a_damaged_chunk_stored_again_reads_again() -> None:
    """A re-put of the damaged bytes repairs the store (see test_damage): the mount
    reads the new copy instead of failing on what it remembered."""
    sizes = [100 * KB] * 2
    blobs = FakeBlobs(sizes, damaged=frozenset({1}))
    cache = make_cache(blobs)
    file = make_reader(sizes)
    with pytest.raises(Corruption):
        await file.read(cache, 100 * KB, 10 * KB, None)
    blobs.damaged.clear()  # stored again
    assert bytes(await file.read(cache, 100 * KB, 10 * KB, None)) == expected(sizes, 100 * KB,
                                                                              10 * KB)
    assert blobs.reads[digest(1)] == 2


@pytest.mark.expect_warnings
def test_damaged_chunks_remembered_are_bounded() -> None:
    blobs = FakeBlobs([KB] * 8, damaged=frozenset(range(8)))
    cache = ChunkCache(blobs, None, limiter=trio.CapacityLimiter(2),  # type: ignore[arg-type]
                       damaged_limit=4)

    async def fails(i: int) -> None:
        with pytest.raises(Corruption):
            await cache.get(digest(i))

    async def main() -> None:
        for i in range(8):
            await fails(i)
        for i in (7, 6, 5, 4):  # the last four found are remembered
            await fails(i)
        await fails(0)  # the first ones were forgotten: fetched (and reported) again

    trio.run(main)
    assert [blobs.reads[digest(i)] for i in range(8)] == [2, 1, 1, 1, 1, 1, 1, 1]


def test_read_ahead_fits_the_streaming_part_of_the_cache() -> None:
    # Two readers' full windows (of 4 MiB chunks, the largest) must fit, or read-ahead
    # would evict chunks before their reader gets to them.
    assert 2 * (reader._READ_AHEAD + 2 * (4 << 20)) <= reader._STREAM_LIMIT
