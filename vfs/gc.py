"""Garbage collection: delete what no ref, recent reflog entry or open commit keeps.

Mark: every commit named by a branch, or by a reflog entry younger than the
retention, and all their ancestors (history is never rewritten); their trees,
manifests and chunks; and everything the open commits of this node reference.

Sweep, for objects older than the grace period only (a concurrent writer's new
packs and commit objects are younger than that):

* packs with no live blob are deleted (index entries first, then the pack);
* packs whose live part is under half of their bytes are repacked: the live blobs
  are written to a new pack, the index points at it, then the old pack goes;
* packs without an index object (an upload cut short) are deleted;
* commit objects that nothing reaches (a commit interrupted before its ref moved)
  are deleted.

GC holds the node's exclusive lock, so puts and commits on this node wait.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from vfs.blobs import index_key, pack_key
from vfs.reachability import mark, root_commits

_REPACK_BELOW = 0.5  # live fraction of a pack's bytes under which it is repacked


@dataclass
class GcReport:
    packs_total: int = 0
    packs_deleted: int = 0
    packs_repacked: int = 0
    bytes_freed: int = 0
    commits_deleted: int = 0
    blobs_live: int = 0
    dry_run: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def collect(store, *, grace: float = 3600.0, reflog_retention: float = 30 * 86400.0,
            dry_run: bool = False, progress: Callable[[int], None] | None = None) -> GcReport:
    """Collect garbage in ``store``; see the module docstring for the rules.

    Args:
        grace: seconds an unreferenced object must have existed before it is removed.
        reflog_retention: seconds reflog entries keep their commits alive.
        dry_run: report what would be removed, change nothing.
        progress: called with 1 per pack examined.
    """
    report = GcReport(dry_run=dry_run)
    now = time.time()
    with store.lock(exclusive=True):
        store.blobs.learn_new_packs()  # other nodes' blobs count when sweeping
        roots, _ = root_commits(store, reflog_since=now - reflog_retention)
        for repo, branch in store.index.open_commits():
            base = store.index.staging_base(repo, branch)
            if base:
                roots.add(base)
        live = mark(store, roots, missing_commits_are_problems=False)
        report.blobs_live = len(live.blobs)
        stored = {info.key.rsplit("/", 1)[1]: info for info in store.objects.list("packs/")}
        indexed = {info.key.split("/", 1)[1] for info in store.objects.list("index/")}
        report.packs_total = len(stored)
        by_pack: dict[bytes, list[tuple[bytes, int, bool]]] = {}
        for digest, loc in store.index.iter_blobs():
            by_pack.setdefault(loc.pack_id, []).append(
                (digest, loc.stored_len, digest in live.blobs))
        for hex_id, info in stored.items():
            if progress:
                progress(1)
            if now - info.mtime < grace:
                continue
            pack_id = bytes.fromhex(hex_id)
            blobs = by_pack.get(pack_id, [])
            if hex_id not in indexed or not any(is_live for _, _, is_live in blobs):
                report.packs_deleted += 1
                report.bytes_freed += info.size
                if not dry_run:
                    _delete_pack(store, pack_id)
                continue
            live_bytes = sum(size for _, size, is_live in blobs if is_live)
            if all(is_live for _, _, is_live in blobs):
                continue  # nothing to free (a small pack is mostly header and index)
            if live_bytes < _REPACK_BELOW * info.size:
                report.packs_repacked += 1
                report.bytes_freed += info.size - live_bytes
                if not dry_run:
                    _repack(store, pack_id, [d for d, _, is_live in blobs if is_live])
        for info in store.objects.list("commits/"):
            commit_id = info.key.split("/", 1)[1]
            if commit_id not in live.commits and now - info.mtime >= grace:
                report.commits_deleted += 1
                if not dry_run:
                    store.objects.delete(info.key)
    return report


def _delete_pack(store, pack_id: bytes) -> None:
    # Forget it locally first: a crash after this leaves an unindexed pack (garbage),
    # never an index entry naming a deleted pack.
    with store.index.write() as txn:
        store.index.remove_pack_txn(txn, pack_id)
    store.objects.delete(index_key(pack_id))
    store.objects.delete(pack_key(pack_id))


def _repack(store, pack_id: bytes, live: list[bytes]) -> None:
    with store.blobs.writer() as writer:
        for digest in live:
            location = store.index.blob_location(digest)
            assert location is not None
            data = store.blobs.read(digest)
            writer.add(store.blobs.codec.encode(location.kind, data), force=True)
    # The new pack is stored and indexed (the writer flushed): the live blobs now
    # point there, so removing the old pack forgets only dead blobs. (Should the new
    # pack be byte-identical to the old one, it has the same id: keep it.)
    if any(store.index.blob_location(d).pack_id == pack_id for d in live):  # type: ignore[union-attr]
        return
    _delete_pack(store, pack_id)
