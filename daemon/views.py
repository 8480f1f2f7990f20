"""What the mount shows: one *view* per ``repo@ref`` name, and the changes to branch views.

A :class:`CommitView` is one immutable commit. A :class:`BranchView` is a branch's
head with its open commit laid over it, plus the files being written through the
mount (:class:`SpoolFile`): their bytes live in a spool file on local disk until
the flusher (:mod:`daemon.flusher`) turns them into blobs and a staged entry.
A closed file stays a spool (shown, readable, renamable) until it is staged; its
sidecar (:mod:`daemon.spools`) lets a restarted daemon stage it.

Everything here is synchronous and free of FUSE: :mod:`daemon.fs` calls it (in
worker threads where it does I/O) and turns its :class:`vfs.errors.VfsError`
exceptions into errnos.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, TypeVar

from daemon.spools import (
    Sidecar,
    SpoolFile,
    SpoolFiles,
    StoredSpool,
    write_sidecar,
)
from daemon.times import Times
from vfs.errors import (
    AlreadyExists,
    DirectoryNotEmpty,
    InvalidPath,
    IsADirectory,
    NotADirectory,
    PathNotFound,
    ReadOnly,
    VfsError,
)
from vfs.ingest import EncodedPrefix
from vfs.names import parent_and_name
from vfs.pipeline.registry import refuse_hand_commits
from vfs.refs import Commit, RefState, read_ref
from vfs.snapshot import NotCached, Snapshot, TreeCache, changed_paths
from vfs.staging import OpenCommit, new_dir
from vfs.store import Store
from vfs.tree import DIR, FILE, SYMLINK, Entry, Tree, permission_bits

if TYPE_CHECKING:
    from daemon.flusher import Flusher

BRANCH_RECHECK_SECONDS = 1.0
_MAX_TREE_READS = 64  # trees BranchView.locked reads without the lock, at most
T = TypeVar("T")


class View:
    """The files under one ``/pfs/<repo>@<ref>`` directory."""

    writable = False

    def __init__(self, store: Store, name: str, repo: str) -> None:
        self.store = store
        self.name = name
        self.repo = repo

    def lookup(self, path: str) -> Entry | None:
        raise NotImplementedError

    def lookup_nowait(self, path: str) -> Entry | None:
        """:meth:`lookup` from what is in memory (cheap, no I/O).

        Raises:
            NotCached: the answer needs a tree read from the store.
        """
        raise NotImplementedError

    def listdir(self, path: str) -> Mapping[str, Entry]:
        raise NotImplementedError

    def spool(self, path: str) -> SpoolFile | None:
        return None


class CommitView(View):
    """One commit: immutable, so the kernel may cache everything under it.

    Args:
        trees: the decoded trees, shared by all the commit views of a mount.
    """

    def __init__(self, store: Store, name: str, commit: Commit, trees: TreeCache) -> None:
        super().__init__(store, name, commit.repo)
        self.commit = commit
        self.snapshot = Snapshot(store.blobs, commit.tree, trees)  # thread-safe

    def lookup(self, path: str) -> Entry | None:
        return self.snapshot.lookup(path)

    def lookup_nowait(self, path: str) -> Entry | None:
        return self.snapshot.lookup_nowait(path)

    def listdir(self, path: str) -> Mapping[str, Entry]:
        return self.snapshot.listdir(path)

    def tree(self, tree_hex: str) -> Tree:
        """A decoded tree of this commit (reads and decodes it unless cached)."""
        return self.snapshot.tree(tree_hex)

    def cached_tree(self, tree_hex: str) -> Tree | None:
        """A decoded tree of this commit if it is in the cache (cheap: no I/O)."""
        return self.snapshot.cached_tree(tree_hex)


class Reload:
    """What a reload of a branch view changed, for the kernel's caches of its files.

    A change made through the mount is one the kernel saw; a reload brings in the
    others (put, rm, discard and rollback through the daemon, a commit, another
    node's commit). :meth:`paths` are the paths whose entry may differ, cheaply
    (what was staged before or after, and where the heads differ: a directory that
    appeared or vanished stands for everything below it); :meth:`compare` tells
    whether one does.
    """

    def __init__(self, old: OpenCommit | None, new: OpenCommit) -> None:
        self._old = old
        self._new = new

    def paths(self) -> Iterator[str]:
        """The paths whose entry may differ (reads trees where the heads differ)."""
        old, new = self._old, self._new
        if old is None:
            return
        for path in old.changes.keys() | new.changes.keys():
            if path not in old.changes or path not in new.changes or \
                    not _same(old.changes[path], new.changes[path]):
                yield path
        if old.head.root != new.head.root:
            try:
                yield from changed_paths(old.head, new.head)
            except VfsError:
                yield ""  # a tree cannot be read: the root stands for everything

    def entries(self, path: str) -> tuple[Entry | None, Entry | None]:
        """What ``path`` held before the reload and what it holds now (None: nothing).

        Raises:
            VfsError: a tree cannot be read.
        """
        if self._old is None:
            entry = self._new.lookup(path)
            return entry, entry
        return self._old.lookup(path), self._new.lookup(path)

    def compare(self, path: str) -> tuple[bool, bool]:
        """Whether ``path`` holds something else now, and whether what is below it may.

        Below a directory that appeared, vanished, or holds another tree, anything
        may differ (:meth:`paths` names only the directory). An entry that cannot
        be read counts as changed.
        """
        try:
            before, after = self.entries(path)
        except VfsError:
            return True, True
        if _same(before, after):
            return False, False
        dirs = [e for e in (before, after) if e is not None and e.kind == DIR]
        return True, bool(dirs) and not (len(dirs) == 2 and dirs[0].ref == dirs[1].ref)


def _same(a: Entry | None, b: Entry | None) -> bool:
    """The same thing at one path, as ``stat`` and ``read`` see it (an entry made
    here and one decoded from a tree differ in ``count``, which they do not show)."""
    if a is None or b is None:
        return a is b
    return (a.kind, a.ref, a.size, a.mtime_ns, a.mode) == (b.kind, b.ref, b.size, b.mtime_ns,
                                                            b.mode)


class BranchView(View):
    """A branch head plus its open commit plus files being written; read-write.

    All methods are called with the view's lock held by the caller
    (:attr:`lock`), so FUSE requests on one branch apply in order. Lookups,
    listings and reloads read the store without it (:meth:`locked`,
    :meth:`reload`); rarer work still reads under it (copying a stored file into
    its spool to write into it, a reload that raced a change). The FUSE loop
    never waits for it either way (``daemon.fs._with_lock``).

    Args:
        trees: the cache of decoded trees (default: one of its own); it is kept
            across reloads, so a new head reuses the trees it shares with the old.
    """

    writable = True

    def __init__(self, store: Store, name: str, repo: str, branch: str,
                 flusher: Flusher, trees: TreeCache | None = None) -> None:
        super().__init__(store, name, repo)
        self.branch = branch
        self.flusher = flusher
        self.trees = trees if trees is not None else TreeCache()
        self.spool_files: SpoolFiles = flusher.spool_files
        self.lock = threading.RLock()
        self.spools: dict[str, SpoolFile] = {}
        self.times = Times()  # atime, ctime, directory mtimes (daemon.times)
        self.state: RefState
        self.open_commit: OpenCommit
        self._checked = 0.0
        self._stale = False  # a reload failed: the next check reloads, head moved or not
        # Counts the changes of the open commit made here (under the lock): a reload
        # that read the store meanwhile must not lay an older open commit over them.
        self._changes = 0
        self.reload()

    # -- state ---------------------------------------------------------------------------

    def reload(self) -> Reload:
        """Re-read the head and the open commit from the store and the index.

        The store is read without the view's lock: requests on the branch go on
        meanwhile, answered from the view as it was. The new state then replaces
        the old under the lock, unless a change was staged here in between: then
        it is read again, under the lock (rare).

        A clean spool (stored, and kept only for the handles still open on it)
        whose path now holds something else stops standing for that path: it
        lives on through those handles, like a file replaced by a rename.

        Raises:
            VfsError: the store cannot be read (the view stays as it was).
        """
        seen = self._changes
        loaded = self._load()
        with self.lock:
            if self._changes != seen:
                loaded = self._load()
            return self._install(*loaded)

    def _load(self) -> tuple[RefState, OpenCommit, ReadOnly | None]:
        try:
            state, open_commit = self.store.open_commit(self.repo, self.branch,
                                                        trees=self.trees)
            try:  # asked again whenever the head moves (a pipeline's first job moves it)
                refuse_hand_commits(self.store.objects, self.repo, self.branch)
                refused = None
            except ReadOnly as exc:
                refused = exc
        except VfsError:
            self._stale = True
            raise
        for path in list(self.spools):  # the trees _install compares them in, read now
            with contextlib.suppress(VfsError):  # unreadable: compare says changed
                open_commit.lookup(path)
        return state, open_commit, refused

    def _install(self, state: RefState, open_commit: OpenCommit,
                 refused: ReadOnly | None) -> Reload:
        """Make a loaded state the view's (holding the lock)."""
        old = getattr(self, "open_commit", None)
        self.state, self.open_commit = state, open_commit
        self.refused: ReadOnly | None = refused
        self._stale = False
        self._changes += 1
        self._checked = time.monotonic()
        changes = Reload(old, self.open_commit)
        for path, spool in list(self.spools.items()):
            if not spool.dirty and changes.compare(path)[0]:
                del self.spools[path]
                self._forget(spool)
        return changes

    def refresh_due(self) -> bool:
        """Is it time to check the head again (at most once a second)? Cheap."""
        return time.monotonic() - self._checked >= BRANCH_RECHECK_SECONDS

    def maybe_refresh(self) -> Reload | None:
        """Notice a head moved by another writer: reload if it did.

        Reads the store (call it in a worker thread), without the view's lock
        but for a moment at the end of a reload.

        Returns:
            What the reload changed, or None if the head had not moved.

        Raises:
            VfsError: the store cannot be read (the view stays as it was).
        """
        self._checked = time.monotonic()
        current = read_ref(self.store.objects, self.repo, self.branch)
        if current.commit != self.state.commit or self._stale:
            return self.reload()
        return None

    # -- reading -------------------------------------------------------------------------

    def spool(self, path: str) -> SpoolFile | None:
        return self.spools.get(path)

    def lookup(self, path: str) -> Entry | None:
        spool = self.spools.get(path)
        if spool is not None:
            return Entry(parent_and_name(path)[1], FILE, spool.mode, spool.size,
                         spool.mtime_ns, "")
        return self.open_commit.lookup(path)

    def lookup_nowait(self, path: str) -> Entry | None:
        spool = self.spools.get(path)
        if spool is not None:
            return self.lookup(path)
        return self.open_commit.lookup_nowait(path)

    def subdirectories(self, path: str) -> int:
        """How many directories the directory at ``path`` holds (spools are files)."""
        return self.open_commit.subdirectories(path)

    def subdirectories_nowait(self, path: str) -> int:
        """:meth:`subdirectories` from what is in memory.

        Raises:
            NotCached: the answer needs a tree read from the store.
        """
        return self.open_commit.subdirectories_nowait(path)

    def locked(self, work: Callable[[], T], nowait: Callable[[], T]) -> T:
        """Run ``nowait`` holding the lock, with the trees it needs read without it.

        ``nowait`` is ``work`` from what is in memory: it raises
        :class:`NotCached` before changing anything. Each tree it misses is read
        with the lock released, then it runs again: a tree read from a slow store
        holds up the request that needs it, not every request on the branch.
        Call it in a worker thread.
        """
        for _ in range(_MAX_TREE_READS):
            with self.lock:
                try:
                    return nowait()
                except NotCached as exc:
                    snapshot, missing = self.open_commit.head, exc.tree_hex
            snapshot.tree(missing)  # into the cache every snapshot here shares
        with self.lock:  # the cache does not keep them (far too small): read holding it
            return work()

    def prefetch(self, *paths: str) -> None:
        """Read the trees a rename or unlink of ``paths`` looks at into the cache
        (holding the lock, in a worker thread): the change itself then runs in
        the FUSE loop without reading the store."""
        for path in paths:
            entry = self.lookup(path)
            if entry is not None and entry.kind == DIR:
                self.listdir(path)
                for below in self.open_commit.below(path):
                    self.lookup(below)

    def listdir(self, path: str) -> dict[str, Entry]:
        return self._with_spools(path, self.open_commit.listdir(path))

    def listdir_nowait(self, path: str) -> dict[str, Entry]:
        """:meth:`listdir` from what is in memory.

        Raises:
            NotCached: the answer needs a tree read from the store.
        """
        return self._with_spools(path, self.open_commit.listdir_nowait(path))

    def _with_spools(self, path: str, entries: dict[str, Entry]) -> dict[str, Entry]:
        added = False
        for spool_path in self.spools:
            parent, name = parent_and_name(spool_path)
            if parent == path:
                added = added or name not in entries
                entries[name] = self.lookup(spool_path)  # type: ignore[assignment]
        return dict(sorted(entries.items())) if added else entries

    # -- namespace changes ---------------------------------------------------------------------

    @contextlib.contextmanager
    def staging(self) -> Iterator[None]:
        """Hold the branch for a change that stages at once (mkdir, rename, chmod...).

        Takes the branch's lock (see :meth:`Flusher.branch_lock`), then the
        view's lock: a ``vfsctl commit`` that is sealing the branch finishes first,
        so it never clears a change it did not seal. Call it from a worker thread.
        """
        with self.flusher.branch_lock(self.repo, self.branch), self.lock:
            yield

    def _stage(self, changes: dict[str, Entry | None]) -> None:
        self.store.stage(self.state, changes)
        self.open_commit.apply(changes)
        self._changes += 1  # after the index holds them (see reload)

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
        entry = new_dir(parent_and_name(path)[1], permission_bits(mode), time.time_ns())
        self._stage({path: entry})
        self.times.parent_changed(path, entry.mtime_ns)
        return entry

    def symlink(self, path: str, target: str) -> Entry:
        self._parent_dir(path)
        if self.lookup(path) is not None:
            raise AlreadyExists(f"/{path} exists")
        entry = Entry(parent_and_name(path)[1], SYMLINK, 0o777, len(target.encode()),
                      time.time_ns(), target)
        self._stage({path: entry})
        self.times.parent_changed(path, entry.mtime_ns)
        return entry

    def unlink(self, path: str) -> None:
        entry = self.lookup(path)
        if entry is None:
            raise PathNotFound(f"no such file: /{path}")
        if entry.kind == DIR:
            raise IsADirectory(f"/{path} is a directory")
        spool = self.spools.pop(path, None)
        if spool is not None:
            self._forget(spool)
        if self.open_commit.lookup(path) is not None:
            self._stage({path: None})
        self.times.removed(path)
        self.times.parent_changed(path)

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
        self.times.removed(path)
        self.times.parent_changed(path)

    def rename(self, src: str, dst: str, *, no_replace: bool = False) -> None:
        """Move ``src`` to ``dst`` (POSIX rename semantics, within this branch)."""
        entry = self.lookup(src)
        if entry is None:
            raise PathNotFound(f"no such file or directory: /{src}")
        if not src or not dst:
            raise InvalidPath("the root of a branch cannot be renamed")
        if dst == src:
            return
        self._rename(src, dst, entry, no_replace=no_replace)
        now = time.time_ns()
        self.times.moved(src, dst)
        self.times.changed(dst, now)  # its ctime: a rename changes the inode
        self.times.parent_changed(src, now)
        self.times.parent_changed(dst, now)

    def _rename(self, src: str, dst: str, entry: Entry, *, no_replace: bool) -> None:
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
            if old is not None:
                self._forget(old)
        name = parent_and_name(dst)[1]
        # Spools (files being written) move with their names.
        moved = {p: s for p, s in self.spools.items() if p == src or p.startswith(src + "/")}
        for p in moved:
            del self.spools[p]
        for p, s in moved.items():
            s.dirty = True  # it must be stored under its new name on the next flush
            self._set_spool(dst + p[len(src):], s)
            if s.has_sidecar or s.writers == 0:
                self._closed(s, renamed=True)  # a restart must find it under its new name
        if src in moved:
            # What the open commit holds at dst stays until the spool is staged there:
            # a commit sealed meanwhile has the old file or the new one, never neither.
            if self.open_commit.lookup(src) is not None:
                self._stage({src: None})
            return
        staged_below = {p: self.open_commit.changes[p] for p in self.open_commit.below(src)}
        changes = {src: None, dst: entry.renamed(name)}
        for p, change in staged_below.items():
            changes[dst + p[len(src):]] = change
        self._stage(changes)

    def set_attributes(self, path: str, *, mode: int | None = None,
                       mtime_ns: int | None = None) -> Entry:
        """chmod / utimens of anything in the branch.

        Only the permission bits of ``mode`` are kept: chmod 4755 succeeds and leaves
        0755, as on a filesystem that does not keep setuid, setgid and sticky bits
        (see ``vfs.tree.PERMISSION_BITS``).
        """
        self.times.changed(path)
        spool = self.spools.get(path)
        if spool is not None:
            if mode is not None:
                spool.mode = permission_bits(mode)
            if mtime_ns is not None:
                spool.mtime_ns = mtime_ns
            spool.dirty = True  # the next flush stores the new attributes
            spool.generation += 1
            if spool.has_sidecar or spool.writers == 0:
                self._closed(spool)
            return self.lookup(path)  # type: ignore[return-value]
        entry = self.lookup(path)
        if entry is None:
            raise PathNotFound(f"no such file or directory: /{path}")
        new = Entry(entry.name, entry.kind,
                    entry.mode if mode is None else permission_bits(mode), entry.size,
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
            fd, spool_path = self.spool_files.take()
            mode = permission_bits(entry.mode if entry is not None else create_mode or 0o644)
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
            self._set_spool(path, spool)
            if entry is None:
                self.times.parent_changed(path, spool.mtime_ns)
            return spool
        spool.reopen()  # a closed file waiting for the flusher
        if truncate and spool.size:
            os.ftruncate(spool.fd, 0)
            spool.truncated(0)
            spool.size = 0
            spool.dirty = True
            spool.generation += 1
            spool.mtime_ns = time.time_ns()
        return spool

    def _fill(self, spool: SpoolFile, entry: Entry) -> None:
        """Copy a stored file into its new spool. Its chunks but the last become the
        spool's head: appending to a large file stores only what follows them."""
        from vfs.snapshot import file_chunks, iter_file

        offset = 0
        for data in iter_file(self.store.blobs, entry):
            os.pwrite(spool.fd, data, offset)
            offset += len(data)
        spool.size = spool.seq_end = offset
        chunks = file_chunks(self.store.blobs, entry)  # none for an inlined file
        if len(chunks) > 1:
            spool.head = EncodedPrefix.of_chunks(chunks[:-1])
            spool.head_epoch = spool.epoch
            spool.protected = spool.head.size

    @staticmethod
    def write(spool: SpoolFile, offset: int, data: bytes) -> int:
        """Write bytes into the spool (no lock needed: the flusher only reads them);
        then the caller records the write with :meth:`wrote`, holding the lock."""
        return os.pwrite(spool.fd, data, offset)

    def wrote(self, spool: SpoolFile, offset: int, written: int) -> None:
        """Record a write made by :meth:`write` (caller holds the lock).

        Under the lock because the flusher, holding it, checks ``generation`` and
        marks the spool clean: a write recorded half (``dirty`` set, ``generation``
        not bumped yet) would be marked clean with its bytes never stored, and the
        last release would drop them (tests/unit/test_write_race.py).
        """
        spool.size = max(spool.size, offset + written)
        spool.dirty = True
        spool.generation += 1
        spool.mtime_ns = time.time_ns()
        spool.wrote(offset, offset + written)
        if spool.wants_head(self.flusher.encode_ahead):
            spool.head_busy = True
            self.flusher.submit_head(self, spool)

    def truncate(self, path: str, size: int, *, closed: bool = False) -> None:
        """Cut or extend a file to ``size``.

        Args:
            closed: a truncate(2) by name, not through a handle: a whole change,
                handed to the flusher at once like a closed file (a reader holding
                the file open must not keep it from being stored).
        """
        spool = self.open_spool(path, truncate=size == 0)
        self._truncate_spool(spool, size)
        if closed or spool.writers == 0:
            self._closed(spool)
        if spool.opens == 0:  # truncate(2) of a file nobody has open: closed at once
            spool.close_fd()

    def _truncate_spool(self, spool: SpoolFile, size: int) -> None:
        os.ftruncate(spool.fd, size)
        spool.truncated(size)
        spool.size = size
        spool.dirty = True
        spool.generation += 1
        spool.mtime_ns = time.time_ns()

    def change_detached(self, spool: SpoolFile, *, size: int | None = None,
                        mode: int | None = None, mtime_ns: int | None = None) -> None:
        """ftruncate / fchmod / futimens of an open file whose name is gone.

        The file was unlinked or replaced while open: it lives on through its
        handles until the last one closes, and goes then. The change applies to
        what they see; nothing is staged, and no sidecar brings it back.
        """
        assert self.path_of(spool) is None
        if size is not None:
            self._truncate_spool(spool, size)
        if mode is not None:
            spool.mode = permission_bits(mode)
        if mtime_ns is not None:
            spool.mtime_ns = mtime_ns

    def close_file(self, spool: SpoolFile) -> None:
        """A handle of the spool was closed (FUSE flush): have it stored in the background.

        Writes the sidecar (so a ``kill -9`` of the daemon loses nothing) and hands
        the spool to the flusher; it stays in :attr:`spools`, so lookups and reads
        see it, until it is staged.
        """
        if spool.dirty and self.path_of(spool) is not None:
            self._closed(spool)

    def release(self, spool: SpoolFile, *, writer: bool = False) -> None:
        """A handle of the spool went away (``writer``: one that could write); after
        the last: keep it for the flusher, or drop it."""
        spool.opens -= 1
        spool.writers -= writer
        if spool.opens > 0:
            return
        path = self.path_of(spool)
        if path is None:  # unlinked while open
            spool.close()
        elif spool.dirty:
            try:
                self._closed(spool)
            finally:
                spool.close_fd()  # thousands of closed files must not hold a descriptor each
        else:
            del self.spools[path]
            spool.close(self.spool_files)

    def stage_stored(self, stored: list[StoredSpool]) -> None:
        """Stage what the flusher stored, in one index transaction (caller holds the lock).

        Each file goes under its current name (it may have been renamed meanwhile);
        a file deleted meanwhile is skipped. A spool that did not change since its
        bytes were read is then clean: dropped if no handle is open.
        """
        changes: dict[str, Entry | None] = {}
        staged: list[StoredSpool] = []
        for item in stored:
            current = self.path_of(item.spool)
            if current is None:
                continue
            entry = Entry(parent_and_name(current)[1], FILE, item.mode, item.size,
                          item.mtime_ns, item.ref)
            plan = {**self.open_commit.missing_parents(current), current: entry}
            self.open_commit.apply(plan)  # the next file sees the parents made here
            changes.update(plan)
            staged.append(item)
        if not changes:
            return
        try:
            self.store.stage(self.state, changes)
        except BaseException:
            self.reload()  # undo what was applied in memory only
            raise
        self._changes += 1  # after the index holds them (see reload)
        for item in staged:
            spool = item.spool
            if spool.generation != item.generation:
                continue  # changed meanwhile: stays dirty, its next close stores it again
            spool.dirty = False
            if spool.opens == 0:
                del self.spools[spool.path]
                spool.close(self.spool_files)
            else:
                spool.drop_sidecar()

    def write_sidecars(self) -> None:
        """Give every dirty spool a sidecar (at shutdown: whatever happens next, a
        restarted daemon stages them)."""
        for spool in self.spools.values():
            if spool.dirty:
                self._write_sidecar(spool)

    def path_of(self, spool: SpoolFile) -> str | None:
        """The spool's current name, or None if it was unlinked or replaced."""
        return spool.path if self.spools.get(spool.path) is spool else None

    def _set_spool(self, path: str, spool: SpoolFile) -> None:
        spool.path = path
        self.spools[path] = spool

    def _closed(self, spool: SpoolFile, *, renamed: bool = False) -> None:
        """The spool was closed (or changed while closed): sidecar, then the flusher."""
        if renamed or spool.sidecar_generation != spool.generation:
            self._write_sidecar(spool)  # else the one written at the last close holds
        self.flusher.submit(self, spool)

    def _write_sidecar(self, spool: SpoolFile) -> None:
        write_sidecar(spool.spool_path, Sidecar(self.repo, self.branch, spool.path,
                                                spool.mode, spool.mtime_ns),
                      replace=spool.has_sidecar, fd=spool.fd)
        spool.has_sidecar = True
        spool.sidecar_generation = spool.generation

    def _forget(self, spool: SpoolFile) -> None:
        """The spool's name is gone (unlinked or replaced): a restart must not bring it back."""
        if spool.opens == 0:
            spool.close()
        else:
            spool.drop_sidecar()  # it lives on through its handles only


__all__ = ["BranchView", "CommitView", "Reload", "View"]
