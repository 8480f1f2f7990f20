"""A commit rebasing an open commit onto a branch another node moved.

Two nodes are two :class:`vfs.Store` objects on one store directory, each with its
own cache (so its own index and open commits). Node A commits first; node B's commit
then finds the branch moved and must either rebuild its changes on A's commit, giving
exactly "A's changes, then B's", or refuse with a :class:`Conflict` naming a path and
keep everything B staged. Nothing B staged may disappear silently.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import vfs
from vfs import fsck
from vfs.errors import Conflict, VfsError
from vfs.tree import DIR

REPO = "data"
DIRECTORY = "<dir>"


@contextmanager
def two_nodes(root: Path) -> Iterator[tuple[vfs.Store, vfs.Store]]:
    """Two nodes on one new local store (the index is not fsynced: tests only)."""
    a = vfs.open_store(str(root / "store"), cache_dir=str(root / "cache-a"), create=True,
                       durable_index=False)
    try:
        b = vfs.open_store(str(root / "store"), cache_dir=str(root / "cache-b"),
                           durable_index=False)
        try:
            yield a, b
        finally:
            b.close()
    finally:
        a.close()


def put_file(node: vfs.Store, path: str, data: bytes) -> None:
    vfs.put_stream(node, REPO, "main", path, io.BytesIO(data))


def mkdir(node: vfs.Store, path: str, empty: Path) -> None:
    """Stage an empty directory at ``path`` (put of an empty local directory)."""
    empty.mkdir(exist_ok=True)
    vfs.put(node, REPO, "main", path, [str(empty)], recursive=True)


def tree_of(node: vfs.Store, spec: str = f"{REPO}@main") -> dict[str, object]:
    """path -> bytes of a file, or DIRECTORY."""
    _, snapshot = node.snapshot(vfs.parse_ref(spec))
    return {path: DIRECTORY if entry.kind == DIR
            else vfs.read_file(node, vfs.parse_ref(f"{spec}:/{path}"))
            for path, entry in snapshot.walk()}


def staged(node: vfs.Store) -> dict[str, bytes]:
    return node.index.staged(REPO, "main")


def assert_fsck_ok(node: vfs.Store) -> None:
    report = fsck.check(node)
    assert report.ok, report.problems


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[vfs.Store, vfs.Store]]:
    with two_nodes(tmp_path) as (a, b):
        a.create_repo(REPO)
        yield a, b
        assert_fsck_ok(a)
        assert_fsck_ok(b)


# -- the overlaps a file-only diff misses ---------------------------------------------------


def test_a_file_staged_under_a_directory_the_other_node_deleted(nodes) -> None:
    a, b = nodes
    put_file(a, "/e/x", b"x")
    put_file(a, "/keep", b"k")
    a.commit(REPO, "main", "base")
    put_file(b, "/e/f", b"staged by b")  # e exists in b's view: only e/f is staged
    vfs.remove(a, REPO, "main", "/e", recursive=True)
    a.commit(REPO, "main", "a deletes /e")
    before = staged(b)
    with pytest.raises(Conflict, match="/e"):
        b.commit(REPO, "main", "b adds /e/f")
    assert staged(b) == before  # nothing lost: still staged
    assert tree_of(b) == {"keep": b"k"}


def test_a_file_staged_under_an_empty_directory_the_other_node_deleted(nodes,
                                                                       tmp_path: Path) -> None:
    # An empty directory has no file for a file-only diff to report at all.
    a, b = nodes
    mkdir(a, "/e", tmp_path / "empty")
    put_file(a, "/keep", b"k")
    a.commit(REPO, "main", "base")
    put_file(b, "/e/f", b"staged by b")
    vfs.remove(a, REPO, "main", "/e", recursive=True)
    a.commit(REPO, "main", "a deletes /e")
    with pytest.raises(Conflict, match="/e"):
        b.commit(REPO, "main", "b adds /e/f")
    assert "e/f" in staged(b)


def test_a_file_staged_under_a_directory_the_other_node_replaced_by_a_file(nodes) -> None:
    a, b = nodes
    put_file(a, "/e/x", b"x")
    a.commit(REPO, "main", "base")
    put_file(b, "/e/f", b"staged by b")
    vfs.remove(a, REPO, "main", "/e", recursive=True)
    put_file(a, "/e", b"now a file")
    a.commit(REPO, "main", "a replaces /e")
    with pytest.raises(Conflict, match="/e"):
        b.commit(REPO, "main", "b adds /e/f")
    assert "e/f" in staged(b)


def test_a_file_staged_where_the_other_node_made_a_directory(nodes, tmp_path: Path) -> None:
    a, b = nodes
    put_file(a, "/keep", b"k")
    a.commit(REPO, "main", "base")
    put_file(b, "/d", b"a file from b")
    mkdir(a, "/d", tmp_path / "empty")  # an empty directory: no file in it to diff
    a.commit(REPO, "main", "a makes /d")
    with pytest.raises(Conflict, match="/d"):
        b.commit(REPO, "main", "b adds the file /d")
    assert "d" in staged(b)
    assert tree_of(b) == {"d": DIRECTORY, "keep": b"k"}


def test_a_directory_deletion_staged_where_the_other_node_added_files(nodes) -> None:
    a, b = nodes
    put_file(a, "/d/x", b"x")
    a.commit(REPO, "main", "base")
    vfs.remove(b, REPO, "main", "/d", recursive=True)
    put_file(a, "/d/new", b"added by a")
    a.commit(REPO, "main", "a adds /d/new")
    with pytest.raises(Conflict, match="/d"):
        b.commit(REPO, "main", "b deletes /d")
    assert "d" in staged(b)


def test_disjoint_changes_in_one_directory_still_rebase(nodes) -> None:
    a, b = nodes
    put_file(a, "/d/x", b"x")
    a.commit(REPO, "main", "base")
    put_file(b, "/d/from-b", b"b")
    vfs.remove(b, REPO, "main", "/d/x")
    put_file(a, "/d/from-a", b"a")
    put_file(a, "/other/y", b"y")
    theirs = a.commit(REPO, "main", "a")
    mine = b.commit(REPO, "main", "b")
    assert mine.parents == (theirs.id,)
    assert tree_of(b) == {"d": DIRECTORY, "d/from-a": b"a", "d/from-b": b"b",
                          "other": DIRECTORY, "other/y": b"y"}
    assert staged(b) == {}


# -- property: rebase is "A's changes, then B's", or a conflict that loses nothing ------------

_NAMES = ("a", "b", "c")
PATHS = ["/".join(p) for n in (1, 2, 3) for p in itertools.product(_NAMES, repeat=n)]

Model = dict[str, object]  # path -> bytes (a file) or DIRECTORY; the root is implicit


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _drop_below(model: Model, path: str) -> None:
    for p in [p for p in model if p.startswith(path + "/")]:
        del model[p]


def model_put(model: Model, path: str, data: bytes) -> bool:
    """Put a file: parents are created, a file in the way of one becomes a directory."""
    if model.get(path) == DIRECTORY:
        return False  # put_stream refuses: a directory is there
    for parent in _parents(path):
        if model.get(parent) != DIRECTORY:
            model[parent] = DIRECTORY
    model[path] = data
    return True


def model_mkdir(model: Model, path: str) -> bool:
    if model.get(path) == DIRECTORY:
        return False  # already a directory: nothing to stage
    for parent in _parents(path):
        if model.get(parent) != DIRECTORY:
            model[parent] = DIRECTORY
    model[path] = DIRECTORY
    return True


def model_rm(model: Model, path: str) -> bool:
    if path not in model:
        return False
    del model[path]
    _drop_below(model, path)
    return True


_APPLY = {"put": model_put, "mkdir": model_mkdir, "rm": model_rm}

operation = st.tuples(st.sampled_from(["put", "put", "mkdir", "rm", "rm"]),
                      st.sampled_from(PATHS))
operations = st.lists(operation, max_size=6)


class _Contents:
    """Distinct file contents, so that no put is ever a no-op."""

    def __init__(self) -> None:
        self.n = 0

    def next(self, who: str) -> bytes:
        self.n += 1
        return f"{who}{self.n}".encode()


def run(node: vfs.Store, model: Model, ops, who: str, contents: _Contents,
        empty: Path) -> list[tuple]:
    """Apply ``ops`` through the library and to ``model`` (node's view); return the
    operations that changed the view, with their data."""
    done = []
    for op, path in ops:
        data = contents.next(who) if op == "put" else None
        expected = dict(model)
        changed = _APPLY[op](expected, path, data) if op == "put" else _APPLY[op](expected, path)
        if not changed:
            continue
        if op == "put":
            put_file(node, "/" + path, data)
        elif op == "mkdir":
            mkdir(node, "/" + path, empty)
        else:
            vfs.remove(node, REPO, "main", "/" + path, recursive=True)
        model.clear()
        model.update(expected)
        done.append((op, path, data))
    return done


def replay(model: Model, done: list[tuple]) -> Model | None:
    """Apply B's changes to A's result, or None if one of them no longer applies."""
    out = dict(model)
    for op, path, data in done:
        ok = model_put(out, path, data) if op == "put" else _APPLY[op](out, path)
        if not ok:
            return None
    return out


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(base_ops=operations, a_ops=operations, b_ops=operations)
def test_rebase_is_a_then_b_or_a_conflict_that_keeps_b_staged(
        tmp_path_factory: pytest.TempPathFactory, base_ops, a_ops, b_ops) -> None:
    root = tmp_path_factory.mktemp("rebase")
    empty = root / "empty"
    contents = _Contents()
    with two_nodes(root) as (a, b):
        a.create_repo(REPO)
        base: Model = {}
        run(a, base, base_ops, "base", contents, empty)
        if base_ops and staged(a):
            a.commit(REPO, "main", "base")
        b_model, a_model = dict(base), dict(base)
        b_done = run(b, b_model, b_ops, "B", contents, empty)
        run(a, a_model, a_ops, "A", contents, empty)
        try:
            a.commit(REPO, "main", "A")
        except VfsError:  # nothing to commit: A changed nothing
            pass
        assert tree_of(a) == a_model
        b_staged = staged(b)
        expected = replay(a_model, b_done)
        try:
            b.commit(REPO, "main", "B")
        except Conflict as exc:
            event("conflict")
            assert "/" in str(exc) and "\n" not in str(exc)
            assert staged(b) == b_staged, "a conflict must keep what B staged"
            b.discard(REPO, "main")
        except VfsError as exc:  # B's changes amount to nothing
            assert not b_staged or expected == a_model, exc
        else:
            event("rebased" if b_staged else "nothing staged")
            assert expected is not None, "B's changes no longer apply, but B committed"
            assert tree_of(b) == expected
            assert staged(b) == {}
        assert_fsck_ok(b)
