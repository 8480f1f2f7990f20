"""The FUSE operations of the mount (pyfuse3), over the views of :mod:`daemon.views`.

``/`` lists ``repo@branch`` for every branch; ``repo@<commit or prefix>`` resolves
on lookup only. Handlers may raise only ``FUSEError``: :func:`_errors` turns every
domain error into its errno at this boundary, logs it once, and the mount keeps
serving. Corruption is EIO plus a logged corruption report, never wrong bytes.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import pyfuse3
import trio

from daemon import coherence
from daemon.commit_inodes import CommitDir
from daemon.flusher import Flusher
from daemon.inodes import DELETED, Inodes, Node
from daemon.reader import ChunkCache, FileReader, ReportedCorruption
from daemon.spools import SpoolFile
from daemon.views import BranchView, CommitView, Reload, View
from vfs.errors import (
    BranchNotFound,
    CommitNotFound,
    Corruption,
    InvalidName,
    InvalidRef,
    NotFound,
    ReadOnly,
    VfsError,
)
from vfs.names import MAX_COMPONENT_BYTES, MAX_PATH_BYTES, join, normalize_path, parse_ref
from vfs.snapshot import TreeCache
from vfs.store import Store
from vfs.tree import DIR, EMPTY_TREE, FILE, SYMLINK, Entry, Tree, decode_tree, permission_bits

log = logging.getLogger("daemon.fs")
T = TypeVar("T")

COMMIT_TIMEOUT = 24 * 3600.0  # commits never change: let the kernel cache them
BRANCH_TIMEOUT = 1.0  # a moved head shows within a second
ROOT_TIMEOUT = 1.0
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND
_BLOCK_SIZE = 128 * 1024
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
_S_IFDIR, _S_IFREG, _S_IFLNK = stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK
_EMPTY_TREE = decode_tree(EMPTY_TREE)
_DECODED_TREE_BYTES = 32 * 1024 * 1024  # ~250,000 entries; the tree in use stays anyway
# The path of a Node whose name is gone (unlinked or replaced) while the kernel
# still holds it: no entry has a NUL in its name.
# Entries of a commit's directory whose subdirectories' trees are read together
# (a readdirplus reply holds a few dozen).
_READDIR_AHEAD = 64
_TREE_READERS = 4


def _errors(handler: Callable) -> Callable:
    """Translate exceptions into FUSEError at the boundary (and log them once)."""

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except ReportedCorruption:  # the chunk cache reported it when it found it
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Corruption as exc:
            log.error("corruption report: %s", exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except VfsError as exc:
            code = exc.errno
            # The caller's mistakes (ENOENT, EEXIST, EROFS...) are its to see; a failing
            # store or index, or a full disk, is the operator's.
            log.log(logging.WARNING if code in (errno.EIO, errno.ENOSPC) else logging.DEBUG,
                    "%s: %s (%s)", handler.__name__, exc, errno.errorcode.get(code, code))
            raise pyfuse3.FUSEError(code) from None
        except OSError as exc:
            log.warning("%s failed: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("internal error in %s", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _errors_unanswered(handler: Callable) -> Callable:
    """The boundary of a handler the kernel expects no answer from (``forget``).

    There is no errno to give back, and any exception, FUSEError too, would end
    ``pyfuse3.main()``: log it, with its traceback, and keep serving. What it
    leaves undone is lookup counts, which only keep an inode's record longer.
    """

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            await handler(*args, **kwargs)
        except Exception:
            log.exception("internal error in %s", handler.__name__)

    return wrapper


async def _with_lock(view: BranchView, work: Callable[[], T]) -> T:
    """Run short work on a branch view while holding its lock.

    For bookkeeping and a few local syscalls (create a spool, write a sidecar, close a
    descriptor) a hand-off to a worker thread costs more than the work itself and is
    most of what a small-file writer waits for: run it right here when the lock is
    free, and in a worker thread only when another thread holds it (never block the
    FUSE loop on a lock).
    """
    if view.lock.acquire(blocking=False):
        try:
            return work()
        finally:
            view.lock.release()

    def locked() -> T:
        with view.lock:
            return work()

    return await trio.to_thread.run_sync(locked)


@dataclass
class Handle:
    node: Node
    reader: FileReader | None = None
    spool: SpoolFile | None = None
    # A read-only handle of a branch file: it reads what the file holds at each
    # read (the spool it is being written to, or its stored bytes), not what it
    # held at the open (see daemon.coherence).
    follows: bool = False


@dataclass
class DirHandle:
    node: Node | None
    entries: list[tuple[str, Entry | None, View | None]] = field(default_factory=list)
    directory: CommitDir | None = None  # a directory of a commit: its entries are in tree
    tree: Tree | None = None


class VfsOperations(pyfuse3.Operations):
    """pyfuse3 request handlers for the whole namespace."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, store: Store, spool_dir: str, cache: ChunkCache,
                 flusher: Flusher) -> None:
        super().__init__()
        self.store = store
        self.spool_dir = spool_dir
        self.flusher = flusher
        self.cache = cache
        self.nursery: trio.Nursery | None = None
        self.started_ns = time.time_ns()
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.inodes = Inodes()
        self.root = self.inodes.root
        self.commit_inodes = self.inodes.commit_inodes
        # The decoded trees of every commit view: one budget for the whole mount.
        self.trees = TreeCache(_DECODED_TREE_BYTES)
        self._handles: dict[int, Handle | DirHandle] = {}
        self._next_handle = 1
        self.views: dict[str, View] = {}
        self._views_lock = threading.Lock()

    # -- inodes (daemon.inodes) ------------------------------------------------------------

    def _node(self, view: View, path: str) -> Node:
        return self.inodes.node(view, path)

    def _get(self, inode: int) -> Node:
        node = self.inodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _moved(self, view: View, src: str, dst: str) -> None:
        self.inodes.moved(view, src, dst)

    def _forget_path(self, view: View, path: str) -> None:
        self.inodes.forget_path(view, path)

    @_errors_unanswered
    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        self.inodes.forget(inode_list)

    # -- views ---------------------------------------------------------------------------

    def view(self, name: str) -> View:
        """The view for ``repo@ref`` (branches are read-write, commits read-only)."""
        existing = self.views.get(name)
        if existing is not None:
            return existing
        try:
            spec = parse_ref(name, allow_path=False)
        except (InvalidRef, InvalidName):
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        with self._views_lock:
            if name in self.views:
                return self.views[name]
            view: View
            try:
                if spec.ancestor:
                    raise BranchNotFound("ancestor")
                self.store.head(spec.repo, spec.ref)
                view = BranchView(self.store, name, spec.repo, spec.ref, self.flusher)
            except BranchNotFound:
                commit = self.store.resolve(spec)
                if commit is None:
                    raise CommitNotFound(f"{name} has no commits") from None
                view = CommitView(self.store, name, commit, self.trees)
            self.views[name] = view
            return view

    def branch_view(self, repo: str, branch: str) -> BranchView | None:
        view = self.views.get(f"{repo}@{branch}")
        return view if isinstance(view, BranchView) else None

    def _entry(self, node: Node) -> Entry:
        if node.view is None:
            return Entry("", DIR, 0o755, 0, 0, "")
        entry = self._view_entry(node.view, node.path)
        if entry is None:
            entry = self._entry_of_open_handle(node)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    def _view_entry(self, view: View, path: str) -> Entry | None:
        if isinstance(view, BranchView):
            self._refresh(view)
        return view.lookup(path)

    def _refresh(self, view: BranchView) -> None:
        """Notice a head moved by another node (a request handler calls it in passing):
        what the kernel caches of the files it changed is dropped soon after."""
        changes = view.maybe_refresh()
        if changes is not None and self.nursery is not None:
            self.nursery.start_soon(self._drop_changed_soon, view, changes)

    def _entry_of_open_handle(self, node: Node) -> Entry | None:
        """An unlinked file still works through its open handles (the temp-file idiom).

        A handle that writes (its spool) says, before one opened to read the file
        as it was.
        """
        handles = self._open_handles(node)
        for handle in handles:
            if handle.spool is not None:
                spool = handle.spool
                return Entry(node.path.rpartition("/")[2], FILE, spool.mode, spool.size,
                             spool.mtime_ns, "")
        for handle in handles:
            if handle.reader is not None:
                return handle.reader.entry
        return None

    def _open_handles(self, node: Node) -> list[Handle]:
        """The open handles of ``node`` (any thread: the table is copied first)."""
        return [handle for handle in list(self._handles.values())
                if isinstance(handle, Handle) and handle.node is node]

    async def _subdirectories_of(self, view: View | None, path: str, entry: Entry) -> int:
        """How many directories ``entry`` (at ``path`` in ``view``) holds, for its link count.

        Reads its tree unless cached; on a branch, in a worker thread if another
        one holds the branch's lock.
        """
        if entry.kind != DIR:
            return 0
        if isinstance(view, BranchView):
            return await _with_lock(view, functools.partial(view.subdirectories, path))
        if isinstance(view, CommitView) and entry.ref:
            return (await self._tree(view, entry.ref)).subdirectories
        return 0

    def _attrs(self, node: Node, entry: Entry,
               subdirectories: int = 0) -> pyfuse3.EntryAttributes:
        """The attributes of a node (``subdirectories``: see :meth:`_subdirectories_of`)."""
        view = node.view
        timeout = (COMMIT_TIMEOUT if isinstance(view, CommitView)
                   else BRANCH_TIMEOUT if view is not None else ROOT_TIMEOUT)
        attrs = self._new_attrs(timeout)
        # Roots and new directories carry no time of their own: show the mount's.
        mtime_ns = entry.mtime_ns or self.started_ns
        if isinstance(view, BranchView) and node.path != DELETED:
            shown = view.times.shown(node.path, mtime_ns)
            _fill_attrs(attrs, node.inode, entry.kind, entry.mode, entry.size, shown.mtime_ns,
                        subdirectories, atime_ns=shown.atime_ns, ctime_ns=shown.ctime_ns)
        else:
            _fill_attrs(attrs, node.inode, entry.kind, entry.mode, entry.size, mtime_ns,
                        subdirectories)
        if node.path == DELETED:
            attrs.st_nlink = 0  # open, and no name any more
        if view is None:
            # The mount root: its entries are branches listed from the store, and
            # counting them on every stat would list the store. 1 is what a
            # filesystem that does not count says (find and fts read it so).
            attrs.st_nlink = 1
        return attrs

    def _new_attrs(self, timeout: float) -> pyfuse3.EntryAttributes:
        """Attributes with the fields every inode shares filled in."""
        attrs = pyfuse3.EntryAttributes()
        attrs.st_uid = self.uid
        attrs.st_gid = self.gid
        attrs.st_blksize = _BLOCK_SIZE
        attrs.entry_timeout = timeout
        attrs.attr_timeout = timeout
        return attrs

    async def _commit_attrs(self, view: CommitView, inode: int,
                            row: list) -> pyfuse3.EntryAttributes:
        """The attributes of an entry of a commit, from its tree row."""
        attrs = self._new_attrs(COMMIT_TIMEOUT)
        _fill_attrs(attrs, inode, row[1], row[2], row[3], row[4] or self.started_ns,
                    await self._subdirectories(view, row))
        return attrs

    async def _subdirectories(self, view: CommitView, row: list) -> int:
        """How many directories the entry of a commit of tree row ``row`` holds."""
        if row[1] != DIR:
            return 0
        return (await self._tree(view, row[5])).subdirectories

    # -- inside commits: numbered by directory (daemon.commit_inodes) ---------------------------

    async def _tree(self, view: CommitView, tree_hex: str) -> Tree:
        if not tree_hex:
            return _EMPTY_TREE
        tree = view.cached_tree(tree_hex)
        if tree is None:  # read and decode it without blocking other requests
            tree = await trio.to_thread.run_sync(view.tree, tree_hex)
        return tree

    async def _directory(self, inode: int) -> CommitDir:
        """The record of directory ``inode`` (the root of a commit view or a directory in it).

        Raises:
            FUSEError: ENOENT (unknown inode), ENOTDIR.
        """
        directory = self.commit_inodes.directory(inode)
        if directory is not None:
            return directory
        node = self.inodes.nodes.get(inode)
        if node is not None:
            assert isinstance(node.view, CommitView) and not node.path
            view, path, tree_hex = node.view, "", node.view.commit.tree or ""
        else:
            located = self.commit_inodes.locate(inode)
            if located is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            parent, index = located
            row = (await self._tree(parent.view, parent.tree)).row(index)
            if row[1] != DIR:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            view, path, tree_hex = parent.view, parent.child_path(row[0]), row[5]
        size = len(await self._tree(view, tree_hex))
        # Another request may have numbered it while this one waited for the tree.
        return self.commit_inodes.directory(inode) or self.commit_inodes.add(
            view, inode, path, tree_hex, size)

    async def _commit_lookup(self, parent_inode: int, name: bytes) -> pyfuse3.EntryAttributes:
        """lookup in the root of a commit view or a directory in it."""
        if name == b"." or name == b"..":
            inode = parent_inode
            if name == b"..":  # the directory holding the parent (the mount root for a view)
                located = self.commit_inodes.locate(parent_inode)
                inode = located[0].inode if located is not None else pyfuse3.ROOT_INODE
            node = self.inodes.nodes.get(inode)
            if node is not None:
                entry = self._entry(node)
                attrs = self._attrs(node, entry,
                                    await self._subdirectories_of(node.view, node.path, entry))
                node.lookups += 1
                return attrs
            located = self.commit_inodes.locate(inode)
            if located is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            directory, index = located
        else:
            directory = await self._directory(parent_inode)
            index = (await self._tree(directory.view, directory.tree)).index(os.fsdecode(name))
            if index is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
        row = (await self._tree(directory.view, directory.tree)).row(index)
        attrs = await self._commit_attrs(directory.view, directory.base + index, row)
        directory.remember(index)
        return attrs

    async def _read_trees(self, view: CommitView, tree: Tree, start: int) -> None:
        """Read the trees of the directories among the next entries of a listing.

        Their link counts need them. In a few threads at once: one after the
        other, a listing of many directories would wait for each read in turn
        (a request each on S3).
        """
        rows = map(tree.row, range(start, min(start + _READDIR_AHEAD, len(tree))))
        missing = sorted({row[5] for row in rows
                          if row[1] == DIR and row[5] and view.cached_tree(row[5]) is None})
        if not missing:
            return

        def read(group: list[str]) -> None:
            for tree_hex in group:
                view.tree(tree_hex)

        async with trio.open_nursery() as nursery:
            for k in range(min(_TREE_READERS, len(missing))):
                nursery.start_soon(trio.to_thread.run_sync, read, missing[k::_TREE_READERS])

    async def _readdir_commit(self, handle: DirHandle, start: int, token) -> None:
        directory, tree = handle.directory, handle.tree
        assert directory is not None and tree is not None
        # One attributes object for the whole reply (readdir_reply copies it), and
        # the loop kept tight: ls -l of 100,000 files runs it 100,000 times.
        attrs = self._new_attrs(COMMIT_TIMEOUT)
        base, row_at, reply, fill = directory.base, tree.row, pyfuse3.readdir_reply, _fill_attrs
        default_mtime, view = self.started_ns, directory.view
        await self._read_trees(view, tree, start)
        index = start
        for index in range(start, len(tree)):
            row = row_at(index)
            # A directory's link count needs its own tree (read here, once, and cached).
            subdirectories = (await self._tree(view, row[5])).subdirectories \
                if row[1] == DIR else 0
            fill(attrs, base + index, row[1], row[2], row[3], row[4] or default_mtime,
                 subdirectories)
            # The offset of an entry is its position + 1: stable, the tree never changes.
            if not reply(token, row[0].encode(_FS_ENCODING, _FS_ERRORS), attrs, index + 1):
                break
        else:
            index = len(tree)
        # readdirplus: the kernel now holds a reference to each entry it was sent.
        directory.remember_range(start, index)

    def _writable(self, node: Node) -> BranchView:
        if isinstance(node.view, BranchView):
            if node.view.refused is not None:  # a pipeline's output branch
                raise ReadOnly(str(node.view.refused))
            return node.view
        raise ReadOnly("commits are read-only; write to a branch path (repo@branch)")

    def _new_path(self, parent: str, name: str) -> str:
        """The path of an entry to be made: refused if it is too long to commit."""
        path = join(parent, name)
        if len(path.encode(_FS_ENCODING, _FS_ERRORS)) > MAX_PATH_BYTES:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        return path

    @staticmethod
    def _name(name: bytes) -> str:
        try:
            text = name.decode()
        except UnicodeDecodeError:
            text = os.fsdecode(name)  # normalize_path says what is wrong with it
        else:
            # The common case, cheaply (every lookup of a branch passes here); the
            # kernel never sends "/" or NUL, but FUSE allows names up to 1024 bytes.
            if len(name) <= MAX_COMPONENT_BYTES and text not in ("", ".", "..") \
                    and "/" not in text:
                return text
        normalized = normalize_path(text)
        if normalized != text:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return text

    # -- lookup and attributes ---------------------------------------------------------------

    @_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx=None) -> pyfuse3.EntryAttributes:
        parent = self.inodes.nodes.get(parent_inode)
        if parent is None or isinstance(parent.view, CommitView):
            return await self._commit_lookup(parent_inode, name)
        text = os.fsdecode(name)
        if text == ".":
            node = parent
        elif text == "..":
            if parent.view is None or not parent.path:
                node = self.root
            else:
                node = self._node(parent.view, parent.path.rpartition("/")[0])
        elif parent.view is None:
            try:
                view = await trio.to_thread.run_sync(self.view, text)
            except (NotFound, InvalidRef, InvalidName):
                raise pyfuse3.FUSEError(errno.ENOENT) from None
            node = self._node(view, "")
        else:
            view, path = parent.view, join(parent.path, self._name(name))
            known = self.inodes.known(view, path)
            if known is None:
                # Numbered only if it is there: a shell searching its PATH, or a
                # stat of every name a build tries, would otherwise leave one
                # Node behind per miss.
                entry = self._view_entry(view, path)
                if entry is None:
                    raise pyfuse3.FUSEError(errno.ENOENT)
                subdirectories = await self._subdirectories_of(view, path, entry)
                node = self._node(view, path)
                node.lookups += 1
                return self._attrs(node, entry, subdirectories)
            node = known
        entry = self._entry(node)
        attrs = self._attrs(node, entry,
                            await self._subdirectories_of(node.view, node.path, entry))
        node.lookups += 1
        return attrs

    @_errors
    async def getattr(self, inode: int, ctx=None) -> pyfuse3.EntryAttributes:
        node = self.inodes.nodes.get(inode)
        if node is not None:
            entry = self._entry(node)
            return self._attrs(node, entry,
                               await self._subdirectories_of(node.view, node.path, entry))
        located = self.commit_inodes.locate(inode)
        if located is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        directory, index = located
        tree = await self._tree(directory.view, directory.tree)
        return await self._commit_attrs(directory.view, inode, tree.row(index))

    @_errors
    async def setattr(self, inode: int, attr, fields, fh, ctx) -> pyfuse3.EntryAttributes:
        node = self._get(inode)
        view = self._writable(node)
        # Entries keep no owner: every one shows the daemon's user and group. A
        # chown to them changes nothing and succeeds (cp -a, rsync -a and tar as
        # root ask for it); to anyone else it is EPERM, not a success that did
        # nothing (they report that, rather than believe it).
        if (fields.update_uid and attr.st_uid != self.uid) or \
                (fields.update_gid and attr.st_gid != self.gid):
            raise pyfuse3.FUSEError(errno.EPERM)
        if node.path == DELETED:
            return self._attrs(node, await self._change_detached(view, node, attr, fields))

        def change() -> Entry:
            with view.staging():
                if fields.update_size:
                    view.truncate(node.path, attr.st_size, closed=fh is None)
                mode = stat.S_IMODE(attr.st_mode) if fields.update_mode else None
                mtime = attr.st_mtime_ns if fields.update_mtime else None
                if fields.update_atime or fields.update_mtime:
                    view.times.set(node.path, mtime_set=fields.update_mtime,
                                   atime_ns=attr.st_atime_ns if fields.update_atime else None)
                if mode is not None or mtime is not None:
                    return view.set_attributes(node.path, mode=mode, mtime_ns=mtime)
                entry = view.lookup(node.path)
                if entry is None:
                    raise pyfuse3.FUSEError(errno.ENOENT)
                return entry

        entry = await trio.to_thread.run_sync(change)
        return self._attrs(node, entry, await self._subdirectories_of(view, node.path, entry))

    async def _change_detached(self, view: BranchView, node: Node, attr,
                               fields) -> Entry:
        """setattr through a handle of a file unlinked or replaced while open: the
        change applies to what its handles see, and nothing is staged."""
        handles = self._open_handles(node)
        if not handles:
            raise pyfuse3.FUSEError(errno.ENOENT)
        size = attr.st_size if fields.update_size else None
        mode = stat.S_IMODE(attr.st_mode) if fields.update_mode else None
        mtime = attr.st_mtime_ns if fields.update_mtime else None
        spools = {id(h.spool): h.spool for h in handles if h.spool is not None}
        for spool in spools.values():
            await _with_lock(view, functools.partial(
                view.change_detached, spool, size=size, mode=mode, mtime_ns=mtime))
        for handle in handles:
            # Opened to read: the file as it was, which no one can write (the
            # kernel refuses ftruncate without write access); its mode and time
            # may still change.
            if handle.reader is not None:
                old = handle.reader.entry
                handle.reader.entry = replace(
                    old, mode=old.mode if mode is None else permission_bits(mode),
                    mtime_ns=old.mtime_ns if mtime is None else mtime)
        entry = self._entry_of_open_handle(node)
        assert entry is not None
        return entry

    @_errors
    async def readlink(self, inode: int, ctx=None) -> bytes:
        entry = self._entry(self._get(inode))
        if entry.kind != SYMLINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(entry.ref)

    @_errors
    async def statfs(self, ctx=None) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        try:
            st = os.statvfs(getattr(self.store.objects, "root", self.spool_dir))
            data.f_bsize, data.f_frsize = st.f_bsize, st.f_frsize
            data.f_blocks, data.f_bfree, data.f_bavail = st.f_blocks, st.f_bfree, st.f_bavail
        except OSError:
            data.f_bsize = data.f_frsize = 4096
            data.f_blocks = data.f_bfree = data.f_bavail = 1 << 40
        data.f_files = data.f_ffree = data.f_favail = 1 << 32
        data.f_namemax = 255
        return data

    # -- directories ---------------------------------------------------------------------------

    @_errors
    async def opendir(self, inode: int, ctx=None) -> int:
        node = self.inodes.nodes.get(inode)
        if node is None or isinstance(node.view, CommitView):
            directory = await self._directory(inode)
            tree = await self._tree(directory.view, directory.tree)
            return self._new_handle(DirHandle(node, directory=directory, tree=tree))
        handle = DirHandle(node)
        if node.view is None:
            names = await trio.to_thread.run_sync(self._branch_names)
            handle.entries = [(name, None, None) for name in names]
        else:
            view = node.view
            assert isinstance(view, BranchView)
            self._refresh(view)
            with view.lock:
                listing = view.listdir(node.path)
            handle.entries = [(name, entry, view) for name, entry in listing.items()]
        return self._new_handle(handle)

    def _branch_names(self) -> list[str]:
        return sorted(f"{repo}@{branch}" for repo, branch in
                      (info.key.split("/", 2)[1:] for info in self.store.objects.list("refs/")))

    @_errors
    async def readdir(self, fh: int, start_id: int, token) -> None:
        handle = self._handles[fh]
        assert isinstance(handle, DirHandle)
        if handle.directory is not None:
            await self._readdir_commit(handle, start_id, token)
            return
        assert handle.node is not None
        counts = await self._count_subdirectories(handle, start_id)
        for index in range(start_id, len(handle.entries)):
            name, entry, view = handle.entries[index]
            if view is None:
                try:
                    view = await trio.to_thread.run_sync(self.view, name)
                except (VfsError, pyfuse3.FUSEError):
                    continue
                path, entry = "", self._view_entry(view, "")
            else:
                path = join(handle.node.path, name)
            assert entry is not None
            subdirectories = counts.get(path)
            if subdirectories is None:
                subdirectories = await self._subdirectories_of(view, path, entry)
            node = self._node(view, path)
            if not pyfuse3.readdir_reply(token, os.fsencode(name),
                                         self._attrs(node, entry, subdirectories), index + 1):
                return
            node.lookups += 1

    async def _count_subdirectories(self, handle: DirHandle, start: int) -> dict[str, int]:
        """The subdirectory counts of the directories among the next entries of a
        branch listing, counted in one worker thread (they may read trees)."""
        node = handle.node
        if node is None or not isinstance(node.view, BranchView):
            return {}
        view = node.view
        paths = [join(node.path, name) for name, entry, _ in
                 handle.entries[start : start + _READDIR_AHEAD]
                 if entry is not None and entry.kind == DIR]
        if not paths:
            return {}

        def count() -> dict[str, int]:
            with view.lock:
                return {path: view.subdirectories(path) for path in paths}

        return await trio.to_thread.run_sync(count)

    @_errors
    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    @_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx):
        parent = self._get(parent_inode)
        view = self._writable(parent)
        path = self._new_path(parent.path, self._name(name))

        def make() -> Entry:
            with view.staging():
                return view.mkdir(path, mode)

        entry = await trio.to_thread.run_sync(make)
        node = self._node(view, path)
        node.lookups += 1
        return self._attrs(node, entry)

    @_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx) -> None:
        parent = self._get(parent_inode)
        view = self._writable(parent)
        path = join(parent.path, self._name(name))

        def remove() -> None:
            with view.staging():
                view.rmdir(path)

        await trio.to_thread.run_sync(remove)
        self._forget_path(view, path)

    @_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx) -> None:
        parent = self._get(parent_inode)
        view = self._writable(parent)
        path = join(parent.path, self._name(name))

        def unlink_now() -> None:
            view.unlink(path)
            self._forget_path(view, path)

        def remove() -> None:
            with view.staging(), self._freezing(view, path):
                # In the trio thread: no request sees the name gone from the branch
                # and still on its inode (see rename).
                trio.from_thread.run_sync(unlink_now)

        await trio.to_thread.run_sync(remove)

    @_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx):
        parent = self._get(parent_inode)
        view = self._writable(parent)
        path = self._new_path(parent.path, self._name(name))

        def make() -> Entry:
            with view.staging():
                return view.symlink(path, os.fsdecode(target))

        entry = await trio.to_thread.run_sync(make)
        node = self._node(view, path)
        node.lookups += 1
        return self._attrs(node, entry)

    @_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx):
        # A tree holds files, directories and symlinks: FIFOs, sockets and devices
        # are refused with EPERM, as filesystems that cannot hold them do (vfat).
        # The kernel sends mknod(2) of a regular file here too: an empty file.
        self._writable(self._get(parent_inode))  # EROFS first in a commit
        if not stat.S_ISREG(mode):
            raise pyfuse3.FUSEError(errno.EPERM)
        info, attrs = await self.create(parent_inode, name, mode, os.O_WRONLY | os.O_EXCL, ctx)
        await self.flush(info.fh)
        await self.release(info.fh)
        return attrs

    @_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx) -> None:
        old_parent = self._get(parent_inode_old)
        new_parent = self._get(parent_inode_new)
        view = self._writable(old_parent)
        if new_parent.view is not view:
            raise pyfuse3.FUSEError(errno.EXDEV)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        src = join(old_parent.path, self._name(name_old))
        dst = self._new_path(new_parent.path, self._name(name_new))

        def move_now() -> None:
            view.rename(src, dst, no_replace=bool(flags & pyfuse3.RENAME_NOREPLACE))
            if dst != src:
                self._forget_path(view, dst)
                self._moved(view, src, dst)

        def move() -> None:
            with view.staging(), self._freezing(view, dst if dst != src else None):
                # In the trio thread, with the locks held here: no request (a getattr
                # of the file replaced, an open through a name looked up before) sees
                # the branch renamed and the inodes not yet, or the reverse.
                trio.from_thread.run_sync(move_now)

        await trio.to_thread.run_sync(move)

    @_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx):
        # Hard links have no place in a tree of content-addressed entries.
        raise pyfuse3.FUSEError(errno.EPERM)

    # -- extended attributes: none, as on a filesystem without them ------------------------
    # Trees keep no attributes. Listing gives none; reading, setting or removing
    # one is ENOTSUP, which cp -a, rsync -X and tar expect from such a filesystem.
    # ENOSYS tells the kernel to answer ENOTSUP itself from then on: it reads
    # security.capability before every write(2), and a round trip for that (an
    # ENODATA answer) made small writes twice as slow.

    @_errors
    async def getxattr(self, inode: int, name: bytes, ctx) -> bytes:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx) -> None:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_errors
    async def removexattr(self, inode: int, name: bytes, ctx) -> None:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_errors
    async def listxattr(self, inode: int, ctx) -> list[bytes]:
        return []

    # -- files ---------------------------------------------------------------------------

    def _new_handle(self, handle: Handle | DirHandle) -> int:
        fh = self._next_handle
        self._next_handle += 1
        self._handles[fh] = handle
        return fh

    @_errors
    async def open(self, inode: int, flags: int, ctx) -> pyfuse3.FileInfo:
        node = self._get(inode)
        view = node.view
        wants_write = bool(flags & _WRITE_FLAGS)
        if view is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if isinstance(view, CommitView):
            if wants_write:
                raise ReadOnly("commits are read-only")
            entry = self._entry(node)
            reader = await trio.to_thread.run_sync(FileReader.load, self.store.blobs, entry)
            return pyfuse3.FileInfo(fh=self._new_handle(Handle(node, reader=reader)),
                                    keep_cache=True)
        assert isinstance(view, BranchView)
        if wants_write:
            self._writable(node)

        def prepare() -> Handle:
            with view.lock:
                if wants_write or view.spool(node.path) is not None:
                    spool = view.open_spool(node.path, truncate=bool(flags & os.O_TRUNC))
                    spool.opens += 1
                    return Handle(node, spool=spool, follows=not wants_write)
                entry = view.lookup(node.path)
                if entry is None:
                    raise pyfuse3.FUSEError(errno.ENOENT)
                if entry.kind == DIR:
                    raise pyfuse3.FUSEError(errno.EISDIR)
            return Handle(node, reader=FileReader.load(self.store.blobs, entry), follows=True)

        handle = await trio.to_thread.run_sync(prepare)
        # The kernel's pages of a branch file stay right from one open to the next
        # (daemon.coherence); only a change noticed in passing may not have dropped
        # them yet.
        keep_cache = not node.stale
        node.stale = False
        return pyfuse3.FileInfo(fh=self._new_handle(handle), keep_cache=keep_cache)

    @_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx):
        parent = self._get(parent_inode)
        view = self._writable(parent)
        path = self._new_path(parent.path, self._name(name))

        def make() -> SpoolFile:
            if view.lookup(path) is not None and flags & os.O_EXCL:
                raise pyfuse3.FUSEError(errno.EEXIST)
            # Truncating: nothing is read from the store, only a spool file is made.
            spool = view.open_spool(path, truncate=True, create_mode=mode)
            spool.opens += 1
            return spool

        spool = await _with_lock(view, make)
        node = self._node(view, path)
        node.lookups += 1
        fh = self._new_handle(Handle(node, spool=spool))
        return pyfuse3.FileInfo(fh=fh), self._attrs(node, self._entry(node))

    @_errors
    async def read(self, fh: int, off: int, size: int):
        handle = self._handles[fh]
        assert isinstance(handle, Handle)
        view = handle.node.view
        tracked = isinstance(view, BranchView) and handle.node.path != DELETED
        if handle.follows:
            assert isinstance(view, BranchView)
            if not coherence.reads_current(handle, view):
                await self._follow(handle, view)
            if handle.spool is not None:
                data = await _with_lock(view, functools.partial(coherence.read_spool, handle,
                                                                off, size))
                if data is not None:
                    if tracked:
                        view.times.accessed(handle.node.path, handle.spool.mtime_ns)
                    return data
        elif handle.spool is not None:
            if tracked:
                view.times.accessed(handle.node.path, handle.spool.mtime_ns)
            return os.pread(handle.spool.fd, size, off)
        assert handle.reader is not None
        if tracked:
            view.times.accessed(handle.node.path, handle.reader.entry.mtime_ns)
        return await handle.reader.read(self.cache, off, size, self.nursery)

    async def _follow(self, handle: Handle, view: BranchView) -> None:
        """Point a read-only handle at what its file holds now: the spool it is being
        written to, or its stored bytes (a changed file, not the one opened)."""

        def follow() -> None:
            with view.lock:
                if not handle.follows:
                    return  # its file lost its name meanwhile
                entry = coherence.follow_spool(handle, view)
            if entry is not None:  # its manifest is read without the lock
                reader = FileReader.load(self.store.blobs, entry)
                with view.lock:
                    if handle.follows:
                        coherence.switch(handle, view, None, reader)

        await trio.to_thread.run_sync(follow)

    @contextlib.contextmanager
    def _freezing(self, view: BranchView, path: str | None) -> Iterator[None]:
        """Around an unlink or a rename that may take the name ``path`` from its file:
        the file's read-only handles read on what it holds now (call it in a worker
        thread holding the view's lock), and follow the name again if it stays."""
        handles = [] if path is None else coherence.let_go(
            view, self._handles_of(view, path), self.store.blobs,
            functools.partial(coherence.follow_spool, view=view))
        try:
            yield
        except BaseException:
            coherence.follow_again(handles)
            raise

    def _handles_of(self, view: BranchView, path: str) -> list[Handle]:
        """The open handles of the file at ``path`` (any thread)."""
        inode = self.inodes.by_key.get((view.name, path))
        node = self.inodes.nodes.get(inode) if inode is not None else None
        return [] if node is None else self._open_handles(node)

    @_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handles[fh]
        assert isinstance(handle, Handle)
        if handle.spool is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        view = handle.node.view
        assert isinstance(view, BranchView)
        written = view.write(handle.spool, off, buf)
        await _with_lock(view, functools.partial(view.wrote, handle.spool, off, written))
        return written

    @_errors
    async def flush(self, fh: int) -> None:
        # close(): the file is visible at once and survives a crash of the daemon
        # (its sidecar); the flusher stores it in the background. Only fsync waits.
        handle = self._handles[fh]
        assert isinstance(handle, Handle)
        view = handle.node.view
        spool = handle.spool
        if spool is None or not isinstance(view, BranchView):
            return

        await _with_lock(view, functools.partial(view.close_file, spool))
        if self.flusher.backlog_full():
            await trio.to_thread.run_sync(self.flusher.wait_backlog)

    @_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._handles[fh]
        assert isinstance(handle, Handle)
        view = handle.node.view
        if handle.spool is None or not isinstance(view, BranchView):
            return
        await trio.to_thread.run_sync(
            functools.partial(self.flusher.wait_stored, view, [handle.spool], durable=True))

    @_errors
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh)
        assert isinstance(handle, Handle)
        view = handle.node.view
        spool = handle.spool
        if spool is None or not isinstance(view, BranchView):
            return

        await _with_lock(view, functools.partial(view.release, spool))

    # -- for the control socket ---------------------------------------------------------------

    def flush_everything(self) -> None:
        """Store every file written to every branch, open ones too (at a clean shutdown).

        Sidecars come first: if storing fails, a restarted daemon stages the files.
        """
        views = [v for v in list(self.views.values()) if isinstance(v, BranchView)]
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
        view = self.branch_view(repo, branch)
        if view is not None:
            self.flusher.wait_branch(view, include_open=True, durable=False)

    def wait_staged(self, repo: str, branch: str) -> None:
        """Return once every file closed on a branch is staged (before put, rm, status...).

        Raises:
            VfsError: storing one of them failed.
        """
        view = self.branch_view(repo, branch)
        if view is not None:
            self.flusher.wait_branch(view, include_open=False, durable=False)

    def branch_changed(self, repo: str, branch: str) -> None:
        """Reload a branch view after a commit, rollback or staging outside FUSE, and
        make the kernel drop what it cached of the files that changed
        (:meth:`reload_branch`, then :meth:`drop_cached`)."""
        self.drop_cached(self.reload_branch(repo, branch))

    def reload_branch(self, repo: str, branch: str) -> tuple[BranchView, Reload] | None:
        """Reload a branch view after a change made outside FUSE; what it changed.

        A commit or rollback reloads while it still holds the branch's sealing
        lock: a change staged through the mount right after it must be staged on
        the new head, not on the one the view still had.
        """
        view = self.branch_view(repo, branch)
        return None if view is None else (view, view.reload())

    def drop_cached(self, reloaded: tuple[BranchView, Reload] | None) -> None:
        """Make the kernel drop what it caches of the files a reload changed.

        Call it from a worker thread holding no lock (not a branch's sealing lock
        either: a rename waiting for it would keep the kernel from dropping a name).
        It returns once the kernel is done, so every read after a ``vfsctl put``
        (rm, discard, rollback, commit) returned sees it.
        """
        if reloaded is not None and self.nursery is not None:  # None: not mounted
            self._drop_changed(*reloaded)

    def _drop_changed(self, view: BranchView, changes: Reload, *, stale: bool = False) -> None:
        """What :meth:`drop_cached` does (in a trio worker thread). With ``stale``,
        each changed node's next open drops its pages too: this may come late."""
        nodes = coherence.changed_nodes(view, changes, self.inodes.by_key, self.inodes.nodes)
        for node in nodes:
            node.stale = node.stale or stale
        gone = coherence.gone(view, changes, nodes)
        for node, before in gone:
            with view.lock:  # its handles read on what it held when it went
                coherence.let_go(view, self._handles_of(view, node.path), self.store.blobs,
                                 functools.partial(coherence.stored_target, entry=before)
                                 if before.kind == FILE else lambda handle: None)
        names = trio.from_thread.run_sync(self._unlinked, view, [node for node, _ in gone]) \
            if gone else []
        coherence.drop([node.inode for node in nodes], names)

    def _unlinked(self, view: BranchView, nodes: list[Node]) -> list[tuple[int, bytes]]:
        """Forget the names of nodes whose file went away outside FUSE (in the trio
        thread): a new lookup finds what is there now. Returns the (parent inode,
        name) of each, for the kernel to forget too."""
        names = []
        for node in nodes:
            path = node.path
            if self.inodes.by_key.get((view.name, path)) != node.inode:
                continue  # renamed or forgotten meanwhile
            parent, _, name = path.rpartition("/")
            self._forget_path(view, path)
            parent_inode = self.inodes.by_key.get((view.name, parent))
            if parent_inode is not None:
                names.append((parent_inode, os.fsencode(name)))
        return names

    async def _drop_changed_soon(self, view: BranchView, changes: Reload) -> None:
        await trio.to_thread.run_sync(functools.partial(self._drop_changed, view, changes,
                                                        stale=True))


