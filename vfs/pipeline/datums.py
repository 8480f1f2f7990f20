"""Datums: which parts of an input commit a pipeline processes one at a time.

The spec's glob picks them: ``/*`` makes every top-level file or directory one
datum, ``/*/*`` every second-level one, ``/`` the whole repository a single
datum, and a final ``**`` (``/**``, ``/images/**``) every file at any depth.
Each path segment is an ``fnmatch`` pattern (``*``, ``?``, ``[...]``).

A datum's identity is its **hash**: its root, the paths and content ids of its
files, and the transform hash of the pipeline version that processes it (command,
env, runtime, image digest and glob; see :func:`vfs.pipeline.jobs.transform_hash`).
Two runs that would see the same bytes under the same names with the same command,
image and glob have the same hash, so an output recorded once is reused instead of
being computed again. Content ids come from the trees (a file's ``ref`` names its
content), so hashing never reads file data.

The datums a new input commit affects are found from the tree diff with the
commit processed before (:func:`changed_datums`): the cost grows with the size of
the change, not of the repository.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from vfs.blobs import blob_hash
from vfs.errors import InvalidSpec
from vfs.refs import canonical_json
from vfs.snapshot import Snapshot, diff_trees
from vfs.tree import DIR, Entry

DATUM_ID_CHARS = 16


class Glob:
    """A compiled datum glob.

    A segment's parenthesised parts are *capture groups* (``/(*).csv``, ``/*/(*)/*``):
    they match as if the parentheses were not there, and :meth:`captures` gives what
    they matched in a datum's root, numbered from 1 in the order they open (the keys
    of ``join_on`` and ``group_by``).

    Raises:
        InvalidSpec: the pattern is not absolute, has empty, ``.`` or ``..``
            segments, an unbalanced ``[`` or ``(``, a nested ``(``, or a ``**`` that is
            not the last segment (or is in a capture group).
    """

    def __init__(self, pattern: str) -> None:
        if not pattern.startswith("/"):
            raise InvalidSpec(f"glob {pattern!r} must start with '/' (e.g. \"/*\")")
        body = pattern.strip("/")
        written = body.split("/") if body else []
        self.pattern = pattern
        self.files_below = bool(written) and written[-1] == "**"
        if self.files_below:
            written = written[:-1]
        segments = []
        pieces = []
        self.groups = 0
        for segment in written:
            if segment in ("", ".", ".."):
                raise InvalidSpec(f"glob {pattern!r} has an empty, '.' or '..' segment")
            if "**" in segment:
                raise InvalidSpec(f"glob {pattern!r}: '**' is only allowed as the last "
                                  "segment (every file below)")
            if segment.count("[") != segment.count("]"):
                raise InvalidSpec(f"glob {pattern!r}: unbalanced '[' in {segment!r}")
            regex, groups = _capturing(pattern, segment)
            self.groups += groups
            pieces.append(regex)
            segments.append(segment.replace("(", "").replace(")", ""))
            if segments[-1] in ("", ".", ".."):
                raise InvalidSpec(f"glob {pattern!r} has an empty, '.' or '..' segment")
        self.segments = segments
        self._written = written
        self._compiled = [None if _is_literal(s) else re.compile(fnmatch.translate(s))
                          for s in segments]
        tail = ("/.+" if pieces else ".+") if self.files_below else ""
        self._captures = re.compile("/".join(pieces) + tail, re.DOTALL) if self.groups else None

    def captures(self, root: str) -> tuple[str, ...]:
        """What the capture groups matched in datum root ``root`` (() if the glob has
        none or ``root`` is not one of its datums)."""
        if self._captures is None:
            return ()
        match = self._captures.fullmatch(root)
        return match.groups() if match else ()

    def root_of(self, groups: tuple[str, ...]) -> str | None:
        """The one datum root whose capture groups matched ``groups``, when the glob
        says it exactly: every wildcard of the glob is a whole group ``(*)``, each group
        used once (``/(*).csv``, ``/data/(*)/(*).json``); None when the glob cannot
        say (other wildcards, a final ``**``), or no root can have these groups."""
        if self.files_below or self.groups != len(groups) or not self.groups:
            return None
        parts = []
        values = iter(groups)
        for segment in self._written:
            bare = segment.replace("(*)", "")
            if any(ch in bare for ch in "*?[()"):
                return None  # a wildcard outside a whole (*) group: a listing decides
            built = segment
            while "(*)" in built:
                value = next(values)
                if not value or "/" in value or value in (".", ".."):
                    return None  # no single name: a listing decides
                built = built.replace("(*)", value, 1)
            parts.append(built)
        root = "/".join(parts)
        return root if self.captures(root) == groups else None

    def _match(self, index: int, name: str) -> bool:
        regex = self._compiled[index]
        return name == self.segments[index] if regex is None else bool(regex.match(name))

    def datum_of(self, path: str) -> str | None:
        """The datum (root path) a file at ``path`` belongs to, or None."""
        parts = path.split("/") if path else []
        depth = len(self.segments)
        if len(parts) < depth + (1 if self.files_below else 0):
            return None
        if not all(self._match(i, parts[i]) for i in range(depth)):
            return None
        if self.files_below:
            return path
        return "/".join(parts[:depth])

    def datums(self, snapshot: Snapshot) -> Iterator[str]:
        """Every datum root of a snapshot, in path order."""
        yield from self._walk(snapshot, "", 0)

    def _walk(self, snapshot: Snapshot, path: str, level: int) -> Iterator[str]:
        if level == len(self.segments):
            if not self.files_below:
                yield path
                return
            for sub, entry in snapshot.walk(path):
                if entry.kind != DIR:
                    yield sub
            return
        regex = self._compiled[level]
        if regex is None:  # a literal name: one lookup, no listing
            name = self.segments[level]
            child = f"{path}/{name}" if path else name
            entry = snapshot.lookup(child)
            if entry is not None and (entry.kind == DIR or self._is_last(level)):
                yield from self._walk(snapshot, child, level + 1)
            return
        for name, entry in snapshot.listdir(path).items():
            if not regex.match(name):
                continue
            if entry.kind != DIR and not self._is_last(level):
                continue
            yield from self._walk(snapshot, f"{path}/{name}" if path else name, level + 1)

    def _is_last(self, level: int) -> bool:
        return level == len(self.segments) - 1 and not self.files_below


def _is_literal(segment: str) -> bool:
    return not any(ch in segment for ch in "*?[")


def _capturing(pattern: str, segment: str) -> tuple[str, int]:
    """A segment as a regular expression matching one path name, its parenthesised parts
    as groups; and how many groups it has."""
    out = []
    groups = 0
    depth = 0
    i = 0
    while i < len(segment):
        ch = segment[i]
        if ch == "(":
            if depth:
                raise InvalidSpec(f"glob {pattern!r}: capture groups cannot be nested")
            depth, groups = 1, groups + 1
            out.append("(")
        elif ch == ")":
            if not depth:
                raise InvalidSpec(f"glob {pattern!r}: unbalanced ')' in {segment!r}")
            depth = 0
            out.append(")")
        elif ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[":
            end = segment.index("]", i + 1)
            body = segment[i + 1:end]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end
        else:
            out.append(re.escape(ch))
        i += 1
    if depth:
        raise InvalidSpec(f"glob {pattern!r}: unbalanced '(' in {segment!r}")
    return "".join(out), groups


# -- datum hashes ---------------------------------------------------------------------


def datum_files(snapshot: Snapshot, root: str) -> list[tuple[str, Entry]]:
    """The files and symlinks of the datum at ``root`` (path order); [] if none."""
    entry = snapshot.lookup(root) if root else None
    if root and entry is None:
        return []
    if root and entry.kind != DIR:  # type: ignore[union-attr]
        return [(root, entry)]  # type: ignore[list-item]
    return [(path, e) for path, e in snapshot.walk(root) if e.kind != DIR]


def datum_hash(transform_hash: str, root: str, files: list[tuple[str, Entry]]) -> str:
    """The hash naming a datum: its root, its files' paths and contents, the transform."""
    body = [transform_hash, root, [[path, e.kind, e.ref] for path, e in files]]
    return blob_hash(canonical_json(body)).hex()


def datum_id(digest: str) -> str:
    """The short id shown to users and given to the command (``VFS_DATUM_ID``)."""
    return digest[:DATUM_ID_CHARS]


Files = tuple[tuple[str, Entry], ...]


def same_files(a: Files, b: Files) -> bool:
    """Whether two file lists give a datum the same identity (paths, kinds, contents)."""
    return [(p, e.kind, e.ref) for p, e in a] == [(p, e.kind, e.ref) for p, e in b]


@dataclass(frozen=True)
class DatumChange:
    """A datum root whose files differ between two input commits."""

    root: str
    old_files: Files  # () : the datum did not exist in the old commit
    new_files: Files  # () : the datum is gone in the new commit


def changed_datums(glob: Glob, old: Snapshot | None, new: Snapshot) -> list[DatumChange]:
    """The datums whose files differ between ``old`` and ``new`` (all of ``new`` if None).

    Only the roots the tree diff touches are looked at, so the cost follows the
    change. A mode change alone is not a change (modes are not part of a datum).
    """
    if old is None:
        roots: Iterable[str] = glob.datums(new)
    else:
        found = set()
        for change in diff_trees(old, new):
            root = glob.datum_of(change.path)
            if root is not None:
                found.add(root)
        roots = sorted(found)
    out = []
    for root in roots:
        new_files = tuple(datum_files(new, root))
        old_files = tuple(datum_files(old, root)) if old is not None else ()
        if old_files or new_files:
            if not same_files(old_files, new_files):
                out.append(DatumChange(root, old_files, new_files))
    return out


__all__ = ["DatumChange", "Glob", "changed_datums", "datum_files", "datum_hash", "datum_id",
           "same_files"]
