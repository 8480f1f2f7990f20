"""The node-local LMDB index: the only module that opens LMDB.

The index makes every lookup local: which pack holds a blob, the commit objects
already read, the branch heads last seen, the open commits (staging) of this
node and the files cache. Everything except the open commits and the files cache
can be rebuilt from the object store (:meth:`Index.clear_rebuildable` followed
by loading every ``index/<pack>`` object); see ``vfsctl index rebuild``.

This docstring is the canonical reference for the on-disk schema. One LMDB
environment per store lives at ``<cache dir>/<store id>/index.lmdb``. Named
databases, their keys and values:

``meta``
    ASCII key -> value. ``store_id`` -> the store's id (ASCII); guards against
    pointing a cache directory at another store. ``format`` -> b"1".
    ``reflog_next/<repo>`` -> the next reflog number this node expects (a hint).
    ``node_state`` -> JSON ``{"state", "gc_seen", "pins"}``: this node's record as
    last published (docs/format.md §10.2). ``gc_log`` -> the number of the last
    ``gc/deleted/<seq>`` entry applied to this index (ASCII decimal); it is reset
    with the rebuildable databases, since a rebuild reads the packs as they are.

``blobs``
    blob hash (32 bytes) -> blob location, 46 bytes:
    ``pack_id:32 kind:u8 compression:u8 offset:u32 stored_len:u32 plain_len:u32``
    (little-endian). Invariant: the pack exists in the store and its index lists
    the blob at that offset. Written only after the pack and its index are stored.

``packs``
    pack id (32 bytes) -> ``size:u64 blob_count:u32`` (little-endian): every pack
    this node knows, for gc and fsck.

``damaged``
    blob hash (32 bytes) -> pack id (32 bytes): the blob's copy in that pack failed
    verification on this node (a read, or ``fsck --deep``). Recorded only while the
    blob's location in ``blobs`` is in that pack. A blob whose location is in the
    pack its ``damaged`` row names is *not stored* for deduplication
    (:meth:`Index.has_blobs`), so the next put of its bytes stores it again.
    Indexing the pack that put wrote repairs the blob: a pack of another id moves the
    location there; a pack of the same id (the same blobs packed again) replaced the
    damaged object, and the row goes. Otherwise the row stays until its pack is
    forgotten (:meth:`Index.remove_pack_txn`): while it names a pack other than the
    location's it is inert, and it keeps an index rebuild, which meets packs in any
    order, from moving the location back onto the bad copy. Kept by
    :meth:`Index.clear_rebuildable`: damage is found only by reading bytes, and a
    store listing cannot tell it again.

``commits``
    commit id (32 bytes) -> the commit object's bytes exactly as stored at
    ``commits/<id>``. A cache of immutable objects; also lets a unique id prefix
    be resolved with a cursor range scan.

``staging``
    ``repo NUL branch NUL path`` (UTF-8; path relative, no leading slash, "" for
    the root) -> a staged change, JSON: a tree entry (see :mod:`vfs.tree`) or
    ``{"deleted": true}``. A key over LMDB's 511 bytes is kept as its first 400
    bytes, 0xFF and its 32-byte BLAKE3 hash, and its value is then ``NUL path NUL``
    followed by the change. The open commit of each branch on this node. Not
    rebuildable: it lives only here until it is sealed into a commit.

``staging_base``
    ``repo NUL branch`` -> the commit id (hex, or empty) the open commit was
    started on, so a commit notices when the branch moved under it.

``sealing``
    ``repo NUL branch`` -> commit id (hex) being sealed: set after the commit
    object is stored and before the ref's compare-and-swap (for a commit of a
    given tree, such as a rollback, only when recording it failed after the swap),
    cleared once the commit is recorded. Finding it means a commit was interrupted;
    if the branch head is that commit, its reflog entry is recorded if missing and
    the staged changes the commit contains are unstaged (later ones stay).

``files``
    absolute source path (UTF-8) -> JSON ``[size, mtime_ns, ctime_ns, inode, entry]``:
    the files cache of ``put``. A file whose stat matches is not read again. A
    path over 511 bytes is keyed like a long staging key (first 400 bytes, 0xFF,
    BLAKE3 hash).

A write transaction never spans I/O to the object store: callers upload first,
then record in one short transaction.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import blake3
import lmdb

from vfs.blobs import BlobKind, BlobLocation, Compression
from vfs.errors import Locked, StoreError, StoreFull

_LOCATION = struct.Struct("<32sBBIII")
_PACK = struct.Struct("<QI")
_DATABASES = (
    b"meta", b"blobs", b"packs", b"damaged", b"commits", b"staging", b"staging_base",
    b"sealing", b"files",
)
_REBUILDABLE = (b"blobs", b"packs", b"commits")
_MAP_SIZE = 1 << 40  # address space only; the file grows as needed
_FULL_BELOW = 1 << 20  # free bytes under which a failed write is put down to a full disk


def encode_location(loc: BlobLocation) -> bytes:
    return _LOCATION.pack(
        loc.pack_id, loc.kind, loc.compression, loc.offset, loc.stored_len, loc.plain_len
    )


def decode_location(value: bytes) -> BlobLocation:
    pack_id, kind, comp, offset, stored_len, plain_len = _LOCATION.unpack(value)
    return BlobLocation(
        pack_id, BlobKind(kind), Compression(comp), offset, stored_len, plain_len
    )


# LMDB keys are at most 511 bytes. A longer staging or files-cache key is stored as
# its first _KEPT bytes, 0xFF and its BLAKE3 hash, and (staging) its value carries
# the path: NUL, path, NUL, then the change. Range scans by prefix still work.
_MAX_KEY = 511
_KEPT = 400


def _fit(key: bytes) -> bytes:
    if len(key) <= _MAX_KEY:
        return key
    return key[:_KEPT] + b"\xff" + blake3.blake3(key).digest()


def staging_key(repo: str, branch: str, path: str) -> bytes:
    return _fit(f"{repo}\0{branch}\0{path}".encode())


def _staged_item(prefix: bytes, key: bytes, value: bytes) -> tuple[str, bytes]:
    """(path, change) of a staging row whose key starts with ``prefix``."""
    if value[:1] == b"\0":  # a long path: it is in the value
        path, _, change = value[1:].partition(b"\0")
        return path.decode(), change
    return key[len(prefix):].decode(), value


def staging_prefix(repo: str, branch: str) -> bytes:
    return f"{repo}\0{branch}\0".encode()


@dataclass(frozen=True)
class NodeState:
    """This node's record as last published (see vfs/nodes.py)."""

    state: str = ""
    gc_seen: int = 0
    pins: str | None = None


