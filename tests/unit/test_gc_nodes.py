"""gc with several nodes on one store, and gc that stops on what it cannot read.

Two nodes are two Store objects on one local store directory, each with its own
cache (its own index, open commits and node record), as two machines sharing a
bucket. Every test here reproduces a way committed data was lost before the gc
protocol of docs/format.md §10.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

import vfs
import vfs.gclog
from vfs import fsck
from vfs.config import StoreConfig, create_config
from vfs.errors import GcAborted, GcRefused, StoreUnavailable, VfsError
from vfs.gc import collect
from vfs.nodes import ACTIVE, record_key
from vfs.objstore.local import LocalStore
from vfs.objstore.wrappers import DelegatingStore
from vfs.refs import commit_key, ref_key

REPO = "data"


def open_node(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch, *,
              objects=None, config: StoreConfig | None = None) -> vfs.Store:
    monkeypatch.setenv("VFS_NODE_NAME", name)
    store_dir = str(tmp_path / "store")
    if objects is None and config is None:
        return vfs.open_store(store_dir, cache_dir=str(tmp_path / f"cache-{name}"), create=True)
    objects = objects or LocalStore(store_dir, create=True)
    from vfs.config import load_config

    config = create_config(objects, config) if config else load_config(objects)
    return vfs.Store(objects, config, str(tmp_path / f"cache-{name}"))


def put_file(store: vfs.Store, tmp_path: Path, dest: str, data: bytes,
             branch: str = "main") -> None:
    src = tmp_path / "src" / f"{random.random()}"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(data)
    vfs.put(store, REPO, branch, dest, [str(src)])


def read(store: vfs.Store, spec: str) -> bytes:
    return vfs.read_file(store, vfs.parse_ref(spec))


def packs(tmp_path: Path) -> set[str]:
    return {p.name for p in (tmp_path / "store" / "packs").glob("*/*")}


def assert_clean(*stores: vfs.Store) -> None:
    for store in stores:
        report = fsck.check(store, deep=True)
        assert report.ok, (store.node.name, report.problems)


def assert_readable_from_a_new_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: str,
                                    data: bytes, *nodes: vfs.Store) -> None:
    """A node that never saw the store before reads ``spec``; every node checks clean."""
    with open_node(tmp_path, "node-c", monkeypatch) as c:
        assert read(c, spec) == data
        assert_clean(*nodes, c)


@pytest.fixture
def two(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    a = open_node(tmp_path, "node-a", monkeypatch)
    a.create_repo(REPO)
    b = open_node(tmp_path, "node-b", monkeypatch)
    yield a, b
    a.close()
    b.close()


DATA = random.Random(7).randbytes(300_000)


# -- 2. gc treats what it cannot read as dead ---------------------------------------------


@pytest.mark.corrupts_store
def test_gc_stops_on_a_damaged_commit_with_a_cold_cache(two, tmp_path: Path) -> None:
    a, b = two
    put_file(a, tmp_path, "/f", DATA)
    first = a.commit(REPO, "main", "f")
    vfs.remove(a, REPO, "main", "/f")
    a.commit(REPO, "main", "no f")  # /f lives only in the first commit now
    before = packs(tmp_path)
    path = tmp_path / "store" / commit_key(first.id)
    original = path.read_bytes()
    path.write_bytes(original.replace(b'"message":"f"', b'"message":"g"'))
    with pytest.raises(GcAborted, match=first.id):
        collect(b, grace=0)
    assert packs(tmp_path) == before
    path.write_bytes(original)
    assert read(b, f"{REPO}@{first.id}:/f") == DATA


@pytest.mark.corrupts_store
def test_gc_stops_on_a_ref_holding_garbage(two, tmp_path: Path) -> None:
    a, b = two
    a.create_branch(REPO, "side")
    put_file(a, tmp_path, "/only-here", DATA, branch="side")
    side = a.commit(REPO, "side", "side")
    before = packs(tmp_path)
    (tmp_path / "store" / ref_key(REPO, "side")).write_bytes(b"\x00garbage")
    with pytest.raises(GcAborted, match="side"):
        collect(b, grace=0, reflog_retention=0)
    assert packs(tmp_path) == before
    (tmp_path / "store" / ref_key(REPO, "side")).write_text(f'{{"commit":"{side.id}"}}')
    assert read(b, f"{REPO}@side:/only-here") == DATA


class _FailsFirstCommitRead(DelegatingStore):
    """Fails the first read of a commit object, like one lost connection."""

    failed = False

    def get(self, key: str) -> bytes:
        if key.startswith("commits/") and not self.failed:
            self.failed = True
            raise StoreUnavailable("connection reset by peer")
        return super().get(key)


def test_gc_stops_on_one_transient_error_reading_a_commit(
        two, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, _ = two
    put_file(a, tmp_path, "/f", DATA)
    first = a.commit(REPO, "main", "f")
    vfs.remove(a, REPO, "main", "/f")
    a.commit(REPO, "main", "no f")
    before = packs(tmp_path)
    flaky = _FailsFirstCommitRead(LocalStore(str(tmp_path / "store")))
    with open_node(tmp_path, "node-c", monkeypatch, objects=flaky) as c:
        with pytest.raises(GcAborted, match="connection reset"):
            collect(c, grace=0)
        assert packs(tmp_path) == before
        collect(c, grace=0)  # the next run reads everything and keeps what is live
        assert read(c, f"{REPO}@{first.id}:/f") == DATA
        assert_clean(c)


# -- 3. a live pack whose index copy is missing --------------------------------------------


def test_gc_reindexes_a_live_pack_whose_index_copy_is_missing(
        two, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = two
    put_file(a, tmp_path, "/f", DATA)
    a.commit(REPO, "main", "f")
    stored = packs(tmp_path)
    for pack in stored:  # the file's pack and the tree's
        (tmp_path / "store" / "index" / pack).unlink()
    report = collect(b, grace=0)
    assert report.packs_reindexed == len(stored) and report.packs_deleted == 0
    assert packs(tmp_path) == stored
    assert all((tmp_path / "store" / "index" / pack).exists() for pack in stored)
    assert_readable_from_a_new_node(tmp_path, monkeypatch, f"{REPO}@main:/f", DATA, a, b)


# -- 4. dedup on one node, gc on another ---------------------------------------------------


def test_dedup_onto_garbage_is_pinned_against_gc_on_another_node(
        two, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = two
    put_file(a, tmp_path, "/f", DATA)
    a.discard(REPO, "main")  # its pack is garbage now
    put_file(a, tmp_path, "/f", DATA)  # deduplicated onto that garbage: 0 B new
    assert len(packs(tmp_path)) == 1
    report = collect(b, grace=0)
    assert report.packs_deleted == 0  # node a's pins keep it
    a.commit(REPO, "main", "f")
    assert_readable_from_a_new_node(tmp_path, monkeypatch, f"{REPO}@main:/f", DATA, a, b)


def test_a_write_rewrites_blobs_of_a_condemned_pack(
        two, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = two
    put_file(a, tmp_path, "/f", DATA)
    a.discard(REPO, "main")
    (old,) = packs(tmp_path)
    a.presence.publish(ACTIVE)  # as if a write of node a were in flight
    report = collect(b, grace=0)
    assert report.packs_condemned == 1 and report.packs_deleted == 0
    assert report.waiting_for == ["node-a"]
    put_file(a, tmp_path, "/f", DATA)  # the check sees the condemnation: stored again
    assert len(packs(tmp_path)) == 2
    report = collect(b, grace=0)  # node a acknowledged when its put ended
    assert report.packs_deleted == 1 and old not in packs(tmp_path)
    a.commit(REPO, "main", "f")
    assert_readable_from_a_new_node(tmp_path, monkeypatch, f"{REPO}@main:/f", DATA, a, b)


def test_dedup_onto_a_pack_another_node_deleted_is_redone(
        two, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = two
    put_file(a, tmp_path, "/f", DATA)
    a.discard(REPO, "main")
    assert collect(b, grace=0).packs_deleted == 1  # node a is idle: deleted at once
    assert packs(tmp_path) == set()
    put_file(a, tmp_path, "/f", DATA)  # node a's index still offered the deleted pack
    a.commit(REPO, "main", "f")
    assert_readable_from_a_new_node(tmp_path, monkeypatch, f"{REPO}@main:/f", DATA, a, b)


def test_reads_after_another_nodes_repack_follow_the_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = open_node(tmp_path, "node-a", monkeypatch)
    a.create_repo(REPO)
    a.create_branch(REPO, "tmp")
    small, big = DATA[:100_000], random.Random(8).randbytes(3_000_000)
    src = tmp_path / "both"
    src.mkdir()
    (src / "small").write_bytes(small)
    (src / "big").write_bytes(big)
    vfs.put(a, REPO, "tmp", "/", [str(src / "small"), str(src / "big")])
    a.commit(REPO, "tmp", "both")  # one pack: small + big
    put_file(a, tmp_path, "/small", small)
    a.commit(REPO, "main", "small")  # deduplicated: main needs a sliver of that pack
    b = open_node(tmp_path, "node-b", monkeypatch)
    assert read(b, f"{REPO}@main:/small") == small  # node b indexes the old pack
    a.delete_branch(REPO, "tmp")
    time.sleep(0.05)  # the store's clock (file times) is coarser than the reflog's
    report = collect(a, grace=0, reflog_retention=0)
    assert report.packs_repacked == 1 and report.packs_deleted == 2  # + the tmp tree's
    assert read(b, f"{REPO}@main:/small") == small  # follows the log to the new pack
    put_file(b, tmp_path, "/again", small)  # and deduplicates onto the new pack
    b.commit(REPO, "main", "again")
    assert_readable_from_a_new_node(tmp_path, monkeypatch, f"{REPO}@main:/again", small, a, b)
    a.close()
    b.close()


# -- what gc needs from the nodes ----------------------------------------------------------


def test_gc_refuses_while_a_node_is_stale(two, tmp_path: Path) -> None:
    a, b = two
    put_file(a, tmp_path, "/f", DATA)
    a.discard(REPO, "main")
    a.presence.publish(ACTIVE)
    record = tmp_path / "store" / record_key(a.node.id)
    past = time.time() - 3600
    os.utime(record, (past, past))  # silent for an hour: it may have died mid-write
    with pytest.raises(GcRefused, match="node-a"):
        collect(b, grace=0)
    assert len(packs(tmp_path)) == 1
    assert collect(b, grace=0, ignore_nodes=["node-a"]).packs_deleted == 1


def test_an_expired_node_is_not_waited_for(two, tmp_path: Path) -> None:
    a, b = two
    put_file(a, tmp_path, "/f", DATA)
    a.discard(REPO, "main")
    a.presence.publish(ACTIVE)
    record = tmp_path / "store" / record_key(a.node.id)
    past = time.time() - 7200
    os.utime(record, (past, past))
    assert collect(b, grace=0, node_expiry=3600).packs_deleted == 1


def test_grace_is_measured_in_store_time_not_the_node_clock(
        two, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = two
    put_file(a, tmp_path, "/f", DATA)
    a.discard(REPO, "main")  # garbage, but only seconds old
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 10 * 3600)  # node b's clock is ahead
    report = collect(b, grace=3600)
    assert report.packs_condemned == 0 and len(packs(tmp_path)) == 1


def test_an_open_commit_on_another_node_survives_gc(
        two, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = two
    a.create_branch(REPO, "work")
    put_file(a, tmp_path, "/staged", DATA, branch="work")  # no ref names it
    assert collect(b, grace=0).packs_deleted == 0
    a.commit(REPO, "work", "staged")
    assert_readable_from_a_new_node(tmp_path, monkeypatch, f"{REPO}@work:/staged", DATA, a, b)


class _OnDeletionLogged(DelegatingStore):
    """Runs ``hook`` once, right after gc wrote its deletion-log entry and before it
    deleted anything: the moment another node may follow the log."""

    def __init__(self, inner, hook) -> None:
        super().__init__(inner)
        self.hook = hook

    def put(self, key: str, data, **kwargs):
        result = super().put(key, data, **kwargs)
        if key.startswith("gc/deleted/") and self.hook is not None:
            hook, self.hook = self.hook, None
            hook()
        return result


def test_a_node_following_the_log_mid_deletion_does_not_keep_the_deleted_pack(
        two, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = two
    put_file(a, tmp_path, "/f", DATA)
    a.discard(REPO, "main")  # its pack is garbage
    b.blobs.learn_new_packs()  # node b knows the garbage pack too

    def node_b_looks() -> None:  # e.g. an fsck, or a read that learns new packs
        b.blobs.gc.sync()
        b.blobs.learn_new_packs()

    gc_objects = _OnDeletionLogged(LocalStore(str(tmp_path / "store")), node_b_looks)
    with open_node(tmp_path, "node-gc", monkeypatch, objects=gc_objects) as g:
        assert collect(g, grace=0).packs_deleted == 1
    assert packs(tmp_path) == set()
    put_file(b, tmp_path, "/f", DATA)  # must not deduplicate onto the deleted pack
    b.commit(REPO, "main", "f")
    assert_readable_from_a_new_node(tmp_path, monkeypatch, f"{REPO}@main:/f", DATA, a, b)


def test_gc_with_a_longer_retention_after_a_shorter_one_still_runs(two, tmp_path: Path) -> None:
    # The reflog outlives commits that a gc with a shorter retention collected: the next
    # gc must take them as gone, not as unreadable (it aborted until the entries aged out).
    a, b = two
    a.create_branch(REPO, "tmp")
    put_file(a, tmp_path, "/f", DATA, branch="tmp")
    a.commit(REPO, "tmp", "f")
    a.delete_branch(REPO, "tmp")
    time.sleep(0.05)
    assert collect(a, grace=0, reflog_retention=0).commits_deleted == 1
    for node in (a, b):
        report = collect(node, grace=0)  # 30 days: the reflog names the deleted commit
        assert report.packs_deleted == 0
    assert_clean(a, b)


def _condemn_a_dead_commit(a: vfs.Store, b: vfs.Store, tmp_path: Path):
    a.create_branch(REPO, "tmp")
    put_file(a, tmp_path, "/f", DATA, branch="tmp")
    doomed = a.commit(REPO, "tmp", "f")
    a.delete_branch(REPO, "tmp")
    time.sleep(0.05)
    b.presence.publish(ACTIVE)  # node b is mid-write: the condemnation waits for it
    report = collect(a, grace=0, reflog_retention=0)  # node a acknowledges it
    assert report.commits_condemned == 1 and report.waiting_for == ["node-b"]
    return doomed


def test_a_condemned_commit_named_again_before_gc_deletes_it_is_kept(
        two, tmp_path: Path) -> None:
    a, b = two
    doomed = _condemn_a_dead_commit(a, b, tmp_path)
    with pytest.raises(VfsError, match="condemned"):  # acknowledged: a rollback refuses
        a.rollback(REPO, "main", vfs.parse_ref(f"{REPO}@{doomed.id}"))
    # A new branch saves it, whichever node makes it: node b has not acknowledged (gc
    # waits for it), node a has but gc's second look at the refs sees the branch.
    b.create_branch(REPO, "saved-b", vfs.parse_ref(f"{REPO}@{doomed.id}"))
    a.create_branch(REPO, "saved-a", vfs.parse_ref(f"{REPO}@{doomed.id}"))
    b.delete_branch(REPO, "saved-b")
    report = collect(a, grace=0, reflog_retention=3600)
    assert report.commits_deleted == 0 and report.packs_deleted == 0
    assert read(b, f"{REPO}@saved-a:/f") == DATA
    assert_clean(a, b)


def test_gc_and_a_branch_made_while_it_deletes_see_each_other(
        two, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vfs.gc
    from vfs.refs import append_reflog, create_ref

    a, b = two
    doomed = _condemn_a_dead_commit(a, b, tmp_path)
    b.settle()  # acknowledged: gc carries the condemnation out in its next run
    real = vfs.gc.write_deletion

    def deletion_then_a_branch(objects, seq, packs, commits, kept_in):
        # A node that checked before the log entry existed makes its ref just now.
        real(objects, seq, packs, commits, kept_in)
        create_ref(objects, REPO, "late", doomed.id)
        append_reflog(objects, REPO, "late", None, doomed.id, "branch created")

    monkeypatch.setattr(vfs.gc, "write_deletion", deletion_then_a_branch)
    report = collect(a, grace=0, reflog_retention=0)
    assert report.commits_deleted == 0 and report.packs_deleted == 0, report
    monkeypatch.setattr(vfs.gc, "write_deletion", real)
    assert read(b, f"{REPO}@late:/f") == DATA
    # The other order: the log entry exists when the branch is made: the maker backs out.
    put_file(a, tmp_path, "/g", DATA[:1000] * 3)  # another dead commit, on tmp again
    a.discard(REPO, "main")
    again = _condemn_a_dead_commit(a, b, tmp_path)
    seq = max(c.seq for c in vfs.gclog.list_condemnations(a.objects))
    vfs.gclog.write_deletion(a.objects, seq, [], [again.id], [])  # gc is deleting it
    with pytest.raises(VfsError, match="condemned"):
        a.create_branch(REPO, "too-late", vfs.parse_ref(f"{REPO}@{again.id}"))
    assert "too-late" not in {br.name for br in a.list_branches(REPO)}
    a.objects.delete(vfs.gclog.deleted_key(seq))
    b.settle()
    collect(a, grace=0, reflog_retention=0)
    assert_clean(a, b)


def test_a_commit_landing_while_gc_marks_is_seen_through_its_ref_or_its_pins(
        two, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Found by the soak: gc read the refs, then node a committed (its ref moved, its
    # staged file left its pins), then gc read the pins: neither showed the new file,
    # and its pack (condemned while it was being uploaded) was deleted.
    import vfs.gc

    a, b = two
    put_file(a, tmp_path, "/f", DATA)  # staged and pinned
    pack = next(iter(packs(tmp_path)))
    # A gc's first phase condemned the pack while it was uploaded, before it was staged.
    vfs.gclog.write_condemnation(a.objects, "another-gc", [pack], [])
    a.settle()  # node a acknowledges: its pins cover the staged file
    real = vfs.gc.root_commits
    done = []

    def refs_then_a_commit(*args, **kwargs):
        result = real(*args, **kwargs)
        if not done:
            done.append(a.commit(REPO, "main", "f"))  # swap, then unstage and unpin
        return result

    monkeypatch.setattr(vfs.gc, "root_commits", refs_then_a_commit)
    report = collect(b, grace=0)
    assert done and report.packs_deleted == 0, report
    assert_readable_from_a_new_node(tmp_path, monkeypatch, f"{REPO}@main:/f", DATA, a, b)
