"""Watching heads cheaply: one listing of refs/ per round, whatever the number of
branches and pipelines (vfs/heads.py, registry.Pipelines, the watcher's rounds).

Requests are recorded by a wrapper around the store's object store; a round of an idle
watcher must make no request per pipeline.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

import vfs
from daemon.watcher import Watcher
from vfs.errors import BranchNotFound, RepoNotFound
from vfs.heads import Heads
from vfs.objstore.wrappers import DelegatingStore
from vfs.pipeline import registry
from vfs.pipeline.spec import parse_spec


class RecordingStore(DelegatingStore):
    """Records every operation with its key (or a listing's prefix)."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def _call(self, op: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self.calls.append((op, str(args[0]) if args else ""))
        return fn(*args, **kwargs)

    def take(self) -> list[tuple[str, str]]:
        with self._lock:
            calls, self.calls = self.calls, []
        return calls


@pytest.fixture
def recorded(store: vfs.Store) -> RecordingStore:
    recording = RecordingStore(store.objects)
    store.objects = recording  # what the watcher and Heads use (blobs keep their own)
    return recording


def commit_file(store: vfs.Store, tmp_path: Path, repo: str, name: str) -> str:
    (tmp_path / name).write_bytes(name.encode())
    vfs.put(store, repo, "main", name, [str(tmp_path / name)])
    return store.commit(repo, "main", name).id


def test_an_idle_poll_is_one_listing_and_only_changed_refs_are_read(
        store: vfs.Store, recorded: RecordingStore, tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        store.create_repo(name)
    heads = Heads(store)
    recorded.take()
    assert heads.poll() == {("a", "main"), ("b", "main"), ("c", "main")}
    assert [op for op, _ in recorded.take()].count("list") == 1
    assert heads.head("b", "main").commit is None
    assert heads.poll() == set()
    assert recorded.take() == [("list", "refs/")]  # idle: nothing read
    commit = commit_file(store, tmp_path, "b", "f")
    recorded.take()
    assert heads.poll() == {("b", "main")}
    assert recorded.take() == [("list", "refs/"), ("get_tagged", "refs/b/main")]
    assert heads.head("b", "main").commit == commit
    store.delete_branch("c", "main")
    assert heads.poll() == {("c", "main")}


def test_a_missing_branch_raises_as_store_head_does_and_is_read_once(
        store: vfs.Store, recorded: RecordingStore) -> None:
    store.create_repo("a")
    heads = Heads(store)
    heads.poll()
    recorded.take()
    for _ in range(3):
        with pytest.raises(BranchNotFound, match="a@dev"):
            heads.head("a", "dev")
        with pytest.raises(RepoNotFound):
            heads.head("gone", "main")
        heads.poll()
    # Read in full once each (the exact error), then answered from memory until the
    # listing changes.
    assert [call for call in recorded.take() if call[0] != "list"] == [
        ("get", "repos/a"), ("get_tagged", "refs/a/dev"), ("get", "repos/gone")]
    store.create_branch("a", "dev")
    heads.poll()
    assert heads.head("a", "dev").commit is None


def test_pipelines_reads_only_versions_it_has_not_read(
        store: vfs.Store, recorded: RecordingStore) -> None:
    store.create_repo("images")
    spec = {"input": {"repo": "images"}, "transform": {"cmd": ["true"]}, "runtime": "process"}
    for name in ("p1", "p2"):
        registry.create(store, parse_spec({"pipeline": name, **spec}))
    listing = registry.Pipelines(store.objects)
    recorded.take()
    assert [p.name for p in listing.poll()] == ["p1", "p2"]
    assert [op for op, _ in recorded.take()] == ["list", "get", "get"]
    assert [p.name for p in listing.poll()] == ["p1", "p2"]
    assert recorded.take() == [("list", "pipelines/")]
    registry.update(store, parse_spec({"pipeline": "p2", **spec, "parallelism": 2}))
    registry.delete(store, "p1")
    recorded.take()
    found = listing.poll()
    assert [(p.name, p.version) for p in found] == [("p2", 2)]
    assert [op for op, _ in recorded.take()].count("get") == 2  # the two new versions
    assert found == registry.list_pipelines(store.objects)


@pytest.mark.trio
async def test_an_idle_watcher_lists_refs_once_a_round_whatever_the_pipelines(
        store: vfs.Store, recorded: RecordingStore, tmp_path: Path) -> None:
    store.create_repo("images")
    names = [f"p{i}" for i in range(6)]
    for name in names:
        registry.create(store, parse_spec({
            "pipeline": name, "input": {"repo": "images"}, "transform": {"cmd": ["true"]},
            "runtime": "process"}))
    watcher = Watcher(store, str(tmp_path / "jobs"), poll_interval=0.02, debounce=0,
                      allow_process_runtime=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run)
        with trio.fail_after(30):  # every pipeline looked at: nothing to do (no commit)
            while not all(watcher._states.get(n) and watcher._states[n].done for n in names):
                await trio.sleep(0.02)
        recorded.take()
        with trio.fail_after(30):  # ten rounds or more (a round lists one or the other)
            while max(recorded.calls.count(("list", "refs/")),
                      recorded.calls.count(("list", "pipelines/"))) < 11:
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    calls = recorded.take()
    # Nothing per pipeline: no ref, repository or pipeline version read; pipelines/ is
    # listed again only every PIPELINES_RELIST_SECONDS when nothing changed.
    others = [call for call in calls if call != ("list", "refs/")]
    assert others in ([], [("list", "pipelines/")]), others[:20]
    assert calls.count(("list", "refs/")) >= 11
