"""The commit protocol, top to bottom (docs/format.md §9; the names are its steps).

:func:`commit` is the one place a branch moves forward with new content:

1. **seal**: the open commit becomes trees (or a given tree is committed as is);
2. **verify packs**: every pack the seal wrote or deduplicated against is present and
   not condemned by gc; blobs in a condemned pack are written again (§10.4);
3. **write the commit object** (content-addressed: retrying is idempotent);
4. **swap the ref** by compare-and-swap from the head the commit was built on; if the
   head moved, rebase (rebuild on the new head) unless the changes overlap;
5. **reflog**: append the audit entry;
6. **index**: record the commit and clear what was sealed from the open commit.

Why it is safe: a crash before step 4 leaves the branch where it was (what was
written is garbage for gc); from step 4 on the commit is made, and a failure after
the swap is reported as a made commit, finished by the next operation (the sealing
record, see :meth:`vfs.store.Store._recover_seal`). Step 2 and the node-local lock
held from step 1 to step 6 are this node's half of the gc protocol: gc cannot carry
out a condemnation of a pack this commit uses until the node acknowledged it, which
it does only while no commit is between its check and its swap (§10, G1-G2).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import suppress

from vfs.blobstore import BlobWriter
from vfs.errors import (
    Conflict,
    HeadMoved,
    NothingToCommit,
    PreconditionFailed,
    StoreChanged,
    VfsError,
)
from vfs.names import ancestors
from vfs.pipeline.registry import refuse_hand_commits
from vfs.refs import Commit, RefState, commit_key, current_user, move_ref, now_iso, read_ref
from vfs.snapshot import Snapshot, changed_paths
from vfs.staging import OpenCommit

_log = logging.getLogger(__name__)
_CAS_ATTEMPTS = 10


ANY_HEAD = object()  # commit(expect_head=...): rebuild on whatever head the branch has


def commit(store, repo: str, branch: str, message: str = "", *, author: str | None = None,
           provenance: dict | None = None, metadata: dict | None = None,
           tree: str | None = None, why: str = "commit", allow_empty: bool = False,
           expect_head: object = ANY_HEAD, fence: Callable[[], None] | None = None) -> Commit:
    """Seal the open commit of a branch (or commit ``tree`` as is) and move the branch.

    ``allow_empty`` (with ``tree``) commits even when the tree equals the head's:
    a pipeline records every input commit it processed this way.

    ``expect_head`` (a commit id, or None for a branch without commits) makes the
    commit go on exactly that head: a branch found elsewhere, before or during the
    swap, raises HeadMoved instead of rebuilding on the new head. A pipeline job's
    commit uses it, so that two nodes committing one job cannot both succeed.
    ``fence`` is called right before the swap and may raise to stop the commit (a
    node that lost its lease on the job).

    Raises:
        NothingToCommit: nothing is staged, or the result equals the head.
        Conflict: the branch moved and touched paths the open commit overlaps.
        StoreChanged: gc deleted a pack the commit needed (run it again).
        ReadOnly: the branch is a pipeline's output and the commit is not its job's.
        HeadMoved: the branch is not (or no longer) at ``expect_head``.
    """
    if (provenance or {}).get("pipeline") != repo:
        refuse_hand_commits(store.objects, repo, branch)
    with store.lock():
        for _ in range(_CAS_ATTEMPTS):
            state, open_commit, sealed = store._open_commit(repo, branch)
            if expect_head is not ANY_HEAD and state.commit != expect_head:
                raise HeadMoved(f"{repo}@{branch} is at {(state.commit or 'no commit')[:12]}, "
                                f"not at {str(expect_head or 'no commit')[:12]}")
            if tree is None:
                _check_staged(store, state, open_commit)
            head = store.read_commit(state.commit) if state.commit else None

            with store.blobs.writer() as writer:  # steps 1-2: its flush is the check
                new_tree = seal(writer, open_commit, tree)
            checked = time.monotonic()

            if head is not None and new_tree == head.tree and not (
                    allow_empty and tree is not None):
                if tree is None:
                    store.discard(repo, branch)
                raise NothingToCommit(
                    f"nothing to commit on {repo}@{branch}: the result equals the head")
            made = write_commit_object(store, _new_commit(
                store, state, new_tree, message, author, provenance, metadata))
            if tree is None:
                store.index.set_sealing(repo, branch, made.id)
            if time.monotonic() - checked > store.presence.ttl / 2:
                # A check this old may predate a condemnation that this node has since
                # acknowledged: check again before the swap publishes (§10.4).
                verify_packs(store, writer)
            if fence is not None:
                fence()
            if not swap_ref(store, state, made):
                if expect_head is not ANY_HEAD:
                    raise HeadMoved(f"{repo}@{branch} moved while the commit was made")
                continue  # the branch moved meanwhile: rebuild on the new head
            record(store, state, made, why, sealed if tree is None else None)
            return made
    raise Conflict(f"{repo}@{branch} keeps moving: gave up after {_CAS_ATTEMPTS} attempts")


def _check_staged(store, state: RefState, open_commit: OpenCommit) -> None:
    if not open_commit:
        raise NothingToCommit(
            f"nothing to commit on {state.repo}@{state.branch}: stage changes with put or rm")
    base = store.index.staging_base(state.repo, state.branch)
    if base is not None and (base or None) != state.commit:
        check_rebase(store, state.repo, state.branch, base or None, state.commit, open_commit)


# -- 1. seal ----------------------------------------------------------------------------


def seal(writer: BlobWriter, open_commit: OpenCommit, tree: str | None) -> str:
    """The root tree of the new commit; its blobs go through ``writer``.

    A given ``tree`` (rollback, pipeline outputs) is noted as used, so step 2 checks
    its pack like any deduplicated blob.
    """
    if tree is None:
        return open_commit.seal(writer)
    writer.note_used([bytes.fromhex(tree)])
    return tree


# -- 2. verify packs ----------------------------------------------------------------------


def verify_packs(store, writer: BlobWriter) -> None:
    """Check again the packs ``writer`` used (it checked them once when it flushed).

    Raises:
        StoreChanged: one of them was condemned or deleted since: the commit is not
            made, and doing it again stores those blobs anew.
    """
    _, condemned = store.blobs.check_packs(writer.used())
    if condemned:
        raise StoreChanged("gc condemned a pack this commit uses while it was being made: "
                           "run the commit again")


# -- 3. write the commit object ------------------------------------------------------------


def _new_commit(store, state: RefState, tree: str, message: str, author: str | None,
                provenance: dict | None, metadata: dict | None) -> Commit:
    root_entries = Snapshot(store.blobs, tree).root_entries()
    return Commit(
        repo=state.repo,
        branch=state.branch,
        parents=(state.commit,) if state.commit else (),
        tree=tree,
        message=message,
        author=author or current_user(),
        time=now_iso(),
        files=sum(e.file_count for e in root_entries.values()),
        bytes=sum(e.size for e in root_entries.values() if e.kind != "l"),
        provenance=provenance or {},
        metadata=metadata or {},
    ).with_id()


def write_commit_object(store, made: Commit) -> Commit:
    try:
        store.objects.put(commit_key(made.id), made.encode(), if_absent=True)
    except PreconditionFailed:
        pass  # the same commit object is already stored (a retry)
    return made


# -- 4. swap the ref -------------------------------------------------------------------


def swap_ref(store, state: RefState, made: Commit) -> bool:
    """Move the branch from ``state`` to ``made``; False if it moved meanwhile."""
    try:
        move_ref(store.objects, state, made.id)
        return True
    except PreconditionFailed:
        pass
    # A retried swap whose first try landed fails its own condition (its answer was
    # lost on the way back): the head names this commit, and the commit is made.
    if read_ref(store.objects, state.repo, state.branch).commit == made.id:
        return True
    store.index.set_sealing(state.repo, state.branch, None)
    return False


def check_rebase(store, repo: str, branch: str, base: str | None, head: str | None,
                 open_commit: OpenCommit) -> None:
    """Refuse to apply an open commit on a head that changed an overlapping path.

    Paths overlap when equal or when one is below the other, and directories count:
    a change staged below a directory the head deleted (or made a file), or a
    staged directory change where the head changed something inside, is refused
    rather than rebuilt into a tree that silently drops or undoes one side.
    """
    old = Snapshot(store.blobs, store.read_commit(base).tree if base else None)
    new = Snapshot(store.blobs, store.read_commit(head).tree if head else None)
    moved = set(changed_paths(old, new))
    around = {p for path in moved for p in ancestors(path)}  # directories holding them
    for staged in sorted(open_commit.changes):
        other = next((p for p in (staged, *ancestors(staged)) if p in moved), None)
        if other is None and staged in around:
            other = min(p for p in moved if not staged or p.startswith(staged + "/"))
        if other is not None:
            raise Conflict(
                f"{repo}@{branch} moved to {(head or '')[:12]} and changed /{other}, "
                f"which the open commit's change to /{staged} overlaps: discard with "
                f"'vfsctl discard {repo}@{branch}' and redo the change"
            )


# -- 5-6. reflog and index ------------------------------------------------------------------


def record(store, state: RefState, made: Commit, why: str,
           sealed: dict[str, bytes] | None) -> None:
    """Append the reflog entry and record the commit in the index.

    The branch already moved: the commit is made, and reporting a failure here would
    have the user redo it. The sealing record stays, so the next operation on the
    branch records what is missing (docs/format.md §9).
    """
    try:
        store._append_reflog(state.repo, state.branch, state.commit, made.id, why,
                             who=made.author)
        with store.index.write() as txn:
            if sealed is not None:
                # Only what was sealed: a change staged meanwhile (by another process,
                # or the mount) stays for the next commit.
                store.index.clear_sealed_txn(txn, state.repo, state.branch, sealed, made.id)
            store.index.cache_commit_txn(txn, bytes.fromhex(made.id), made.encode())
    except VfsError as exc:
        _log.warning("commit %s was made (%s@%s moved to it) but recording it failed: %s; "
                     "the next operation on the branch finishes that",
                     made.id[:12], state.repo, state.branch, exc)
        if sealed is None:
            with suppress(VfsError):
                store.index.set_sealing(state.repo, state.branch, made.id)
