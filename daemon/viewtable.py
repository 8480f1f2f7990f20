"""The views of the mount by name, and what the control socket asks of branch views.

``repo@branch`` is a :class:`daemon.views.BranchView` (read-write), anything else
that resolves (a commit id or prefix, ``branch^``...) a read-only
:class:`daemon.views.CommitView`. A view is made on first lookup and kept.
"""

from __future__ import annotations

import logging
import threading

from daemon.flusher import Flusher
from daemon.views import BranchView, CommitView, Reload, View
from vfs.errors import BranchNotFound, CommitNotFound, VfsError
from vfs.names import parse_ref
from vfs.snapshot import TreeCache
from vfs.store import Store

log = logging.getLogger("daemon.fs")

_DECODED_TREE_BYTES = 32 * 1024 * 1024  # ~250,000 entries; the tree in use stays anyway


class ViewTable:
    """Every view of the mount, by name."""

    def __init__(self, store: Store, flusher: Flusher) -> None:
        self.store = store
        self.flusher = flusher
        # The decoded trees of every view: one budget for the whole mount.
        self.trees = TreeCache(_DECODED_TREE_BYTES)
        self._views: dict[str, View] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> View:
        """The view for ``repo@ref`` (made on first use; call it in a worker thread).

        Raises:
            InvalidRef, InvalidName: ``name`` is not a ref.
            NotFound: no such repository, branch or commit.
        """
        existing = self._views.get(name)
        if existing is not None:
            return existing
        spec = parse_ref(name, allow_path=False)
        with self._lock:
            if name in self._views:
                return self._views[name]
            view: View
            try:
                if spec.ancestor:
                    raise BranchNotFound("ancestor")
                self.store.head(spec.repo, spec.ref)
                view = BranchView(self.store, name, spec.repo, spec.ref, self.flusher,
                                  self.trees)
            except BranchNotFound:
                commit = self.store.resolve(spec)
                if commit is None:
                    raise CommitNotFound(f"{name} has no commits") from None
                view = CommitView(self.store, name, commit, self.trees)
            self._views[name] = view
            return view

    def branch(self, repo: str, branch: str) -> BranchView | None:
        """The view of ``repo@branch`` if the mount made one."""
        view = self._views.get(f"{repo}@{branch}")
        return view if isinstance(view, BranchView) else None

    def branches(self) -> list[BranchView]:
        return [v for v in list(self._views.values()) if isinstance(v, BranchView)]

    def drop(self, repo: str, branch: str | None = None) -> None:
        """Forget the views of a deleted branch (or of every ref of a deleted repo)."""
        prefix = f"{repo}@"
        for name in [n for n in list(self._views) if n.startswith(prefix)]:
            if branch is None or name == prefix + branch:
                self._views.pop(name, None)

    def open_files(self) -> int:
        return sum(len(view.spools) for view in self.branches())

    # -- for the control socket -------------------------------------------------------------

    def flush_everything(self) -> None:
        """Store every file written to every branch, open ones too (at a clean shutdown).

        Sidecars come first: if storing fails, a restarted daemon stages the files.
        """
        views = self.branches()
        for view in views:
            with view.lock:
                try:
                    view.write_sidecars()
                except OSError as exc:
                    log.error("could not record the files written to %s for the next start: "
                              "%s", view.name, exc)
        for view in views:
            try:
                self.flusher.wait_branch(view, include_open=True, durable=True)
            except VfsError as exc:
                log.error("could not store files written to %s (kept for the next start): "
                          "%s", view.name, exc)
            with view.lock:  # the process goes away: no handle stays open
                for spool in list(view.spools.values()):
                    if spool.dirty:
                        spool.close_fd()
                    else:
                        del view.spools[spool.path]
                        spool.close()

    def flush_branch(self, repo: str, branch: str) -> None:
        """Store every file written to a branch, open ones as they are now (before a commit).

        Raises:
            VfsError: storing one of them failed (StoreFull for a full disk).
        """
        view = self.branch(repo, branch)
        if view is not None:
            self.flusher.wait_branch(view, include_open=True, durable=False)

    def wait_staged(self, repo: str, branch: str) -> None:
        """Return once every file closed on a branch is staged (before put, rm, status...).

        Raises:
            VfsError: storing one of them failed.
        """
        view = self.branch(repo, branch)
        if view is not None:
            self.flusher.wait_branch(view, include_open=False, durable=False)

    def reload_branch(self, repo: str, branch: str) -> tuple[BranchView, Reload] | None:
        """Reload a branch view after a change made outside FUSE; what it changed.

        A commit or rollback reloads while it still holds the branch's sealing
        lock: a change staged through the mount right after it must be staged on
        the new head, not on the one the view still had.
        """
        view = self.branch(repo, branch)
        return None if view is None else (view, view.reload())
