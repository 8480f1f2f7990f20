"""Reading file bytes for the mount: only the chunks a request covers, cached and read ahead.

A :class:`FileReader` knows a file's chunk list and cumulative offsets, so a
``read(off, size)`` finds the covering chunks with a bisection. Chunks come from
the :class:`ChunkCache`: decoded chunks in memory (a small LRU), then an optional
bounded on-disk cache on this node, then the object store. Every chunk is
verified against its hash before it is used, wherever it came from. Fetches run
in worker threads; concurrent requests for one chunk share one fetch; sequential
readers get the next chunks fetched ahead of them.
"""

from __future__ import annotations

import bisect
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

_MEMORY_CHUNKS = 24  # decoded chunks kept in memory (at most ~100 MiB with 4 MiB chunks)
_READ_AHEAD = 3  # chunks fetched ahead of a sequential reader


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


class ChunkCache:
    """Decoded chunks for all readers of the mount."""

    def __init__(self, blobs: BlobStore, disk: DiskCache | None, *,
                 limiter: trio.CapacityLimiter) -> None:
        self.blobs = blobs
        self.disk = disk
        self.limiter = limiter
        self._memory: OrderedDict[bytes, bytes] = OrderedDict()
        self._inflight: dict[bytes, trio.Event] = {}
        self._failed: dict[bytes, BaseException] = {}

    def cached(self, digest: bytes) -> bytes | None:
        data = self._memory.get(digest)
        if data is not None:
            self._memory.move_to_end(digest)
        return data

    async def get(self, digest: bytes) -> bytes:
        """The verified bytes of one chunk.

        Raises:
            Corruption: the stored chunk is damaged (never returned as data).
        """
        data = self.cached(digest)
        if data is not None:
            return data
        event = self._inflight.get(digest)
        if event is None:
            event = self._inflight[digest] = trio.Event()
            try:
                data = await trio.to_thread.run_sync(self._fetch, digest, limiter=self.limiter)
                self._remember(digest, data)
            except BaseException as exc:
                self._failed[digest] = exc
                raise
            finally:
                del self._inflight[digest]
                event.set()
            self._failed.pop(digest, None)
            return data
        await event.wait()
        data = self.cached(digest)
        if data is not None:
            return data
        failure = self._failed.get(digest)
        if isinstance(failure, Corruption):
            raise failure
        return await self.get(digest)

    def _fetch(self, digest: bytes) -> bytes:
        if self.disk is not None:
            data = self.disk.get(digest)
            if data is not None:
                return data
        data = self.blobs.read(digest)
        if self.disk is not None:
            self.disk.put(digest, data)
        return data

    def _remember(self, digest: bytes, data: bytes) -> None:
        self._memory[digest] = data
        while len(self._memory) > _MEMORY_CHUNKS:
            self._memory.popitem(last=False)

    def prefetch(self, nursery: trio.Nursery, digests: list[bytes]) -> None:
        for digest in digests:
            if digest not in self._memory and digest not in self._inflight:
                nursery.start_soon(self._prefetch_one, digest)

    async def _prefetch_one(self, digest: bytes) -> None:
        try:
            await self.get(digest)
        except Exception:  # noqa: BLE001 - the real read reports it
            pass


class FileReader:
    """Random access to one immutable file entry."""

    def __init__(self, entry: Entry, chunks: list[tuple[bytes, int]] | None,
                 inline: bytes | None) -> None:
        self.entry = entry
        self.inline = inline
        self.digests = [d for d, _ in chunks or []]
        self.starts: list[int] = []
        offset = 0
        for _, length in chunks or []:
            self.starts.append(offset)
            offset += length
        self.size = offset if inline is None else len(inline)
        self._next_offset = 0

    @classmethod
    def load(cls, blobs: BlobStore, entry: Entry) -> FileReader:
        """Build a reader (reads the manifest: call it in a worker thread)."""
        tag, payload = parse_file_ref(entry.ref)
        if tag == "i":
            return cls(entry, None, payload)
        return cls(entry, file_chunks(blobs, entry), None)

    async def read(self, cache: ChunkCache, offset: int, size: int,
                   nursery: trio.Nursery | None) -> bytes | memoryview:
        if self.inline is not None:
            return self.inline[offset : offset + size]
        if offset >= self.size or size <= 0:
            return b""
        end = min(offset + size, self.size)
        first = bisect.bisect_right(self.starts, offset) - 1
        sequential = offset == self._next_offset
        self._next_offset = end
        parts = []
        index = first
        position = offset
        while position < end:
            data = await cache.get(self.digests[index])
            start = self.starts[index]
            view = memoryview(data)[position - start : min(end - start, len(data))]
            parts.append(view)
            position += len(view)
            index += 1
        if sequential and nursery is not None:
            cache.prefetch(nursery, self.digests[index : index + _READ_AHEAD])
        if len(parts) == 1:
            return parts[0]  # no copy: a slice of the cached chunk
        return b"".join(parts)
