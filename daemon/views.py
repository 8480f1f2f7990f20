"""What the mount shows: one *view* per ``repo@ref`` name, and the changes to branch views.

A :class:`CommitView` is one immutable commit. A :class:`BranchView` is a branch's
head with its open commit laid over it, plus the files being written through the
mount (:class:`SpoolFile`): their bytes live in a spool file on local disk until a
flush turns them into blobs and a staged entry.

Everything here is synchronous and free of FUSE: :mod:`daemon.fs` calls it (in
worker threads where it does I/O) and turns its :class:`vfs.errors.VfsError`
exceptions into errnos.
"""

from __future__ import annotations

import os
import stat
import tempfile
import threading
import time
from dataclasses import dataclass, field

from vfs.errors import (
    AlreadyExists,
    DirectoryNotEmpty,
    InvalidPath,
    IsADirectory,
    NotADirectory,
    PathNotFound,
)
from vfs.ingest import encode_stream
from vfs.names import parent_and_name
from vfs.refs import Commit, RefState, read_ref
from vfs.snapshot import Snapshot
from vfs.staging import OpenCommit, new_dir
from vfs.store import Store
from vfs.tree import DIR, FILE, SYMLINK, Entry

BRANCH_RECHECK_SECONDS = 1.0


class View:
    """The files under one ``/pfs/<repo>@<ref>`` directory."""

    writable = False

    def __init__(self, store: Store, name: str, repo: str) -> None:
        self.store = store
        self.name = name
        self.repo = repo

    def lookup(self, path: str) -> Entry | None:
        raise NotImplementedError

    def listdir(self, path: str) -> dict[str, Entry]:
        raise NotImplementedError

    def spool(self, path: str) -> SpoolFile | None:
        return None


class CommitView(View):
    """One commit: immutable, so the kernel may cache everything under it."""

    def __init__(self, store: Store, name: str, commit: Commit) -> None:
        super().__init__(store, name, commit.repo)
        self.commit = commit
        self.snapshot = Snapshot(store.blobs, commit.tree)
        self._lock = threading.Lock()

    def lookup(self, path: str) -> Entry | None:
        with self._lock:  # the snapshot's tree LRU is not thread-safe
            return self.snapshot.lookup(path)

    def listdir(self, path: str) -> dict[str, Entry]:
        with self._lock:
            return self.snapshot.listdir(path)


@dataclass
class SpoolFile:
    """A file being written through the mount; its bytes are in ``spool_path``."""

    spool_path: str
    fd: int
    size: int
    mode: int
    mtime_ns: int
    opens: int = 0
    dirty: bool = False
    generation: int = 0  # bumped by every change of the bytes or attributes
    flushing: threading.Lock = field(default_factory=threading.Lock)  # one flush at a time

    def close(self) -> None:
        try:
            os.close(self.fd)
        finally:
            try:
                os.unlink(self.spool_path)
            except FileNotFoundError:
                pass


