"""The FUSE operations of the mount (pyfuse3), over the views of :mod:`daemon.views`.

``/`` lists ``repo@branch`` for every branch; ``repo@<commit or prefix>`` resolves
on lookup only. Handlers may raise only ``FUSEError``: :func:`_errors` turns every
domain error into its errno at this boundary, logs it once, and the mount keeps
serving. Corruption is EIO plus a logged corruption report, never wrong bytes.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import pyfuse3
import trio

from daemon import coherence
from daemon.attrs import BRANCH_TIMEOUT, COMMIT_TIMEOUT, ROOT_TIMEOUT, fill_attrs, new_attrs
from daemon.commit_fs import CommitFs
from daemon.flusher import Flusher
from daemon.handles import DirHandle, Handle, Handles
from daemon.inodes import DELETED, Inodes, Node
from daemon.reader import ChunkCache, FileReader, ReportedCorruption
from daemon.spools import SpoolFile
from daemon.views import BranchView, CommitView, View
from daemon.viewtable import ViewTable
from vfs.errors import Corruption, InvalidName, InvalidRef, NotFound, ReadOnly, VfsError
from vfs.names import MAX_COMPONENT_BYTES, MAX_PATH_BYTES, join, normalize_path
from vfs.snapshot import NotCached
from vfs.store import Store
from vfs.tree import DIR, FILE, SYMLINK, Entry, permission_bits

log = logging.getLogger("daemon.fs")
T = TypeVar("T")

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND
_READDIR_AHEAD = 64  # branch entries whose subdirectories are counted together


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


async def _with_lock(view: BranchView, work: Callable[[], T],
                     nowait: Callable[[], T] | None = None) -> T:
    """Run short work on a branch view while holding its lock.

    For bookkeeping and a few local syscalls (create a spool, write a sidecar, close a
    descriptor) a hand-off to a worker thread costs more than the work itself and is
    most of what a small-file writer waits for: run it right here when the lock is
    free, and in a worker thread only when another thread holds it (never block the
    FUSE loop on a lock).

    Args:
        nowait: the same work from what is in memory, for work that may read
            trees: it raises :class:`NotCached` (before changing anything) where
            ``work`` would read the store; it then goes on in a worker thread,
            which reads the trees without the lock (:meth:`BranchView.locked`).
    """
    if view.lock.acquire(blocking=False):
        try:
            return (nowait or work)()
        except NotCached:
            pass  # a tree to read from the store: not in the FUSE loop
        finally:
            view.lock.release()
    if nowait is not None:
        return await trio.to_thread.run_sync(view.locked, work, nowait)

    def locked() -> T:
        with view.lock:
            return work()

    return await trio.to_thread.run_sync(locked)


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
        self.started_ns = time.time_ns()
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.inodes = Inodes()
        self.root = self.inodes.root
        self.commit_inodes = self.inodes.commit_inodes
        self.views = ViewTable(store, flusher)
        self.handles = Handles()
        self.commits = CommitFs(self.inodes, self.uid, self.gid, self.started_ns)
        self.coherence = coherence.Coherence(self.inodes, self.handles, store.blobs)
        self._nursery: trio.Nursery | None = None

    @property
    def nursery(self) -> trio.Nursery | None:
        """The mount's nursery (set by the daemon once mounted; None in tests of handlers)."""
        return self._nursery

    @nursery.setter
    def nursery(self, nursery: trio.Nursery | None) -> None:
        self._nursery = self.coherence.nursery = nursery

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

    def _losing_name(self, view: BranchView, path: str) -> Callable[[], None]:
        """``path`` is about to be unlinked or replaced (in the trio thread, the view's
        lock held): its node, if the kernel knows one, keeps what the file holds for a
        request already on its way (:attr:`Node.kept`). Returns the undo, for when
        the change fails."""
        node = self.inodes.known(view, path)
        if node is None:
            return lambda: None
        spool = view.spool(path)
        if spool is not None:
            spool.opens += 1  # released when the kernel forgets the node (forget)
            node.kept = spool
        else:
            node.kept = view.lookup(path)

        def undo() -> None:
            if spool is not None:
                spool.opens -= 1
            node.kept = None

        return undo

    @_errors_unanswered
    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for view, spool in self.inodes.forget(inode_list):
            assert isinstance(view, BranchView)
            await _with_lock(view, functools.partial(view.release, spool))

    # -- views ---------------------------------------------------------------------------

    async def _entry(self, node: Node) -> Entry:
        if node.view is None:
            return Entry("", DIR, 0o755, 0, 0, "")
        entry = await self._view_entry(node.view, node.path)
        if entry is None:
            entry = self.handles.entry_of(node)
        if entry is None and node.path == DELETED:
            entry = _kept_entry(node)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    async def _view_entry(self, view: View, path: str, *, wait: bool = True) -> Entry | None:
        """The entry at ``path`` in ``view``: from memory in the FUSE loop, else (a
        tree to read from the store) in a worker thread. On a branch, checks its
        head in passing (:meth:`Coherence.refresh`; ``wait``: see there)."""
        if isinstance(view, BranchView) and self.coherence.due(view):
            await self.coherence.refresh(view, wait=wait)
        try:
            return view.lookup_nowait(path)
        except NotCached:
            return await trio.to_thread.run_sync(_lookup, view, path)

    async def _subdirectories_of(self, view: View | None, path: str, entry: Entry) -> int:
        """How many directories ``entry`` (at ``path`` in ``view``) holds, for its link count.

        Reads its tree unless cached; on a branch, in a worker thread if another
        one holds the branch's lock.
        """
        if entry.kind != DIR or path == DELETED:
            return 0
        if isinstance(view, BranchView):
            return await _with_lock(view, functools.partial(view.subdirectories, path),
                                    functools.partial(view.subdirectories_nowait, path))
        if isinstance(view, CommitView) and entry.ref:
            return await self.commits.subdirectories(view, entry.ref)
        return 0

    def _attrs(self, node: Node, entry: Entry,
               subdirectories: int = 0) -> pyfuse3.EntryAttributes:
        """The attributes of a node (``subdirectories``: see :meth:`_subdirectories_of`)."""
        view = node.view
        timeout = (COMMIT_TIMEOUT if isinstance(view, CommitView)
                   else BRANCH_TIMEOUT if view is not None else ROOT_TIMEOUT)
        attrs = new_attrs(self.uid, self.gid, timeout)
        # Roots and new directories carry no time of their own: show the mount's.
        mtime_ns = entry.mtime_ns or self.started_ns
        shown = view.times.shown(node.path, mtime_ns) \
            if isinstance(view, BranchView) and node.path != DELETED else None
        if shown is not None:
            fill_attrs(attrs, node.inode, entry.kind, entry.mode, entry.size, shown.mtime_ns,
                       subdirectories, atime_ns=shown.atime_ns, ctime_ns=shown.ctime_ns)
        else:
            fill_attrs(attrs, node.inode, entry.kind, entry.mode, entry.size, mtime_ns,
                       subdirectories)
        if node.path == DELETED:
            attrs.st_nlink = 0  # open, and no name any more
        if view is None:
            # The mount root: its entries are branches listed from the store, and
            # counting them on every stat would list the store. 1 is what a
            # filesystem that does not count says (find and fts read it so).
            attrs.st_nlink = 1
        return attrs

    def _writable(self, node: Node) -> BranchView:
        if isinstance(node.view, BranchView):
            if node.view.refused is not None:  # a pipeline's output branch
                raise ReadOnly(str(node.view.refused))
            return node.view
        raise ReadOnly("commits are read-only; write to a branch path (repo@branch)")

    def _new_path(self, parent: str, name: str) -> str:
        """The path of an entry to be made: refused if it is too long to commit."""
        path = join(parent, name)
        if len(os.fsencode(path)) > MAX_PATH_BYTES:
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
            if name == b".":
                return await self._lookup_again(parent_inode)
            if name == b"..":
                return await self._lookup_again(self.commits.parent_of(parent_inode))
            return await self.commits.lookup(parent_inode, name)
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
                view = await trio.to_thread.run_sync(self.views.get, text)
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
                entry = await self._view_entry(view, path)
                if entry is None:
                    raise pyfuse3.FUSEError(errno.ENOENT)
                subdirectories = await self._subdirectories_of(view, path, entry)
                node = self._node(view, path)
                node.lookups += 1
                return self._attrs(node, entry, subdirectories)
            node = known
        entry = await self._entry(node)
        attrs = self._attrs(node, entry,
                            await self._subdirectories_of(node.view, node.path, entry))
        node.lookups += 1
        return attrs

    @_errors
    async def getattr(self, inode: int, ctx=None) -> pyfuse3.EntryAttributes:
        node = self.inodes.nodes.get(inode)
        if node is not None:
            entry = await self._entry(node)
            return self._attrs(node, entry,
                               await self._subdirectories_of(node.view, node.path, entry))
        return await self.commits.getattr(inode)

    async def _lookup_again(self, inode: int) -> pyfuse3.EntryAttributes:
        """``.`` or ``..`` in a commit view: the node or commit entry ``inode``, counted."""
        node = self.inodes.nodes.get(inode)
        if node is None:
            return await self.commits.lookup_inode(inode)
        entry = await self._entry(node)
        attrs = self._attrs(node, entry,
                            await self._subdirectories_of(node.view, node.path, entry))
        node.lookups += 1
        return attrs

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
        handles = self.handles.of_node(node)
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
        entry = self.handles.entry_of(node)
        assert entry is not None
        return entry

    @_errors
    async def readlink(self, inode: int, ctx=None) -> bytes:
        entry = await self._entry(self._get(inode))
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
            return self.handles.add(await self.commits.opendir(inode))
        handle = DirHandle(node)
        if node.view is None:
            names = await trio.to_thread.run_sync(self._branch_names)
            handle.entries = [(name, None, None) for name in names]
        else:
            view = node.view
            assert isinstance(view, BranchView)
            if self.coherence.due(view):
                await self.coherence.refresh(view)
            # Many rows to decode: not in the trio thread.
            listing = await trio.to_thread.run_sync(
                view.locked, functools.partial(view.listdir, node.path),
                functools.partial(view.listdir_nowait, node.path))
            handle.entries = [(name, entry, view) for name, entry in listing.items()]
        return self.handles.add(handle)

    def _branch_names(self) -> list[str]:
        return sorted(f"{repo}@{branch}" for repo, branch in
                      (info.key.split("/", 2)[1:] for info in self.store.objects.list("refs/")))

    @_errors
    async def readdir(self, fh: int, start_id: int, token) -> None:
        handle = self.handles.directory(fh)
        if handle.directory is not None:
            await self.commits.readdir(handle, start_id, token)
            return
        assert handle.node is not None
        counts = await self._count_subdirectories(handle, start_id)
        for index in range(start_id, len(handle.entries)):
            name, entry, view = handle.entries[index]
            if view is None:
                try:
                    view = await trio.to_thread.run_sync(self.views.get, name)
                except (VfsError, pyfuse3.FUSEError):
                    continue
                # Many branches: their heads are checked, but not waited for.
                path, entry = "", await self._view_entry(view, "", wait=False)
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
            return {path: view.subdirectories(path) for path in paths}

        def count_nowait() -> dict[str, int]:
            return {path: view.subdirectories_nowait(path) for path in paths}

        return await _with_lock(view, count, count_nowait)

    @_errors
    async def releasedir(self, fh: int) -> None:
        self.handles.pop(fh)

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

        def remove() -> Entry | None:
            with view.staging():
                entry = view.lookup(path)
                view.rmdir(path)
                return entry

        entry = await trio.to_thread.run_sync(remove)
        node = self.inodes.known(view, path)
        if node is not None:
            node.kept = entry  # a process still in it: stat(".") answers, nlink 0
        self._forget_path(view, path)

    @_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx) -> None:
        parent = self._get(parent_inode)
        view = self._writable(parent)
        path = join(parent.path, self._name(name))

        def unlink_now() -> None:
            undo = self._losing_name(view, path)
            try:
                view.unlink(path)
            except BaseException:
                undo()
                raise
            self._forget_path(view, path)

        def remove() -> None:
            with view.staging(), self.coherence.freezing(view, path):
                view.prefetch(path)
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
            undo = self._losing_name(view, dst) if dst != src else lambda: None
            try:
                view.rename(src, dst, no_replace=bool(flags & pyfuse3.RENAME_NOREPLACE))
            except BaseException:
                undo()
                raise
            if dst != src:
                self._forget_path(view, dst)
                self._moved(view, src, dst)

        def move() -> None:
            with view.staging(), self.coherence.freezing(view, dst if dst != src else None):
                view.prefetch(src, dst)
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
            entry = await self._entry(node)
            reader = await trio.to_thread.run_sync(FileReader.load, self.store.blobs, entry)
            return pyfuse3.FileInfo(fh=self.handles.add(Handle(node, reader=reader)),
                                    keep_cache=True)
        assert isinstance(view, BranchView)
        if wants_write:
            self._writable(node)
        if node.path == DELETED:
            return await self._open_kept(node, view, wants_write)

        def choose() -> Handle | Entry | None:  # holding the lock
            if node.path == DELETED:
                return None  # gone meanwhile: what it kept (see below)
            if view.lookup(node.path) is None:
                # Changed from outside since the kernel looked the name up:
                # ESTALE has it look again and open what is there now (or
                # answer ENOENT).
                raise pyfuse3.FUSEError(errno.ESTALE)
            if wants_write or view.spool(node.path) is not None:
                spool = view.open_spool(node.path, truncate=bool(flags & os.O_TRUNC))
                spool.opens += 1
                spool.writers += wants_write
                return Handle(node, spool=spool, follows=not wants_write,
                              writes=wants_write)
            entry = view.lookup(node.path)
            assert entry is not None
            if entry.kind == DIR:
                raise pyfuse3.FUSEError(errno.EISDIR)
            return entry

        def choose_nowait() -> Handle | Entry | None:
            if node.path != DELETED:
                view.lookup_nowait(node.path)  # all choose looks up
            return choose()

        def prepare() -> Handle | None:
            chosen = view.locked(choose, choose_nowait)
            if isinstance(chosen, Entry):  # its manifest is read without the lock
                return Handle(node, reader=FileReader.load(self.store.blobs, chosen),
                              follows=True)
            return chosen

        handle = await trio.to_thread.run_sync(prepare)
        if handle is None:
            return await self._open_kept(node, view, wants_write)
        # The kernel's pages of a branch file stay right from one open to the next
        # (daemon.coherence); only a change noticed in passing may not have dropped
        # them yet.
        keep_cache = not node.stale
        node.stale = False
        return pyfuse3.FileInfo(fh=self.handles.add(handle), keep_cache=keep_cache)

    async def _open_kept(self, node: Node, view: BranchView,
                         wants_write: bool) -> pyfuse3.FileInfo:
        """open of a file whose name went after the kernel looked it up (a rename
        replaced it, an unlink): the old file, as on a local filesystem, from what
        its node kept. A stored file kept only as its entry opens read-only; to
        write, ESTALE has the kernel look the name up again."""
        kept = node.kept
        if isinstance(kept, SpoolFile):
            def take() -> None:
                kept.reopen()
                kept.opens += 1
                kept.writers += wants_write

            await _with_lock(view, take)
            handle = Handle(node, spool=kept, writes=wants_write)
        elif isinstance(kept, Entry) and kept.kind == FILE and not wants_write and \
                (kept.ref or not kept.size):
            reader = await trio.to_thread.run_sync(FileReader.load, self.store.blobs, kept)
            handle = Handle(node, reader=reader)
        else:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return pyfuse3.FileInfo(fh=self.handles.add(handle), keep_cache=False)

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
            spool.writers += 1
            return spool

        def make_nowait() -> SpoolFile:
            view.lookup_nowait(path)  # its parents too: all make looks up
            return make()

        spool = await _with_lock(view, make, make_nowait)
        node = self._node(view, path)
        node.lookups += 1
        fh = self.handles.add(Handle(node, spool=spool, writes=True))
        return pyfuse3.FileInfo(fh=fh), self._attrs(node, await self._entry(node))

    @_errors
    async def read(self, fh: int, off: int, size: int):
        handle = self.handles.file(fh)
        view = handle.node.view
        tracked = isinstance(view, BranchView) and handle.node.path != DELETED
        if handle.follows:
            assert isinstance(view, BranchView)
            if not coherence.reads_current(handle, view):
                await self.coherence.follow(handle, view)
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

    @_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.handles.file(fh)
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
        handle = self.handles.file(fh)
        view = handle.node.view
        spool = handle.spool
        if spool is None or not isinstance(view, BranchView):
            return

        await _with_lock(view, functools.partial(view.close_file, spool))
        if self.flusher.backlog_full():
            await trio.to_thread.run_sync(self.flusher.wait_backlog)

    @_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self.handles.file(fh)
        view = handle.node.view
        if handle.spool is None or not isinstance(view, BranchView):
            return
        await trio.to_thread.run_sync(
            functools.partial(self.flusher.wait_stored, view, [handle.spool], durable=True))

    @_errors
    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh)
        assert isinstance(handle, Handle)
        view = handle.node.view
        spool = handle.spool
        if spool is None or not isinstance(view, BranchView):
            return

        await _with_lock(view, functools.partial(view.release, spool, writer=handle.writes))

    # -- for the control socket ---------------------------------------------------------------

    def branch_changed(self, repo: str, branch: str) -> None:
        """Reload a branch view after a commit, rollback or staging outside FUSE, and
        make the kernel drop what it cached of the files that changed (call it in a
        worker thread holding no lock)."""
        self.coherence.drop_cached(self.views.reload_branch(repo, branch))


def _lookup(view: View, path: str) -> Entry | None:
    """``view.lookup`` in a worker thread (it reads trees from the store)."""
    if isinstance(view, BranchView):  # as in the FUSE loop, no change is seen half made
        return view.locked(functools.partial(view.lookup, path),
                           functools.partial(view.lookup_nowait, path))
    return view.lookup(path)


def _kept_entry(node: Node) -> Entry | None:
    """What a node whose name is gone shows of the file it kept (:attr:`Node.kept`)."""
    kept = node.kept
    if isinstance(kept, SpoolFile):
        return Entry("", FILE, kept.mode, kept.size, kept.mtime_ns, "")
    return kept
