"""The open commit of a branch: staged changes over the head, and sealing them.

Staged changes are kept per path in the ``staging`` database of the index
(node-local; they survive restarts). A change is one of:

* a file or symlink entry: the path now holds it;
* a *new directory* (a DIR entry with an empty ref): a fresh, empty directory
  replaces whatever the head had at that path; staged children fill it;
* a deletion: nothing is at that path any more.

The view of ``repo@branch`` is the head tree with these changes laid over it.
Sealing rebuilds only the directories on the paths of staged changes, writes
their tree blobs, and returns the new root.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from vfs.blobs import BlobKind
from vfs.blobstore import BlobWriter
from vfs.errors import NotADirectory, PathNotFound
from vfs.names import ancestors, join, parent_and_name
from vfs.snapshot import Snapshot
from vfs.tree import DIR, Entry, Tree, dir_entry, encode_tree

DELETED = b"D"


def encode_change(entry: Entry | None) -> bytes:
    return DELETED if entry is None else json.dumps(entry.encode()).encode()


def decode_change(value: bytes) -> Entry | None:
    return None if value == DELETED else Entry.decode(json.loads(value))


def new_dir(name: str, mode: int = 0o755, mtime_ns: int = 0) -> Entry:
    return Entry(name, DIR, mode, 0, mtime_ns, "", 0)


@dataclass(frozen=True)
class StagedChange:
    path: str
    entry: Entry | None  # None: deleted


class OpenCommit:
    """The staged changes of one branch on top of its head snapshot.

    Args:
        head: the snapshot the changes apply to.
        changes: path -> entry, or None for a deletion.
    """

    def __init__(self, head: Snapshot, changes: dict[str, Entry | None]) -> None:
        self.head = head
        self.changes = dict(changes)
        self._children: dict[str, dict[str, Entry | None]] = {}
        # Directories with staged changes somewhere below them (may over-approximate).
        self._dirty: set[str] = set()
        # How many directories such a directory holds, once asked (kept by apply).
        self._subdirectories: dict[str, int] = {}
        for path, entry in self.changes.items():
            self._dirty.update(ancestors(path))
            if path:
                parent, name = parent_and_name(path)
                self._children.setdefault(parent, {})[name] = entry

    def __bool__(self) -> bool:
        return bool(self.changes)

    # -- the overlay view ------------------------------------------------------------

    def lookup(self, path: str) -> Entry | None:
        """The entry at ``path`` in the view, or None.

        Invariant (kept by :meth:`apply`): every staged path's ancestors exist in
        the view, so a staged entry can be returned without checking them.
        """
        return self._lookup(path, self.head.tree)

    def lookup_nowait(self, path: str) -> Entry | None:
        """:meth:`lookup` from decoded trees only (no I/O).

        Raises:
            NotCached: a tree it needs is not decoded yet.
        """
        return self._lookup(path, self.head.tree_nowait)

    def _lookup(self, path: str, tree: Callable[[str], Tree]) -> Entry | None:
        if path in self.changes:
            return self.changes[path]
        if not path:
            return self.head.lookup("")
        parent, name = parent_and_name(path)
        parent_entry = self._lookup(parent, tree)
        if parent_entry is None or parent_entry.kind != DIR or not parent_entry.ref:
            return None  # absent, not a directory, or a new directory (staged children only)
        return tree(parent_entry.ref).get(name)

    def listdir(self, path: str) -> dict[str, Entry]:
        """The entries of a directory in the view (sorted by name)."""
        return self._listdir(path, self.head.tree)

    def listdir_nowait(self, path: str) -> dict[str, Entry]:
        """:meth:`listdir` from decoded trees only (no I/O).

        Raises:
            NotCached: a tree it needs is not decoded yet.
        """
        return self._listdir(path, self.head.tree_nowait)

    def _listdir(self, path: str, tree: Callable[[str], Tree]) -> dict[str, Entry]:
        entry = self._lookup(path, tree)
        if entry is None:
            raise PathNotFound(f"no such file or directory: /{path}")
        if entry.kind != DIR:
            raise NotADirectory(f"/{path} is not a directory")
        # Row after row (a tree is in name order): no lookup per name.
        base: dict[str, Entry] = dict(tree(entry.ref).items()) if entry.ref else {}
        children = self._children.get(path)
        if not children:
            return base
        for name, change in children.items():
            if change is None:
                base.pop(name, None)
            else:
                base[name] = change
        return dict(sorted(base.items()))

    def subdirectories(self, path: str) -> int:
        """How many directories the directory at ``path`` holds (0 if it is none).

        Its tree says, while nothing is staged below it; otherwise it is counted
        once and then kept up to date by :meth:`apply`, so that a directory
        being filled with files is not listed again after each one.
        """
        return self._count(path, self.head.tree)

    def subdirectories_nowait(self, path: str) -> int:
        """:meth:`subdirectories` from decoded trees only (no I/O).

        Raises:
            NotCached: a tree it needs is not decoded yet.
        """
        return self._count(path, self.head.tree_nowait)

    def _count(self, path: str, tree: Callable[[str], Tree]) -> int:
        count = self._subdirectories.get(path)
        if count is not None:
            return count
        entry = self._lookup(path, tree)
        if entry is None or entry.kind != DIR:
            return 0
        if path not in self._dirty:
            return tree(entry.ref).subdirectories if entry.ref else 0
        count = sum(1 for child in self._listdir(path, tree).values() if child.kind == DIR)
        self._subdirectories[path] = count
        return count

    def walk(self, path: str = "") -> Iterable[tuple[str, Entry]]:
        for name, entry in self.listdir(path).items():
            child = join(path, name)
            yield child, entry
            if entry.kind == DIR:
                yield from self.walk(child)

    # -- building changes ------------------------------------------------------------

    def plan_set(self, path: str, entry: Entry) -> dict[str, Entry | None]:
        """The staged changes that put ``entry`` at ``path``, creating parent dirs.

        Raises:
            NotADirectory: an ancestor of ``path`` is a file or symlink.
        """
        plan: dict[str, Entry | None] = {}
        for parent in ancestors(path)[1:]:
            existing = plan.get(parent) or self.lookup(parent)
            if existing is None:
                plan[parent] = new_dir(parent_and_name(parent)[1])
            elif existing.kind != DIR:
                raise NotADirectory(f"cannot create /{path}: /{parent} is not a directory")
        plan[path] = entry
        return plan

    def missing_parents(self, path: str) -> dict[str, Entry | None]:
        """New directories to stage so that ``path``'s parent exists in the view.

        A file or symlink in the way is replaced by a directory (putting a tree
        over a path that held a file mirrors the tree).
        """
        plan: dict[str, Entry | None] = {}
        missing = []
        parent = parent_and_name(path)[0]
        while parent:
            existing = self.lookup(parent)
            if existing is not None and existing.kind == DIR:
                break
            missing.append(parent)
            parent = parent_and_name(parent)[0]
        for p in reversed(missing):
            plan[p] = new_dir(parent_and_name(p)[1])
        return plan

    def apply(self, changes: dict[str, Entry | None]) -> None:
        """Apply changes to this in-memory view (the caller persists them).

        A change at a path supersedes whatever was staged below it.
        """
        for path, entry in changes.items():
            if self._subdirectories:
                self._count_subdirectories(path, entry)
            for doomed in self.below(path):
                del self.changes[doomed]
                parent, name = parent_and_name(doomed)
                self._children.get(parent, {}).pop(name, None)
            self.changes[path] = entry
            self._dirty.update(ancestors(path))
            if path:
                parent, name = parent_and_name(path)
                self._children.setdefault(parent, {})[name] = entry

    def _count_subdirectories(self, path: str, entry: Entry | None) -> None:
        """Keep the counts of :meth:`subdirectories` true across a change at ``path``."""
        before = self.lookup(path)
        was_dir = before is not None and before.kind == DIR
        if was_dir:  # replaced as a whole: what was counted in it is gone
            prefix = path + "/" if path else ""
            for counted in [p for p in self._subdirectories
                            if p == path or p.startswith(prefix)]:
                del self._subdirectories[counted]
        if path:
            parent = parent_and_name(path)[0]
            if parent in self._subdirectories:
                self._subdirectories[parent] += (entry is not None and entry.kind == DIR) \
                    - was_dir

    def below(self, path: str) -> list[str]:
        """Staged paths strictly below ``path``."""
        if path not in self._dirty:
            return []  # the common case, and O(1): nothing was ever staged below it
        prefix = path + "/" if path else ""
        return [p for p in self.changes if p.startswith(prefix) and p != path]

    def staged(self) -> list[StagedChange]:
        return [StagedChange(p, e) for p, e in sorted(self.changes.items())]

    # -- sealing ------------------------------------------------------------------------

    def seal(self, writer: BlobWriter) -> str:
        """Write the trees of the view; return the new root tree hash (hex)."""
        root = self.lookup("")
        root_entries = self._build("", root.ref if root else None, writer)
        return writer.add_bytes(BlobKind.TREE, encode_tree(list(root_entries.values()))).hex()

    def _build(self, path: str, tree_hex: str | None, writer: BlobWriter) -> dict[str, Entry]:
        entries: dict[str, Entry] = dict(self.head.tree(tree_hex)) if tree_hex else {}
        for name, change in self._children.get(path, {}).items():
            if change is None:
                entries.pop(name, None)
            else:
                entries[name] = change
        for name, entry in list(entries.items()):
            child = join(path, name)
            if entry.kind == DIR and (child in self._dirty or not entry.ref):
                entries[name] = self._dir(name, child, entry, writer)
        return entries

    def _dir(self, name: str, path: str, entry: Entry, writer: BlobWriter) -> Entry:
        children = self._build(path, entry.ref or None, writer)
        digest = writer.add_bytes(BlobKind.TREE, encode_tree(list(children.values())))
        return dir_entry(name, digest, children, entry.mode, entry.mtime_ns)
