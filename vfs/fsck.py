"""Integrity checks (``vfsctl fsck``) and rebuilding the local index.

``check`` verifies, without reading pack contents:

* every ``index/<pack>`` object decodes and passes its checksum, and its pack exists
  with a size that can hold the blobs it lists, the index and the trailer;
* every blob the local index knows lives in a pack that exists;
* every commit reachable from a branch (and its ancestors) decodes and matches
  its hash, and every tree, manifest and chunk it references is known;
* the reflog records the current head of every branch: its entries, followed from
  ``old`` to ``new`` in the order the moves happened (not necessarily the order the
  entries were appended), lead to the head.

With ``deep`` it also reads every pack whole, checks that it hashes to its name,
that its embedded index equals the index object, and that every blob decompresses
to bytes matching its hash. A damaged blob is recorded in the node's index (the
``damaged`` database), so the next put of its bytes repairs it.

Interrupted commits found in this node's index are finished or forgotten first
(see :meth:`vfs.store.Store._recover_seal`), so a ``kill -9`` during a commit
leaves a store that checks clean.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from vfs.blobs import check_pack_size, decode_index, index_from_pack, pack_key, read_stored_index
from vfs.errors import Corruption, ObjectNotFound, VfsError
from vfs.reachability import mark, root_commits
from vfs.refs import Commit, ReflogEntry, read_ref, read_reflog


@dataclass
class FsckReport:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    packs: int = 0
    blobs: int = 0
    commits: int = 0
    deep: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def check(store, *, deep: bool = False,
          progress: Callable[[int], None] | None = None) -> FsckReport:
    """Verify the store and the local index; see the module docstring."""
    report = FsckReport(deep=deep)
    store.blobs.gc.sync()  # what other nodes' gc deleted is not this index's problem
    store.blobs.learn_new_packs()  # nor what other nodes wrote since
    _finish_interrupted_commits(store)
    stored_packs = {info.key.rsplit("/", 1)[1]: info.size for info in store.objects.list("packs/")}
    index_objects = [info.key for info in store.objects.list("index/")]
    report.packs = len(stored_packs)
    indexed: dict[str, list] = {}
    for key in index_objects:
        hex_id = key.split("/", 1)[1]
        try:
            index = store.objects.get(key)
            entries = decode_index(index, key)
        except Corruption as exc:
            report.problems.append(str(exc))
            continue
        indexed[hex_id] = entries
        if hex_id not in stored_packs:
            report.problems.append(f"pack {hex_id} is missing but its index exists")
            continue
        try:
            check_pack_size(entries, len(index), stored_packs[hex_id], f"pack {hex_id}")
        except Corruption as exc:
            report.problems.append(str(exc))
    for hex_id in stored_packs.keys() - indexed.keys():
        report.notes.append(f"pack {hex_id} has no index (an interrupted upload): gc removes it")
    for digest, loc in store.index.iter_blobs():
        report.blobs += 1
        if loc.pack_id.hex() not in stored_packs:
            report.problems.append(
                f"the local index places blob {digest.hex()} in missing pack {loc.pack_id.hex()}"
                " (run 'vfsctl index rebuild')"
            )
    roots, problems = root_commits(store, reflog_since=None)
    report.problems.extend(problems)
    live = mark(store, roots)
    report.problems.extend(live.problems)
    report.commits = len(live.commits)
    missing = [d for d in live.blobs if store.index.blob_location(d) is None]
    for digest in missing[:20]:
        report.problems.append(f"blob {digest.hex()} is referenced but stored in no pack")
    if len(missing) > 20:
        report.problems.append(f"... and {len(missing) - 20} more missing blobs")
    _check_reflogs(store, report)
    if deep:
        for hex_id in sorted(stored_packs):
            _check_pack_deep(store, hex_id, indexed.get(hex_id), report)
            if progress:
                progress(stored_packs[hex_id])
    return report


def _finish_interrupted_commits(store) -> None:
    # Sealing records, not open commits: a commit of a tree (a rollback) stages nothing.
    for repo, branch in store.index.sealing_branches():
        try:
            store._recover_seal(read_ref(store.objects, repo, branch))
        except VfsError:
            continue


def _check_reflogs(store, report: FsckReport) -> None:
    by_repo: dict[str, dict[str, list[ReflogEntry]] | None] = {}
    for info in store.objects.list("refs/"):
        _, repo, branch = info.key.split("/", 2)
        if repo not in by_repo:  # one reading of a repository's reflog for all its branches
            try:
                grouped: dict[str, list[ReflogEntry]] = {}
                for entry in read_reflog(store.objects, repo):
                    grouped.setdefault(entry.branch, []).append(entry)
                by_repo[repo] = grouped
            except VfsError as exc:
                report.problems.append(f"the reflog of {repo}: {exc}")
                by_repo[repo] = None
        grouped_entries = by_repo[repo]
        if grouped_entries is None:
            continue
        entries = grouped_entries.get(branch, [])
        try:
            head = read_ref(store.objects, repo, branch).commit
        except VfsError as exc:
            report.problems.append(f"{repo}@{branch}: {exc}")
            continue
        if head and _reflog_head(entries) != head:
            report.problems.append(
                f"the reflog of {repo}@{branch} does not record its head {head[:12]}"
            )


def _reflog_head(entries: list[ReflogEntry]) -> str | None:
    """Where a branch's reflog says the branch is: its moves followed old -> new.

    Two writers append in the order their appends land, which need not be the
    order their swaps did (the second writer's entry can land first; a move
    recovered after an interrupted commit is recorded later still). So the
    entries are not read last-is-head: starting from no branch, an entry applies
    once the chain stands at its ``old``, the earliest such first.
    """
    current: str | None = None
    pending: list[ReflogEntry] = []
    for entry in entries:
        pending.append(entry)
        moved = True
        while moved:
            moved = False
            for i, waiting in enumerate(pending):
                if waiting.old == current:
                    current = pending.pop(i).new
                    moved = True
                    break
    return current


def _check_pack_deep(store, hex_id: str, entries: list | None, report: FsckReport) -> None:
    from vfs.blobs import blob_hash

    key = pack_key(bytes.fromhex(hex_id))
    try:
        data = store.objects.get(key)
    except ObjectNotFound:
        return
    if blob_hash(data).hex() != hex_id:
        report.problems.append(f"pack {hex_id} does not match its hash: it is corrupted")
    try:
        embedded = index_from_pack(data, f"pack {hex_id}")
    except Corruption as exc:
        report.problems.append(str(exc))
        return
    if entries is not None and embedded != entries:
        report.problems.append(f"pack {hex_id}: embedded index differs from index/{hex_id}")
    pack_id = bytes.fromhex(hex_id)
    for entry in embedded:
        stored = data[entry.offset : entry.offset + entry.stored_len]
        try:
            store.blobs.codec.decode(entry.hash, entry.location(pack_id), stored)
        except Corruption as exc:
            report.problems.append(str(exc))
            # So that this node's next put of the blob stores it again (index.py, damaged).
            store.index.mark_damaged(entry.hash, pack_id)


@dataclass
class RebuildReport:
    packs: int = 0
    blobs: int = 0
    commits: int = 0
    skipped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def rebuild_index(store, progress: Callable[[int], None] | None = None) -> RebuildReport:
    """Rebuild the node's index of packs, blobs and commits from the object store.

    Open commits and the files cache are node-local and kept. A pack whose index
    object does not decode, or which is missing or too short for what that index
    lists, is not indexed and is named in ``skipped`` with the reason.
    """
    report = RebuildReport()
    with store.lock(exclusive=True):
        store.index.clear_rebuildable()
        for info in store.objects.list("index/"):
            pack_id = bytes.fromhex(info.key.split("/", 1)[1])
            try:
                size, entries = read_stored_index(store.objects, pack_id)
            except (Corruption, ObjectNotFound) as exc:
                report.skipped.append(f"{info.key}: {exc}")
                continue
            store.index.add_pack(pack_id, size, [e.location(pack_id) for e in entries],
                                 [e.hash for e in entries])
            report.packs += 1
            report.blobs += len(entries)
            if progress:
                progress(1)
        for info in store.objects.list("commits/"):
            commit_id = info.key.split("/", 1)[1]
            try:
                data = store.objects.get(info.key)
                Commit.decode(data, commit_id)
                store.index.cache_commit(bytes.fromhex(commit_id), data)
                report.commits += 1
            except (VfsError, ValueError) as exc:
                report.skipped.append(f"{info.key}: {exc}")
    return report
