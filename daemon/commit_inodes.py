"""Inode numbers of what is inside commit views: one block of numbers per directory.

A commit never changes, so the entries of one of its directories can be numbered
once and for all: the directory gets a block of consecutive inode numbers, entry
``i`` of its tree being ``base + i``. A :class:`CommitDir` is that block plus the
kernel's lookup count of each entry, in an array while any is nonzero. Nothing
else is kept per entry: names and attributes come from the tree (decoded, in the
mount's bounded tree cache), so listing a million files costs a few bytes each here.

Blocks are never handed out again, so an entry keeps its number for the life of
the mount, also after the kernel forgot it (tools such as ``find`` and ``tar``
compare inode numbers). The price is one small record per directory ever looked into.

Everything here runs in the trio thread, like the rest of the inode tables.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass

from daemon.views import CommitView
from vfs.names import join


@dataclass(eq=False, slots=True)
class CommitDir:
    """One directory of a commit view and the inode numbers of its entries.

    Args:
        view: the commit view.
        inode: the directory's own inode number.
        path: its path in the commit ("" for the root of the view).
        tree: its tree hash (hex); "" for an empty directory.
        base: the inode number of its first entry.
        size: how many entries it has.
    """

    view: CommitView
    inode: int
    path: str
    tree: str
    base: int
    size: int
    lookups: array | None = None  # per entry; None while the kernel knows none of them
    known: int = 0  # entries with a nonzero lookup count

    def remember(self, index: int) -> None:
        """The kernel learned entry ``index`` once more (a lookup or readdirplus reply)."""
        lookups = self.lookups
        if lookups is None:
            lookups = self.lookups = array("I", bytes(4 * self.size))
        if not lookups[index]:
            self.known += 1
        lookups[index] += 1

    def remember_range(self, start: int, stop: int) -> None:
        """:meth:`remember` of entries ``start`` to ``stop - 1`` (a readdirplus reply)."""
        if start >= stop:
            return
        lookups = self.lookups
        if lookups is None:
            lookups = self.lookups = array("I", bytes(4 * self.size))
        known = 0
        for index in range(start, stop):
            if not lookups[index]:
                known += 1
            lookups[index] += 1
        self.known += known

    def forget(self, index: int, count: int) -> None:
        lookups = self.lookups
        if lookups is None or not lookups[index]:
            return
        if lookups[index] > count:
            lookups[index] -= count
            return
        lookups[index] = 0
        self.known -= 1
        if not self.known:
            self.lookups = None

    def lookup_count(self, index: int) -> int:
        return self.lookups[index] if self.lookups is not None else 0

    def child_path(self, name: str) -> str:
        return join(self.path, name)


class CommitInodes:
    """The :class:`CommitDir` of every directory of a commit view the kernel looked into.

    Args:
        allocate: hands out ``n`` consecutive unused inode numbers, returning the
            first (shared with the other inode tables of the mount).
    """

    def __init__(self, allocate: Callable[[int], int]) -> None:
        self._allocate = allocate
        self._by_inode: dict[int, CommitDir] = {}
        # Blocks in the order they were handed out, which is also by base.
        self._bases: list[int] = []
        self._blocks: list[CommitDir] = []

    def directory(self, inode: int) -> CommitDir | None:
        """The record of directory ``inode``, if it has one."""
        return self._by_inode.get(inode)

    def add(self, view: CommitView, inode: int, path: str, tree: str, size: int) -> CommitDir:
        """Number the ``size`` entries of directory ``inode`` (which must have no record)."""
        assert inode not in self._by_inode
        directory = CommitDir(view, inode, path, tree, self._allocate(size) if size else 0,
                              size)
        self._by_inode[inode] = directory
        if size:
            self._bases.append(directory.base)
            self._blocks.append(directory)
        return directory

    def locate(self, inode: int) -> tuple[CommitDir, int] | None:
        """The directory holding entry ``inode`` and its index there, or None."""
        k = bisect_right(self._bases, inode) - 1
        if k < 0:
            return None
        directory = self._blocks[k]
        index = inode - directory.base
        return (directory, index) if index < directory.size else None

    def __len__(self) -> int:
        return len(self._by_inode)
