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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyfuse3
import trio

from daemon.reader import ChunkCache, FileReader
from daemon.views import BranchView, CommitView, SpoolFile, View, entry_mode
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
from vfs.names import join, normalize_path, parse_ref
from vfs.store import Store
from vfs.tree import DIR, FILE, SYMLINK, Entry

log = logging.getLogger("daemon.fs")

COMMIT_TIMEOUT = 24 * 3600.0  # commits never change: let the kernel cache them
BRANCH_TIMEOUT = 1.0  # a moved head shows within a second
ROOT_TIMEOUT = 1.0
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND


def _errors(handler: Callable) -> Callable:
    """Translate exceptions into FUSEError at the boundary (and log them once)."""

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Corruption as exc:
            log.error("corruption report: %s", exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except VfsError as exc:
            code = exc.errno
            log.debug("%s: %s (%s)", handler.__name__, exc, errno.errorcode.get(code, code))
            raise pyfuse3.FUSEError(code) from None
        except OSError as exc:
            log.warning("%s failed: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("internal error in %s", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


@dataclass
class Node:
    """What one inode number stands for."""

    inode: int
    view: View | None  # None: the mount root
    path: str
    lookups: int = 0


@dataclass
class Handle:
    node: Node
    reader: FileReader | None = None
    spool: SpoolFile | None = None


@dataclass
class DirHandle:
    node: Node
    entries: list[tuple[str, Entry | None, View | None]] = field(default_factory=list)


class VfsOperations(pyfuse3.Operations):
    """pyfuse3 request handlers for the whole namespace."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, store: Store, spool_dir: str, cache: ChunkCache) -> None:
        super().__init__()
        self.store = store
        self.spool_dir = spool_dir
        self.cache = cache
        self.nursery: trio.Nursery | None = None
        self.started_ns = time.time_ns()
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.root = Node(pyfuse3.ROOT_INODE, None, "", 1)
        self._nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: self.root}
        self._by_key: dict[tuple[str, str], int] = {}
        self._next_inode = pyfuse3.ROOT_INODE + 1
        self._handles: dict[int, Handle | DirHandle] = {}
        self._next_handle = 1
        self.views: dict[str, View] = {}
        self._views_lock = threading.Lock()

    # -- inodes --------------------------------------------------------------------------

    def _node(self, view: View, path: str) -> Node:
        key = (view.name, path)
        inode = self._by_key.get(key)
        if inode is not None:
            return self._nodes[inode]
        node = Node(self._next_inode, view, path)
        self._next_inode += 1
        self._nodes[node.inode] = node
        self._by_key[key] = node.inode
        return node

    def _get(self, inode: int) -> Node:
        try:
            return self._nodes[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _moved(self, view: View, src: str, dst: str) -> None:
        """Keep inode numbers across a rename (open files and cwd follow it)."""
        for (name, path), inode in list(self._by_key.items()):
            if name == view.name and (path == src or path.startswith(src + "/")):
                del self._by_key[(name, path)]
                new = dst + path[len(src):]
                self._nodes[inode].path = new
                self._by_key[(name, new)] = inode

    def _forget_path(self, view: View, path: str) -> None:
        inode = self._by_key.pop((view.name, path), None)
        if inode is not None:
            self._nodes[inode].path = "\0deleted"

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            node = self._nodes.get(inode)
            if node is None or node is self.root:
                continue
            node.lookups -= count
            if node.lookups <= 0:
                del self._nodes[inode]
                if node.view is not None and self._by_key.get(
                    (node.view.name, node.path)) == inode:
                    del self._by_key[(node.view.name, node.path)]

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
                view = BranchView(self.store, name, spec.repo, spec.ref, self.spool_dir)
            except BranchNotFound:
                commit = self.store.resolve(spec)
                if commit is None:
                    raise CommitNotFound(f"{name} has no commits") from None
                view = CommitView(self.store, name, commit)
            self.views[name] = view
            return view

    def branch_view(self, repo: str, branch: str) -> BranchView | None:
        view = self.views.get(f"{repo}@{branch}")
        return view if isinstance(view, BranchView) else None

    def _entry(self, node: Node) -> Entry:
        if node.view is None:
            return Entry("", DIR, 0o755, 0, 0, "")
        if isinstance(node.view, BranchView):
            node.view.maybe_refresh()
        entry = node.view.lookup(node.path)
        if entry is None:
            entry = self._entry_of_open_handle(node)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    def _entry_of_open_handle(self, node: Node) -> Entry | None:
        """An unlinked file still works through its open handles (the temp-file idiom)."""
        for handle in self._handles.values():
            if isinstance(handle, Handle) and handle.node is node:
                if handle.spool is not None:
                    spool = handle.spool
                    return Entry(node.path.rpartition("/")[2], FILE, spool.mode, spool.size,
                                 spool.mtime_ns, "")
                if handle.reader is not None:
                    return handle.reader.entry
        return None

    def _attrs(self, node: Node, entry: Entry) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = node.inode
        attrs.generation = 0
        attrs.st_mode = entry_mode(entry)
        attrs.st_nlink = 2 if entry.kind == DIR else 1
        attrs.st_size = entry.size if entry.kind != DIR else 4096
        attrs.st_uid = self.uid
        attrs.st_gid = self.gid
        attrs.st_blksize = 128 * 1024
        attrs.st_blocks = (attrs.st_size + 511) // 512
        # Roots and new directories carry no time of their own: show the mount's.
        mtime = entry.mtime_ns or self.started_ns
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = mtime
        timeout = (COMMIT_TIMEOUT if isinstance(node.view, CommitView)
                   else BRANCH_TIMEOUT if node.view is not None else ROOT_TIMEOUT)
        attrs.entry_timeout = timeout
        attrs.attr_timeout = timeout
        return attrs

    def _writable(self, node: Node) -> BranchView:
        if isinstance(node.view, BranchView):
            return node.view
        raise ReadOnly("commits are read-only; write to a branch path (repo@branch)")

    @staticmethod
    def _name(name: bytes) -> str:
        text = os.fsdecode(name)
        normalized = normalize_path(text)
        if normalized != text:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return text

    # -- lookup and attributes ---------------------------------------------------------------

    @_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx=None) -> pyfuse3.EntryAttributes:
        parent = self._get(parent_inode)
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
            node = self._node(parent.view, join(parent.path, self._name(name)))
        entry = self._entry(node)
        node.lookups += 1
        return self._attrs(node, entry)

    @_errors
    async def getattr(self, inode: int, ctx=None) -> pyfuse3.EntryAttributes:
        node = self._get(inode)
        return self._attrs(node, self._entry(node))

    @_errors
    async def setattr(self, inode: int, attr, fields, fh, ctx) -> pyfuse3.EntryAttributes:
        node = self._get(inode)
        view = self._writable(node)

        def change() -> Entry:
            with view.lock:
                if fields.update_size:
                    view.truncate(node.path, attr.st_size)
                mode = stat.S_IMODE(attr.st_mode) if fields.update_mode else None
                mtime = attr.st_mtime_ns if fields.update_mtime else None
                if mode is not None or mtime is not None:
                    return view.set_attributes(node.path, mode=mode, mtime_ns=mtime)
                entry = view.lookup(node.path)
                if entry is None:
                    raise pyfuse3.FUSEError(errno.ENOENT)
                return entry

        entry = await trio.to_thread.run_sync(change)
        return self._attrs(node, entry)

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
        node = self._get(inode)
        handle = DirHandle(node)
        if node.view is None:
            names = await trio.to_thread.run_sync(self._branch_names)
            handle.entries = [(name, None, None) for name in names]
        else:
            view = node.view
            if isinstance(view, BranchView):
                view.maybe_refresh()
                with view.lock:
                    listing = view.listdir(node.path)
            else:
                listing = await trio.to_thread.run_sync(view.listdir, node.path)
            handle.entries = [(name, entry, view) for name, entry in listing.items()]
        return self._new_handle(handle)

    def _branch_names(self) -> list[str]:
        return sorted(f"{repo}@{branch}" for repo, branch in
                      (info.key.split("/", 2)[1:] for info in self.store.objects.list("refs/")))

    @_errors
    async def readdir(self, fh: int, start_id: int, token) -> None:
        handle = self._handles[fh]
        assert isinstance(handle, DirHandle)
        for index in range(start_id, len(handle.entries)):
            name, entry, view = handle.entries[index]
            if view is None:
                try:
                    view = await trio.to_thread.run_sync(self.view, name)
                except (VfsError, pyfuse3.FUSEError):
                    continue
                node = self._node(view, "")
                entry = self._entry(node)
            else:
                node = self._node(view, join(handle.node.path, name))
            assert entry is not None
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(node, entry),
                                         index + 1):
                return
            node.lookups += 1

    @_errors
    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    @_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx):
        parent = self._get(parent_inode)
        view = self._writable(parent)
        path = join(parent.path, self._name(name))

        def make() -> Entry:
            with view.lock:
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
            with view.lock:
                view.rmdir(path)

        await trio.to_thread.run_sync(remove)
        self._forget_path(view, path)

    @_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx) -> None:
        parent = self._get(parent_inode)
        view = self._writable(parent)
        path = join(parent.path, self._name(name))

        def remove() -> None:
            with view.lock:
                view.unlink(path)

        await trio.to_thread.run_sync(remove)
        self._forget_path(view, path)

    @_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx):
        parent = self._get(parent_inode)
        view = self._writable(parent)
        path = join(parent.path, self._name(name))

        def make() -> Entry:
            with view.lock:
                return view.symlink(path, os.fsdecode(target))

        entry = await trio.to_thread.run_sync(make)
        node = self._node(view, path)
        node.lookups += 1
        return self._attrs(node, entry)

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
        dst = join(new_parent.path, self._name(name_new))

        def move() -> None:
            with view.lock:
                view.rename(src, dst, no_replace=bool(flags & pyfuse3.RENAME_NOREPLACE))

        await trio.to_thread.run_sync(move)
        self._forget_path(view, dst)
        self._moved(view, src, dst)

    @_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx):
        # Hard links have no place in a tree of content-addressed entries.
        raise pyfuse3.FUSEError(errno.EPERM)

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

        def prepare() -> Handle:
            with view.lock:
                if wants_write or view.spool(node.path) is not None:
                    spool = view.open_spool(node.path, truncate=bool(flags & os.O_TRUNC))
                    spool.opens += 1
                    return Handle(node, spool=spool)
                entry = view.lookup(node.path)
                if entry is None:
                    raise pyfuse3.FUSEError(errno.ENOENT)
                if entry.kind == DIR:
                    raise pyfuse3.FUSEError(errno.EISDIR)
            return Handle(node, reader=FileReader.load(self.store.blobs, entry))

        handle = await trio.to_thread.run_sync(prepare)
        return pyfuse3.FileInfo(fh=self._new_handle(handle))

    @_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx):
        parent = self._get(parent_inode)
        view = self._writable(parent)
        path = join(parent.path, self._name(name))

        def make() -> SpoolFile:
            with view.lock:
                if view.lookup(path) is not None and flags & os.O_EXCL:
                    raise pyfuse3.FUSEError(errno.EEXIST)
                spool = view.open_spool(path, truncate=True, create_mode=mode)
                spool.opens += 1
                return spool

        spool = await trio.to_thread.run_sync(make)
        node = self._node(view, path)
        node.lookups += 1
        fh = self._new_handle(Handle(node, spool=spool))
        return pyfuse3.FileInfo(fh=fh), self._attrs(node, self._entry(node))

    @_errors
    async def read(self, fh: int, off: int, size: int):
        handle = self._handles[fh]
        assert isinstance(handle, Handle)
        if handle.spool is not None:
            return os.pread(handle.spool.fd, size, off)
        assert handle.reader is not None
        return await handle.reader.read(self.cache, off, size, self.nursery)

    @_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handles[fh]
        assert isinstance(handle, Handle)
        if handle.spool is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        view = handle.node.view
        assert isinstance(view, BranchView)
        return view.write(handle.spool, off, buf)

    async def _flush(self, handle: Handle, *, durable: bool) -> None:
        view = handle.node.view
        if handle.spool is None or not isinstance(view, BranchView):
            return

        def flush() -> None:
            with view.lock:
                path = view.path_of(handle.spool)  # type: ignore[arg-type]
            if path is not None:
                view.flush(path)
            if durable:
                self.store.index.sync()

        await trio.to_thread.run_sync(flush)

    @_errors
    async def flush(self, fh: int) -> None:
        handle = self._handles[fh]
        assert isinstance(handle, Handle)
        await self._flush(handle, durable=False)

    @_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._handles[fh]
        assert isinstance(handle, Handle)
        await self._flush(handle, durable=True)

    @_errors
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh)
        assert isinstance(handle, Handle)
        view = handle.node.view
        if handle.spool is None or not isinstance(view, BranchView):
            return
        spool = handle.spool

        def release() -> None:
            with view.lock:
                path = view.path_of(spool)
            if path is not None:
                view.flush(path)
            with view.lock:
                view.release(view.path_of(spool), spool)

        await trio.to_thread.run_sync(release)

    # -- for the control socket ---------------------------------------------------------------

    def flush_everything(self) -> None:
        """Store every dirty file of every branch (at a clean shutdown)."""
        for view in list(self.views.values()):
            if isinstance(view, BranchView):
                try:
                    view.flush_all()
                except VfsError as exc:
                    log.error("could not store files written to %s: %s", view.name, exc)

    def flush_branch(self, repo: str, branch: str) -> None:
        """Store every dirty file of a branch (before its open commit is sealed)."""
        view = self.branch_view(repo, branch)
        if view is not None:
            view.flush_all()

    def branch_changed(self, repo: str, branch: str) -> None:
        """Reload a branch view after a commit, rollback or staging outside FUSE."""
        view = self.branch_view(repo, branch)
        if view is not None:
            view.reload()