class BranchView(View):
    """A branch head plus its open commit plus files being written; read-write.

    All methods are called with the view's lock held by the caller
    (:attr:`lock`), so FUSE requests on one branch apply in order.
    """

    writable = True

    def __init__(self, store: Store, name: str, repo: str, branch: str,
                 spool_dir: str) -> None:
        super().__init__(store, name, repo)
        self.branch = branch
        self.spool_dir = spool_dir
        self.lock = threading.RLock()
        self.spools: dict[str, SpoolFile] = {}
        self.state: RefState
        self.open_commit: OpenCommit
        self._checked = 0.0
        self.reload()

    # -- state ---------------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the head and the open commit from the store and the index."""
        with self.lock:
            self.state, self.open_commit = self.store.open_commit(self.repo, self.branch)
            self._checked = time.monotonic()

    def maybe_refresh(self) -> None:
        """Notice a head moved by another writer (checked at most once a second)."""
        if time.monotonic() - self._checked < BRANCH_RECHECK_SECONDS:
            return
        with self.lock:
            self._checked = time.monotonic()
            current = read_ref(self.store.objects, self.repo, self.branch)
            if current.commit != self.state.commit:
                self.reload()

    # -- reading -------------------------------------------------------------------------

    def spool(self, path: str) -> SpoolFile | None:
        return self.spools.get(path)

    def lookup(self, path: str) -> Entry | None:
        spool = self.spools.get(path)
        if spool is not None:
            return Entry(parent_and_name(path)[1], FILE, spool.mode, spool.size,
                         spool.mtime_ns, "")
        return self.open_commit.lookup(path)

    def listdir(self, path: str) -> dict[str, Entry]:
        entries = self.open_commit.listdir(path)
        for spool_path in self.spools:
            parent, name = parent_and_name(spool_path)
            if parent == path:
                entries[name] = self.lookup(spool_path)  # type: ignore[assignment]
        return dict(sorted(entries.items()))

    # -- namespace changes ---------------------------------------------------------------------

    def _stage(self, changes: dict[str, Entry | None]) -> None:
        self.store.stage(self.state, changes)
        self.open_commit.apply(changes)

    def _parent_dir(self, path: str) -> None:
        parent = parent_and_name(path)[0]
        entry = self.lookup(parent)
        if entry is None:
            raise PathNotFound(f"no such directory: /{parent}")
        if entry.kind != DIR:
            raise NotADirectory(f"/{parent} is not a directory")

    def mkdir(self, path: str, mode: int) -> Entry:
        if not path:
            raise AlreadyExists("the root exists")
        self._parent_dir(path)
        if self.lookup(path) is not None:
            raise AlreadyExists(f"/{path} exists")
        entry = new_dir(parent_and_name(path)[1], mode & 0o7777, time.time_ns())
        self._stage({path: entry})
        return entry

    def symlink(self, path: str, target: str) -> Entry:
        self._parent_dir(path)
        if self.lookup(path) is not None:
            raise AlreadyExists(f"/{path} exists")
        entry = Entry(parent_and_name(path)[1], SYMLINK, 0o777, len(target.encode()),
                      time.time_ns(), target)
        self._stage({path: entry})
        return entry

    def unlink(self, path: str) -> None:
        entry = self.lookup(path)
        if entry is None:
            raise PathNotFound(f"no such file: /{path}")
        if entry.kind == DIR:
            raise IsADirectory(f"/{path} is a directory")
        spool = self.spools.pop(path, None)
        if spool is not None and spool.opens == 0:
            spool.close()
        if self.open_commit.lookup(path) is not None:
            self._stage({path: None})

    def rmdir(self, path: str) -> None:
        entry = self.lookup(path)
        if entry is None:
            raise PathNotFound(f"no such directory: /{path}")
        if entry.kind != DIR:
            raise NotADirectory(f"/{path} is not a directory")
        if not path:
            raise InvalidPath("the root of a branch cannot be removed")
        if self.listdir(path):
            raise DirectoryNotEmpty(f"/{path} is not empty")
        self._stage({path: None})

    def rename(self, src: str, dst: str, *, no_replace: bool = False) -> None:
        """Move ``src`` to ``dst`` (POSIX rename semantics, within this branch)."""
        entry = self.lookup(src)
        if entry is None:
            raise PathNotFound(f"no such file or directory: /{src}")
        if not src or not dst:
            raise InvalidPath("the root of a branch cannot be renamed")
        if dst == src:
            return
        if dst.startswith(src + "/"):
            raise InvalidPath(f"cannot move /{src} into itself")
        self._parent_dir(dst)
        target = self.lookup(dst)
        if target is not None:
            if no_replace:
                raise AlreadyExists(f"/{dst} exists")
            if target.kind == DIR and entry.kind != DIR:
                raise IsADirectory(f"/{dst} is a directory")
            if target.kind != DIR and entry.kind == DIR:
                raise NotADirectory(f"/{dst} is not a directory")
            if target.kind == DIR and self.listdir(dst):
                raise DirectoryNotEmpty(f"/{dst} is not empty")
            old = self.spools.pop(dst, None)
            if old is not None and old.opens == 0:
                old.close()
        name = parent_and_name(dst)[1]
        # Spools (files being written) move with their names.
        moved = {p: s for p, s in self.spools.items() if p == src or p.startswith(src + "/")}
        for p in moved:
            del self.spools[p]
        for p, s in moved.items():
            s.dirty = True  # it must be stored under its new name on the next flush
            self.spools[dst + p[len(src):]] = s
        if src in moved:
            committed = self.open_commit.lookup(src)
            changes: dict[str, Entry | None] = {}
            if committed is not None:
                changes[src] = None
            if target is not None and self.open_commit.lookup(dst) is not None:
                changes[dst] = None
            if changes:
                self._stage(changes)
            return
        staged_below = {p: self.open_commit.changes[p] for p in self.open_commit.below(src)}
        changes = {src: None, dst: entry.renamed(name)}
        for p, change in staged_below.items():
            changes[dst + p[len(src):]] = change
        self._stage(changes)

    def set_attributes(self, path: str, *, mode: int | None = None,
                       mtime_ns: int | None = None) -> Entry:
        """chmod / utimens of anything in the branch."""
        spool = self.spools.get(path)
        if spool is not None:
            if mode is not None:
                spool.mode = mode & 0o7777
            if mtime_ns is not None:
                spool.mtime_ns = mtime_ns
            spool.dirty = True  # the next flush stores the new attributes
            spool.generation += 1
            return self.lookup(path)  # type: ignore[return-value]
        entry = self.lookup(path)
        if entry is None:
            raise PathNotFound(f"no such file or directory: /{path}")
        new = Entry(entry.name, entry.kind,
                    entry.mode if mode is None else mode & 0o7777, entry.size,
                    entry.mtime_ns if mtime_ns is None else mtime_ns, entry.ref, entry.count)
        if new != entry and path:
            changes: dict[str, Entry | None] = {path: new}
            # Staging a directory entry replaces what was staged below it: keep that.
            for below in sorted(self.open_commit.below(path)):
                changes[below] = self.open_commit.changes[below]
            self._stage(changes)
        return new

    # -- writing file contents -------------------------------------------------------------

    def open_spool(self, path: str, *, truncate: bool, create_mode: int | None = None) -> SpoolFile:
        """The spool of ``path`` for writing (made from the current content if needed).

        Raises:
            PathNotFound: the file does not exist and ``create_mode`` is None.
        """
        spool = self.spools.get(path)
        if spool is None:
            entry = self.lookup(path)
            if entry is None and create_mode is None:
                raise PathNotFound(f"no such file: /{path}")
            if entry is not None and entry.kind == DIR:
                raise IsADirectory(f"/{path} is a directory")
            if entry is None:
                self._parent_dir(path)
            fd, spool_path = tempfile.mkstemp(dir=self.spool_dir, prefix="spool-")
            mode = entry.mode if entry is not None else (create_mode or 0o644) & 0o7777
            spool = SpoolFile(spool_path, fd, 0, mode, time.time_ns())
            try:
                if entry is not None and not truncate and entry.size:
                    self._fill(spool, entry)
                spool.mtime_ns = entry.mtime_ns if entry is not None and not truncate \
                    else spool.mtime_ns
            except BaseException:
                spool.close()
                raise
            spool.dirty = entry is None or (truncate and entry.size > 0)
            self.spools[path] = spool
        elif truncate and spool.size:
            os.ftruncate(spool.fd, 0)
            spool.size = 0
            spool.dirty = True
            spool.mtime_ns = time.time_ns()
        return spool

    def _fill(self, spool: SpoolFile, entry: Entry) -> None:
        from vfs.snapshot import iter_file

        offset = 0
        for data in iter_file(self.store.blobs, entry):
            os.pwrite(spool.fd, data, offset)
            offset += len(data)
        spool.size = offset

    def write(self, spool: SpoolFile, offset: int, data: bytes) -> int:
        written = os.pwrite(spool.fd, data, offset)
        spool.size = max(spool.size, offset + written)
        spool.dirty = True
        spool.generation += 1
        spool.mtime_ns = time.time_ns()
        return written

    def truncate(self, path: str, size: int) -> None:
        spool = self.open_spool(path, truncate=size == 0)
        os.ftruncate(spool.fd, size)
        spool.size = size
        spool.dirty = True
        spool.generation += 1
        spool.mtime_ns = time.time_ns()
        if spool.opens == 0:
            self.flush(path)
            if self.spools.get(path) is spool:
                del self.spools[path]
                spool.close()

    def flush(self, path: str) -> None:
        """Store a dirty spool's bytes as blobs and stage the file (durable on return).

        The encoding runs without the view's lock (it can take a while for a big
        file); a write that lands meanwhile leaves the spool dirty for the next flush.
        """
        with self.lock:
            spool = self.spools.get(path)
        if spool is None:
            return
        # Flushes of one spool run one at a time, so an older one can never be
        # staged after a newer one.
        with spool.flushing:
            with self.lock:
                if not spool.dirty or self.path_of(spool) is None:
                    return
                generation = spool.generation
                mode, mtime_ns = spool.mode, spool.mtime_ns
                # A file description of our own: its offset is not shared with anyone.
                fd = os.open(spool.spool_path, os.O_RDONLY)
            with os.fdopen(fd, "rb") as f, self.store.blobs.writer() as writer:
                ref, size = encode_stream(self.store, f, writer)
            with self.lock:
                current = self.path_of(spool)
                if current is None:
                    return  # unlinked meanwhile: nothing to stage
                entry = Entry(parent_and_name(current)[1], FILE, mode, size, mtime_ns, ref)
                self._stage({**self.open_commit.missing_parents(current), current: entry})
                if spool.generation == generation:
                    spool.dirty = False

    def release(self, path: str | None, spool: SpoolFile) -> None:
        """The last handle of a spool closed: flush it and drop it."""
        spool.opens -= 1
        if spool.opens > 0:
            return
        if path is not None and self.spools.get(path) is spool:
            self.flush(path)
            del self.spools[path]
        spool.close()

    def flush_all(self) -> None:
        """Flush every dirty spool (before a commit)."""
        for path, spool in list(self.spools.items()):
            if spool.dirty:
                self.flush(path)

    def path_of(self, spool: SpoolFile) -> str | None:
        for path, candidate in self.spools.items():
            if candidate is spool:
                return path
        return None


def entry_mode(entry: Entry) -> int:
    """``st_mode`` for an entry (new directories default to 0755)."""
    if entry.kind == DIR:
        return stat.S_IFDIR | (entry.mode & 0o7777 or 0o755)
    return entry.st_mode


__all__ = ["BranchView", "CommitView", "SpoolFile", "View", "entry_mode"]
