"""Read access to one tree: path lookup, listing, walking, file contents and diff.

A :class:`Snapshot` is the tree of a commit (or any tree hash). Directories are
decoded lazily, one tree blob at a time, and kept in an LRU bounded by memory (a
:class:`TreeCache`, which snapshots may share), so a lookup costs the depth of
the path and a listing of a huge commit never loads it whole.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from vfs.blobstore import BlobStore
from vfs.errors import NotADirectory, PathNotFound
from vfs.names import join
from vfs.tree import (
    DIR,
    EMPTY_TREE,
    FILE,
    Entry,
    Tree,
    decode_manifest,
    decode_tree,
    parse_file_ref,
)

_NO_ENTRIES: Mapping[str, Entry] = decode_tree(EMPTY_TREE)


class NotCached(Exception):  # noqa: N818 - not an error: the answer needs a read
    """A ``*_nowait`` method would have to read a tree from the store to answer.

    Raised before anything changed: the caller asks the blocking method instead,
    where waiting for the store is fine (a worker thread), or reads
    :attr:`tree_hex` and asks again.
    """

    def __init__(self, tree_hex: str) -> None:
        super().__init__(tree_hex)
        self.tree_hex = tree_hex


class TreeCache:
    """Decoded trees by hash, the least recently used dropped beyond a memory budget.

    Trees are named by their content, so one cache can serve any number of
    snapshots (the mount shares one among all its commits). The most recent tree
    stays even if it alone is over the budget: it is the one being used.
    Thread-safe.

    Args:
        budget: bytes, as estimated by :attr:`Tree.memory`; the default holds
            ~200,000 entries of short names.
    """

    def __init__(self, budget: int = 24 * 1024 * 1024) -> None:
        self.budget = budget
        self._trees: OrderedDict[str, Tree] = OrderedDict()
        self._memory = 0
        self._lock = threading.Lock()

    def get(self, tree_hex: str) -> Tree | None:
        with self._lock:
            tree = self._trees.get(tree_hex)
            if tree is not None:
                self._trees.move_to_end(tree_hex)
            return tree

    def put(self, tree_hex: str, tree: Tree) -> None:
        with self._lock:
            old = self._trees.pop(tree_hex, None)
            if old is not None:
                self._memory -= old.memory
            self._trees[tree_hex] = tree
            self._memory += tree.memory
            while self._memory > self.budget and len(self._trees) > 1:
                self._memory -= self._trees.popitem(last=False)[1].memory

    @property
    def memory(self) -> int:
        return self._memory


class Snapshot:
    """The files of one root tree (``root`` is a tree hash in hex, or None for empty).

    Args:
        blobs: where the trees are read from.
        root: the root tree's hash (hex), or None for an empty tree.
        trees: the cache of decoded trees to use (default: one of its own).
    """

    def __init__(self, blobs: BlobStore, root: str | None,
                 trees: TreeCache | None = None) -> None:
        self.blobs = blobs
        self.root = root
        self.trees = trees if trees is not None else TreeCache()

    def tree(self, tree_hex: str) -> Tree:
        """The decoded entries of one tree blob (name -> entry, sorted by name).

        Raises:
            Corruption: the blob is missing, damaged or not a tree.
        """
        tree = self.trees.get(tree_hex)
        if tree is None:
            tree = decode_tree(self.blobs.read(bytes.fromhex(tree_hex), cache=True))
            self.trees.put(tree_hex, tree)
        return tree

    def cached_tree(self, tree_hex: str) -> Tree | None:
        """The tree if it is decoded already (never reads or decodes)."""
        return self.trees.get(tree_hex)

    def tree_nowait(self, tree_hex: str) -> Tree:
        """:meth:`tree`, from the cache only.

        Raises:
            NotCached: it is not decoded yet.
        """
        tree = self.trees.get(tree_hex)
        if tree is None:
            raise NotCached(tree_hex)
        return tree

    def root_entries(self) -> Mapping[str, Entry]:
        return self.tree(self.root) if self.root else _NO_ENTRIES

    def lookup(self, path: str) -> Entry | None:
        """The entry at a normalized path, None if absent. The root is a DIR entry."""
        return self._lookup(path, self.tree)

    def lookup_nowait(self, path: str) -> Entry | None:
        """:meth:`lookup` from decoded trees only (no I/O, cheap).

        Raises:
            NotCached: a tree on the path is not decoded yet.
        """
        return self._lookup(path, self.tree_nowait)

    def _lookup(self, path: str, tree: Callable[[str], Tree]) -> Entry | None:
        if not path:
            return Entry("", DIR, 0o755, 0, 0, self.root or "")
        entries: Mapping[str, Entry] = tree(self.root) if self.root else _NO_ENTRIES
        parts = path.split("/")
        for i, part in enumerate(parts):
            entry = entries.get(part)
            if entry is None:
                return None
            if i == len(parts) - 1:
                return entry
            if entry.kind != DIR:
                return None
            entries = tree(entry.ref)
        return None

    def listdir(self, path: str) -> Mapping[str, Entry]:
        """The entries of a directory (a read-only mapping, sorted by name).

        Raises:
            PathNotFound: nothing at ``path``.
            NotADirectory: ``path`` is a file or symlink.
        """
        if not path:
            return self.root_entries()
        entry = self.lookup(path)
        if entry is None:
            raise PathNotFound(f"no such file or directory: /{path}")
        if entry.kind != DIR:
            raise NotADirectory(f"/{path} is not a directory")
        return self.tree(entry.ref) if entry.ref else _NO_ENTRIES

    def walk(self, path: str = "") -> Iterator[tuple[str, Entry]]:
        """Yield ``(path, entry)`` for everything below ``path`` (depth first, sorted)."""
        for name, entry in self.listdir(path).items():
            child = join(path, name)
            yield child, entry
            if entry.kind == DIR:
                yield from self.walk(child)


# -- file contents -----------------------------------------------------------------


def file_chunks(blobs: BlobStore, entry: Entry) -> list[tuple[bytes, int]]:
    """The ``(chunk hash, length)`` list of a non-inline file."""
    tag, payload = parse_file_ref(entry.ref)
    if tag == "c":
        return [(payload, entry.size)]
    if tag == "m":
        return decode_manifest(blobs.read(payload, cache=True))
    return []


def iter_file(blobs: BlobStore, entry: Entry) -> Iterator[bytes]:
    """Yield a file's bytes chunk by chunk, each verified against its hash."""
    if entry.kind != FILE:
        raise PathNotFound(f"{entry.name} is not a regular file")
    tag, payload = parse_file_ref(entry.ref)
    if tag == "i":
        yield payload
        return
    for digest, _ in file_chunks(blobs, entry):
        yield blobs.read(digest)


