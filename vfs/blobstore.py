"""Reading and writing blobs through packs, deduplicated by the local index.

:class:`BlobStore` reads one blob (ranged get of its pack, decompress, verify) and
keeps decoded trees and manifests in a small LRU. :class:`BlobWriter` packs new
blobs: it skips blobs the index or the current session already has, seals a pack
when it reaches the store's target size, and uploads sealed packs in background
threads (at most ``max_inflight`` at once, which bounds memory). A pack is
recorded in the index only after the store confirmed both the pack and its index
object (step 1 of the commit protocol), so the index never names a missing pack.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from vfs.blobs import (
    BlobCodec,
    BlobKind,
    BlobLocation,
    EncodedBlob,
    PackBuilder,
    PackParts,
    SealedPack,
    index_key,
    pack_key,
    read_stored_index,
)
from vfs.config import StoreConfig
from vfs.errors import Corruption, ObjectNotFound, StoreChanged, StoreError
from vfs.gclog import GcFollower, GcView
from vfs.index import Index
from vfs.objstore.base import ObjectStore

_METADATA_CACHE_BYTES = 64 * 1024 * 1024
_CHECKPOINT_PACKS = 16  # packs (~256 MiB) between two checkpoints of a long write

_log = logging.getLogger(__name__)


class BlobStore:
    """Blob-level access to a store: read by hash, write through :class:`BlobWriter`."""

    def __init__(self, objects: ObjectStore, index: Index, config: StoreConfig) -> None:
        self.objects = objects
        self.index = index
        self.config = config
        self.codec = BlobCodec(config.compression_level)
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._cache_bytes = 0
        self._cache_lock = threading.Lock()
        self.gc = GcFollower(objects, index)
        #: Called before a writer first relies on its view of gc (the Store makes the
        #: node's record active there: docs/format.md §10.2).
        self.before_check: Callable[[], None] = lambda: None
        self._unusable_packs: set[bytes] = set()  # found damaged by learn_new_packs
        self._learning = threading.Lock()

    def has(self, digest: bytes) -> bool:
        """True if the blob is stored and not known to be damaged (see ``read``)."""
        return bool(self.index.has_blobs((digest,)))

    def read(self, digest: bytes, *, cache: bool = False) -> bytes:
        """Return a blob's verified bytes.

        Args:
            digest: the blob's hash.
            cache: keep the result in the in-memory LRU (trees and manifests).

        Raises:
            Corruption: the blob is unknown, its pack is missing, or its bytes are damaged.
        """
        if cache:
            with self._cache_lock:
                hit = self._cache.get(digest)
                if hit is not None:
                    self._cache.move_to_end(digest)
                    return hit
        location = self.index.blob_location(digest)
        if location is None:
            # Always look again: another thread may have been indexing the pack that
            # holds it while this one listed (learn_new_packs then learns nothing).
            self.learn_new_packs()
            location = self.index.blob_location(digest)
        if location is None:
            raise Corruption(
                f"blob {digest.hex()} is not in the local index: the store lost data or the "
                "index is stale (run 'vfsctl index rebuild', then 'vfsctl fsck')"
            )
        try:
            stored = self._fetch(digest, location)
        except Corruption:
            # gc may have deleted or repacked it: follow the log, learn new packs,
            # and look again before calling it lost (docs/format.md §10.3).
            self.gc.sync()
            self.learn_new_packs()
            moved = self.index.blob_location(digest)
            if moved is None or moved == location:
                raise
            location = moved
            stored = self._fetch(digest, location)
        try:
            data = self.codec.decode(digest, location, stored)
        except Corruption:
            if not self._found_damaged(digest, location.pack_id):
                raise
            return self.read(digest, cache=cache)
        if cache:
            self._remember(digest, data)
        return data

    def _fetch(self, digest: bytes, location: BlobLocation) -> bytes:
        """The stored bytes of a blob at ``location``.

        Raises:
            Corruption: its pack is missing from the store.
        """
        try:
            return self.objects.get_range(
                pack_key(location.pack_id), location.offset, location.stored_len)
        except ObjectNotFound:
            raise Corruption(
                f"pack {location.pack_id.hex()} holding blob {digest.hex()} is missing "
                "from the store (run 'vfsctl fsck')") from None

    def learn_new_packs(self) -> int:
        """Index packs that other nodes (or an interrupted rebuild) stored; return how many.

        Each node's index learns its own packs as it writes them; packs written
        elsewhere are found here, by listing ``index/`` and reading the new ones.
        """
        with self._learning:  # one at a time: a pack half indexed is not "known"
            return self._learn_new_packs()

    def _learn_new_packs(self) -> int:
        known = self.index.packs()
        learned = 0
        for info in self.objects.list("index/"):
            pack_id = bytes.fromhex(info.key.split("/", 1)[1])
            if pack_id in known or pack_id in self._unusable_packs:
                continue
            try:
                size, entries = read_stored_index(self.objects, pack_id)
            except ObjectNotFound:
                continue  # deleted meanwhile, or its pack never arrived
            except Corruption as exc:
                # Packs are immutable: it stays damaged, so say it once and stop asking.
                self._unusable_packs.add(pack_id)
                _log.warning("not indexing %s: %s (run 'vfsctl fsck')", info.key, exc)
                continue
            self.index.add_pack(pack_id, size, [e.location(pack_id) for e in entries],
                                [e.hash for e in entries])
            learned += 1
        return learned

    def _found_damaged(self, digest: bytes, pack_id: bytes) -> bool:
        """Record that the blob's copy in ``pack_id`` is bad; return True if the index
        now reads it from another pack (one a node stored since: read that instead).

        Recording it makes the next put of these bytes store them again rather than
        deduplicate onto the bad copy (:meth:`Index.has_blobs`).
        """
        # Both steps are extras: if either fails (a full index disk, an unreachable
        # store), the caller must still hear of the corruption, not of this.
        try:
            self.index.mark_damaged(digest, pack_id)
        except StoreError:
            pass
        try:
            self.learn_new_packs()
        except StoreError:
            return False
        location = self.index.blob_location(digest)
        return location is not None and location.pack_id != pack_id

    def _remember(self, digest: bytes, data: bytes) -> None:
        if len(data) > _METADATA_CACHE_BYTES // 4:
            # A huge tree (a directory of a million files is ~60 MB) would evict
            # everything else; its decoded form is cached by whoever decodes it.
            return
        with self._cache_lock:
            if digest in self._cache:
                return
            self._cache[digest] = data
            self._cache_bytes += len(data)
            while self._cache_bytes > _METADATA_CACHE_BYTES and self._cache:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= len(old)

    def writer(self, *, max_inflight: int = 2) -> BlobWriter:
        return BlobWriter(self, max_inflight=max_inflight)

    def gc_view(self) -> GcView:
        """This node's fresh view of gc, for a write about to rely on it (the node's
        record is made active first: docs/format.md §10.2)."""
        self.before_check()
        return self.gc.sync()

    def check_packs(self, used: dict[bytes, set[bytes]]) -> tuple[GcView, dict[bytes, set[bytes]]]:
        """The *check* of docs/format.md §10.4 for packs a write used.

        Args:
            used: pack id -> the blobs the write took from that pack.

        Returns:
            The node's fresh view of gc, and the used packs that are condemned.

        Raises:
            StoreChanged: a used pack was deleted by gc already; the write must be
                done again (the index no longer offers that pack).
        """
        view = self.gc_view()
        present = self.index.known_packs(used)
        gone = [p for p in used if p not in present]
        if gone:
            raise StoreChanged(
                f"pack {gone[0].hex()} was deleted by gc while this write used it: "
                "run the command again")
        condemned = {p: blobs for p, blobs in used.items() if p.hex() in view.condemned_packs}
        return view, condemned


class BlobWriter:
    """Packs new blobs and uploads them; use as a context manager or call close().

    Packs are uploaded by background threads with the store's *deferred* put (for
    the local store: no fsync per object), and become durable together at the
    next checkpoint: :meth:`flush`, or every ``_CHECKPOINT_PACKS`` packs. A
    checkpoint waits for the uploads, makes them durable with the store's
    ``sync()`` and only then records the packs in the index, so the index never
    names a pack that a crash could lose (step 1 of the commit protocol). One
    ``sync()`` per checkpoint (the local store's issues the fsyncs of all those
    objects at once) instead of two fsyncs per pack, each waited for in turn, is
    what lets a put run at the disk's speed.
    """

    def __init__(self, blobs: BlobStore, *, max_inflight: int = 3) -> None:
        self.blobs = blobs
        self._builder = PackBuilder()
        self._target = blobs.config.pack_target_size
        self._pool = ThreadPoolExecutor(max_inflight, thread_name_prefix="vfs-upload")
        self._slots = threading.Semaphore(max_inflight)
        self._inflight: list[Future[SealedPack]] = []
        self._pending: set[bytes] = set()  # in a sealed pack not yet indexed
        self._lock = threading.Lock()
        self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="vfs-checkpoint")
        self._checkpoints: list[Future[None]] = []
        self.bytes_written = 0
        # pack id -> blobs this session took from it (deduplicated or written), for
        # the check before the result is published (docs/format.md §10.4).
        self._used: dict[bytes, set[bytes]] = {}
        self._used_lock = threading.Lock()

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(flush=exc[0] is None)

    def has(self, digest: bytes) -> bool:
        """True if the blob is stored, in flight, or in the current pack."""
        if digest in self._builder:
            return True
        with self._lock:
            if digest in self._pending:
                return True
        return self.blobs.has(digest)

    def add(self, blob: EncodedBlob, *, force: bool = False) -> bool:
        """Add an encoded blob unless it is already stored; return True if added.

        ``force`` writes it even if the index knows it elsewhere (repacking).
        """
        self._raise_failed_upload()
        if blob.hash in self._builder:
            return False
        if not force:
            if self._in_flight(blob.hash):
                return False
            located = self.blobs.index.blob_packs((blob.hash,))  # not if damaged
            if located:
                self._note(located)
                return False
        self._builder.add(blob)
        if len(self._builder) >= self._target:
            self._seal()
            if len(self._inflight) >= _CHECKPOINT_PACKS:
                self._checkpoint(wait=False)
        return True

    def add_many(self, blobs: list[EncodedBlob]) -> None:
        """Add several blobs, asking the index about all of them in one transaction
        (one lookup each would hand the GIL back and forth thousands of times)."""
        self._raise_failed_upload()
        known = self.blobs.index.blob_packs([b.hash for b in blobs])
        self._note(known)
        for blob in blobs:
            if blob.hash in known or blob.hash in self._builder:
                continue
            with self._lock:
                if blob.hash in self._pending:
                    continue
            self._builder.add(blob)
            if len(self._builder) >= self._target:
                self._seal()
                if len(self._inflight) >= _CHECKPOINT_PACKS:
                    self._checkpoint(wait=False)

    def _in_flight(self, digest: bytes) -> bool:
        with self._lock:
            return digest in self._pending

    def _note(self, located: dict[bytes, bytes]) -> None:
        """Remember blobs this session deduplicated against (blob -> pack id)."""
        if not located:
            return
        with self._used_lock:
            for digest, pack_id in located.items():
                self._used.setdefault(pack_id, set()).add(digest)

    def used(self) -> dict[bytes, set[bytes]]:
        """pack id -> the blobs this session took from it (deduplicated or written)."""
        with self._used_lock:
            return {p: set(b) for p, b in self._used.items()}

    def note_used(self, digests: list[bytes]) -> None:
        """Count blobs reused without passing through :meth:`add` (a files-cache hit)."""
        self._note(self.blobs.index.blob_packs(digests))

    def add_bytes(self, kind: BlobKind, data: bytes) -> bytes:
        """Encode and add one blob in the calling thread; return its hash."""
        blob = self.blobs.codec.encode(kind, data)
        self.add(blob)
        return blob.hash

    def flush(self) -> None:
        """Seal the current pack; return once every pack is durable and indexed and
        every pack this session used passed the check (docs/format.md §10.4)."""
        self._store_all()
        for _ in range(3):
            _, condemned = self.blobs.check_packs(self.used())
            if not condemned:
                return
            # Still present (a condemnation is carried out only once this node has
            # acknowledged it): write those blobs again, in a new pack.
            for pack_id, digests in condemned.items():
                for digest in digests:
                    location = self.blobs.index.blob_location(digest)
                    if location is None or location.pack_id != pack_id:
                        continue  # already stored elsewhere by this session
                    data = self.blobs.read(digest)
                    self.add(self.blobs.codec.encode(location.kind, data), force=True)
                with self._used_lock:
                    self._used.pop(pack_id, None)
            # The same blobs alone would make a byte-identical pack, under the condemned
            # pack's name: one random unreferenced blob gives the new pack its own.
            self.add(self.blobs.codec.encode(BlobKind.CHUNK, os.urandom(32)), force=True)
            self._store_all()
        raise StoreChanged("gc keeps condemning the packs this write uses: run it again")

    def _store_all(self) -> None:
        if self._builder.blob_count:
            self._seal()
        self._checkpoint()

    def close(self, *, flush: bool = True) -> None:
        try:
            if flush:
                self.flush()
        finally:
            self._pool.shutdown(wait=True)
            self._checkpointer.shutdown(wait=True)
            if not flush:
                with self._lock:
                    self._pending.clear()

    def _raise_failed_upload(self) -> None:
        for future in [*self._inflight, *self._checkpoints]:
            if future.done() and future.exception() is not None:
                future.result()

    def _checkpoint(self, *, wait: bool = True) -> None:
        """Make the uploaded packs durable and index them.

        With ``wait=False`` (a checkpoint in the middle of a long write) the work
        runs in the background so reading and packing go on meanwhile; ``flush``
        waits for every checkpoint.
        """
        batch, self._inflight = self._inflight, []
        if batch:
            self._checkpoints.append(self._checkpointer.submit(self._record, batch))
        if wait:
            checkpoints, self._checkpoints = self._checkpoints, []
            for checkpoint in checkpoints:
                checkpoint.result()

    def _record(self, batch: list[Future[SealedPack]]) -> None:
        sealed_packs = [future.result() for future in batch]
        self.blobs.objects.sync()
        with self.blobs.index.write() as txn:
            for sealed in sealed_packs:
                self.blobs.index.add_pack_txn(
                    txn, sealed.pack_id, sealed.size,
                    [e.location(sealed.pack_id) for e in sealed.entries],
                    [e.hash for e in sealed.entries], written=True)
        with self._lock:
            for sealed in sealed_packs:
                self._pending.difference_update(e.hash for e in sealed.entries)
        self._note({e.hash: s.pack_id for s in sealed_packs for e in s.entries})

    def _seal(self) -> None:
        sealed = self._builder.seal_parts()
        self._builder = PackBuilder()
        with self._lock:
            self._pending.update(e.hash for e in sealed.entries)
        self._slots.acquire()  # bound the packs held in memory
        try:
            self._inflight.append(self._pool.submit(self._upload, sealed))
        except BaseException:
            self._slots.release()
            raise

    def _upload(self, sealed: PackParts) -> SealedPack:
        try:
            objects = self.blobs.objects
            try:
                pack_id = sealed.pack_id()  # hashing here keeps it off the caller's thread
                objects.put_deferred(pack_key(pack_id), sealed.parts)
                objects.put_deferred(index_key(pack_id), sealed.index)
            except BaseException:
                # Nothing of this pack may count as stored: later writers re-add its blobs.
                with self._lock:
                    self._pending.difference_update(e.hash for e in sealed.entries)
                raise
            with self._lock:
                self.bytes_written += sealed.size
            # Keep no bytes: only the index entries are needed until the checkpoint.
            return SealedPack(pack_id, b"", sealed.index, sealed.entries, size=sealed.size)
        finally:
            self._slots.release()
