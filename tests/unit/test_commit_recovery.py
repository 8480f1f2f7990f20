"""What surrounds the ref's compare-and-swap: recording a commit, recovering an
interrupted one, the reflog fsck reads, and refs that do not decode.

A commit is made the moment its branch moves. Whatever fails or races after that
must neither hide the commit nor drop changes that were staged meanwhile.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

import vfs
import vfs.commit
import vfs.store
from vfs import fsck
from vfs.config import create_config
from vfs.errors import Corruption, StoreFull, StoreUnavailable
from vfs.objstore.local import LocalStore
from vfs.objstore.wrappers import FaultyStore
from vfs.refs import append_reflog, canonical_json, move_ref, read_ref, ref_key
from vfs.store import Store, open_store
from vfs.tree import FILE, Entry, inline_ref

REPO = "data"


class _Crash(BaseException):
    """The process dies here (not an error anything may catch)."""


def put_file(store: Store, path: str, data: bytes) -> None:
    vfs.put_stream(store, REPO, "main", path, io.BytesIO(data))


def content(store: Store, spec: str) -> bytes:
    return vfs.read_file(store, vfs.parse_ref(spec))


def stage_directly(store: Store, path: str, data: bytes) -> None:
    """Stage a file the way another process would, without running any recovery."""
    entry = Entry(path.rsplit("/", 1)[-1], FILE, 0o644, len(data), 1, inline_ref(data))
    store.stage(store.head(REPO, "main"), {path: entry})


def fsck_problems(store: Store) -> list[str]:
    return fsck.check(store).problems


@pytest.fixture
def repo(store: Store) -> Store:
    store.create_repo(REPO)
    return store


# -- an interrupted commit whose swap landed, and changes staged after it ---------------------


def test_recovery_keeps_changes_staged_after_the_interrupted_commit(
        repo: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    put_file(repo, "/a", b"a1")
    put_file(repo, "/b", b"b1")
    real_move_ref = vfs.commit.move_ref

    def move_then_die(objects, state, commit_id):
        real_move_ref(objects, state, commit_id)
        raise _Crash  # killed after the swap, before the reflog and the index

    monkeypatch.setattr(vfs.commit, "move_ref", move_then_die)
    with pytest.raises(_Crash):
        repo.commit(REPO, "main", "interrupted")
    monkeypatch.setattr(vfs.commit, "move_ref", real_move_ref)
    made = repo.head(REPO, "main").commit
    assert repo.index.sealing(REPO, "main") == made
    # Another process stages after the seal: a new version of a, and c.
    stage_directly(repo, "a", b"a2")
    stage_directly(repo, "c", b"c1")

    repo.open_commit(REPO, "main")  # the next operation recovers the commit
    assert repo.index.sealing(REPO, "main") is None
    assert [e.new for e in repo.reflog(REPO, "main")][-1] == made
    assert sorted(repo.index.staged(REPO, "main")) == ["a", "c"]
    assert repo.index.staging_base(REPO, "main") == made
    assert content(repo, f"{REPO}@main:/a") == b"a1"
    second = repo.commit(REPO, "main", "the rest")
    assert second.parents == (made,)
    assert {p: content(repo, f"{REPO}@main:/{p}") for p in "abc"} == {
        "a": b"a2", "b": b"b1", "c": b"c1"}


def test_recovery_keeps_a_change_staged_while_it_runs(
        repo: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    put_file(repo, "/a", b"a1")
    real_move_ref = vfs.commit.move_ref

    def move_then_die(objects, state, commit_id):
        real_move_ref(objects, state, commit_id)
        raise _Crash

    monkeypatch.setattr(vfs.commit, "move_ref", move_then_die)
    with pytest.raises(_Crash):
        repo.commit(REPO, "main", "interrupted")
    monkeypatch.setattr(vfs.commit, "move_ref", real_move_ref)
    real_read_reflog = vfs.store.read_reflog

    def read_reflog_then_race(*args, **kwargs):
        entries = real_read_reflog(*args, **kwargs)
        stage_directly(repo, "late", b"staged while recovering")
        monkeypatch.setattr(vfs.store, "read_reflog", real_read_reflog)  # once
        return entries

    monkeypatch.setattr(vfs.store, "read_reflog", read_reflog_then_race)
    repo.open_commit(REPO, "main")
    assert sorted(repo.index.staged(REPO, "main")) == ["late"]
    repo.commit(REPO, "main", "late")
    assert content(repo, f"{REPO}@main:/late") == b"staged while recovering"


def test_discard_reports_exactly_what_it_removed(repo: Store,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process stages between discard's count and its clear (old code read
    the count in one transaction and cleared in another)."""
    put_file(repo, "/a", b"a")
    put_file(repo, "/d/b", b"b")
    real_staged = repo.index.staged
    raced = []

    def staged_then_race(repo_name: str, branch: str) -> dict[str, bytes]:
        rows = real_staged(repo_name, branch)
        stage_directly(repo, "late", b"staged by another process meanwhile")
        raced.append("late")
        monkeypatch.setattr(repo.index, "staged", real_staged)  # once
        return rows

    monkeypatch.setattr(repo.index, "staged", staged_then_race)
    removed = repo.discard(REPO, "main")
    left = real_staged(REPO, "main")
    assert removed + len(left) == 3 + len(raced)  # a, d, d/b and the late one
    assert "a" not in left


