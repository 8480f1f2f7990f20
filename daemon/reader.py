"""Reading file bytes for the mount: only the chunks a request covers, cached and read ahead.

A :class:`FileReader` knows a file's chunk list and cumulative offsets, so a
``read(off, size)`` finds the covering chunks with a bisection. Chunks come from
the :class:`ChunkCache`: decoded chunks in memory, then an optional bounded
on-disk cache on this node, then the object store. Every chunk is verified
against its hash before it is used, wherever it came from. Fetches run in worker
threads; concurrent requests for one chunk share one fetch.

Each open file handle tells sequential from random access: a read that starts
where the previous one ended, or a little after, continues a sequential run.
Sequential readers get the next chunks fetched ahead of them, in a window that
doubles with the contiguous part of the run up to :data:`_READ_AHEAD` bytes (so
reading a file's header does not decode the whole file); random readers get no
read-ahead.
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import os
import threading
from collections import OrderedDict

import trio

from vfs.blobs import blob_hash
from vfs.blobstore import BlobStore
from vfs.errors import Corruption
from vfs.snapshot import file_chunks
from vfs.tree import Entry, parse_file_ref

log = logging.getLogger("daemon.reader")

MEMORY_LIMIT = 128 << 20  # default bytes of decoded chunks kept for random readers
_STREAM_LIMIT = 32 << 20  # bytes of decoded chunks kept for sequential readers
# Bytes fetched ahead of a long sequential run: with the kernel sending 1 MiB
# READs, 8 MiB (about 8 average chunks) keeps both cores decoding while the FUSE
# loop copies, and stays well inside _STREAM_LIMIT for a few readers at once.
_READ_AHEAD = 8 << 20
# A read this close to where the previous one ended still continues the run: the
# kernel sends only what its page cache lacks, so a re-read of a partly cached
# file arrives as reads with holes between them.
_RUN_GAP = 4 << 20
# Damaged chunks remembered, so that reading one again fails at once (about 100
# bytes each); beyond that the oldest is fetched and reported again if read.
_DAMAGED_LIMIT = 4096

_M_ARENA_MAX = -8  # glibc's mallopt() parameter number


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Make glibc's malloc share ``arenas`` heaps between all threads (call it first).

    Chunks are allocated by whichever worker thread fetched them and freed later
    by the trio thread. With glibc's default of up to 8 heaps per core, memory a
    chunk freed in one heap is not reused by the next chunk allocated in another,
    and the daemon's RSS grew to 2.5x the bytes the cache held (360 MB for a full
    128 MiB cache); with 2 heaps it stays near the cache's size, at no measurable
    cost in throughput. Does nothing on a C library without ``mallopt``.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return
    if not mallopt(_M_ARENA_MAX, arenas):
        log.debug("mallopt(M_ARENA_MAX, %d) failed", arenas)


class DiskCache:
    """A bounded LRU of verified chunks in a local directory (survives restarts)."""

    def __init__(self, directory: str, limit: int) -> None:
        self.directory = directory
        self.limit = limit
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, int] = OrderedDict()
        self.used = 0
        os.makedirs(directory, exist_ok=True)
        found = []
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            if name.endswith(".tmp"):
                os.unlink(path)
                continue
            st = os.stat(path)
            found.append((st.st_atime, name, st.st_size))
        for _, name, size in sorted(found):
            self._entries[name] = size
            self.used += size
        self._evict()

    def get(self, digest: bytes) -> bytes | None:
        name = digest.hex()
        with self._lock:
            if name not in self._entries:
                return None
            self._entries.move_to_end(name)
        try:
            with open(os.path.join(self.directory, name), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        if blob_hash(data) != digest:
            log.error("corruption report: cached chunk %s is damaged; dropping it", name)
            self._drop(name)
            return None
        return data

    def put(self, digest: bytes, data: bytes) -> None:
        if len(data) > self.limit:
            return
        name = digest.hex()
        path = os.path.join(self.directory, name)
        tmp = f"{path}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.rename(tmp, path)
        except OSError as exc:  # a full cache disk must not fail the read
            log.warning("cannot cache chunk %s: %s", name, exc)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return
        with self._lock:
            if name not in self._entries:
                self._entries[name] = len(data)
                self.used += len(data)
            self._evict()

    def _drop(self, name: str) -> None:
        with self._lock:
            size = self._entries.pop(name, None)
            if size is not None:
                self.used -= size
        try:
            os.unlink(os.path.join(self.directory, name))
        except FileNotFoundError:
            pass

    def _evict(self) -> None:
        while self.used > self.limit and self._entries:
            name, size = self._entries.popitem(last=False)
            self.used -= size
            try:
                os.unlink(os.path.join(self.directory, name))
            except FileNotFoundError:
                pass


class ReportedCorruption(Corruption):
    """A chunk found damaged before, and reported then: EIO without another report."""


class ChunkCache:
    """Decoded, verified chunks for all readers of the mount, in two bounded parts.

    Chunks fetched for random readers stay in an LRU of ``memory_limit`` bytes.
    Chunks fetched for sequential readers (their read-ahead) are kept apart, in
    ``stream_limit`` bytes: first as *ahead* of their reader, then, once the
    reader has moved past them, as *behind* it, and the chunks behind go first,
    oldest first. Streaming a large file then neither evicts the random readers'
    working set nor holds more memory than a few windows (the kernel's page
    cache keeps what was streamed), and a file read again soon after may still
    be there. A random read of a streamed chunk moves it to the LRU.

    A chunk whose fetch finds it damaged is reported once (a corruption report at
    ERROR) and remembered, up to ``damaged_limit`` of them: reading it again fails
    at once with :class:`ReportedCorruption`, without fetching it and reporting
    it again, for as long as the index knows its copy as damaged (a put of the
    same bytes stores a good copy, and the next read fetches that one). A pack
    missing from the store is not marked damaged in the index: each read tries it
    again, since gc may have moved the blob to a pack this node learns about.

    Only the trio thread touches the dictionaries, so they need no lock.
    """

    def __init__(self, blobs: BlobStore, disk: DiskCache | None, *,
                 limiter: trio.CapacityLimiter, memory_limit: int = MEMORY_LIMIT,
                 stream_limit: int = _STREAM_LIMIT,
                 damaged_limit: int = _DAMAGED_LIMIT) -> None:
        self.blobs = blobs
        self.disk = disk
        self.limiter = limiter
        self.memory_limit = memory_limit
        self.stream_limit = stream_limit
        self.damaged_limit = damaged_limit
        self._memory: OrderedDict[bytes, memoryview] = OrderedDict()  # LRU: oldest first
        self._memory_bytes = 0
        self._ahead: OrderedDict[bytes, memoryview] = OrderedDict()  # oldest first
        self._behind: OrderedDict[bytes, memoryview] = OrderedDict()  # oldest passed first
        self._stream_bytes = 0  # in _ahead and _behind
        self._inflight: dict[bytes, trio.Event] = {}
        # digest -> what was wrong with it, oldest found first
        self._damaged: OrderedDict[bytes, str] = OrderedDict()

    @property
    def used(self) -> int:
        """Bytes of decoded chunks held in memory."""
        return self._memory_bytes + self._stream_bytes

    def cached(self, digest: bytes, *, sequential: bool = False) -> memoryview | None:
        """The chunk if it is in memory (a random read of a streamed chunk keeps it)."""
        view = self._memory.get(digest)
        if view is not None:
            self._memory.move_to_end(digest)
            return view
        part = self._ahead
        view = part.get(digest)
        if view is None:
            part = self._behind
            view = part.get(digest)
        if view is not None and not sequential:
            del part[digest]
            self._stream_bytes -= len(view)
            self._keep(digest, view, sequential=False)
        return view

    def passed(self, digest: bytes) -> None:
        """A sequential reader is done with this chunk: evict it before those ahead."""
        view = self._ahead.pop(digest, None)
        if view is not None:
            self._behind[digest] = view

    async def get(self, digest: bytes, *, sequential: bool = False) -> memoryview:
        """The verified bytes of one chunk.

        Args:
            digest: the chunk's hash.
            sequential: asked for by a sequential reader (kept in the streaming part).

        Raises:
            ReportedCorruption: the stored chunk is damaged (never returned as
                data); the cache has logged the corruption report.
        """
        view = self.cached(digest, sequential=sequential)
        if view is not None:
            return view
        if digest in self._damaged:
            await self._check_damaged(digest)
        event = self._inflight.get(digest)
        if event is None:
            event = self._inflight[digest] = trio.Event()
            try:
                data = await trio.to_thread.run_sync(self._fetch, digest, limiter=self.limiter)
                view = self._keep(digest, memoryview(data), sequential=sequential)
            except Corruption as exc:
                raise self._found_damaged(digest, exc) from exc
            finally:
                del self._inflight[digest]
                event.set()
            return view
        await event.wait()
        view = self.cached(digest, sequential=sequential)
        if view is not None:
            return view
        why = self._damaged.get(digest)
        if why is not None:  # the fetch this one waited for found it damaged
            raise ReportedCorruption(why)
        return await self.get(digest, sequential=sequential)

    def _found_damaged(self, digest: bytes, exc: Corruption) -> ReportedCorruption:
        """Report a chunk found damaged, once, and remember it."""
        why = str(exc)
        log.error("corruption report: %s (reads of this chunk fail until it is stored "
                  "again)", why)
        self._damaged[digest] = why
        self._damaged.move_to_end(digest)
        while len(self._damaged) > self.damaged_limit:
            self._damaged.popitem(last=False)
        return ReportedCorruption(why)

    async def _check_damaged(self, digest: bytes) -> None:
        """Fail at once if the index still knows the chunk's copy as damaged.

        Raises:
            ReportedCorruption: it does (an index read; no fetch, no new report).
        """
        # A thread of its own, not one of the limiter's: this must not wait
        # behind slow fetches.
        if await trio.to_thread.run_sync(self.blobs.has, digest):
            self._damaged.pop(digest, None)  # stored again since (or its pack was missing)
            return
        why = self._damaged.get(digest)
        if why is not None:
            raise ReportedCorruption(why)

    def _fetch(self, digest: bytes) -> bytes:
        if self.disk is not None:
            data = self.disk.get(digest)
            if data is not None:
                return data
        data = self.blobs.read(digest)
        if self.disk is not None:
            self.disk.put(digest, data)
        return data

    def _keep(self, digest: bytes, view: memoryview, *, sequential: bool) -> memoryview:
        if len(view) > (self.stream_limit if sequential else self.memory_limit):
            return view  # it would evict everything else, and then itself
        if sequential:
            self._ahead[digest] = view
            self._stream_bytes += len(view)
            while self._stream_bytes > self.stream_limit:
                part = self._behind or self._ahead
                self._stream_bytes -= len(part.popitem(last=False)[1])
        else:
            self._memory[digest] = view
            self._memory_bytes += len(view)
            while self._memory_bytes > self.memory_limit:
                self._memory_bytes -= len(self._memory.popitem(last=False)[1])
        return view

    def prefetch(self, nursery: trio.Nursery, digests: list[bytes]) -> None:
        """Start fetching these chunks for a sequential reader, in order."""
        for digest in digests:
            if digest not in self._memory and digest not in self._ahead \
                    and digest not in self._behind and digest not in self._inflight:
                nursery.start_soon(self._prefetch_one, digest)

    async def _prefetch_one(self, digest: bytes) -> None:
        try:
            await self.get(digest, sequential=True)
        except Exception:  # noqa: BLE001 - reported by get(), or by the real read
            pass


class FileReader:
    """Random access to one immutable file entry, for one open file handle."""

    def __init__(self, entry: Entry, chunks: list[tuple[bytes, int]] | None,
                 inline: bytes | None) -> None:
        self.entry = entry
        self.inline = inline
        self.digests = [d for d, _ in chunks or []]
        # bounds[i] is where chunk i starts and bounds[i + 1] where it ends.
        self.bounds = [0]
        for _, length in chunks or []:
            self.bounds.append(self.bounds[-1] + length)
        self.size = self.bounds[-1] if inline is None else len(inline)
        self._next_offset = 0  # where a read continuing the current run starts
        self._run = 0  # bytes read in the current sequential run
        self._chunk = 0  # the chunk the previous read started in
        self._ahead = 0  # chunks before this one are fetched or asked for by read-ahead

    @classmethod
    def load(cls, blobs: BlobStore, entry: Entry) -> FileReader:
        """Build a reader (reads the manifest: call it in a worker thread)."""
        tag, payload = parse_file_ref(entry.ref)
        if tag == "i":
            return cls(entry, None, payload)
        return cls(entry, file_chunks(blobs, entry), None)

    async def read(self, cache: ChunkCache, offset: int, size: int,
                   nursery: trio.Nursery | None) -> bytes | memoryview:
        """Up to ``size`` bytes at ``offset`` (fewer at the end of the file).

        Raises:
            Corruption: a chunk the range covers is damaged.
        """
        if self.inline is not None:
            return self.inline[offset : offset + size]
        if offset >= self.size or size <= 0:
            return b""
        end = min(offset + size, self.size)
        index = bisect.bisect_right(self.bounds, offset) - 1
        sequential = self._note(offset, end, index, cache)
        if sequential and nursery is not None:
            self._read_ahead(cache, nursery, end)
        start = self.bounds[index]
        if end <= self.bounds[index + 1]:  # within one chunk: a slice, no copy
            digest = self.digests[index]
            view = cache.cached(digest, sequential=sequential)
            if view is None:
                view = await cache.get(digest, sequential=sequential)
            return view[offset - start : end - start]
        parts = []
        position = offset
        while position < end:
            view = await cache.get(self.digests[index], sequential=sequential)
            part = view[position - start : min(end - start, len(view))]
            parts.append(part)
            position += len(part)
            index += 1
            start = self.bounds[index]
        return b"".join(parts)

    def _note(self, offset: int, end: int, index: int, cache: ChunkCache) -> bool:
        """Record this read in the handle's access pattern; is it sequential?"""
        sequential = self._next_offset <= offset <= self._next_offset + _RUN_GAP
        if offset == self._next_offset:
            self._run += end - offset
        else:  # a hole, or a jump: the read-ahead window starts small again
            self._run = end - offset
        if sequential:
            for passed in range(self._chunk, index):
                cache.passed(self.digests[passed])
        else:
            self._ahead = 0
        self._next_offset = end
        self._chunk = index
        return sequential

    def _read_ahead(self, cache: ChunkCache, nursery: trio.Nursery, end: int) -> None:
        # The window doubles with the run, like the kernel's own read-ahead.
        limit = end + min(_READ_AHEAD, 2 * self._run)
        first = max(self._ahead, bisect.bisect_left(self.bounds, end))
        last = first
        while last < len(self.digests) and self.bounds[last] < limit:
            last += 1
        if last > first:
            self._ahead = last
            cache.prefetch(nursery, self.digests[first:last])
