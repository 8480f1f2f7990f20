"""The mount's inode table: which number stands for which (view, path).

The mount root, every branch and commit view, and every path looked up in a branch
view get a :class:`Node`, kept while the kernel holds a lookup on it and numbered
once: a rename moves the number with the path (open files and working directories
follow it), an unlink or a replacement leaves the node nameless (:data:`DELETED`)
for the handles still open on it. Entries inside commits are numbered by directory
(:mod:`daemon.commit_inodes`), from the same counter, and get a Node only for one
request.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyfuse3

from daemon.commit_inodes import CommitInodes
from daemon.spools import SpoolFile
from daemon.views import CommitView, View
from vfs.tree import Entry

#: The path of a node whose name is gone (unlinked or replaced while open).
DELETED = "\0deleted"


@dataclass
class Node:
    """What one inode number stands for (entries inside commits are numbered by
    :mod:`daemon.commit_inodes` instead and have a Node only for a moment)."""

    inode: int
    view: View | None  # None: the mount root
    path: str
    lookups: int = 0
    # A change the kernel did not see was found and its cached pages may not have
    # been dropped yet: the next open drops them (see VfsOperations.open).
    stale: bool = False
    # Its name is gone (path DELETED) while the kernel still holds the inode: what
    # it held, for a request already on its way (an open that looked the name up
    # before a rename replaced it opens the old file, as on a local filesystem):
    # the spool of a file not stored yet (kept open until the kernel forgets the
    # inode), or its entry.
    kept: SpoolFile | Entry | None = None


class Inodes:
    """Numbers for the nodes of the mount (see the module docstring). Used from the
    trio thread only."""

    def __init__(self) -> None:
        self.root = Node(pyfuse3.ROOT_INODE, None, "", 1)
        self.nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: self.root}
        # (view name, path) -> inode, for the nodes of branch and commit views; read by
        # worker threads too (daemon.coherence), changed by the trio thread only.
        self.by_key: dict[tuple[str, str], int] = {}
        self._next = pyfuse3.ROOT_INODE + 1
        self.commit_inodes = CommitInodes(self.allocate)

    def allocate(self, count: int) -> int:
        """``count`` consecutive numbers never used before; returns the first."""
        first = self._next
        self._next += count
        return first

    def node(self, view: View, path: str) -> Node:
        """The node of ``path`` in ``view``, numbered the first time it is asked for."""
        key = (view.name, path)
        inode = self.by_key.get(key)
        if inode is not None:
            return self.nodes[inode]
        node = Node(self.allocate(1), view, path)
        self.nodes[node.inode] = node
        self.by_key[key] = node.inode
        return node

    def known(self, view: View, path: str) -> Node | None:
        """The node of ``path`` in ``view`` if it has one (no number is made)."""
        inode = self.by_key.get((view.name, path))
        return None if inode is None else self.nodes[inode]

    def get(self, inode: int) -> Node | None:
        """The node numbered ``inode``; None if the number means nothing (any more)."""
        node = self.nodes.get(inode)
        if node is not None:
            return node
        located = self.commit_inodes.locate(inode)
        if located is None:
            return None
        # An entry of a commit: a Node for this request only, for the handlers
        # that are not on the hot paths (open, readlink, and the EROFS ones).
        directory, index = located
        tree = directory.view.tree(directory.tree)
        return Node(inode, directory.view, directory.child_path(tree.name(index)))

    def moved(self, view: View, src: str, dst: str) -> None:
        """Keep inode numbers across a rename (open files and cwd follow it)."""
        for (name, path), inode in list(self.by_key.items()):
            if name == view.name and (path == src or path.startswith(src + "/")):
                del self.by_key[(name, path)]
                new = dst + path[len(src):]
                self.nodes[inode].path = new
                self.by_key[(name, new)] = inode

    def forget_path(self, view: View, path: str) -> None:
        """``path`` was unlinked or replaced: its node (if any) has no name now."""
        inode = self.by_key.pop((view.name, path), None)
        if inode is not None:
            self.nodes[inode].path = DELETED

    def forget(self, inode_list: list[tuple[int, int]]) -> list[tuple[View, SpoolFile]]:
        """The kernel dropped lookups: free the nodes it no longer holds.

        Returns the spools freed nodes kept (:attr:`Node.kept`), for the caller
        to release under their view's lock.
        """
        released = []
        for inode, count in inode_list:
            node = self.nodes.get(inode)
            if node is None:
                located = self.commit_inodes.locate(inode)
                if located is not None:
                    located[0].forget(located[1], count)
                continue
            if node is self.root:
                continue
            node.lookups = max(node.lookups - count, 0)
            # The root of a commit view keeps its number, so that everything below
            # it does (see daemon.commit_inodes); it is one Node per commit view.
            if not node.lookups and not isinstance(node.view, CommitView):
                del self.nodes[inode]
                if isinstance(node.kept, SpoolFile) and node.view is not None:
                    released.append((node.view, node.kept))
                node.kept = None
                if node.view is not None and self.by_key.get(
                        (node.view.name, node.path)) == inode:
                    del self.by_key[(node.view.name, node.path)]
        return released
