"""diff_trees against a diff of two full listings, on random trees and on a directory
too big for its tree to keep a list of names (tree.NAMES_KEPT)."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfs import tree as tree_module
from vfs.snapshot import Snapshot, diff_trees
from vfs.staging import OpenCommit
from vfs.tree import FILE, Entry, inline_ref


def build(store, files: dict[str, tuple[bytes, int]]) -> Snapshot:
    view = OpenCommit(Snapshot(store.blobs, None), {})
    for path, (data, mode) in sorted(files.items()):
        name = path.rsplit("/", 1)[-1]
        view.apply(view.plan_set(path, Entry(name, FILE, mode, len(data), 1,
                                             inline_ref(data))))
    with store.blobs.writer() as writer:
        root = view.seal(writer)
    return Snapshot(store.blobs, root)


def expected(old: dict, new: dict) -> set[tuple[str, str]]:
    out = set()
    for path in old.keys() | new.keys():
        if path not in new:
            out.add(("deleted", path))
        elif path not in old:
            out.add(("added", path))
        elif old[path] != new[path]:
            out.add(("modified", path))
    return out


def got(old: Snapshot, new: Snapshot) -> set[tuple[str, str]]:
    changes = list(diff_trees(old, new))
    return {(c.status, c.path) for c in changes}


names = st.sampled_from(["a", "b", "c", "d", "a/x", "a/y", "b/x", "c/d/e", "e/f"])
file_sets = st.dictionaries(names, st.tuples(st.sampled_from([b"1", b"2"]),
                                             st.sampled_from([0o644, 0o600])), max_size=6)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=file_sets, after=file_sets)
def test_diff_matches_the_listings(store, before, after) -> None:
    # A path that is a file in one set and a directory in the other is fine; one that is
    # both a file and a directory in one set is not a tree: drop those.
    for files in (before, after):
        for path in list(files):
            if any(other.startswith(path + "/") for other in files):
                del files[path]
    assert got(build(store, before), build(store, after)) == expected(before, after)


def test_a_change_in_a_directory_too_big_to_keep_its_names(store, monkeypatch) -> None:
    monkeypatch.setattr(tree_module, "NAMES_KEPT", 50)  # the same path as 65,536 names
    before = {f"big/k{i:04d}": (b"x", 0o644) for i in range(400)}
    after = dict(before)
    rng = random.Random(7)
    for i in rng.sample(range(400), 20):
        del after[f"big/k{i:04d}"]
    for i in rng.sample(range(400), 20):
        after[f"big/k{i:04d}"] = (b"y", 0o644)
    after["big/k0000a"] = (b"z", 0o644)
    after["big/zzz"] = (b"z", 0o644)
    old, new = build(store, before), build(store, after)
    assert old.tree(old.lookup("big").ref)._names is None  # names not kept: bisects text
    assert got(old, new) == expected(before, after)
    assert got(new, old) == expected(after, before)


def test_mode_only_changes_are_modifications(store) -> None:
    old = build(store, {"a": (b"1", 0o644)})
    new = build(store, {"a": (b"1", 0o600)})
    assert got(old, new) == {("modified", "a")}


@pytest.mark.parametrize("count", [0, 1, 3])
def test_empty_and_full(store, count) -> None:
    files = {f"f{i}": (b"1", 0o644) for i in range(count)}
    assert got(build(store, {}), build(store, files)) == {("added", p) for p in files}
    assert got(build(store, files), build(store, {})) == {("deleted", p) for p in files}
