"""Which datums a pipeline's inputs make over given commits, and which a change touches.

A datum is a tuple of *parts*, one ``(input index, root)`` per datum of a
repository input it combines (one part for a single input, one per input for a
cross, several of one input for a group). :class:`Datums` evaluates an input
expression (:mod:`vfs.pipeline.inputs`) over one :class:`Side`, the commits of
every input at one moment:

* :meth:`Datums.all`: every datum (a full job);
* :meth:`Datums.touched`: the datums holding a part that changed, or, in a join
  or a group, whose key is the key of a part that changed. The datums not touched
  are the same on both sides (same parts, same files), so the change between two
  sides is found among the touched ones of each (:func:`changed_datums`), and
  the cost follows the change: a new datum of one input of a cross touches one
  datum per datum of the other inputs, a changed file of a join the datums of
  its key.

A datum is stored and shown under its *key* (:meth:`Datums.key`): the root for a
single input (as every version did, so records stay valid), else the JSON list of
its ``[input name, root]`` parts. Its files are the parts' files under
``<input name>/`` (the layout of ``/pfs``), so the datum hash
(:func:`vfs.pipeline.datums.datum_hash`) covers every part's name, paths and
contents.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from vfs.pipeline.datums import DatumChange, Files, Glob, datum_files, same_files
from vfs.pipeline.inputs import Combine, Input, Leaf, is_plain, leaves
from vfs.snapshot import Snapshot, TreeCache, diff_trees

Part = tuple[int, str]  # (input index, datum root in that input)
_DIRECT = re.compile(r"\$(1|\{1\})")  # a key that is the glob's first capture group
Parts = tuple[Part, ...]  # one datum: its parts, in input order then root order


class Side:
    """The commits of every input at one moment (an input without commits: empty).

    Roots, files and keys are read once and kept: a plan asks for them many times.
    """

    def __init__(self, store, expression: Input, trees: list[str | None]) -> None:
        self.leaves = leaves(expression)
        cache = TreeCache()
        self.snapshots = [Snapshot(store.blobs, tree, cache) for tree in trees]
        self.globs = [Glob(leaf.glob) for leaf in self.leaves]
        self._roots: dict[int, list[str]] = {}
        self._files: dict[Part, Files] = {}
        self._keyed: dict[int, dict[str, list[str]]] = {}

    def roots(self, index: int) -> list[str]:
        """Every datum root of input ``index`` that holds files, in path order."""
        found = self._roots.get(index)
        if found is None:
            glob = self.globs[index]
            found = [root for root in glob.datums(self.snapshots[index])
                     if self.files(index, root)]
            self._roots[index] = found
        return found

    def files(self, index: int, root: str) -> Files:
        part = (index, root)
        found = self._files.get(part)
        if found is None:
            found = tuple(datum_files(self.snapshots[index], root))
            self._files[part] = found
        return found

    def keyed(self, index: int, key: str) -> list[str]:
        """The roots of input ``index`` (with files) whose join/group key is ``key``.

        When the key is the glob's one capture group and the glob's only wildcard
        (``/(*).csv`` on ``$1``), the root is the glob with the key in it: one lookup.
        Otherwise the input's datum names are listed once, and every key looked up in
        that table."""
        table = self._keyed.get(index)
        leaf, glob = self.leaves[index], self.globs[index]
        if table is None and _DIRECT.fullmatch(leaf.key_template or ""):
            root = glob.root_of((key,))
            if root is not None:
                return [root] if self.files(index, root) else []
        if table is None:
            table = {}
            # Names only: files are read for the keys a plan asks for, not for all.
            for root in glob.datums(self.snapshots[index]):
                table.setdefault(leaf.key(glob, root), []).append(root)
            self._keyed[index] = table
        return [root for root in table.get(key, ()) if self.files(index, root)]


class Datums:
    """The datums of one input expression (see the module docstring)."""

    def __init__(self, expression: Input) -> None:
        self.expression = expression
        self.leaves = leaves(expression)
        self.plain = is_plain(expression)
        counter = itertools.count()
        self._root = _compile(expression, counter)
        self._index = {leaf.name: i for i, leaf in enumerate(self.leaves)}

    def all(self, side: Side) -> list[Parts]:
        return _unique(self._root.all(side))

    def touched(self, side: Side, changed: dict[int, set[str]]) -> list[Parts]:
        return _unique(self._root.touched(side, changed))

    def key(self, parts: Parts) -> str:
        """How a datum is named in plans, records and messages (module docstring)."""
        if self.plain:
            return parts[0][1]
        return json.dumps([[self.leaves[i].name, root] for i, root in parts],
                          separators=(",", ":"), ensure_ascii=False)

    def parts(self, key: str) -> Parts:
        """The parts of the datum named ``key`` (the inverse of :meth:`key`).

        Raises:
            ValueError: ``key`` names no datum of these inputs.
        """
        if self.plain:
            return ((0, key),)
        try:
            items = json.loads(key)
            return tuple((self._index[name], root) for name, root in items)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{key!r} is not a datum of these inputs") from exc

    def files(self, side: Side, parts: Parts) -> Files:
        """A datum's files: its parts' files, under ``<input name>/`` unless plain."""
        if self.plain:
            return side.files(*parts[0])
        out = []
        for index, root in parts:
            prefix = self.leaves[index].name + "/"
            out.extend((prefix + path, entry) for path, entry in side.files(index, root))
        return tuple(out)


def label(key: str) -> str:
    """A datum key as users read it: ``/root``, or ``/images/a.png, /models/m1`` (the
    paths its parts have under /pfs)."""
    if key.startswith("[["):
        try:
            items = json.loads(key)
            return ", ".join(f"/{name}/{root}" if root else f"/{name}"
                             for name, root in items)
        except (ValueError, TypeError):
            pass
    return f"/{key}"


def changed_parts(old: Side, new: Side) -> dict[int, set[str]]:
    """The datum roots of each input whose files differ between two sides.

    Found from the tree diffs (one per distinct pair of trees), so the cost follows
    the change. A mode change alone is not a change (modes are not part of a datum).
    """
    diffs: dict[tuple[str | None, str | None], list[str]] = {}
    out: dict[int, set[str]] = {}
    for index in range(len(new.leaves)):
        before, after = old.snapshots[index], new.snapshots[index]
        pair = (before.root, after.root)
        if pair[0] == pair[1]:
            continue
        if pair not in diffs:
            diffs[pair] = [change.path for change in diff_trees(before, after)]
        glob = new.globs[index]
        roots = {glob.datum_of(path) for path in diffs[pair]}
        roots.discard(None)
        changed = {root for root in roots if root is not None
                   and not same_files(old.files(index, root), new.files(index, root))}
        if changed:
            out[index] = changed
    return out


def changed_datums(datums: Datums, old: Side | None, new: Side) -> list[DatumChange]:
    """The datums whose files differ between ``old`` and ``new`` (all of ``new`` when
    ``old`` is None), as changes named by their keys."""
    if old is None:
        return [DatumChange(datums.key(parts), (), datums.files(new, parts))
                for parts in datums.all(new)]
    changed = changed_parts(old, new)
    if not changed:
        return []
    before = {parts: datums.files(old, parts) for parts in datums.touched(old, changed)}
    after = {parts: datums.files(new, parts) for parts in datums.touched(new, changed)}
    out = []
    for parts in sorted(set(before) | set(after)):
        old_files, new_files = before.get(parts, ()), after.get(parts, ())
        if not same_files(old_files, new_files):
            out.append(DatumChange(datums.key(parts), old_files, new_files))
    return out


# -- the expression's nodes -------------------------------------------------------------


@dataclass
class _Leaf:
    index: int

    def all(self, side: Side) -> list[Parts]:
        return [((self.index, root),) for root in side.roots(self.index)]

    def touched(self, side: Side, changed: dict[int, set[str]]) -> list[Parts]:
        return [((self.index, root),) for root in sorted(changed.get(self.index, ()))
                if side.files(self.index, root)]


@dataclass
class _Cross:
    children: list

    def all(self, side: Side) -> list[Parts]:
        return _product([child.all(side) for child in self.children])

    def touched(self, side: Side, changed: dict[int, set[str]]) -> list[Parts]:
        out: list[Parts] = []
        everything: dict[int, list[Parts]] = {}
        for position, child in enumerate(self.children):
            touched = child.touched(side, changed)
            if not touched:
                continue
            lists = []
            for other, sibling in enumerate(self.children):
                if other == position:
                    lists.append(touched)
                else:
                    if other not in everything:
                        everything[other] = sibling.all(side)
                    lists.append(everything[other])
            out.extend(_product(lists))
        return out


@dataclass
class _Union:
    children: list

    def all(self, side: Side) -> list[Parts]:
        return [parts for child in self.children for parts in child.all(side)]

    def touched(self, side: Side, changed: dict[int, set[str]]) -> list[Parts]:
        return [parts for child in self.children for parts in child.touched(side, changed)]


@dataclass
class _Keyed:
    """A join (``group`` False) or a group of repository inputs."""

    indexes: list[int]
    outer: list[bool]
    group: bool

    def all(self, side: Side) -> list[Parts]:
        keys: set[str] = set()
        for index in self.indexes:
            keys.update(side.leaves[index].key(side.globs[index], root)
                        for root in side.roots(index))
        return self._of_keys(side, sorted(keys))

    def touched(self, side: Side, changed: dict[int, set[str]]) -> list[Parts]:
        keys = {side.leaves[index].key(side.globs[index], root)
                for index in self.indexes for root in changed.get(index, ())}
        return self._of_keys(side, sorted(keys))

    def _of_keys(self, side: Side, keys: Iterable[str]) -> list[Parts]:
        out: list[Parts] = []
        for key in keys:
            found = [(index, outer, side.keyed(index, key))
                     for index, outer in zip(self.indexes, self.outer, strict=True)]
            present = [(index, roots) for index, _, roots in found if roots]
            if not present:
                continue
            if self.group:
                out.append(tuple(sorted((index, root) for index, roots in present
                                        for root in roots)))
                continue
            if len(present) < len(found) and not any(outer and roots
                                                     for _, outer, roots in found):
                continue  # a key some inputs lack: kept only by an outer input having it
            out.extend(_product([[((index, root),) for root in roots]
                                 for index, roots in present]))
        return out


def _compile(expression: Input, counter) -> object:
    if isinstance(expression, Leaf):
        return _Leaf(next(counter))
    assert isinstance(expression, Combine)
    if expression.op in ("join", "group"):
        indexes = [next(counter) for _ in expression.inputs]
        return _Keyed(indexes, [bool(getattr(c, "outer", False)) for c in expression.inputs],
                      expression.op == "group")
    children = [_compile(child, counter) for child in expression.inputs]
    return _Cross(children) if expression.op == "cross" else _Union(children)


def _product(lists: list[list[Parts]]) -> list[Parts]:
    return [tuple(sorted(part for parts in combination for part in parts))
            for combination in itertools.product(*lists)]


def _unique(items: list[Parts]) -> list[Parts]:
    return list(dict.fromkeys(items))


__all__ = ["Datums", "Part", "Parts", "Side", "changed_datums", "changed_parts", "label"]