def read_file(blobs: BlobStore, entry: Entry) -> bytes:
    return b"".join(iter_file(blobs, entry))


# -- diff --------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One difference between two trees, for files and symlinks."""

    status: str  # "added" | "modified" | "deleted"
    path: str
    old: Entry | None
    new: Entry | None


def diff_trees(old: Snapshot, new: Snapshot, path: str = "") -> Iterator[Change]:
    """Yield the changed files and symlinks between two snapshots, in path order.

    Subtrees with the same hash are skipped without being read, so the cost grows
    with the size of the change, not of the trees.
    """
    old_root = old.lookup(path)
    new_root = new.lookup(path)
    if not path:
        yield from _diff_entries(old, new, path, old.root_entries(), new.root_entries())
        return
    # Compare the entry at ``path`` itself within its parent: this covers a file,
    # a directory, and one becoming the other.
    parent, name = path.rpartition("/")[0], path.rpartition("/")[2]
    yield from _diff_entries(old, new, parent,
                             {name: old_root} if old_root else {},
                             {name: new_root} if new_root else {})


def _diff_entries(old: Snapshot, new: Snapshot, path: str, a: Mapping[str, Entry],
                  b: Mapping[str, Entry]) -> Iterator[Change]:
    if isinstance(a, Tree) and isinstance(b, Tree):
        yield from _diff_rows(old, new, path, a, b)
        return
    for name in sorted(a.keys() | b.keys()):
        yield from _diff_entry(old, new, join(path, name), a.get(name), b.get(name))


