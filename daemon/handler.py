"""What vfsctl asks the daemon over the control socket, and how the daemon does it.

State-changing commands go through the daemon while it owns the store, so the
mount's views and the CLI never disagree: each one runs the library call and then
reloads the branch view it touched. ``dispatch`` runs in a worker thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator

import vfs
from daemon.fs import VfsOperations
from daemon.protocol import commit_to_dict
from daemon.reader import DiskCache
from vfs.errors import VfsError
from vfs.names import parse_ref
from vfs.pipeline import records, registry
from vfs.pipeline.spec import Spec, parse_spec

log = logging.getLogger("daemon.handler")

class ControlHandler:
    """Executes control requests against the store and the mounted views."""

    def __init__(self, store: vfs.Store, operations: VfsOperations, mountpoint: str,
                 disk: DiskCache | None) -> None:
        self.store = store
        self.operations = operations
        self.mountpoint = mountpoint
        self.disk = disk
        self.stop: Callable[[], None] = lambda: None
        self.watcher = None  # daemon.watcher.Watcher, set by serve()

    def dispatch(self, op: str, args: dict) -> object:
        method = getattr(self, f"op_{op}", None)
        if method is None:
            raise VfsError(f"vfsd does not know the request {op!r}: is vfsctl newer than vfsd?")
        return method(**args)

    @contextlib.contextmanager
    def _sealing(self, repo: str, branch: str) -> Iterator[None]:
        """Hold a branch's lock for a commit, discard or rollback (no flusher
        round stages into it meanwhile), then do what :meth:`_changed` does.

        The view is reloaded before the lock goes: a change staged through the mount
        right after must be staged on the new head, not on the one the view had.
        The kernel's caches are dropped after it went (see
        daemon.coherence.Coherence.drop_cached). A reload that fails (the node's disk
        is full, say) does not fail the request: the change is made in the store,
        which is the truth; the view reloads when the mount next looks at the branch.
        """
        reloaded = None
        try:
            with self.operations.flusher.branch_lock(repo, branch):
                try:
                    yield
                finally:
                    try:
                        reloaded = self.operations.views.reload_branch(repo, branch)
                    except VfsError as exc:
                        log.warning("the mount cannot reload %s@%s after a change: %s; "
                                    "it tries again when the branch is next read",
                                    repo, branch, exc)
        finally:
            self.operations.coherence.drop_cached(reloaded)
            if self.watcher is not None:
                self.watcher.nudge()

    # -- requests ------------------------------------------------------------------------

    def op_hello(self) -> dict:
        return {"store_id": self.store.config.store_id, "pid": os.getpid(),
                "mount": self.mountpoint, "version": 1}

    def op_status(self) -> dict:
        open_commits = [
            {"repo": repo, "branch": branch,
             "changes": len(self.store.index.staged(repo, branch))}
            for repo, branch in self.store.index.open_commits()
        ]
        open_files = self.operations.views.open_files()
        return {"mount": self.mountpoint, "pid": os.getpid(), "store": self.store.objects.url,
                "cache": {"dir": self.store.cache_dir,
                          "used_bytes": self.disk.used if self.disk else 0,
                          "limit_bytes": self.disk.limit if self.disk else 0},
                "open_commits": open_commits, "open_files": open_files,
                "jobs": [{"id": job.id, "pipeline": job.pipeline,
                          "datums_total": job.datums_total,
                          "datums_skipped": job.datums_skipped,
                          "datums_processed": job.datums_processed}
                         for job in (self.watcher.running_jobs() if self.watcher else [])]}

    def op_put(self, repo: str, branch: str, dest: str, sources: list[str],
               recursive: bool = False, delete: bool = False, stdin: bool = False) -> dict:
        self.operations.views.wait_staged(repo, branch)  # files closed before the put go first
        # Holding the branch like a commit: a commit meanwhile would clear what the put
        # staged on the old head, or leave it staged on a head that moved.
        with self._sealing(repo, branch):
            if stdin:
                with open(sources[0], "rb") as f:
                    result = vfs.put_stream(self.store, repo, branch, dest, f)
            else:
                result = vfs.put(self.store, repo, branch, dest, sources,
                                 recursive=recursive, delete=delete)
        return {"files": result.files, "read": result.read, "cached": result.cached,
                "unchanged": result.unchanged, "staged": result.staged,
                "deleted": result.deleted, "bytes_read": result.bytes_read,
                "bytes_stored": result.bytes_stored, "skipped": result.skipped}

    def op_rm(self, repo: str, branch: str, path: str, recursive: bool = False) -> dict:
        self.operations.views.wait_staged(repo, branch)
        with self._sealing(repo, branch):  # as put
            count = vfs.remove(self.store, repo, branch, path, recursive=recursive)
        return {"files": count}

    def op_commit(self, repo: str, branch: str, message: str = "",
                  author: str | None = None) -> dict:
        # Files closed before now, and files still open as they are now, are stored
        # and staged first. No flusher round stages into the branch while it is
        # sealed: the commit clears exactly what it sealed.
        self.operations.views.flush_branch(repo, branch)
        with self._sealing(repo, branch):
            commit = self.store.commit(repo, branch, message, author=author)
        try:
            self.store.index.sync()
        except VfsError as exc:  # made in the store all the same: say so, not "failed"
            log.warning("commit %s was made but the local index cannot be synced: %s",
                        commit.id[:12], exc)
        return commit_to_dict(commit)

    def op_discard(self, repo: str, branch: str) -> dict:
        self.operations.views.wait_staged(repo, branch)  # closed files are discarded too
        with self._sealing(repo, branch):
            count = self.store.discard(repo, branch)
        return {"changes": count}

    def op_rollback(self, repo: str, branch: str, to: str, message: str = "",
                    author: str | None = None) -> dict:
        target = parse_ref(to if "@" in to else f"{repo}@{to}", allow_path=False)
        self.operations.views.wait_staged(repo, branch)  # closed files count as staged changes
        with self._sealing(repo, branch):
            commit = self.store.rollback(repo, branch, target, message, author=author)
        return commit_to_dict(commit)

    def op_branch_create(self, repo: str, branch: str, **kwargs: str | None) -> dict:
        start = kwargs.get("from")
        spec = parse_ref(start, allow_path=False) if start else None
        info = self.store.create_branch(repo, branch, spec)
        return {"repo": info.repo, "branch": info.name, "head": info.head}

    def op_wait_staged(self, repo: str, branch: str) -> dict:
        """Return once every file closed on the branch is staged (``vfsctl status``)."""
        self.operations.views.wait_staged(repo, branch)
        return {}

    def op_branch_delete(self, repo: str, branch: str) -> dict:
        self.operations.views.wait_staged(repo, branch)
        self.store.delete_branch(repo, branch)
        self.operations.views.drop(repo, branch)
        return {}

    def op_repo_delete(self, name: str, force: bool = False) -> dict:
        self.store.delete_repo(name, force=force)
        self.operations.views.drop(name)
        return {}

    # -- pipelines ---------------------------------------------------------------------

    def op_pipeline_create(self, spec: dict, author: str | None = None) -> dict:
        parsed = parse_spec(spec, source="request")
        warnings = self._check_runtime(parsed)
        version = registry.create(self.store, parsed, author=author)
        self._pipelines_changed()
        return {"version": version.version, "warnings": warnings}

    def op_pipeline_update(self, spec: dict, keep_outputs: bool = False,
                           author: str | None = None) -> dict:
        parsed = parse_spec(spec, source="request")
        warnings = self._check_runtime(parsed)
        version = registry.update(self.store, parsed, keep_outputs=keep_outputs,
                                  author=author)
        self._pipelines_changed()
        return {"version": version.version, "warnings": warnings}

    def _check_runtime(self, spec: Spec) -> list[str]:
        """Can this node run the spec (runtime installed, image usable, the process
        runtime allowed)? Raises InvalidSpec if not; returns what it cannot enforce."""
        if self.watcher is not None:
            runtime = self.watcher.runtime(spec.runtime)
        else:  # a node that runs no pipelines: check what any node would need
            from daemon.runtimes import get_runtime

            runtime = get_runtime(spec.runtime, allow_process_as_root=True)
        runtime.check(spec.image)
        return [f"runtime {spec.runtime} cannot enforce the {limit} limit"
                for limit in runtime.unsupported_limits(spec.memory, spec.cpu, spec.pids)]

    def op_pipeline_delete(self, name: str, author: str | None = None) -> dict:
        version = registry.delete(self.store, name, author=author)
        self._pipelines_changed()
        return {"version": version.version}

    def op_job_cancel(self, job: str) -> dict:
        # In the store first: every node taking part stops at its next look; this
        # one at once.
        records.cancel_job(self.store.objects, job)
        if self.watcher is not None:
            self.watcher.cancel_job(job)
        return {}

    def _pipelines_changed(self) -> None:
        if self.watcher is not None:
            self.watcher.nudge()

    def op_unmount(self) -> dict:
        self.stop()
        return {}


