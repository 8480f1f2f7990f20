"""The mount's open file and directory handles (what ``fh`` numbers stand for).

Handlers run in the trio thread and change the table there; any thread may ask
for the handles of a node (:meth:`Handles.of_node` copies the table first).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from daemon.commit_inodes import CommitDir
from daemon.inodes import Node
from daemon.reader import FileReader
from daemon.spools import SpoolFile
from daemon.views import View
from vfs.tree import FILE, Entry, Tree


@dataclass
class Handle:
    node: Node
    reader: FileReader | None = None
    spool: SpoolFile | None = None
    # A read-only handle of a branch file: it reads what the file holds at each
    # read (the spool it is being written to, or its stored bytes), not what it
    # held at the open (see daemon.coherence).
    follows: bool = False
    writes: bool = False  # opened for writing (counted in its spool's ``writers``)


@dataclass
class DirHandle:
    node: Node | None
    entries: list[tuple[str, Entry | None, View | None]] = field(default_factory=list)
    directory: CommitDir | None = None  # a directory of a commit: its entries are in tree
    tree: Tree | None = None


class Handles:
    """Open handles by number."""

    def __init__(self) -> None:
        self._by_fh: dict[int, Handle | DirHandle] = {}
        self._next = 1

    def add(self, handle: Handle | DirHandle) -> int:
        fh = self._next
        self._next += 1
        self._by_fh[fh] = handle
        return fh

    def file(self, fh: int) -> Handle:
        handle = self._by_fh[fh]
        assert isinstance(handle, Handle)
        return handle

    def directory(self, fh: int) -> DirHandle:
        handle = self._by_fh[fh]
        assert isinstance(handle, DirHandle)
        return handle

    def pop(self, fh: int) -> Handle | DirHandle | None:
        return self._by_fh.pop(fh, None)

    def of_node(self, node: Node) -> list[Handle]:
        """The open handles of ``node`` (any thread: the table is copied first)."""
        return [handle for handle in list(self._by_fh.values())
                if isinstance(handle, Handle) and handle.node is node]

    def entry_of(self, node: Node) -> Entry | None:
        """What the open handles of ``node`` see of it (an unlinked file still works
        through them: the temp-file idiom); None if it has none.

        A handle that writes (its spool) says, before one opened to read the file
        as it was.
        """
        handles = self.of_node(node)
        for handle in handles:
            if handle.spool is not None:
                spool = handle.spool
                return Entry(node.path.rpartition("/")[2], FILE, spool.mode, spool.size,
                             spool.mtime_ns, "")
        for handle in handles:
            if handle.reader is not None:
                return handle.reader.entry
        return None
