"""Condemnations and the deletion log: how gc tells every node what goes (docs/format.md §10.3).

``gc/condemned/<seq>`` lists the packs and commit objects gc will delete once every
active node has acknowledged it; ``gc/deleted/<seq>`` lists what it then deleted,
and the packs that hold the live blobs of deleted packs. Nodes follow the log to
drop stale index entries, and check their writes against the condemnations.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field

from vfs.blobs import read_stored_index
from vfs.errors import Corruption, ObjectNotFound, PreconditionFailed
from vfs.objstore.base import ObjectStore
from vfs.refs import canonical_json

CONDEMNED = "gc/condemned/"
DELETED = "gc/deleted/"


def condemned_key(seq: int) -> str:
    return f"{CONDEMNED}{seq:016d}"


def deleted_key(seq: int) -> str:
    return f"{DELETED}{seq:016d}"


def _seq_of(key: str) -> int:
    try:
        return int(key.rsplit("/", 1)[1])
    except ValueError:
        raise Corruption(f"{key} is not a gc log object name") from None


@dataclass(frozen=True)
class Condemnation:
    seq: int
    by: str
    packs: frozenset[str]
    commits: frozenset[str]
    mtime: float = 0.0


@dataclass(frozen=True)
class Deletion:
    seq: int
    packs: list[str]
    commits: list[str]
    kept_in: list[str]  # packs holding live blobs of the deleted ones


def _read_json(objects: ObjectStore, key: str) -> dict:
    data = objects.get(key)
    try:
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("not an object")
        return raw
    except ValueError as exc:
        raise Corruption(f"{key} is damaged: {exc}") from exc


def read_condemnation(objects: ObjectStore, key: str, mtime: float = 0.0) -> Condemnation:
    raw = _read_json(objects, key)
    try:
        return Condemnation(_seq_of(key), str(raw["by"]), frozenset(map(str, raw["packs"])),
                            frozenset(map(str, raw["commits"])), mtime)
    except (KeyError, TypeError) as exc:
        raise Corruption(f"{key} is damaged: {exc!r}") from exc


def read_deletion(objects: ObjectStore, key: str) -> Deletion:
    raw = _read_json(objects, key)
    try:
        return Deletion(_seq_of(key), list(map(str, raw["packs"])),
                        list(map(str, raw["commits"])), list(map(str, raw.get("kept_in", []))))
    except (KeyError, TypeError) as exc:
        raise Corruption(f"{key} is damaged: {exc!r}") from exc


def deleted_commits(objects: ObjectStore, seq: int) -> list[str]:
    """The commits the deletion-log entry of condemnation ``seq`` lists (none yet: [])."""
    try:
        return read_deletion(objects, deleted_key(seq)).commits
    except ObjectNotFound:
        return []


def list_condemnations(objects: ObjectStore) -> list[Condemnation]:
    out = []
    for info in objects.list(CONDEMNED):
        try:
            out.append(read_condemnation(objects, info.key, info.mtime))
        except ObjectNotFound:
            continue  # carried out meanwhile
    return out


def latest_seq(objects: ObjectStore) -> int:
    """The newest condemnation number, pending or carried out (0 if none)."""
    keys = [info.key for prefix in (CONDEMNED, DELETED) for info in objects.list(prefix)]
    return max((_seq_of(k) for k in keys), default=0)


def write_condemnation(objects: ObjectStore, by: str, packs: list[str],
                       commits: list[str]) -> int:
    """Record a new condemnation under the next free number; return it."""
    seq = latest_seq(objects) + 1
    body = {"v": 1, "by": by, "packs": sorted(packs), "commits": sorted(commits)}
    while True:
        if objects.exists(deleted_key(seq)):
            seq += 1
            continue
        try:
            objects.put(condemned_key(seq), canonical_json({**body, "seq": seq}), if_absent=True)
            return seq
        except PreconditionFailed:
            seq += 1


def write_deletion(objects: ObjectStore, seq: int, packs: list[str], commits: list[str],
                   kept_in: list[str]) -> None:
    objects.put(deleted_key(seq), canonical_json({
        "v": 1, "seq": seq, "packs": sorted(packs), "commits": sorted(commits),
        "kept_in": sorted(kept_in)}))


@dataclass
class GcView:
    """A node's view of gc: pending condemnations and how far it followed the log."""

    seen: int = 0  # the newest condemnation number read (the acknowledgement)
    condemned_packs: dict[str, int] = field(default_factory=dict)  # pack hex -> seq
    condemned_commits: dict[str, int] = field(default_factory=dict)
    deleted_packs: set[str] = field(default_factory=set)  # deleted since this view began


