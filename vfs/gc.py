"""Garbage collection that is safe with many nodes writing (docs/format.md §10.5).

One run, holding this node's lock alone and the store's gc lease:

1. read the store's time and every node record; anything gc cannot read stops it
   before it deletes anything (:class:`~vfs.errors.GcAborted`);
2. carry out older condemnations that every active node has acknowledged: mark
   again, delete what is still dead, pardon the rest, log what went;
3. mark: refs, reflog entries within the retention, node pins, datum records;
4. condemn what is dead and older than the grace period (store time): packs with no
   live blob, mostly-dead packs after repacking their live blobs, unreachable commit
   objects. A pack without its ``index/`` copy is re-indexed from the pack;
5. delete the claims and plans of jobs finished long ago (:mod:`vfs.pipeline.claims_gc`).

A condemnation is carried out in the same run when every other node is idle or
has acknowledged it (``wait_acks`` waits for that), else by a later run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

from vfs.blobs import blob_hash, decode_index, embedded_index, index_key, pack_key
from vfs.errors import (
    Corruption,
    GcAborted,
    GcRefused,
    ObjectNotFound,
    PreconditionFailed,
    VfsError,
)
from vfs.gclog import (
    DELETED,
    Condemnation,
    condemned_key,
    deleted_key,
    list_condemnations,
    write_condemnation,
    write_deletion,
)
from vfs.nodes import ACTIVE, NodeRecord, read_pins, read_records, store_now
from vfs.pipeline.claims_gc import collect_claims
from vfs.reachability import Reachable, mark, root_commits
from vfs.refs import canonical_json, commit_key
from vfs.tree import Entry

_REPACK_BELOW = 0.5  # live fraction of a pack's bytes under which it is repacked
LEASE_KEY = "gc/lease"
LEASE_TTL = 3600.0  # a gc lease older than this (store time) was left by a dead gc
LOG_RETENTION = 7 * 86400.0  # deletion-log entries are kept at least this long


@dataclass
class GcReport:
    packs_total: int = 0
    packs_condemned: int = 0
    packs_deleted: int = 0
    packs_repacked: int = 0
    packs_pardoned: int = 0
    packs_reindexed: int = 0
    bytes_freed: int = 0
    commits_condemned: int = 0
    commits_deleted: int = 0
    blobs_live: int = 0
    claims_deleted: int = 0  # objects under claims/ (a dry run: that would be deleted)
    claim_jobs: int = 0  # the jobs they belonged to
    waiting_for: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dry_run: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GcSettings:
    grace: float = 3600.0
    reflog_retention: float = 30 * 86400.0
    node_expiry: float = 86400.0
    ignore_nodes: tuple[str, ...] = ()
    wait_acks: float = 0.0
    delete_delay: float = 0.0


def collect(store, *, grace: float = 3600.0, reflog_retention: float = 30 * 86400.0,
            dry_run: bool = False, progress: Callable[[int], None] | None = None,
            node_expiry: float = 86400.0, ignore_nodes: Iterable[str] = (),
            wait_acks: float = 0.0, delete_delay: float = 0.0) -> GcReport:
    """Collect garbage in ``store``; see the module docstring.

    Args:
        grace: seconds (store time) an unreferenced object must have existed before
            it is condemned.
        reflog_retention: seconds reflog entries keep their commits alive.
        dry_run: report what would be condemned, change nothing.
        progress: called with 1 per pack examined.
        node_expiry: seconds after which a silent node is taken as gone.
        ignore_nodes: names or ids of nodes not to wait for (their pins still count).
        wait_acks: seconds to wait for active nodes to acknowledge a condemnation.
        delete_delay: seconds (store time) a condemnation must be old before it is
            carried out, on top of every node's acknowledgement.

    Raises:
        GcAborted: something gc marks from could not be read; nothing was deleted.
        GcRefused: a node's record is stale, or another gc holds the lease.
    """
    settings = GcSettings(grace, reflog_retention, node_expiry, tuple(ignore_nodes),
                          wait_acks, delete_delay)
    return _Collector(store, settings, dry_run, progress).run()


class _Collector:
    def __init__(self, store, settings: GcSettings, dry_run: bool,
                 progress: Callable[[int], None] | None) -> None:
        self._started = 0.0  # the store's time when the run began (see _prepare)
        self._index_listing: set[str] = set()
        self._pack_listing: dict = {}
        self.store = store
        self.objects = store.objects
        self.settings = settings
        self.progress = progress
        self.report = GcReport(dry_run=dry_run)

    def run(self) -> GcReport:
        with self.store.lock(exclusive=True):
            if self.report.dry_run:
                self._prepare()
                live = self._mark()
                self._condemn(live, self._started)
                self._collect_claims()
                return self.report
            self._take_lease()
            try:
                self._prepare()
                pending = list_condemnations(self.objects)
                if pending:
                    self._carry_out(pending, wait=0.0)
                live = self._mark()
                seq = self._condemn(live, self._started)
                if seq is not None:
                    self._acknowledge()
                    fresh = [c for c in list_condemnations(self.objects) if c.seq == seq]
                    self._carry_out(fresh, wait=self.settings.wait_acks)
                self._expire_log()
                self._collect_claims()
            finally:
                try:
                    self._acknowledge()
                finally:
                    self.objects.delete(LEASE_KEY)
        return self.report

    # -- steps ---------------------------------------------------------------------

    def _now(self) -> float:
        return store_now(self.objects, self.store.node.id)

    def _prepare(self) -> None:
        # One reading of the store's clock serves the grace period, the retention and
        # the log's expiry: an earlier "now" only keeps more. (Staleness of nodes is
        # judged with a fresh one.)
        self._started = self._now()
        self.store.blobs.gc.sync()  # other gcs' deletions
        self.store.blobs.learn_new_packs()  # other nodes' blobs count when sweeping
        # One listing of packs/ and index/ per run, taken before the mark: a pack
        # stored after it is only condemned by a later run.
        self._index_listing = {info.key.split("/", 1)[1] for info in self.objects.list("index/")}
        self._pack_listing = {info.key.rsplit("/", 1)[1]: info
                              for info in self.objects.list("packs/")}
        # Before marking: a live tree may sit in a pack whose index copy was lost.
        for hex_id, info in self._pack_listing.items():
            if hex_id not in self._index_listing and \
                    self._started - info.mtime >= self.settings.grace:
                if self._reindex(hex_id):
                    self._index_listing.add(hex_id)

    def _acknowledge(self) -> None:
        self.store.acknowledge_locked()  # gc holds this node's lock alone

    def _take_lease(self) -> None:
        body = canonical_json({"node": self.store.node.id, "name": self.store.node.name})
        try:
            self.objects.put(LEASE_KEY, body, if_absent=True)
            return
        except PreconditionFailed:
            pass
        data, tag = self.objects.get_tagged(LEASE_KEY)
        age = self._now() - self.objects.stat(LEASE_KEY).mtime
        try:
            holder = json.loads(data)
        except ValueError:
            holder = {}
        # This node's own lease was left by a run that failed to delete it (or lost the
        # answer to taking it): no gc of this node runs now, since we hold its lock alone.
        mine = isinstance(holder, dict) and holder.get("node") == self.store.node.id
        if age < LEASE_TTL and not mine:
            holder = holder.get("name", "?") if isinstance(holder, dict) else "?"
            raise GcRefused(f"gc is already running on node {holder} (for {age:.0f} s): "
                            "wait for it to finish")
        try:
            self.objects.put(LEASE_KEY, body, if_match=tag)  # left by a gc that died
        except PreconditionFailed:
            raise GcRefused("another gc took the lease just now: wait for it") from None

    def _mark(self) -> Reachable:
        """Mark from refs, the reflog, node pins and datum records (§10.5 step 3)."""
        store = self.store
        try:
            now = self._started
            # Node pins before refs: a commit moves its ref first and unpins what it
            # staged after, so one of the two reads sees what the commit made.
            bases: set[str] = set()
            entries: list[tuple[Entry, str]] = []
            for record in read_records(self.objects):
                pins = self._pins_of(record)
                if pins is None:
                    continue
                for base in pins.bases:
                    if self.objects.exists(commit_key(base)):
                        bases.add(base)
                    else:  # a base gone long ago: nothing left to keep
                        self.report.notes.append(
                            f"node {record.name}: open commit based on missing commit {base}")
                for kind, ref in pins.entries:
                    entries.append((Entry("pin", kind, 0o644, 0, 0, ref, 0),
                                    f"pins of node {record.name}"))
            # A commit that was a head within the grace period stays live even with a
            # shorter retention: a writer may be making a branch from it right now.
            retention = max(self.settings.reflog_retention, self.settings.grace)
            from_reflog: set[str] = set()
            roots, problems = root_commits(store, reflog_since=now - retention,
                                           reflog_roots=from_reflog)
            if from_reflog:
                # An earlier gc with a shorter retention may have collected commits the
                # reflog still names: gone, not unreadable.
                stored = {info.key.split("/", 1)[1] for info in self.objects.list("commits/")}
                gone = from_reflog - stored
                roots -= gone
                store.forget_commits(gone)
            roots |= bases
            for repo, branch in store.index.open_commits():
                base = store.index.staging_base(repo, branch)
                if base:
                    roots.add(base)
            live = mark(store, roots, extra_entries=entries)
        except VfsError as exc:
            raise GcAborted(f"gc stopped, nothing was deleted: {exc}") from exc
        problems += live.problems
        if problems:
            shown = "; ".join(problems[:5])
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise GcAborted(f"gc stopped, nothing was deleted: cannot read {shown}{more}")
        self.report.blobs_live = len(live.blobs)
        return live

    def _pins_of(self, record: NodeRecord):
        if record.pins is None:
            return None
        try:
            return read_pins(self.objects, record.pins)
        except ObjectNotFound:
            # The node published newer pins meanwhile: read its record again.
            for fresh in read_records(self.objects):
                if fresh.node == record.node:
                    return read_pins(self.objects, fresh.pins) if fresh.pins else None
            return None

    def _condemn(self, live: Reachable, now: float) -> int | None:
        """Phase 1: condemn what is dead and older than the grace period."""
        store = self.store
        condemnations = list_condemnations(self.objects)
        pending = {p for c in condemnations for p in c.packs}
        stored = self._pack_listing
        indexed = self._index_listing
        self.report.packs_total = len(stored)
        by_pack: dict[bytes, list[tuple[bytes, int, bool]]] = {}
        for digest, loc in store.index.iter_blobs():
            by_pack.setdefault(loc.pack_id, []).append(
                (digest, loc.stored_len, digest in live.blobs))
        packs: list[str] = []
        for hex_id, info in stored.items():
            if self.progress:
                self.progress(1)
            if now - info.mtime < self.settings.grace or hex_id in pending:
                continue
            if hex_id not in indexed:
                continue  # kept: re-indexed in _prepare, or unreadable and reported
            blobs = by_pack.get(bytes.fromhex(hex_id), [])
            if not any(is_live for _, _, is_live in blobs):
                packs.append(hex_id)
                self.report.bytes_freed += info.size
                continue
            if all(is_live for _, _, is_live in blobs):
                continue  # nothing to free (a small pack is mostly header and index)
            live_bytes = sum(size for _, size, is_live in blobs if is_live)
            if live_bytes < _REPACK_BELOW * info.size:
                self.report.packs_repacked += 1
                self.report.bytes_freed += info.size - live_bytes
                if not self.report.dry_run:
                    self._repack([d for d, _, is_live in blobs if is_live])
                packs.append(hex_id)
        pending_commits = {c for k in condemnations for c in k.commits}
        commits = [info.key.split("/", 1)[1] for info in self.objects.list("commits/")
                   if info.key.split("/", 1)[1] not in live.commits
                   and info.key.split("/", 1)[1] not in pending_commits
                   and now - info.mtime >= self.settings.grace]
        self.report.packs_condemned = len(packs)
        self.report.commits_condemned = len(commits)
        if self.report.dry_run or not (packs or commits):
            return None
        return write_condemnation(self.objects, self.store.node.id, packs, commits)

    def _reindex(self, hex_id: str) -> bool:
        """A pack whose index copy is missing: write it again from the pack (never
        treat the pack as dead: its blobs may be live). True if it was written."""
        pack_id = bytes.fromhex(hex_id)
        try:
            data = self.objects.get(pack_key(pack_id))
            if blob_hash(data) != pack_id:
                raise Corruption("it does not match its hash")
            index_bytes = embedded_index(data, f"pack {hex_id}")
            entries = decode_index(index_bytes, f"pack {hex_id}")
        except (Corruption, ObjectNotFound) as exc:
            self.report.notes.append(f"pack {hex_id} has no index and cannot be read ({exc}): "
                                     "kept")
            return False
        if self.report.dry_run:
            self.report.notes.append(f"pack {hex_id} has no index: would re-index it")
            return False
        self.objects.put(index_key(pack_id), index_bytes)
        self.store.index.add_pack(pack_id, len(data), [e.location(pack_id) for e in entries],
                                  [e.hash for e in entries])
        self.report.packs_reindexed += 1
        return True

    def _repack(self, live: list[bytes]) -> None:
        # The new pack is stored and indexed (the writer flushed) before the old one
        # is condemned: the live blobs point there from now on.
        with self.store.blobs.writer() as writer:
            for digest in live:
                location = self.store.index.blob_location(digest)
                assert location is not None
                data = self.store.blobs.read(digest)
                writer.add(self.store.blobs.codec.encode(location.kind, data), force=True)

    # -- phase 2 -------------------------------------------------------------------

    def _blockers(self, condemnations: list[Condemnation]) -> tuple[list[str], list[int]]:
        """(nodes still to acknowledge, condemnations that may be carried out now).

        Raises:
            GcRefused: an active node's record is stale but not expired.
        """
        now = self._now()
        records = read_records(self.objects)
        waiting: list[NodeRecord] = []
        stale = []
        newest = max(c.seq for c in condemnations)
        for record in records:
            if record.node == self.store.node.id or record.state != ACTIVE:
                continue
            if any(record.matches(name) for name in self.settings.ignore_nodes):
                continue
            age = now - record.mtime
            if age >= self.settings.node_expiry:
                continue
            if age > record.ttl and record.gc_seen < newest:
                # It may be between a check that did not see these condemnations and its
                # publish; one that acknowledged them already checked against them.
                stale.append(f"{record.name} ({record.node[:8]}, silent for {age:.0f} s)")
            waiting.append(record)
        if stale:
            raise GcRefused(
                f"gc will not delete: node {', '.join(stale)} may hold unpublished "
                f"references; wait for it to come back or expire, or pass --ignore-node NAME")
        ready = [c.seq for c in condemnations
                 if now - c.mtime >= self.settings.delete_delay
                 and all(r.gc_seen >= c.seq for r in waiting)]
        names = sorted({r.name for r in waiting
                        if any(r.gc_seen < c.seq for c in condemnations)})
        return names, ready

    def _carry_out(self, condemnations: list[Condemnation], *, wait: float) -> None:
        deadline = time.monotonic() + wait
        while True:
            waiting, ready = self._blockers(condemnations)
            if len(ready) == len(condemnations) or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        self.report.waiting_for = waiting
        if not ready:
            return
        self.store.blobs.learn_new_packs()
        live = self._mark()  # after the acknowledgements: sees every published write
        for condemnation in condemnations:
            if condemnation.seq in ready:
                self._delete(condemnation, live)

    def _delete(self, condemnation: Condemnation, live: Reachable) -> None:
        store = self.store
        packs, kept_in = [], set()
        for hex_id in sorted(condemnation.packs):
            pack_id = bytes.fromhex(hex_id)
            try:
                entries = decode_index(self.objects.get(index_key(pack_id)), index_key(pack_id))
            except ObjectNotFound:
                entries = []  # deleted already (an earlier run stopped half-way)
            # live blob -> the pack this index reads it from
            located = store.index.blob_packs([e.hash for e in entries if e.hash in live.blobs])
            if any(p == pack_id for p in located.values()) or any(
                    e.hash in live.blobs and e.hash not in located for e in entries):
                self.report.packs_pardoned += 1  # live again: a write published meanwhile
                continue
            packs.append(hex_id)
            kept_in.update(located[e.hash].hex() for e in entries if e.hash in located)
        commits = sorted(c for c in condemnation.commits if c not in live.commits)
        write_deletion(self.objects, condemnation.seq, packs, commits, sorted(kept_in))
        # A branch may have been made from a condemned commit after the mark read the
        # refs. Its maker checks for this log entry after making the ref, so reading
        # the refs once more now closes the window: one of the two sees the other.
        named, _ = root_commits(store, reflog_since=None)
        if named & set(commits):
            self.objects.delete(deleted_key(condemnation.seq))
            self.report.notes.append(
                f"condemnation {condemnation.seq}: a branch was made from one of its "
                "commits meanwhile; left for the next run")
            return
        # Forget locally first: a crash after this leaves an unindexed pack (which
        # the next run re-indexes or collects), never an index entry naming a
        # deleted pack.
        with store.index.write() as txn:
            store.index.remove_packs_txn(txn, {bytes.fromhex(h) for h in packs})
        for hex_id in packs:
            pack_id = bytes.fromhex(hex_id)
            self.objects.delete(index_key(pack_id))
            self.objects.delete(pack_key(pack_id))
            self._pack_listing.pop(hex_id, None)  # this run's listing is taken once
            self._index_listing.discard(hex_id)
            self.report.packs_deleted += 1
        for commit_id in commits:
            self.objects.delete(commit_key(commit_id))
            self.report.commits_deleted += 1
        store.forget_commits(commits)
        store.index.set_gc_log_cursor(max(store.index.gc_log_cursor(), condemnation.seq))
        self.objects.delete(condemned_key(condemnation.seq))

    def _collect_claims(self) -> None:
        """Step 5. Claims hold no data and no node's index names them: nothing to
        condemn or acknowledge, only the job's end and a margin to wait for."""
        done = collect_claims(self.objects, now=self._started, grace=self.settings.grace,
                              dry_run=self.report.dry_run)
        self.report.claims_deleted = done.objects
        self.report.claim_jobs = done.jobs
        self.report.notes.extend(done.notes)

    def _expire_log(self) -> None:
        """Drop old deletion-log entries. A node that missed expired entries compares
        its whole index with the store instead (vfs.gclog), so this is only a cost."""
        keep = max(LOG_RETENTION, self.settings.node_expiry, self.settings.reflog_retention)
        now = self._started
        for info in self.objects.list(DELETED):
            if now - info.mtime > keep:
                self.objects.delete(info.key)