class Index:
    """The LMDB environment of one store on this node."""

    def __init__(self, directory: str, store_id: str, *, durable: bool = True) -> None:
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "index.lmdb")
        try:
            self.env = lmdb.open(
                self.path,
                map_size=_MAP_SIZE,
                max_dbs=len(_DATABASES) + 2,
                subdir=True,
                max_readers=256,
                # Without per-transaction fsync (the daemon) a process crash loses
                # nothing (the OS has the pages); callers sync() at durability points.
                sync=durable,
                metasync=durable,
            )
        except lmdb.LockError as exc:
            raise Locked(f"the index at {self.path} is locked: {exc}") from exc
        except lmdb.Error as exc:
            raise StoreError(f"cannot open the index at {self.path}: {exc}") from exc
        self.db = {name.decode(): self.env.open_db(name) for name in _DATABASES}
        with self.env.begin(write=True) as txn:
            meta = self.db["meta"]
            existing = txn.get(b"store_id", db=meta)
            if existing is None:
                txn.put(b"store_id", store_id.encode(), db=meta)
                txn.put(b"format", b"1", db=meta)
            elif existing.decode() != store_id:
                raise StoreError(
                    f"the index at {self.path} belongs to store {existing.decode()}, "
                    f"not {store_id}: use another --cache directory"
                )

    def close(self) -> None:
        self.env.close()

    def sync(self) -> None:
        """Force everything written so far to disk.

        Raises:
            StoreError: the disk holding the index failed (or is full).
        """
        try:
            self.env.sync(True)
        except lmdb.Error as exc:
            if _disk_full(self.path):
                raise StoreFull(f"no space left to sync the local index at {self.path}: "
                                f"{exc}") from exc
            raise StoreError(f"cannot sync the local index at {self.path}: {exc}") from exc

    @contextmanager
    def write(self) -> Iterator[lmdb.Transaction]:
        """One write transaction; it must not span object store I/O or an ``await``.

        Raises:
            StoreFull: the disk holding the index is full (the transaction is undone).
            StoreError: any other LMDB failure.
        """
        try:
            with self.env.begin(write=True) as txn:
                yield txn
        except lmdb.DiskError as exc:
            raise StoreFull(f"no space left for the local index at {self.path}: {exc}") from exc
        except lmdb.MapFullError as exc:
            raise StoreFull(f"the local index at {self.path} is full: {exc}") from exc
        except lmdb.Error as exc:
            # LMDB reports a write the full disk cut short as an I/O error.
            if "No space left" in str(exc) or _disk_full(self.path):
                raise StoreFull(f"no space left for the local index at {self.path}: "
                                f"{exc}") from exc
            raise StoreError(f"the local index at {self.path} failed: {exc}") from exc

    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        with self.env.begin(buffers=False) as txn:
            yield txn

    # -- blobs and packs ---------------------------------------------------------

    def blob_location(self, digest: bytes) -> BlobLocation | None:
        with self.env.begin() as txn:
            value = txn.get(digest, db=self.db["blobs"])
        return decode_location(value) if value is not None else None

    def has_blobs(self, digests: Iterable[bytes]) -> set[bytes]:
        """Return the subset of ``digests`` that the index knows, less damaged blobs."""
        return set(self.blob_packs(digests))

    def mark_damaged(self, digest: bytes, pack_id: bytes) -> bool:
        """Record that the blob's copy in ``pack_id`` failed verification.

        Returns:
            True if recorded; False if the index reads the blob from another pack
            (already re-stored) or does not know it.
        """
        with self.write() as txn:
            location = txn.get(digest, db=self.db["blobs"])
            if location is None or location[:32] != pack_id:
                return False
            txn.put(digest, pack_id, db=self.db["damaged"])
            return True

    def damaged(self) -> dict[bytes, bytes]:
        """Every ``damaged`` row: blob hash -> the pack where its copy is bad."""
        with self.env.begin() as txn:
            return {bytes(k): bytes(v)
                    for k, v in txn.cursor(db=self.db["damaged"]).iternext()}

    def add_pack(self, pack_id: bytes, size: int, locations: Iterable[BlobLocation],
                 hashes: Iterable[bytes], *, written: bool = False) -> None:
        """Record a stored pack and all its blobs (after the store confirmed both)."""
        with self.write() as txn:
            self.add_pack_txn(txn, pack_id, size, locations, hashes, written=written)

    def add_pack_txn(self, txn: lmdb.Transaction, pack_id: bytes, size: int,
                     locations: Iterable[BlobLocation], hashes: Iterable[bytes], *,
                     written: bool = False) -> None:
        """Record a pack and its blobs inside ``txn``.

        Args:
            written: this node has just stored the pack, so every copy in it is good,
                even under the id of a pack known damaged (the put replaced that
                object): its ``damaged`` rows go. A pack found by listing the store
                (``written=False``) does not take a blob's location away from a good
                copy onto one known bad.
        """
        blobs = self.db["blobs"]
        damaged = self.db["damaged"] if txn.stat(self.db["damaged"])["entries"] else None
        count = 0
        for digest, loc in zip(hashes, locations, strict=True):
            count += 1
            if damaged is not None and txn.get(digest, db=damaged) == pack_id:
                if written:
                    txn.delete(digest, db=damaged)
                elif _read_elsewhere(txn, digest, pack_id, blobs):
                    continue
            txn.put(digest, encode_location(loc), db=blobs)
        txn.put(pack_id, _PACK.pack(size, count), db=self.db["packs"])

    def remove_pack_txn(self, txn: lmdb.Transaction, pack_id: bytes) -> None:
        """Forget a pack and every blob whose recorded location is in it."""
        self.remove_packs_txn(txn, {pack_id})

    def remove_packs_txn(self, txn: lmdb.Transaction, pack_ids: set[bytes]) -> None:
        """Forget packs and every blob located in one of them (one pass over the blobs)."""
        if not pack_ids:
            return
        blobs = self.db["blobs"]
        cursor = txn.cursor(db=blobs)
        doomed = [bytes(k) for k, v in cursor.iternext() if bytes(v[:32]) in pack_ids]
        for k in doomed:
            txn.delete(k, db=blobs)
        for pack_id in pack_ids:
            txn.delete(pack_id, db=self.db["packs"])
        _delete_prefix(txn, self.db["damaged"], b"", where=lambda _, bad: bad in pack_ids)

    def blob_packs(self, digests: Iterable[bytes]) -> dict[bytes, bytes]:
        """blob hash -> pack id, for the given blobs the index knows (less damaged ones,
        like :meth:`has_blobs`: deduplication must store those again)."""
        db, damaged = self.db["blobs"], self.db["damaged"]
        out = {}
        with self.env.begin() as txn:
            # The usual case, nothing damaged: one lookup per blob.
            check = txn.stat(damaged)["entries"] > 0
            for d in digests:
                value = txn.get(d, db=db)
                if value is not None and not (check and txn.get(d, db=damaged) == value[:32]):
                    out[d] = bytes(value[:32])
        return out

    def known_packs(self, pack_ids: Iterable[bytes]) -> set[bytes]:
        """The subset of ``pack_ids`` the index knows."""
        db = self.db["packs"]
        with self.env.begin() as txn:
            return {p for p in pack_ids if txn.get(p, db=db) is not None}

    def packs(self) -> dict[bytes, tuple[int, int]]:
        """Every known pack: id -> (size, blob count)."""
        with self.env.begin() as txn:
            return {
                bytes(k): _PACK.unpack(v)
                for k, v in txn.cursor(db=self.db["packs"]).iternext()
            }

    def iter_blobs(self) -> Iterator[tuple[bytes, BlobLocation]]:
        with self.env.begin() as txn:
            for k, v in txn.cursor(db=self.db["blobs"]).iternext():
                yield bytes(k), decode_location(v)

    def clear_rebuildable(self) -> None:
        """Drop everything that can be rebuilt from the object store."""
        with self.write() as txn:
            for name in _REBUILDABLE:
                txn.drop(self.db[name.decode()], delete=False)
            txn.delete(b"gc_log", db=self.db["meta"])

    # -- this node in the store (gc protocol) ------------------------------------------

    def node_state(self) -> NodeState:
        with self.env.begin() as txn:
            value = txn.get(b"node_state", db=self.db["meta"])
        if value is None:
            return NodeState()
        raw = json.loads(value)
        return NodeState(raw["state"], raw["gc_seen"], raw["pins"])

    def set_node_state(self, state: str, gc_seen: int, pins: str | None) -> None:
        with self.write() as txn:
            txn.put(b"node_state", json.dumps({"state": state, "gc_seen": gc_seen,
                                               "pins": pins}).encode(), db=self.db["meta"])

    def gc_log_cursor(self) -> int:
        with self.env.begin() as txn:
            value = txn.get(b"gc_log", db=self.db["meta"])
        return int(value) if value is not None else 0

    def set_gc_log_cursor(self, seq: int) -> None:
        with self.write() as txn:
            txn.put(b"gc_log", str(seq).encode(), db=self.db["meta"])

    # -- commits -------------------------------------------------------------------

    def cached_commit(self, commit_id: bytes) -> bytes | None:
        with self.env.begin() as txn:
            return txn.get(commit_id, db=self.db["commits"])

    def cache_commit(self, commit_id: bytes, data: bytes) -> None:
        with self.write() as txn:
            self.cache_commit_txn(txn, commit_id, data)

    def cache_commit_txn(self, txn: lmdb.Transaction, commit_id: bytes, data: bytes) -> None:
        txn.put(commit_id, data, db=self.db["commits"])

    def forget_commits_txn(self, txn: lmdb.Transaction, commit_ids: Iterable[str]) -> None:
        """Drop cached commit objects that gc deleted from the store."""
        for commit_id in commit_ids:
            txn.delete(bytes.fromhex(commit_id), db=self.db["commits"])

    def reflog_hint(self, repo: str) -> int | None:
        """The reflog number this node expects next in ``repo`` (None: list to find it)."""
        with self.env.begin() as txn:
            value = txn.get(f"reflog_next/{repo}".encode(), db=self.db["meta"])
        return int(value) if value else None

    def set_reflog_hint(self, repo: str, seq: int) -> None:
        with self.write() as txn:
            txn.put(f"reflog_next/{repo}".encode(), str(seq).encode(), db=self.db["meta"])

    def commits_with_prefix(self, prefix: bytes, *, limit: int = 2) -> list[bytes]:
        """Commit ids starting with the (byte) prefix, at most ``limit``."""
        found: list[bytes] = []
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self.db["commits"])
            if not cursor.set_range(prefix):
                return found
            for key in cursor.iternext(keys=True, values=False):
                if not key.startswith(prefix) or len(found) >= limit:
                    break
                found.append(bytes(key))
        return found

    # -- staging (open commits) -------------------------------------------------------

    def staged(self, repo: str, branch: str) -> dict[str, bytes]:
        """The open commit of a branch: path -> encoded change."""
        prefix = staging_prefix(repo, branch)
        out: dict[str, bytes] = {}
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self.db["staging"])
            if not cursor.set_range(prefix):
                return out
            for key, value in cursor.iternext():
                if not key.startswith(prefix):
                    break
                path, change = _staged_item(prefix, bytes(key), bytes(value))
                out[path] = change
        return out

    def staging_base(self, repo: str, branch: str) -> str | None:
        with self.env.begin() as txn:
            value = txn.get(f"{repo}\0{branch}".encode(), db=self.db["staging_base"])
        return value.decode() if value is not None else None

    def stage_txn(self, txn: lmdb.Transaction, repo: str, branch: str, base: str,
                  changes: dict[str, bytes | None], *, drop_below: Iterable[str] = ()) -> None:
        """Record changes to an open commit inside ``txn``.

        ``changes`` maps path -> encoded change, or None to unstage that path.
        ``drop_below`` lists directories whose staged descendants are discarded
        (a directory deletion supersedes what was staged under it).
        """
        if not changes:
            return  # nothing staged: the open commit must not be pinned to this head
        db = self.db["staging"]
        base_key = f"{repo}\0{branch}".encode()
        if txn.get(base_key, db=self.db["staging_base"]) is None:
            txn.put(base_key, base.encode(), db=self.db["staging_base"])
        for directory in drop_below:
            self._unstage_below(txn, repo, branch, directory)
        for path, value in changes.items():
            full = f"{repo}\0{branch}\0{path}".encode()
            key = _fit(full)
            if value is None:
                txn.delete(key, db=db)
            elif key is not full:  # a long path: the value carries it
                txn.put(key, b"\0" + path.encode() + b"\0" + value, db=db)
            else:
                txn.put(key, value, db=db)

    def _unstage_below(self, txn: lmdb.Transaction, repo: str, branch: str,
                       directory: str) -> None:
        """Drop every staged change under ``directory`` ("" is the root)."""
        db = self.db["staging"]
        prefix = staging_prefix(repo, branch)
        below = directory + "/" if directory else ""
        full = prefix + below.encode()
        # A long key keeps only its first _KEPT bytes: scan by those, and check the
        # path such a row carries.
        _delete_prefix(txn, db, full[:_KEPT], where=lambda key, value: key.startswith(full)
                       or _staged_item(prefix, key, value)[0].startswith(below))

    def clear_staging_txn(self, txn: lmdb.Transaction, repo: str, branch: str) -> int:
        """Drop a branch's whole open commit inside ``txn``; return how many changes."""
        count = _delete_prefix(txn, self.db["staging"], staging_prefix(repo, branch))
        txn.delete(f"{repo}\0{branch}".encode(), db=self.db["staging_base"])
        txn.delete(f"{repo}\0{branch}".encode(), db=self.db["sealing"])
        return count

    def clear_sealed_txn(self, txn: lmdb.Transaction, repo: str, branch: str,
                         sealed: dict[str, bytes], new_base: str) -> None:
        """After a commit: unstage exactly the changes it sealed.

        A change staged after the commit read the open commit (or changed since)
        stays staged, now on top of ``new_base`` (the commit just made).
        """
        db = self.db["staging"]
        prefix = staging_prefix(repo, branch)

        def was_sealed(key: bytes, value: bytes) -> bool:
            path, change = _staged_item(prefix, key, value)
            return sealed.get(path) == change

        _delete_prefix(txn, db, prefix, where=was_sealed)
        cursor = txn.cursor(db=db)
        kept = cursor.set_range(prefix) and cursor.key().startswith(prefix)
        base_key = f"{repo}\0{branch}".encode()
        if kept:
            txn.put(base_key, new_base.encode(), db=self.db["staging_base"])
        else:
            txn.delete(base_key, db=self.db["staging_base"])
        txn.delete(base_key, db=self.db["sealing"])

    def open_commits(self) -> list[tuple[str, str]]:
        """Every (repo, branch) with an open commit on this node."""
        with self.env.begin() as txn:
            return [
                tuple(bytes(k).decode().split("\0", 1))  # type: ignore[misc]
                for k in txn.cursor(db=self.db["staging_base"]).iternext(values=False)
            ]

    def sealing_branches(self) -> list[tuple[str, str]]:
        """Every (repo, branch) with a ``sealing`` record: an interrupted commit."""
        with self.env.begin() as txn:
            return [
                tuple(bytes(k).decode().split("\0", 1))  # type: ignore[misc]
                for k in txn.cursor(db=self.db["sealing"]).iternext(values=False)
            ]

    def sealing(self, repo: str, branch: str) -> str | None:
        with self.env.begin() as txn:
            value = txn.get(f"{repo}\0{branch}".encode(), db=self.db["sealing"])
        return value.decode() if value is not None else None

    def set_sealing(self, repo: str, branch: str, commit_id: str | None) -> None:
        with self.write() as txn:
            key = f"{repo}\0{branch}".encode()
            if commit_id is None:
                txn.delete(key, db=self.db["sealing"])
            else:
                txn.put(key, commit_id.encode(), db=self.db["sealing"])

    # -- files cache -----------------------------------------------------------------

    def files_cache_get_many(self, paths: list[str]) -> list[bytes | None]:
        db = self.db["files"]
        with self.env.begin() as txn:
            return [txn.get(_fit(p.encode()), db=db) for p in paths]

    def files_cache_put_txn(self, txn: lmdb.Transaction, path: str, value: bytes) -> None:
        txn.put(_fit(path.encode()), value, db=self.db["files"])


def _disk_full(path: str) -> bool:
    """Whether the filesystem holding ``path`` has (nearly) no room left: a few pages,
    less than an LMDB transaction may need to grow the file."""
    try:
        free = os.statvfs(path)
    except OSError:
        return False
    return free.f_bavail * free.f_frsize < _FULL_BELOW


def _read_elsewhere(txn: lmdb.Transaction, digest: bytes, pack_id: bytes,
                    blobs: object) -> bool:
    """The index reads the blob from a pack other than ``pack_id``."""
    location = txn.get(digest, db=blobs)
    return location is not None and location[:32] != pack_id


def _delete_prefix(txn: lmdb.Transaction, db: object, prefix: bytes, *,
                   where: Callable[[bytes, bytes], bool] | None = None) -> int:
    """Delete every key of ``db`` that starts with ``prefix`` (and, given ``where``,
    whose ``where(key, value)`` is true); return how many."""
    cursor = txn.cursor(db=db)
    doomed = []
    if cursor.set_range(prefix):
        for key, value in cursor.iternext():
            if not key.startswith(prefix):
                break
            if where is None or where(bytes(key), bytes(value)):
                doomed.append(bytes(key))
    for key in doomed:
        txn.delete(key, db=db)
    return len(doomed)
