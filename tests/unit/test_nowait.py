"""Answers from memory for the FUSE loop: the ``*_nowait`` lookups of an open commit.

The mount answers in its one trio thread from decoded trees only, and reads a tree it
misses in a worker thread. A ``*_nowait`` method must therefore never read the store,
must say so (NotCached) whenever the answer needs a tree it does not have, and must
otherwise answer exactly what the blocking method answers.
"""

from __future__ import annotations

import random

import pytest
from test_open_commit_counts import _change, _directories, _head

import vfs
from vfs.errors import NotADirectory, PathNotFound
from vfs.snapshot import NotCached, Snapshot, TreeCache
from vfs.staging import OpenCommit

PATHS = ["", "a", "b", "c", "a/b", "a/c", "a/b/a", "b/a/b", "c/a", "x", "a/x/y"]


def _answer(call, path: str) -> object:
    try:
        return call(path)
    except (PathNotFound, NotADirectory) as exc:
        return type(exc)


@pytest.mark.parametrize("seed", range(12))
def test_nowait_answers_like_the_blocking_lookups_or_says_it_cannot(
        store: vfs.Store, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    built = OpenCommit(_head(store), {})
    for _ in range(rng.randrange(0, 12)):
        built.apply(_change(built, rng))
    paths = PATHS + _directories(built)
    reads = []
    real_read = store.blobs.read
    monkeypatch.setattr(store.blobs, "read",
                        lambda digest, **kw: reads.append(digest) or real_read(digest, **kw))
    for _ in range(5):
        # A fresh cache, some of it read by the blocking methods (as a worker does).
        head = Snapshot(store.blobs, built.head.root, TreeCache())
        view = OpenCommit(head, built.changes)
        fresh = OpenCommit(Snapshot(store.blobs, built.head.root), built.changes)
        for path in rng.sample(paths, rng.randrange(len(paths))):
            _answer(view.lookup, path)
        for path in paths:
            for nowait, blocking in ((view.lookup_nowait, fresh.lookup),
                                     (view.listdir_nowait, fresh.listdir),
                                     (view.subdirectories_nowait, fresh.subdirectories)):
                before = len(reads)
                try:
                    answer = _answer(nowait, path)
                except NotCached as missing:
                    assert head.cached_tree(missing.tree_hex) is None
                    continue
                finally:
                    assert len(reads) == before, f"{nowait.__name__}({path!r}) read the store"
                assert answer == _answer(blocking, path), (nowait.__name__, path)
        # Everything read: every answer comes from memory.
        for path in paths:
            _answer(view.listdir, path)
            _answer(view.subdirectories, path)
        for path in paths:
            assert _answer(view.lookup_nowait, path) == _answer(fresh.lookup, path)
            assert _answer(view.listdir_nowait, path) == _answer(fresh.listdir, path)
