"""The subdirectory counts of an open commit (a directory's link count on the mount).

The counts of directories with staged changes below them are kept up to date by
``OpenCommit.apply`` rather than counted again after every change; whatever the
order of changes and questions, they must be what a fresh listing says.
"""

from __future__ import annotations

import random

import pytest

import vfs
from vfs.blobs import BlobKind
from vfs.snapshot import Snapshot
from vfs.staging import OpenCommit, new_dir
from vfs.tree import DIR, FILE, Entry, dir_entry, encode_tree, inline_ref

NAMES = "abc"


def _file(name: str) -> Entry:
    return Entry(name, FILE, 0o644, 1, 1, inline_ref(b"x"))


def _head(store: vfs.Store) -> Snapshot:
    """A committed tree: a/, a/b/, a/c (a file), b/, c (a file)."""
    with store.blobs.writer() as writer:
        def add(children: dict[str, Entry]) -> bytes:
            return writer.add_bytes(BlobKind.TREE, encode_tree(list(children.values())))

        ab: dict[str, Entry] = {}
        a = {"b": dir_entry("b", add(ab), ab), "c": _file("c")}
        b: dict[str, Entry] = {}
        root = {"a": dir_entry("a", add(a), a), "b": dir_entry("b", add(b), b),
                "c": _file("c")}
        root_hash = add(root)
    return Snapshot(store.blobs, root_hash.hex())


def _directories(view: OpenCommit, path: str = "") -> list[str]:
    found = [path]
    for name, entry in view.listdir(path).items():
        if entry.kind == DIR:
            found += _directories(view, f"{path}/{name}" if path else name)
    return found


def _counted(view: OpenCommit, path: str) -> int:
    return sum(1 for entry in view.listdir(path).values() if entry.kind == DIR)


def _change(view: OpenCommit, rng: random.Random) -> dict[str, Entry | None]:
    """One random change: a new directory or file, a removal, or a move."""
    directories = _directories(view)
    parent = rng.choice(directories)
    name = rng.choice(NAMES)
    path = f"{parent}/{name}" if parent else name
    existing = view.lookup(path)
    action = rng.choice(["mkdir", "file", "remove", "move"])
    if action == "mkdir":
        return {path: new_dir(name)}
    if action == "file":
        return {path: _file(name)}
    if existing is None:
        return {}
    if action == "remove":
        return {path: None}
    target_parent = rng.choice(directories)
    target = f"{target_parent}/{name}" if target_parent else name
    if target == path or target_parent == path or target_parent.startswith(path + "/"):
        return {}
    changes: dict[str, Entry | None] = {path: None, target: existing.renamed(name)}
    for below in view.below(path):
        changes[target + below[len(path):]] = view.changes[below]
    return changes


@pytest.mark.parametrize("seed", range(20))
def test_subdirectory_counts_stay_true_across_changes(store: vfs.Store, seed: int) -> None:
    rng = random.Random(seed)
    view = OpenCommit(_head(store), {})
    for _ in range(60):
        view.apply(_change(view, rng))
        for path in _directories(view):
            if rng.random() < 0.5:  # asked about some, kept for the next changes
                assert view.subdirectories(path) == _counted(view, path), path
    for path in _directories(view):
        assert view.subdirectories(path) == _counted(view, path), path
    assert view.subdirectories("nothing/here") == 0