def _diff_rows(old: Snapshot, new: Snapshot, path: str, a: Tree, b: Tree
               ) -> Iterator[Change]:
    """Two trees' rows side by side, in name order: a row stored the same in both is
    passed over without being decoded, so a change in a huge directory costs one pass
    over its rows, not a lookup per name."""
    i = j = 0
    while i < len(a) and j < len(b):
        if a.raw(i) == b.raw(j):
            i, j = i + 1, j + 1
            continue
        x, y = a.name(i), b.name(j)
        if x == y:
            yield from _diff_entry(old, new, join(path, x), a.entry(i), b.entry(j))
            i, j = i + 1, j + 1
        elif x < y:
            yield from _diff_entry(old, new, join(path, x), a.entry(i), None)
            i += 1
        else:
            yield from _diff_entry(old, new, join(path, y), None, b.entry(j))
            j += 1
    for k in range(i, len(a)):
        yield from _diff_entry(old, new, join(path, a.name(k)), a.entry(k), None)
    for k in range(j, len(b)):
        yield from _diff_entry(old, new, join(path, b.name(k)), None, b.entry(k))


def _diff_entry(old: Snapshot, new: Snapshot, child: str, ea: Entry | None,
                eb: Entry | None) -> Iterator[Change]:
    """The changes at ``child``, whose entry is ``ea`` in ``old`` and ``eb`` in ``new``."""
    if ea is not None and eb is not None and ea.kind == DIR and eb.kind == DIR:
        if ea.ref != eb.ref:
            yield from _diff_entries(old, new, child, old.tree(ea.ref), new.tree(eb.ref))
        return
    if ea is not None and ea.kind == DIR:
        for sub, entry in old.walk(child):
            if entry.kind != DIR:
                yield Change("deleted", sub, entry, None)
        ea = None
    if eb is not None and eb.kind == DIR:
        for sub, entry in new.walk(child):
            if entry.kind != DIR:
                yield Change("added", sub, None, entry)
        eb = None
    if ea is None and eb is not None:
        yield Change("added", child, None, eb)
    elif eb is None and ea is not None:
        yield Change("deleted", child, ea, None)
    elif ea is not None and eb is not None and not ea.same_content(eb):
        yield Change("modified", child, ea, eb)


def changed_paths(old: Snapshot, new: Snapshot) -> Iterator[str]:
    """Yield every path whose entry differs between two snapshots, directories included.

    Unlike :func:`diff_trees`, a directory that appears, disappears or turns into a
    file (or the reverse) is itself reported, even when it is empty, and what is below
    it is not (it is implied). A directory whose contents changed is not reported:
    its changed descendants are. What a rebase must compare, path by path.
    """
    yield from _changed_entries(old, new, "", old.root_entries(), new.root_entries())


def _changed_entries(old: Snapshot, new: Snapshot, path: str, a: Mapping[str, Entry],
                     b: Mapping[str, Entry]) -> Iterator[str]:
    for name in sorted(a.keys() | b.keys()):
        ea, eb = a.get(name), b.get(name)
        child = join(path, name)
        if ea is not None and eb is not None and ea.kind == DIR and eb.kind == DIR:
            if ea.ref != eb.ref:
                yield from _changed_entries(old, new, child, old.tree(ea.ref), new.tree(eb.ref))
        elif ea is None or eb is None or not ea.same_content(eb):
            yield child
