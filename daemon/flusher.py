"""Storing files closed through the mount in the background, many at a time.

``close()`` of a file written through the mount does not store it: the view
writes the spool's sidecar (:mod:`daemon.spools`), which is enough to survive a
``kill -9`` of the daemon, and hands the spool to the :class:`Flusher`. The
flusher takes every spool handed to it since its last round at once, from all
branches, and:

1. encodes them through one :class:`vfs.blobstore.BlobWriter`, so small files
   share packs (a large file is cut in this thread while worker threads hash and
   compress its chunks);
2. makes the packs durable with one checkpoint (one sync of the store) and indexes
   them;
3. stages each branch's files in one index transaction (holding that branch's
   :meth:`Flusher.branch_lock`, so a commit never clears what it did not seal);
4. forgets the spools that did not change meanwhile (their ``generation`` is the
   one it read), deleting sidecar and spool.

While one round syncs, the next closes accumulate: batches form by themselves
(group commit). A large file written in order is also encoded while it is being
written (:meth:`Flusher.submit_head`: its *head*, whole chunks of its first
bytes, is stored in steps of ``encode_ahead`` bytes), so its close or fsync encodes and
syncs only the rest, and the disk writes packs while the writer writes.
``fsync``, ``vfsctl commit`` and a clean shutdown wait for a round with
:meth:`Flusher.wait_stored`. A round that fails (a full disk, a store error)
keeps its spools pending: it is logged once, retried later, and the next wait for
those files raises the error, so fsync and commit fail instead of silently
succeeding.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from daemon.spools import SpoolFile, SpoolFiles, StoredSpool
from vfs.blobstore import BlobWriter
from vfs.errors import StoreChanged, StoreError, StoreFull, VfsError
from vfs.ingest import EncodedPrefix, encode_bytes, encode_file, encode_prefix

if TYPE_CHECKING:
    from daemon.views import BranchView

log = logging.getLogger("daemon.flusher")

ENCODE_AHEAD = 32 << 20  # default step of encoding ahead of the close
MAX_BACKLOG_FILES = 4096  # closed files not yet stored before close() waits
MAX_BACKLOG_BYTES = 256 << 20  # their bytes not stored yet (not counting a head stored ahead)
RETRY_SECONDS = 10.0  # after a failed round, its files are tried again this much later
# Rounds start at most this often unless someone waits: each ends with fsyncs and a
# journal commit, and a writer's creates wait behind those.
ROUND_INTERVAL = 0.05
_LARGE_FILE = 8 << 20  # from this size a file's chunks are encoded by the worker threads
_WORKER_FILE = 64 << 10  # from this size a whole file is encoded by a worker thread
_AHEAD = 8  # files being encoded by workers at once (bounds the bytes read ahead)
_ADD_BATCH = 512  # small files whose blobs are added to the writer at once


@dataclass(eq=False)
class _FileWork:
    """One spool in a round: what was read of it, and what it became."""

    view: BranchView
    spool: SpoolFile
    generation: int
    mode: int
    mtime_ns: int
    must_finish: bool  # someone waits for it: never abandoned for newer writes
    fd: int
    prefix: EncodedPrefix = EncodedPrefix()  # its head, stored before (may be empty)
    ref: str = ""
    size: int = 0

    def superseded(self) -> bool:
        return not self.must_finish and self.spool.generation != self.generation


@dataclass(eq=False)
class _HeadWork:
    """Encoding more of a file that is being written: ``[base.size, end)``."""

    view: BranchView
    spool: SpoolFile
    epoch: int  # the spool's epoch when it was read: the result counts only if unchanged
    base: EncodedPrefix
    end: int
    fd: int
    result: EncodedPrefix | None = None


class Flusher:
    """The background write-back of spools; one per daemon, thread-safe.

    Args:
        store: the open store.
        spool_dir: where spool files live (:attr:`spool_files` hands them out);
            ``<cache>/spool`` by default.
        workers: threads that hash and compress.
        encode_ahead: encode a file written in order while it is being written,
            in steps of this many bytes (0: only once it is closed).
        max_backlog_files: closed files waiting to be stored before :meth:`wait_backlog` blocks.
        max_backlog_bytes: their bytes.
    """

    def __init__(self, store, spool_dir: str | None = None, *, workers: int = 2,
                 encode_ahead: int = ENCODE_AHEAD,
                 max_backlog_files: int = MAX_BACKLOG_FILES,
                 max_backlog_bytes: int = MAX_BACKLOG_BYTES) -> None:
        self.store = store
        self.spool_files = SpoolFiles(spool_dir or os.path.join(store.cache_dir, "spool"))
        self.max_backlog_files = max_backlog_files
        self.encode_ahead = encode_ahead
        self.max_backlog_bytes = max_backlog_bytes
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="vfs-flush")
        self._cond = threading.Condition()
        # Everything below is guarded by _cond. Lock order: a view's lock, then _cond.
        self._queue: dict[SpoolFile, BranchView] = {}
        self._heads: dict[SpoolFile, BranchView] = {}  # files to encode ahead of the close
        self._queued_bytes = 0
        self._busy_files = 0
        self._busy_bytes = 0
        self._waited: set[SpoolFile] = set()
        self._ticket = 0  # bumped by every submit
        self._done = 0  # every submit up to this ticket went through a round
        self._failed: dict[SpoolFile, tuple[BranchView, VfsError]] = {}
        self._retry_at = 0.0
        self._failing: set[str] = set()  # views whose failure was logged
        self._gates: dict[tuple[str, str], threading.Lock] = {}
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="vfs-flusher", daemon=True)

    def start(self) -> None:
        self.spool_files.top_up()
        self._thread.start()

    def close(self) -> None:
        """Store what is queued, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        self._pool.shutdown(wait=True)
        self.spool_files.close()

    # -- for the views and the FUSE layer ---------------------------------------------

    def submit(self, view: BranchView, spool: SpoolFile, *, waited: bool = False) -> int:
        """Queue a spool for the next round (never blocks; the view's lock may be held).

        Returns:
            A ticket: once a round that took the spool is over, ``_done`` is at
            least this (what :meth:`wait_stored` waits for).
        """
        with self._cond:
            self._ticket += 1
            if spool not in self._queue:
                self._queue[spool] = view
                self._queued_bytes += spool.bytes_to_store()
            if waited:
                self._waited.add(spool)
            self._cond.notify_all()
            return self._ticket

    def submit_head(self, view: BranchView, spool: SpoolFile) -> None:
        """Encode more of a file that is being written in order, in the next round
        (the caller set ``spool.head_busy``; never blocks)."""
        with self._cond:
            self._heads[spool] = view
            self._cond.notify_all()

    def backlog_full(self) -> bool:
        with self._cond:
            return self._backlog_full()

    def _backlog_full(self) -> bool:
        return not self._closing and (
            len(self._queue) + self._busy_files > self.max_backlog_files
            or self._queued_bytes + self._busy_bytes > self.max_backlog_bytes)

    def wait_backlog(self) -> None:
        """Block while too many closed files wait to be stored (call without view locks).

        This is what keeps a writer faster than the disk from filling the spool
        directory: its close() calls slow down to the flusher's pace.
        """
        with self._cond:
            while self._backlog_full():
                self._cond.wait()

    def wait_stored(self, view: BranchView, spools: list[SpoolFile], *,
                    durable: bool) -> None:
        """Store and stage the given spools of ``view`` now; return when that is done.

        Call it without the view's lock. With ``durable`` the index is synced too,
        so what is staged survives a power loss (fsync).

        Raises:
            VfsError: storing one of them failed (StoreFull for a full disk); the
                spool stays pending and is retried later.
        """
        ticket = 0
        with view.lock:
            targets = [s for s in spools if s.dirty and view.path_of(s) is not None]
            for spool in targets:
                ticket = self.submit(view, spool, waited=True)
        with self._cond:
            while self._done < ticket:
                if not self._thread.is_alive():
                    raise StoreError("the files written through the mount cannot be stored: "
                                     "vfsd is stopping")
                self._cond.wait(1.0)
            errors = [self._failed[s][1] for s in targets if s in self._failed]
        if errors:
            raise errors[0]
        if durable:
            self.store.index.sync()

    def wait_branch(self, view: BranchView, *, include_open: bool, durable: bool) -> None:
        """Store every closed file of a branch not stored yet (with ``include_open``:
        also files still open, as their bytes are now); see :meth:`wait_stored`."""
        with view.lock:
            spools = [s for s in view.spools.values()
                      if s.dirty and (include_open or s.closed_since_staged)]
        self.wait_stored(view, spools, durable=durable)

    def branch_lock(self, repo: str, branch: str) -> threading.Lock:
        """The lock a commit, discard or rollback of a branch holds: no round stages
        into that branch meanwhile (a commit clears exactly what it sealed)."""
        with self._cond:
            return self._gates.setdefault((repo, branch), threading.Lock())

    # -- the rounds ---------------------------------------------------------------------

    def _run(self) -> None:
        started = 0.0
        while True:
            with self._cond:
                while not self._queue and not self._heads:
                    if self._closing:
                        return
                    if self._failed and time.monotonic() >= self._retry_at:
                        for spool, (view, _) in self._failed.items():
                            self._queue.setdefault(spool, view)
                        self._retry_at = time.monotonic() + RETRY_SECONDS
                        continue
                    timeout = max(0.0, self._retry_at - time.monotonic()) \
                        if self._failed else None
                    self._cond.wait(timeout)
                # Let closes gather into a bigger round, unless someone waits for one.
                while not (self._waited or self._closing or self._backlog_full()):
                    delay = started + ROUND_INTERVAL - time.monotonic()
                    if delay <= 0:
                        break
                    self._cond.wait(delay)
                started = time.monotonic()
                batch, self._queue = self._queue, {}
                heads, self._heads = self._heads, {}
                waited = self._waited & batch.keys()
                self._waited -= waited
                upto = self._ticket
                self._busy_files, self._busy_bytes = len(batch), self._queued_bytes
                self._queued_bytes = 0
            try:
                self._round(batch, waited, heads)
            except Exception:  # a bug: keep the files pending and the daemon serving
                log.exception("storing %d closed files failed", len(batch))
                with self._cond:
                    for spool, view in batch.items():
                        self._failed[spool] = (view, StoreError("internal error"))
                    self._retry_at = time.monotonic() + RETRY_SECONDS
            with self._cond:
                self._done = upto
                self._busy_files = self._busy_bytes = 0
                self._cond.notify_all()
            try:
                self.spool_files.top_up()  # between rounds, off the path of any create
            except OSError as exc:
                log.debug("cannot make spare spool files: %s", exc)

    def _round(self, batch: dict[SpoolFile, BranchView], waited: set[SpoolFile],
               heads: dict[SpoolFile, BranchView]) -> None:
        head_work = self._head_work(heads, batch)
        try:
            jobs = self._jobs(batch, waited)
        except BaseException:
            self._heads_done(head_work, failed=True)
            raise
        if not jobs and not head_work:
            return
        started = time.monotonic()
        with self.store.lock():
            try:
                try:
                    try:
                        writer = self._store_round(jobs, head_work)
                    except StoreChanged as exc:
                        # gc deleted a pack this round deduplicated against; the check
                        # applied the deletion to the index, so a second try stores
                        # those blobs anew (and the heads, which may sit there, whole).
                        log.info("storing again: %s", exc)
                        self._heads_done(head_work, failed=True)
                        for head in head_work:
                            os.close(head.fd)
                        head_work = []
                        for job in jobs:
                            job.prefix, job.ref, job.size = EncodedPrefix(), "", 0
                            os.lseek(job.fd, 0, os.SEEK_SET)
                        writer = self._store_round(jobs, head_work)
                    encoded = time.monotonic()
                    log.debug("round of %d files and %d heads: %d bytes stored, encoded in "
                              "%.3f s, synced in %.3f s", len(jobs), len(head_work),
                              writer.bytes_written, encoded - started,
                              time.monotonic() - encoded)
                finally:
                    for job in jobs:
                        os.close(job.fd)
                    for head in head_work:
                        os.close(head.fd)
            except (VfsError, OSError) as exc:
                self._heads_done(head_work, failed=True)
                if jobs:
                    self._fail(jobs, exc)
                else:
                    log.debug("encoding ahead of the close failed: %s", exc)
                return
            except BaseException:
                self._heads_done(head_work, failed=True)
                raise
            self._heads_done(head_work, failed=False)
            by_view: dict[BranchView, list[_FileWork]] = {}
            for job in jobs:
                if job.ref:
                    by_view.setdefault(job.view, []).append(job)
            for view, view_jobs in by_view.items():
                try:
                    with self.branch_lock(view.repo, view.branch), view.lock:
                        view.stage_stored([StoredSpool(j.spool, j.generation, j.mode,
                                                       j.mtime_ns, j.ref, j.size)
                                           for j in view_jobs])
                except (VfsError, OSError) as exc:
                    self._fail(view_jobs, exc)
                    continue
                self._stored(view, view_jobs)
        # Abandoned for newer writes with no handle left to close: go round again.
        for job in jobs:
            if not job.ref:
                with job.view.lock:
                    if job.spool.dirty and job.spool.writers == 0 and \
                            job.view.path_of(job.spool) is not None:
                        self.submit(job.view, job.spool)

    def _store_round(self, jobs: list[_FileWork], head_work: list[_HeadWork]) -> BlobWriter:
        with self.store.blobs.writer() as writer:
            self._encode_heads(head_work, writer)
            self._encode(jobs, writer)
        return writer

    def _jobs(self, batch: dict[SpoolFile, BranchView], waited: set[SpoolFile]) -> list[_FileWork]:
        jobs = []
        for spool, view in batch.items():
            with view.lock:
                if not spool.dirty or view.path_of(spool) is None:
                    with self._cond:  # stored meanwhile, or deleted: nothing to do
                        self._failed.pop(spool, None)
                    continue
                try:
                    # A file description of our own: its offset is shared with no one,
                    # and it reads the bytes even if the file is deleted meanwhile.
                    fd = os.open(spool.spool_path, os.O_RDONLY)
                except OSError as exc:
                    self._fail([_FileWork(view, spool, 0, 0, 0, False, -1)], exc)
                    continue
                jobs.append(_FileWork(view, spool, spool.generation, spool.mode, spool.mtime_ns,
                                 spool in waited, fd, spool.valid_head()))
        return jobs

    # -- encoding ahead of the close ------------------------------------------------------

    def _head_work(self, heads: dict[SpoolFile, BranchView],
                   batch: dict[SpoolFile, BranchView]) -> list[_HeadWork]:
        """What to encode ahead: every queued head whose file is not stored whole in
        this round anyway. Marks the bytes it will read as protected."""
        out = []
        for spool, view in heads.items():
            with view.lock:
                base = spool.valid_head()
                end = spool.seq_end
                if spool in batch or view.path_of(spool) is None or \
                        end - base.size < self.encode_ahead // 2:
                    spool.head_busy = False
                    continue
                try:
                    fd = os.open(spool.spool_path, os.O_RDONLY)
                except OSError as exc:
                    log.debug("cannot read %s ahead of its close: %s", spool.spool_path, exc)
                    spool.head_busy = False
                    continue
                # From here a write below ``end`` makes what is encoded now useless
                # (the FUSE thread checks ``protected`` after each write).
                spool.protected = end
                out.append(_HeadWork(view, spool, spool.epoch, base, end, fd))
        return out

    def _encode_heads(self, head_work: list[_HeadWork], writer: BlobWriter) -> None:
        for head in head_work:
            if head.spool.epoch != head.epoch:
                continue  # rewritten meanwhile: the next close encodes it whole
            try:
                head.result = encode_prefix(self.store, head.fd, head.base, head.end, writer,
                                            pool=self._pool)
            except OSError as exc:  # the close stores the file whole, and reports errors
                log.debug("encoding %s ahead of its close failed: %s", head.spool.path, exc)

    def _heads_done(self, head_work: list[_HeadWork], *, failed: bool) -> None:
        """Record the heads made in a round (their packs are durable and indexed)."""
        for head in head_work:
            view, spool = head.view, head.spool
            with view.lock:
                spool.head_busy = False
                if spool.epoch != head.epoch:
                    continue  # rewritten meanwhile; the FUSE thread reset ``protected``
                result = None if failed else head.result
                if result is not None:
                    spool.head, spool.head_epoch = result, head.epoch
                    log.debug("%s: %d bytes stored ahead", spool.path, result.size)
                spool.protected = spool.valid_head().size
                if result is not None and view.path_of(spool) is not None and \
                        spool.wants_head(self.encode_ahead):
                    spool.head_busy = True  # written on meanwhile
                    self.submit_head(view, spool)

    def _encode(self, jobs: list[_FileWork], writer: BlobWriter) -> None:
        """Encode every job's file; small ones by worker threads, in order."""
        store = self.store
        ahead: deque[tuple[_FileWork, Future[tuple[str, list, int]]]] = deque()
        small: list[tuple[_FileWork, tuple[str, list, int]]] = []

        def add_small() -> None:
            writer.add_many([blob for _, (_, blobs, _) in small for blob in blobs])
            for job, (ref, _, size) in small:
                job.ref, job.size = ref, size
            small.clear()

        def collect(limit: int) -> None:
            while len(ahead) > limit:
                job, future = ahead.popleft()
                small.append((job, future.result()))
            if len(small) >= _ADD_BATCH or limit == 0:
                add_small()

        for job in jobs:
            size = os.fstat(job.fd).st_size
            if size >= _LARGE_FILE or job.prefix.size:
                collect(0)
                prefix = job.prefix
                if prefix.size and \
                        len(store.index.has_blobs(prefix.hashes)) < len(set(prefix.hashes)):
                    prefix = EncodedPrefix()  # collected meanwhile (it was written long ago)
                if prefix.size:
                    log.debug("storing %s from byte %d (the bytes before were stored "
                              "ahead)", job.spool.path, prefix.size)
                result = encode_file(store, job.fd, writer, pool=self._pool,
                                     stop=job.superseded, prefix=prefix)
                if result is not None:
                    job.ref, job.size = result
            elif size >= _WORKER_FILE:
                ahead.append((job, self._pool.submit(_read_and_encode, store, job.fd, size)))
                collect(_AHEAD)
            else:
                small.append((job, _read_and_encode(store, job.fd, size)))
                collect(_AHEAD)
        collect(0)

    def _stored(self, view: BranchView, jobs: list[_FileWork]) -> None:
        with self._cond:
            for job in jobs:
                self._failed.pop(job.spool, None)
            if view.name in self._failing and not any(v is view for v, _ in
                                                      self._failed.values()):
                self._failing.discard(view.name)
                log.info("files written to %s are stored again", view.name)

    def _fail(self, jobs: list[_FileWork], exc: BaseException) -> None:
        error = _as_vfs_error(exc)
        with self._cond:
            for job in jobs:
                self._failed[job.spool] = (job.view, error)
            self._retry_at = time.monotonic() + RETRY_SECONDS
            names = sorted({job.view.name for job in jobs} - self._failing)
            self._failing.update(names)
        if names:
            log.error("could not store %d closed files written to %s (kept, retried every "
                      "%g s; fsync and commit fail until it works): %s", len(jobs),
                      ", ".join(names), RETRY_SECONDS, error)
        else:
            log.debug("storing %d closed files failed again: %s", len(jobs), error)


def _read_and_encode(store, fd: int, size: int) -> tuple[str, list, int]:
    data = os.pread(fd, size, 0)
    ref, blobs = encode_bytes(store, data)
    return ref, blobs, len(data)


def _as_vfs_error(exc: BaseException) -> VfsError:
    """The error a waiter gets: a VfsError whose errno the FUSE layer returns."""
    if isinstance(exc, VfsError):
        return exc
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return StoreFull(f"no space left on the device while storing written files: {exc}")
    error = StoreError(f"storing written files failed: {exc}")
    if isinstance(exc, OSError) and exc.errno:
        error.errno = exc.errno  # type: ignore[misc]
    return error


__all__ = ["Flusher"]
