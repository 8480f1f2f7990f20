"""A hypothesis state machine of put / rm / commit / rollback against a plain dict model.

The model is the view of one branch: path -> file bytes, or DIR for a directory. It
mirrors vfs semantics precisely, including the shape changes:

* putting a single file at a path that is a directory, or at ``path/`` (trailing
  slash), puts it *inside* (like ``cp``), under the source file's own name;
* a file in the way of a new path is replaced by a directory (``Ingest._parents``);
* a directory put at a path that is a file replaces the file; at a directory, merges;
* ``rm`` removes a path and everything below it; the parent directory stays.

Sources always have mode 0644 and a fixed mtime, and directories mode 0755 and mtime 0,
so a tree is a pure function of the model: two equal models give the same root tree, and
"nothing to commit" is predictable.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import vfs
from vfs import fsck
from vfs.errors import IsADirectory, NothingToCommit, PathNotFound, VfsError
from vfs.snapshot import read_file
from vfs.tree import DIR

REPO = "r"
BRANCH = "main"
SOURCE_NAME = "a"  # basename of every single-file source: collides on purpose
MTIME_NS = 1_500_000_000_000_000_000

NAMES = ["a", "b"]
PATHS = NAMES + [f"{x}/{y}" for x in NAMES for y in NAMES]
CONTENTS = [
    b"",
    b"x",
    bytes(range(256)) * 8,  # over the 1 KiB inline limit: stored as a chunk blob
]

Model = dict[str, object]  # path -> bytes, or DIR


def _below(model: Model, path: str) -> list[str]:
    return [p for p in model if p.startswith(path + "/")]


def _remove_tree(model: Model, path: str) -> None:
    for p in _below(model, path):
        del model[p]
    model.pop(path, None)


def _ensure_parents(model: Model, path: str) -> None:
    parts = path.split("/")
    for i in range(1, len(parts)):
        ancestor = "/".join(parts[:i])
        if model.get(ancestor) is not DIR:
            _remove_tree(model, ancestor)  # a file in the way is replaced
            model[ancestor] = DIR


def _set_file(model: Model, path: str, content: bytes) -> None:
    _ensure_parents(model, path)
    if model.get(path) is DIR:
        _remove_tree(model, path)
    model[path] = content


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="vfs-state-")
        self.store = self._open(create=True)
        self.store.create_repo(REPO)
        self.committed: Model = {}
        self.view: Model = {}
        self.has_staged = False  # the index holds staged changes for the branch
        self.head: str | None = None
        self.history: list[tuple[str, Model]] = []
        self.sources = 0

    def _open(self, *, create: bool = False) -> vfs.Store:
        return vfs.open_store(os.path.join(self.tmp, "store"),
                              cache_dir=os.path.join(self.tmp, "cache"), create=create)

    def _source_file(self, content: bytes) -> str:
        self.sources += 1
        directory = os.path.join(self.tmp, "src", str(self.sources))
        os.makedirs(directory)
        path = os.path.join(directory, SOURCE_NAME)
        with open(path, "wb") as f:
            f.write(content)
        os.chmod(path, 0o644)
        os.utime(path, ns=(MTIME_NS, MTIME_NS))
        return path

    def _source_dir(self, files: dict[str, bytes]) -> str:
        self.sources += 1
        directory = os.path.join(self.tmp, "src", str(self.sources), "dir")
        os.makedirs(directory)
        for name, content in files.items():
            path = os.path.join(directory, name)
            with open(path, "wb") as f:
                f.write(content)
            os.chmod(path, 0o644)
            os.utime(path, ns=(MTIME_NS, MTIME_NS))
        os.chmod(directory, 0o755)
        os.utime(directory, ns=(0, 0))
        return directory

    # -- rules -------------------------------------------------------------------------

    @initialize(first=st.dictionaries(st.sampled_from(PATHS), st.sampled_from(CONTENTS),
                                      min_size=1, max_size=3),
                second=st.dictionaries(st.sampled_from(PATHS), st.sampled_from(CONTENTS),
                                       min_size=1, max_size=3))
    def two_commits(self, first: dict[str, bytes], second: dict[str, bytes]) -> None:
        # Start with some history, so rollbacks and changes on top of it come early.
        for files in (first, second):
            for path, content in files.items():
                self.put_file(path, content)
            self.commit()

    @rule(path=st.sampled_from(PATHS), content=st.sampled_from(CONTENTS),
          into=st.booleans(), and_commit=st.booleans())
    def put_file_rule(self, path: str, content: bytes, into: bool, and_commit: bool) -> None:
        self.put_file(path, content, into=into)
        if and_commit:
            self.commit()

    def put_file(self, path: str, content: bytes, *, into: bool = False) -> None:
        # A trailing "/" on the destination (``into``) always means "inside this directory".
        inside = into or self.view.get(path) is DIR
        target = f"{path}/{SOURCE_NAME}" if inside else path
        expected = dict(self.view)
        _set_file(expected, target, content)
        dest = "/" + path + ("/" if into else "")
        result = vfs.put(self.store, REPO, BRANCH, dest, [self._source_file(content)])
        assert bool(result.changes) == (expected != self.view), result.changes
        self.view = expected
        self.has_staged |= bool(result.changes)

    @precondition(lambda self: any(v is not DIR for v in self.view.values()))
    @rule(data=st.data())
    def put_same_again(self, data: st.DataObject) -> None:
        # Re-putting what the view already holds stages nothing (and must not leave
        # any trace in the open commit either).
        path = data.draw(st.sampled_from(sorted(p for p, v in self.view.items()
                                                if v is not DIR)), label="path")
        self.put_file(path, self.view[path])

    @rule(path=st.sampled_from(PATHS),
          files=st.dictionaries(st.sampled_from(NAMES), st.sampled_from(CONTENTS), max_size=3))
    def put_dir(self, path: str, files: dict[str, bytes]) -> None:
        expected = dict(self.view)
        if expected.get(path) is not DIR:
            _ensure_parents(expected, path)
            _remove_tree(expected, path)
            expected[path] = DIR
        for name, content in files.items():
            _set_file(expected, f"{path}/{name}", content)
        result = vfs.put(self.store, REPO, BRANCH, "/" + path, [self._source_dir(files)],
                         recursive=True)
        assert bool(result.changes) == (expected != self.view), result.changes
        self.view = expected
        self.has_staged |= bool(result.changes)

    @rule(path=st.sampled_from(PATHS), recursive=st.booleans())
    def rm(self, path: str, recursive: bool) -> None:
        current = self.view.get(path)
        if current is None:
            with pytest.raises(PathNotFound):
                vfs.remove(self.store, REPO, BRANCH, "/" + path, recursive=recursive)
            return
        if current is DIR and not recursive:
            with pytest.raises(IsADirectory):
                vfs.remove(self.store, REPO, BRANCH, "/" + path)
            return
        removed = vfs.remove(self.store, REPO, BRANCH, "/" + path, recursive=recursive)
        files = [p for p in [path, *_below(self.view, path)] if self.view[p] is not DIR]
        assert removed == len(files)
        _remove_tree(self.view, path)
        self.has_staged = True

    @rule()
    def commit_rule(self) -> None:
        self.commit()

    def commit(self) -> None:
        if not self.has_staged or (self.head is not None and self.view == self.committed):
            with pytest.raises(NothingToCommit):
                self.store.commit(REPO, BRANCH, "nothing")
            if self.has_staged:  # a no-op open commit is dropped
                self.has_staged = False
            return
        commit = self.store.commit(REPO, BRANCH, f"commit {len(self.history)}")
        assert commit.parents == ((self.head,) if self.head else ())
        self._moved(commit, dict(self.view))
        self.has_staged = False

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def rollback(self, data: st.DataObject) -> None:
        target_id, target = data.draw(st.sampled_from(self.history), label="target")
        spec = vfs.parse_ref(f"{REPO}@{target_id[:10]}")
        if self.has_staged:
            with pytest.raises(VfsError, match="staged changes"):
                self.store.rollback(REPO, BRANCH, spec)
            return
        if target == self.committed:
            with pytest.raises(NothingToCommit):
                self.store.rollback(REPO, BRANCH, spec)
            return
        commit = self.store.rollback(REPO, BRANCH, spec)
        assert commit.tree == self.store.read_commit(target_id).tree
        assert commit.parents == (self.head,)
        self._moved(commit, dict(target))
        self.view = dict(target)

    @rule()
    def discard(self) -> None:
        self.store.discard(REPO, BRANCH)
        self.view = dict(self.committed)
        self.has_staged = False

    @rule()
    def reopen(self) -> None:
        # The open commit lives in the node-local index and must survive a restart.
        self.store.close()
        self.store = self._open()

    def _moved(self, commit: vfs.Commit, model: Model) -> None:
        self.head = commit.id
        self.committed = model
        self.history.append((commit.id, model))
        assert self.store.head(REPO, BRANCH).commit == commit.id
        assert self._snapshot_files(f"{REPO}@{BRANCH}") == model

    # -- checks ------------------------------------------------------------------------

    def _snapshot_files(self, spec: str) -> Model:
        _, snapshot = self.store.snapshot(vfs.parse_ref(spec))
        return {p: DIR if e.kind == DIR else read_file(self.store.blobs, e)
                for p, e in snapshot.walk()}

    @invariant()
    def view_matches_model(self) -> None:
        _, open_commit = self.store.open_commit(REPO, BRANCH)
        view = {p: DIR if e.kind == DIR else read_file(self.store.blobs, e)
                for p, e in open_commit.walk()}
        assert view == self.view
        assert bool(open_commit.changes) == self.has_staged

    def teardown(self) -> None:
        try:
            # Every earlier commit still reads back exactly as it was, through get.
            for i, (commit_id, model) in enumerate(self.history):
                out = os.path.join(self.tmp, "get", str(i))
                vfs.get(self.store, vfs.parse_ref(f"{REPO}@{commit_id}"), out)
                assert _local_files(out) == model, f"commit {i} ({commit_id[:12]})"
            report = fsck.check(self.store, deep=True)
            assert report.ok, report.problems
        finally:
            self.store.close()
            shutil.rmtree(self.tmp, ignore_errors=True)


def _local_files(root: str) -> Model:
    out: Model = {}
    for directory, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(directory, root)
        prefix = "" if rel == "." else rel + "/"
        for name in dirnames:
            out[prefix + name] = DIR
        for name in filenames:
            with open(os.path.join(directory, name), "rb") as f:
                out[prefix + name] = f.read()
    return out


StoreMachine.TestCase.settings = settings(
    # ~3 s. Measured against the bug where an empty put pinned the open commit's base
    # (found again in about half the runs; the example database keeps it once found).
    max_examples=50,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_store_state_machine = StoreMachine.TestCase