class GcFollower:
    """Keeps one node's :class:`GcView` and its index in step with the store's gc log.

    Args:
        objects: the store.
        index: the node's index (holds how far the deletion log was applied).
    """

    def __init__(self, objects: ObjectStore, index) -> None:
        self.objects = objects
        self.index = index
        self._cache: dict[str, Condemnation] = {}
        self._lock = threading.Lock()

    def sync(self) -> GcView:
        """Read the condemnations and apply new deletion-log entries to the index.

        Costs one listing (of ``gc/``) plus one read per new object.
        """
        with self._lock:
            view = GcView()
            current = {}
            # One listing, in key order: the condemnations, then the log. gc writes a log
            # entry before it deletes its condemnation, so a condemnation missing from
            # the listing was carried out completely and its entry is listed after it.
            listed = list(self.objects.list("gc/"))
            logged = [(info, _seq_of(info.key)) for info in listed
                      if info.key.startswith(DELETED)]
            for info in (i for i in listed if i.key.startswith(CONDEMNED)):
                cached = self._cache.get(info.key)
                if cached is None:
                    try:
                        cached = read_condemnation(self.objects, info.key, info.mtime)
                    except ObjectNotFound:
                        continue
                current[info.key] = cached
                view.seen = max(view.seen, cached.seq)
                for pack in cached.packs:
                    view.condemned_packs.setdefault(pack, cached.seq)
                for commit in cached.commits:
                    view.condemned_commits.setdefault(commit, cached.seq)
            self._cache = current
            applied = self.index.gc_log_cursor()
            numbers = {c.seq for c in current.values()} | {seq for _, seq in logged}
            # An entry whose condemnation is still listed is being carried out: its packs
            # may still be listed in index/ (and learned again by learn_new_packs), and a
            # gc that stopped half-way writes the entry again. Apply it, but keep the
            # cursor below it so that the next sync applies it again.
            in_progress = min((c.seq for c in current.values()), default=None)
            newest = max(numbers, default=0)
            if any(n not in numbers for n in range(applied + 1, newest + 1)):
                # Entries this node never applied have expired from the log: compare
                # the whole index with the store instead.
                self._reconcile()
            for info, seq in logged:
                view.seen = max(view.seen, seq)
                if seq <= applied:
                    continue
                try:
                    deletion = read_deletion(self.objects, info.key)
                except ObjectNotFound:
                    continue  # expired from the log meanwhile
                self.apply(deletion)
                view.deleted_packs.update(deletion.packs)
                if in_progress is None or seq < in_progress:
                    self.index.set_gc_log_cursor(seq)
            return view

    def _reconcile(self) -> None:
        known = self.index.packs()
        if not known:
            return
        stored = {bytes.fromhex(info.key.rsplit("/", 1)[1])
                  for info in self.objects.list("packs/")}
        with self.index.write() as txn:
            self.index.remove_packs_txn(txn, set(known) - stored)

    def apply(self, deletion: Deletion) -> None:
        """Forget the deleted packs; (re)learn the packs that kept their live blobs."""
        learned = []
        for hex_id in deletion.kept_in:
            pack_id = bytes.fromhex(hex_id)
            try:
                size, entries = read_stored_index(self.objects, pack_id)
            except ObjectNotFound:
                continue  # itself collected later; the log says so further on
            except Corruption:
                continue  # cut short: never indexed (learn_new_packs reports it)
            learned.append((pack_id, size, entries))
        with self.index.write() as txn:
            self.index.remove_packs_txn(txn, {bytes.fromhex(h) for h in deletion.packs})
            self.index.forget_commits_txn(txn, deletion.commits)
            for pack_id, size, entries in learned:
                self.index.add_pack_txn(txn, pack_id, size,
                                        [e.location(pack_id) for e in entries],
                                        [e.hash for e in entries])