def _fill_attrs(attrs: pyfuse3.EntryAttributes, inode: int, kind: str, mode: int, size: int,
                mtime_ns: int, subdirectories: int = 0, *, atime_ns: int | None = None,
                ctime_ns: int | None = None) -> None:
    """The fields that differ from one entry to the next (see ``_new_attrs``); atime and
    ctime are the mtime unless given (a branch view keeps them: daemon.times)."""
    attrs.st_ino = inode
    if kind == DIR:
        # New directories (staged, never committed) have mode 0: show 0755.
        attrs.st_mode = _S_IFDIR | (permission_bits(mode) or 0o755)
        # Its name, its "." and the ".." of each subdirectory (find and fts may
        # rely on it to skip leaves).
        attrs.st_nlink = 2 + subdirectories
        size = 4096
    else:
        attrs.st_mode = (_S_IFREG if kind == FILE else _S_IFLNK) | permission_bits(mode)
        attrs.st_nlink = 1
    attrs.st_size = size
    # Every byte counts: the store keeps no holes (zeros are stored, deduplicated
    # and compressed), a file reads back whole, and lseek's SEEK_HOLE finds only
    # its end (the kernel answers that itself: there is no lseek handler).
    attrs.st_blocks = (size + 511) // 512
    attrs.st_mtime_ns = mtime_ns
    attrs.st_atime_ns = mtime_ns if atime_ns is None else atime_ns
    attrs.st_ctime_ns = mtime_ns if ctime_ns is None else ctime_ns
