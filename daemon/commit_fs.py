"""The mount inside commit views: lookups, attributes and listings from trees.

A commit never changes, so nothing here keeps a record per entry: names and
attributes come from its trees (decoded, in the mount's bounded tree cache) and
inode numbers from :mod:`daemon.commit_inodes`. Trees not cached yet are read in
worker threads, several at once for a listing (one request each on S3).
"""

from __future__ import annotations

import errno
import os
import sys

import pyfuse3
import trio

from daemon.attrs import COMMIT_TIMEOUT, fill_attrs, new_attrs
from daemon.commit_inodes import CommitDir
from daemon.handles import DirHandle
from daemon.inodes import Inodes
from daemon.views import CommitView
from vfs.tree import DIR, EMPTY_TREE, Tree, decode_tree

_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
_EMPTY_TREE = decode_tree(EMPTY_TREE)
# Entries of a commit's directory whose subdirectories' trees are read together
# (a readdirplus reply holds a few dozen).
_READDIR_AHEAD = 64
_TREE_READERS = 4


class CommitFs:
    """Answers for inodes inside commit views (all in the trio thread)."""

    def __init__(self, inodes: Inodes, uid: int, gid: int, default_mtime_ns: int) -> None:
        self.inodes = inodes
        self.commit_inodes = inodes.commit_inodes
        self.uid = uid
        self.gid = gid
        self.default_mtime_ns = default_mtime_ns  # for entries that carry no time

    async def tree(self, view: CommitView, tree_hex: str) -> Tree:
        if not tree_hex:
            return _EMPTY_TREE
        tree = view.cached_tree(tree_hex)
        if tree is None:  # read and decode it without blocking other requests
            tree = await trio.to_thread.run_sync(view.tree, tree_hex)
        return tree

    async def subdirectories(self, view: CommitView, tree_hex: str) -> int:
        """How many directories the directory of tree ``tree_hex`` holds."""
        return (await self.tree(view, tree_hex)).subdirectories

    async def directory(self, inode: int) -> CommitDir:
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
            row = (await self.tree(parent.view, parent.tree)).row(index)
            if row[1] != DIR:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            view, path, tree_hex = parent.view, parent.child_path(row[0]), row[5]
        size = len(await self.tree(view, tree_hex))
        # Another request may have numbered it while this one waited for the tree.
        return self.commit_inodes.directory(inode) or self.commit_inodes.add(
            view, inode, path, tree_hex, size)

    async def attrs(self, directory: CommitDir, index: int) -> pyfuse3.EntryAttributes:
        """The attributes of entry ``index`` of ``directory``."""
        view = directory.view
        row = (await self.tree(view, directory.tree)).row(index)
        attrs = new_attrs(self.uid, self.gid, COMMIT_TIMEOUT)
        fill_attrs(attrs, directory.base + index, row[1], row[2], row[3],
                   row[4] or self.default_mtime_ns,
                   await self.subdirectories(view, row[5]) if row[1] == DIR else 0)
        return attrs

    async def lookup(self, parent_inode: int, name: bytes) -> pyfuse3.EntryAttributes:
        """The entry ``name`` of a directory inside a commit view (counted as looked up)."""
        directory = await self.directory(parent_inode)
        index = (await self.tree(directory.view, directory.tree)).index(os.fsdecode(name))
        if index is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attrs = await self.attrs(directory, index)
        directory.remember(index)
        return attrs

    async def lookup_inode(self, inode: int) -> pyfuse3.EntryAttributes:
        """``.`` or ``..`` inside a commit view: the entry numbered ``inode`` again."""
        located = self.commit_inodes.locate(inode)
        if located is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        directory, index = located
        attrs = await self.attrs(directory, index)
        directory.remember(index)
        return attrs

    def parent_of(self, inode: int) -> int:
        """The inode of the directory holding ``inode`` (the mount root for a view)."""
        located = self.commit_inodes.locate(inode)
        return located[0].inode if located is not None else pyfuse3.ROOT_INODE

    async def getattr(self, inode: int) -> pyfuse3.EntryAttributes:
        located = self.commit_inodes.locate(inode)
        if located is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.attrs(*located)

    async def opendir(self, inode: int) -> DirHandle:
        directory = await self.directory(inode)
        tree = await self.tree(directory.view, directory.tree)
        return DirHandle(self.inodes.nodes.get(inode), directory=directory, tree=tree)

    async def readdir(self, handle: DirHandle, start: int, token) -> None:
        directory, tree = handle.directory, handle.tree
        assert directory is not None and tree is not None
        # One attributes object for the whole reply (readdir_reply copies it), and
        # the loop kept tight: ls -l of 100,000 files runs it 100,000 times.
        attrs = new_attrs(self.uid, self.gid, COMMIT_TIMEOUT)
        base, row_at, reply, fill = directory.base, tree.row, pyfuse3.readdir_reply, fill_attrs
        default_mtime, view = self.default_mtime_ns, directory.view
        await self._read_trees(view, tree, start)
        index = start
        for index in range(start, len(tree)):
            row = row_at(index)
            # A directory's link count needs its own tree (read here, once, and cached).
            subdirectories = (await self.tree(view, row[5])).subdirectories \
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
