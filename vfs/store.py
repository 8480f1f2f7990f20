"""The versioned store: repositories, branches, commits, open commits and history.

:class:`Store` ties the object store, the node-local index and the blob layer
together and implements the commit protocol (docs/format.md, "Commit protocol"):

1. every new pack and its index are stored (``BlobWriter.flush``);
2. the commit object is written (content-addressed, so retrying is idempotent);
3. the branch ref is moved by compare-and-swap from the head the commit was built on;
4. the reflog entry is appended and the index records the new state.

A crash between any two steps leaves the branch on its old head or its new one.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from vfs import commit as commit_protocol
from vfs.blobstore import BlobStore
from vfs.config import StoreConfig, create_config, load_config
from vfs.errors import (
    AlreadyExists,
    AmbiguousRef,
    BranchNotFound,
    CommitNotFound,
    InvalidRef,
    ObjectNotFound,
    PreconditionFailed,
    RepoNotFound,
    VfsError,
)
from vfs.gclog import deleted_commits
from vfs.index import Index
from vfs.names import RefSpec, check_name, looks_like_commit
from vfs.nodes import ACTIVE, IDLE, Presence, node_identity, rename_identity, unique_name
from vfs.objstore import ObjectStore, open_object_store
from vfs.refs import (
    Commit,
    ReflogEntry,
    RefState,
    append_reflog,
    canonical_json,
    commit_key,
    create_ref,
    now_iso,
    read_ref,
    read_reflog,
    ref_key,
)
from vfs.snapshot import Change, Snapshot, TreeCache, diff_trees
from vfs.staging import OpenCommit, decode_change, encode_change
from vfs.tree import DIR, Entry

DEFAULT_BRANCH = "main"


def default_store_url() -> str:
    return os.environ.get("VFS_STORE") or os.path.expanduser("~/.local/share/vfs/store")


def default_cache_dir() -> str:
    return os.environ.get("VFS_CACHE") or os.path.expanduser("~/.cache/vfs")


@dataclass(frozen=True)
class RepoInfo:
    name: str
    description: str
    created: str


@dataclass(frozen=True)
class BranchInfo:
    repo: str
    name: str
    head: str | None


class Store:
    """A vfs store opened on this node. Use :func:`open_store` to get one."""

    def __init__(self, objects: ObjectStore, config: StoreConfig, cache_dir: str, *,
                 durable_index: bool = True) -> None:
        self.objects = objects
        self.config = config
        self.cache_dir = os.path.join(cache_dir, config.store_id)
        os.makedirs(self.cache_dir, exist_ok=True)
        self.index = Index(self.cache_dir, config.store_id, durable=durable_index)
        self.blobs = BlobStore(objects, self.index, config)
        self._commits: dict[str, Commit] = {}
        self.node = node_identity(self.cache_dir)
        self.presence = Presence(objects, self.index, self.node)
        #: A long-running process (vfsd, see :meth:`keep_active`) keeps the node active
        #: and refreshes its record; a command-line process marks the node idle when
        #: its writes end, unless such a process runs on the node.
        self.stays_active = False
        self._active_fd: int | None = None
        self.blobs.before_check = self._ensure_active
        self._shared_depth = 0
        self._depth_lock = threading.Lock()

    def close(self) -> None:
        if self._active_fd is not None:
            os.close(self._active_fd)
            self._active_fd = None
        self.index.close()
        self.objects.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def lock(self, *, exclusive: bool = False) -> Iterator[None]:
        """Node-local lock: writers share it; gc, and a node acknowledging gc's
        condemnations, hold it alone (docs/format.md §10.2)."""
        fd = self._lock_file("gc.lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            if not exclusive:
                with self._depth_lock:
                    self._shared_depth += 1
            try:
                yield
            finally:
                if not exclusive:
                    with self._depth_lock:
                        self._shared_depth -= 1
                        last = self._shared_depth == 0
        finally:
            os.close(fd)
        if not exclusive and last and not self.stays_active \
                and self.index.node_state().state == ACTIVE:
            self.settle()

    def keep_active(self, ttl: float = 60.0) -> None:
        """Declare this process long-running (vfsd): the node stays active while it
        lives, and :meth:`heartbeat` must be called every ``ttl / 3`` seconds."""
        self.stays_active = True
        self.presence.ttl = ttl
        self.presence.vfsd = True  # the record is this vfsd's heartbeat
        # Held shared for the life of the process: a command-line process on the same
        # node sees it and does not mark the node idle under the daemon's feet.
        self._active_fd = self._lock_file("active.lock")
        fcntl.flock(self._active_fd, fcntl.LOCK_SH)
        self.heartbeat()

    def claim_node_name(self, *, chosen: bool) -> str:
        """Make sure no other live vfsd goes by this node's name (vfsd, before
        :meth:`keep_active`); see :func:`vfs.nodes.unique_name`.

        Args:
            chosen: the user named the node (``--node-name``, ``$VFS_NODE_NAME``).

        Raises:
            AlreadyExists: a chosen name is taken by another live vfsd.
        """
        name = unique_name(self.objects, self.node, chosen=chosen)
        if name != self.node.name:
            self.node = rename_identity(self.cache_dir, self.node, name)
            self.presence.identity = self.node
        return name

    def heartbeat(self) -> None:
        """Refresh this node's record; acknowledge gc if no write is in flight."""
        if not self.settle(wait=1.0):
            self.presence.publish(ACTIVE)  # a write is in flight: refresh only

    def _long_running_process_on_node(self) -> bool:
        if self.stays_active:
            return True
        fd = self._lock_file("active.lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def _ensure_active(self) -> None:
        """Make the node's record active before a write relies on its view of gc."""
        if self.index.node_state().state != ACTIVE:
            self.presence.publish(ACTIVE)

    def settle(self, *, wait: float = 0.0) -> bool:
        """Acknowledge gc's condemnations and publish fresh pins, if no write of this
        node is in flight; a command-line process also marks the node idle.

        Args:
            wait: seconds to keep trying for the node's lock alone.

        Returns:
            True if the record was published with a new acknowledgement.
        """
        fd = self._lock_file("gc.lock")
        try:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        return False  # a write is in flight: it settles when it ends
                    time.sleep(0.05)
            self.acknowledge_locked()
            return True
        finally:
            os.close(fd)

    def acknowledge_locked(self) -> None:
        """Publish this node's record with its newest view of gc and fresh pins.

        Only while holding :meth:`lock` alone (or its file, as :meth:`settle` does):
        no write of this node may be between its check and its publish.
        """
        view = self.blobs.gc.sync()
        state = ACTIVE if self._long_running_process_on_node() else IDLE
        self.presence.publish(state, gc_seen=view.seen)

    def _lock_file(self, name: str) -> int:
        """An open descriptor of one of this node's lock files (the caller closes it)."""
        return os.open(os.path.join(self.cache_dir, name), os.O_RDWR | os.O_CREAT, 0o644)

    # -- repositories ------------------------------------------------------------------

    def create_repo(self, name: str, description: str = "") -> RepoInfo:
        """Create a repository with an empty ``main`` branch.

        Raises:
            AlreadyExists: a repository of that name exists.
        """
        check_name(name, "repository")
        info = RepoInfo(name, description, now_iso())
        try:
            self.objects.put(f"repos/{name}", canonical_json(info.__dict__), if_absent=True)
        except PreconditionFailed:
            raise AlreadyExists(f"repository {name} already exists") from None
        try:
            create_ref(self.objects, name, DEFAULT_BRANCH, None)
            self._append_reflog(name, DEFAULT_BRANCH, None, None, "branch created")
        except PreconditionFailed:
            pass
        return info

    def repo(self, name: str) -> RepoInfo:
        check_name(name, "repository")
        try:
            raw = json.loads(self.objects.get(f"repos/{name}"))
        except ObjectNotFound:
            raise RepoNotFound(
                f"repository {name} does not exist (create it with 'vfsctl repo create {name}')"
            ) from None
        return RepoInfo(**raw)

    def list_repos(self) -> list[RepoInfo]:
        return [self.repo(info.key.split("/", 1)[1]) for info in self.objects.list("repos/")]

    def delete_repo(self, name: str, *, force: bool = False) -> None:
        """Delete a repository: its branches go; commits become garbage for gc.

        Raises:
            VfsError: the repository has commits and ``force`` is not set.
        """
        self.repo(name)
        branches = self.list_branches(name)
        if not force and any(b.head for b in branches):
            raise VfsError(f"repository {name} has commits: use --force to delete it anyway")
        for branch in branches:
            self.objects.delete(ref_key(name, branch.name))
            self._append_reflog(name, branch.name, branch.head, None, "repository deleted")
            with self.index.write() as txn:
                self.index.clear_staging_txn(txn, name, branch.name)
        self.objects.delete(f"repos/{name}")

    # -- branches ----------------------------------------------------------------------

    def list_branches(self, repo: str) -> list[BranchInfo]:
        self.repo(repo)
        prefix = f"refs/{repo}/"
        out = []
        for info in self.objects.list(prefix):
            branch = info.key[len(prefix) :]
            out.append(BranchInfo(repo, branch, read_ref(self.objects, repo, branch).commit))
        return out

    def head(self, repo: str, branch: str) -> RefState:
        self.repo(repo)
        check_name(branch, "branch")
        return read_ref(self.objects, repo, branch)

    def create_branch(self, repo: str, branch: str, start: RefSpec | None = None) -> BranchInfo:
        """Create a branch at the commit ``start`` names (or empty).

        Raises:
            AlreadyExists: the branch exists.
        """
        self.repo(repo)
        check_name(branch, "branch")
        commit = None
        # Check, then publish (docs/format.md §10.4): the new ref may be all that keeps
        # an old commit alive, so it is made under the lock, against a fresh view of gc.
        with self.lock():
            if start is not None:
                if start.repo != repo:
                    raise InvalidRef(f"--from must name a commit of {repo}, not of {start.repo}")
                found = self.resolve(start)
                commit = found.id if found else None
            doomed = self._condemned_after_ack(commit) if commit else None
            try:
                create_ref(self.objects, repo, branch, commit)
            except PreconditionFailed:
                raise AlreadyExists(f"branch {repo}@{branch} already exists") from None
            if doomed is not None and commit in deleted_commits(self.objects, doomed):
                # gc is carrying the condemnation out and read the refs before this one
                # was made; once its log entry exists, it checks the refs again before
                # deleting, so a ref made earlier saves the commit (§10.5).
                self.objects.delete(ref_key(repo, branch))
                raise _condemned(commit)
        self._append_reflog(repo, branch, None, commit, "branch created")
        return BranchInfo(repo, branch, commit)

    def _condemned_after_ack(self, commit_id: str) -> int | None:
        """The condemnation of a commit gc may be carrying out now, if any.

        A condemned commit (nothing named it when gc marked; a commit whose ref moved
        just after gc read the refs is one) may be named again safely while this node
        has not acknowledged the condemnation: gc waits for this node, whose
        acknowledgement comes after the new name is published, and marks again (§10,
        G1). Callers hold :meth:`lock` until the name is published.

        Raises:
            CommitNotFound: gc deleted it already (a stale cache named it).
        """
        view = self.blobs.gc_view()
        if not self.objects.exists(commit_key(commit_id)):
            self.forget_commits([commit_id])
            raise CommitNotFound(f"commit {commit_id[:12]} was deleted by gc")
        seq = view.condemned_commits.get(commit_id)
        if seq is not None and self.index.node_state().gc_seen >= seq:
            return seq
        return None

    def _check_not_condemned(self, commit_id: str) -> None:
        if self._condemned_after_ack(commit_id) is not None:
            raise _condemned(commit_id)

    def delete_branch(self, repo: str, branch: str) -> None:
        state = self.head(repo, branch)
        self.objects.delete(ref_key(repo, branch))
        self._append_reflog(repo, branch, state.commit, None, "branch deleted")
        with self.index.write() as txn:
            self.index.clear_staging_txn(txn, repo, branch)

    def _append_reflog(self, repo: str, branch: str, old: str | None, new: str | None,
                       why: str, who: str | None = None) -> ReflogEntry:
        entry = append_reflog(self.objects, repo, branch, old, new, why,
                              start=self.index.reflog_hint(repo), who=who)
        self.index.set_reflog_hint(repo, entry.seq + 1)
        return entry

    def reflog(self, repo: str, branch: str | None = None) -> list[ReflogEntry]:
        self.repo(repo)
        return read_reflog(self.objects, repo, branch)

    # -- commits and refs ----------------------------------------------------------------

    def read_commit(self, commit_id: str) -> Commit:
        """Read (and verify) a commit object; results are kept in memory.

        Raises:
            CommitNotFound: no such commit object.
            Corruption: the object does not match its id.
        """
        commit = self._commits.get(commit_id)
        if commit is not None:
            return commit
        try:
            raw_id = bytes.fromhex(commit_id)
        except ValueError:
            raise CommitNotFound(f"{commit_id!r} is not a commit id") from None
        data = self.index.cached_commit(raw_id)
        if data is None:
            try:
                data = self.objects.get(commit_key(commit_id))
            except ObjectNotFound:
                raise CommitNotFound(f"commit {commit_id} does not exist") from None
        # Not written back to the index here: one LMDB write (and fsync) per
        # commit read would make 'log' crawl. Commits this node makes are indexed.
        commit = Commit.decode(data, commit_id)
        self._commits[commit_id] = commit
        return commit

    def forget_commits(self, commit_ids: Iterable[str]) -> None:
        """Drop commits gc deleted from this node's caches (one index transaction)."""
        commit_ids = list(commit_ids)
        if not commit_ids:
            return
        for commit_id in commit_ids:
            self._commits.pop(commit_id, None)
        with self.index.write() as txn:
            self.index.forget_commits_txn(txn, commit_ids)

    def resolve(self, spec: RefSpec) -> Commit | None:
        """The commit a ref names; None for a branch that has no commits yet.

        Branch names win over commit prefixes. ``~N`` follows first parents.

        Raises:
            RepoNotFound, BranchNotFound, CommitNotFound, AmbiguousRef.
        """
        self.repo(spec.repo)
        try:
            commit_id = read_ref(self.objects, spec.repo, spec.ref).commit
        except BranchNotFound:
            if not looks_like_commit(spec.ref):
                raise
            commit_id = self._resolve_prefix(spec.repo, spec.ref)
        commit = self.read_commit(commit_id) if commit_id else None
        for _ in range(spec.ancestor):
            if commit is None or not commit.parents:
                raise CommitNotFound(f"{spec} does not exist: the history is shorter")
            commit = self.read_commit(commit.parents[0])
        return commit

    def _resolve_prefix(self, repo: str, prefix: str) -> str:
        candidates = [info.key.split("/", 1)[1] for info in self.objects.list(f"commits/{prefix}")]
        matches = [c for c in candidates if self.read_commit(c).repo == repo]
        if not matches:
            raise CommitNotFound(f"no branch or commit {prefix} in repository {repo}")
        if len(matches) > 1:
            shown = ", ".join(m[:12] for m in matches[:5])
            raise AmbiguousRef(f"commit prefix {prefix} is ambiguous ({shown}): give more digits")
        return matches[0]

    def snapshot(self, spec: RefSpec) -> tuple[Commit | None, Snapshot]:
        commit = self.resolve(spec)
        return commit, Snapshot(self.blobs, commit.tree if commit else None)

    def log(self, spec: RefSpec, *, limit: int | None = None,
            path: str | None = None) -> Iterator[Commit]:
        """Commits from ``spec`` back along first parents, newest first.

        With ``path``, only the commits that changed what is at that path.
        """
        commit = self.resolve(spec)
        shown = 0
        while commit is not None and (limit is None or shown < limit):
            parent = self.read_commit(commit.parents[0]) if commit.parents else None
            if path is None or self._changed(commit, parent, path):
                yield commit
                shown += 1
            commit = parent

    def _changed(self, commit: Commit, parent: Commit | None, path: str) -> bool:
        now = Snapshot(self.blobs, commit.tree).lookup(path)
        before = Snapshot(self.blobs, parent.tree).lookup(path) if parent else None
        if now is None or before is None:
            return now is not before
        return now.ref != before.ref or now.kind != before.kind or now.mode != before.mode

    def diff(self, new: RefSpec, old: RefSpec | None = None) -> list[Change]:
        """Changed files between two refs (``old`` defaults to the parent of ``new``)."""
        new_commit, new_snap = self.snapshot(new)
        if old is None:
            parent = new_commit.parents[0] if new_commit and new_commit.parents else None
            old_snap = Snapshot(self.blobs, self.read_commit(parent).tree if parent else None)
        else:
            _, old_snap = self.snapshot(old)
        return list(diff_trees(old_snap, new_snap, new.path))

    # -- open commits --------------------------------------------------------------------

    def open_commit(self, repo: str, branch: str, *,
                    trees: TreeCache | None = None) -> tuple[RefState, OpenCommit]:
        """The head of a branch and its open commit (possibly empty).

        Args:
            trees: the cache of decoded trees its head snapshot uses (trees are
                named by their content: a long-lived view keeps one across heads).
        """
        state, open_commit, _ = self._open_commit(repo, branch, trees)
        return state, open_commit

    def _open_commit(self, repo: str, branch: str, trees: TreeCache | None = None
                     ) -> tuple[RefState, OpenCommit, dict[str, bytes]]:
        """:meth:`open_commit`, plus the staged changes as the index holds them."""
        state = self.head(repo, branch)
        self._recover_seal(state)
        staged = self.index.staged(repo, branch)
        changes = {p: decode_change(v) for p, v in staged.items()}
        head = Snapshot(self.blobs, self.read_commit(state.commit).tree if state.commit else None,
                        trees)
        return state, OpenCommit(head, changes), staged

    def stage(self, state: RefState, changes: dict[str, object]) -> None:
        """Persist changes (path -> Entry or None) to a branch's open commit."""
        encoded = {p: encode_change(e) for p, e in changes.items()}  # type: ignore[arg-type]
        with self.index.write() as txn:
            self.index.stage_txn(txn, state.repo, state.branch, state.commit or "", encoded,
                                 drop_below=list(changes))

    def discard(self, repo: str, branch: str) -> int:
        """Drop a branch's open commit; return how many changes were dropped."""
        self.head(repo, branch)
        with self.lock():
            with self.index.write() as txn:  # counted where cleared: nothing staged in between
                count = self.index.clear_staging_txn(txn, repo, branch)
        self.settle()  # publish the node's pins without the dropped changes
        return count

    def _recover_seal(self, state: RefState) -> None:
        """Finish or forget a commit that was interrupted after its object was written.

        If the branch moved to it, its reflog entry is recorded (unless some entry
        already has it) and the staged changes it contains are unstaged; changes
        staged after it was sealed (by another process, or since) stay staged.
        """
        sealing = self.index.sealing(state.repo, state.branch)
        if sealing is None:
            return
        if state.commit == sealing:
            entries = read_reflog(self.objects, state.repo, state.branch)
            if not any(entry.new == sealing for entry in entries):
                parents = self.read_commit(sealing).parents
                self._append_reflog(state.repo, state.branch,
                                    parents[0] if parents else None, sealing,
                                    "commit (recorded after an interrupted commit)")
            made = Snapshot(self.blobs, self.read_commit(sealing).tree)
            sealed = {path: change for path, change in
                      self.index.staged(state.repo, state.branch).items()
                      if _contains(made, path, decode_change(change))}
            with self.index.write() as txn:
                self.index.clear_sealed_txn(txn, state.repo, state.branch, sealed, sealing)
        else:
            self.index.set_sealing(state.repo, state.branch, None)

    def commit(self, repo: str, branch: str, message: str = "", *, author: str | None = None,
               provenance: dict | None = None, metadata: dict | None = None,
               tree: str | None = None, why: str = "commit",
               allow_empty: bool = False, **exact) -> Commit:
        """Seal the open commit of a branch (or commit ``tree`` as is) and move the branch.

        The protocol is :func:`vfs.commit.commit`, which documents its steps (and
        ``exact``: its ``expect_head`` and ``fence``).

        Raises:
            NothingToCommit: nothing is staged, or the result equals the head.
            Conflict: the branch moved and touched paths the open commit overlaps.
        """
        return commit_protocol.commit(self, repo, branch, message, author=author,
                                      provenance=provenance, metadata=metadata, tree=tree,
                                      why=why, allow_empty=allow_empty, **exact)

    def rollback(self, repo: str, branch: str, target: RefSpec, message: str = "", *,
                 author: str | None = None) -> Commit:
        """Make a new commit on ``branch`` whose tree equals ``target``'s; history is kept.

        Raises:
            VfsError: the branch has an open commit (commit or discard it first).
        """
        if self.index.staged(repo, branch):
            raise VfsError(
                f"{repo}@{branch} has staged changes: commit or discard them before a rollback"
            )
        if target.repo != repo:
            raise InvalidRef(f"--to must name a commit of {repo}, not of {target.repo}")
        commit = self.resolve(target)
        if commit is None:
            raise CommitNotFound(f"{target} has no commits to roll back to")
        with self.lock():  # from the check until the commit is published
            self._check_not_condemned(commit.id)
            return self.commit(
                repo,
                branch,
                message or f"rollback to {commit.id[:12]}",
                author=author,
                tree=commit.tree,
                metadata={"rollback_to": commit.id},
                why=f"rollback to {commit.id}",
            )


def _condemned(commit_id: str) -> VfsError:
    return VfsError(f"commit {commit_id[:12]} is condemned by gc (no branch or recent reflog "
                    "entry named it) and its data is being deleted: it cannot be used")


def _contains(snapshot: Snapshot, path: str, change: Entry | None) -> bool:
    """Whether a commit's tree shows a staged change (is what sealing it made)."""
    now = snapshot.lookup(path)
    if change is None:
        return now is None
    if now is None or now.kind != change.kind:
        return False
    if change.kind == DIR and not change.ref:  # a new directory: sealed, it got a tree
        return (now.mode, now.mtime_ns) == (change.mode, change.mtime_ns)
    return now.same_content(change)


def open_store(url: str | None = None, *, cache_dir: str | None = None, create: bool = False,
               s3_endpoint: str | None = None, durable_index: bool = True) -> Store:
    """Open (or with ``create`` make) the store at ``url``.

    Args:
        url: store location; defaults to ``$VFS_STORE`` then ``~/.local/share/vfs/store``.
        cache_dir: node-local index and cache; defaults to ``$VFS_CACHE`` then ``~/.cache/vfs``.
        create: create the store if it does not exist (idempotent).
        s3_endpoint: endpoint of an S3-compatible service.
        durable_index: fsync the local index at every transaction (the daemon turns
            this off and syncs at commits and fsyncs instead).

    Raises:
        StoreNotFound: no store there and ``create`` is false.
        UnsupportedFormat: the store was written by a newer vfs.
    """
    objects = open_object_store(url or default_store_url(), create=create,
                                s3_endpoint=s3_endpoint)
    config = create_config(objects) if create else load_config(objects)
    return Store(objects, config, cache_dir or default_cache_dir(),
                 durable_index=durable_index)