# -- a failure after the swap: the commit is made ------------------------------------------------


@pytest.fixture
def faulty(tmp_path: Path) -> Iterator[tuple[Store, FaultyStore]]:
    objects = FaultyStore(LocalStore(str(tmp_path / "faulty-store"), create=True))
    store = Store(objects, create_config(objects), str(tmp_path / "faulty-cache"))
    store.create_repo(REPO)
    try:
        yield store, objects
        objects.clear()
        assert fsck_problems(store) == []
    finally:
        store.close()


def _fail_the_next_put_after_the_swap(objects: FaultyStore,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real_move_ref = vfs.commit.move_ref

    def move_then_arm(store_objects, state, commit_id):
        real_move_ref(store_objects, state, commit_id)
        objects.fail_once(1, lambda: StoreUnavailable("timed out (injected)"))
        monkeypatch.setattr(vfs.commit, "move_ref", real_move_ref)

    monkeypatch.setattr(vfs.commit, "move_ref", move_then_arm)


@pytest.mark.expect_warnings
def test_a_failed_reflog_append_after_the_swap_still_returns_the_commit(
        faulty, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    store, objects = faulty
    put_file(store, "/a", b"a")
    _fail_the_next_put_after_the_swap(objects, monkeypatch)  # the reflog's put
    with caplog.at_level(logging.WARNING, logger="vfs"):
        commit = store.commit(REPO, "main", "made")
    assert store.head(REPO, "main").commit == commit.id
    assert any(commit.id[:12] in r.getMessage() for r in caplog.records)
    assert commit.id not in [e.new for e in store.reflog(REPO, "main")]
    assert store.index.sealing(REPO, "main") == commit.id  # the recovery is left
    store.open_commit(REPO, "main")  # the next operation records it
    assert [e.new for e in store.reflog(REPO, "main")].count(commit.id) == 1
    assert store.index.staged(REPO, "main") == {}
    assert store.index.sealing(REPO, "main") is None


@pytest.mark.expect_warnings
def test_a_failed_index_update_after_the_swap_still_returns_the_commit(
        faulty, monkeypatch: pytest.MonkeyPatch) -> None:
    store, _ = faulty
    put_file(store, "/a", b"a")

    def index_full(*args, **kwargs):
        raise StoreFull("no space left for the local index (injected)")

    monkeypatch.setattr(store.index, "clear_sealed_txn", index_full)
    commit = store.commit(REPO, "main", "made")
    monkeypatch.undo()
    assert store.head(REPO, "main").commit == commit.id
    store.open_commit(REPO, "main")
    assert [e.new for e in store.reflog(REPO, "main")].count(commit.id) == 1
    assert store.index.staged(REPO, "main") == {}


@pytest.mark.expect_warnings
def test_a_rollback_whose_reflog_append_fails_is_made_and_recorded_later(
        faulty, monkeypatch: pytest.MonkeyPatch) -> None:
    store, objects = faulty
    put_file(store, "/a", b"1")
    first = store.commit(REPO, "main", "one")
    put_file(store, "/a", b"2")
    store.commit(REPO, "main", "two")
    _fail_the_next_put_after_the_swap(objects, monkeypatch)
    back = store.rollback(REPO, "main", vfs.parse_ref(f"{REPO}@{first.id}"))
    assert store.head(REPO, "main").commit == back.id
    objects.clear()
    # fsck finishes it like any interrupted commit of this node: nothing staged here.
    assert fsck_problems(store) == []
    assert [e.new for e in store.reflog(REPO, "main")].count(back.id) == 1


# -- the reflog, as fsck reads it ----------------------------------------------------------------


def test_fsck_accepts_reflog_entries_appended_out_of_order(tmp_path: Path) -> None:
    """Writer A moves the branch, writer B moves it again and appends its reflog
    entry before A appends its own: the reflog is complete, only out of order."""
    a = open_store(str(tmp_path / "s"), cache_dir=str(tmp_path / "ca"), create=True)
    b = open_store(str(tmp_path / "s"), cache_dir=str(tmp_path / "cb"))
    try:
        a.create_repo(REPO)
        put_file(a, "/a", b"a")
        put_file(b, "/b", b"b")
        real_append = a._append_reflog
        b_commit = []

        def b_commits_first(*args, **kwargs):
            b_commit.append(b.commit(REPO, "main", "B, between A's swap and A's reflog"))
            return real_append(*args, **kwargs)

        a._append_reflog = b_commits_first  # type: ignore[method-assign]
        a_commit = a.commit(REPO, "main", "A")
        assert b_commit[0].parents == (a_commit.id,)
        assert [e.new for e in a.reflog(REPO, "main")][-2:] == [b_commit[0].id, a_commit.id]
        assert fsck_problems(a) == []
        assert fsck_problems(b) == []
    finally:
        b.close()
        a.close()


@pytest.mark.corrupts_store
def test_fsck_reports_a_head_no_reflog_entry_records(repo: Store) -> None:
    put_file(repo, "/a", b"a")
    first = repo.commit(REPO, "main", "one")
    put_file(repo, "/a", b"a2")
    second = repo.commit(REPO, "main", "two")
    # Moved back to the first commit behind the reflog's back.
    move_ref(repo.objects, read_ref(repo.objects, REPO, "main"), first.id)
    assert any("does not record its head" in p for p in fsck_problems(repo))
    # An entry that is not part of the chain does not count either: one records
    # second -> first only if second is where the chain stands.
    append_reflog(repo.objects, REPO, "main", "f" * 64, first.id, "bogus")
    assert any("does not record its head" in p for p in fsck_problems(repo))
    append_reflog(repo.objects, REPO, "main", second.id, first.id, "the real move")
    assert fsck_problems(repo) == []


# -- refs that do not decode ---------------------------------------------------------------------


@pytest.mark.corrupts_store
@pytest.mark.parametrize("body", [b'{"commit": 5}', b'{"commit": ["x"]}', b'{"commit": {}}',
                                  b'{"commit": "not a commit id"}', b"[1]", b'"text"'])
def test_a_damaged_ref_is_corruption_naming_it(repo: Store, body: bytes) -> None:
    repo.objects.put(ref_key(REPO, "main"), body)
    with pytest.raises(Corruption, match=f"{REPO}@main"):
        repo.head(REPO, "main")
    with pytest.raises(Corruption, match=f"{REPO}@main"):
        repo.list_branches(REPO)
    with pytest.raises(Corruption, match=f"{REPO}@main"):
        repo.resolve(vfs.parse_ref(f"{REPO}@main"))
    assert any(f"{REPO}@main" in p for p in fsck_problems(repo))


def test_a_well_formed_ref_still_reads(repo: Store) -> None:
    put_file(repo, "/a", b"a")
    commit = repo.commit(REPO, "main", "one")
    assert canonical_json({"commit": commit.id}) == repo.objects.get(ref_key(REPO, "main"))
    assert repo.head(REPO, "main").commit == commit.id
