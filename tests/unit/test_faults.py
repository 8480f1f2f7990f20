"""Faults on purpose: a full store, an unreachable store mid-commit, damaged packs.

After every injected failure the store must check clean, nothing half-done may be
visible (no staged changes from a failed put, no branch on a commit whose data is
missing), and redoing the operation once the fault is gone must succeed.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import vfs
from vfs import fsck
from vfs.blobs import BlobKind, pack_key
from vfs.config import StoreConfig, create_config
from vfs.errors import Corruption, NothingToCommit, StoreFull, StoreUnavailable
from vfs.objstore.local import LocalStore
from vfs.objstore.wrappers import DelegatingStore, FaultyStore, RetryingStore
from vfs.snapshot import file_chunks
from vfs.store import Store

REPO = "data"


class FailingKeys(DelegatingStore):
    """Fails puts of keys with a given prefix while armed (FaultyStore counts by op only)."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.prefix: str | None = None
        self.after = False
        self.once = False
        self.failed = 0

    def arm(self, prefix: str, *, after: bool = False, once: bool = False) -> None:
        """Fail every later put under ``prefix``; ``after``: once the write happened;
        ``once``: only the next such put."""
        self.prefix, self.after, self.once = prefix, after, once

    def disarm(self) -> None:
        self.prefix = None

    def put(self, key, data, *, if_absent=False, if_match=None):
        if self.prefix is not None and key.startswith(self.prefix):
            self.failed += 1
            if self.once:
                self.disarm()
            if self.after:
                super().put(key, data, if_absent=if_absent, if_match=if_match)
            raise StoreUnavailable(f"timed out writing {key} (injected)")
        return super().put(key, data, if_absent=if_absent, if_match=if_match)


@dataclass
class Rig:
    store: Store
    faulty: FaultyStore
    root: Path


def _assert_fsck_ok(store: Store) -> None:
    report = fsck.check(store, deep=True)
    assert report.ok, report.problems


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """A local store behind a FaultyStore, with 1 MiB packs so a put writes many packs."""
    faulty = FaultyStore(LocalStore(str(tmp_path / "faulty-store"), create=True))
    config = create_config(faulty, StoreConfig(pack_target_size=1 << 20))
    store = Store(faulty, config, str(tmp_path / "faulty-cache"))
    store.create_repo(REPO)
    try:
        yield Rig(store, faulty, tmp_path / "faulty-store")
        faulty.clear()
        _assert_fsck_ok(store)
    finally:
        store.close()


def _source_tree(root: Path) -> dict[str, bytes]:
    """About 7 MiB: many small files, some chunked ones, and one large streamed file."""
    rnd = random.Random(11)
    content = {f"small/f{i:03d}": rnd.randbytes(rnd.randint(0, 20_000)) for i in range(60)}
    content["medium/a.bin"] = rnd.randbytes(1_500_000)
    content["medium/b.txt"] = b"compressible line of text\n" * 40_000
    content["large.bin"] = rnd.randbytes(9 << 20)  # streamed (>= 8 MiB)
    for path, data in content.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    return content


def _staged(store: Store) -> dict:
    return store.open_commit(REPO, "main")[1].changes


def _view(store: Store, spec: str = f"{REPO}@main") -> dict[str, bytes]:
    _, snapshot = store.snapshot(vfs.parse_ref(spec))
    return {p: vfs.read_file(store, vfs.parse_ref(f"{spec}:/{p}"))
            for p, e in snapshot.walk() if e.kind == "f"}


# -- a full store during put ------------------------------------------------------------------


@pytest.mark.parametrize("nth_put", [1, 2, 3, 6, 11])
@pytest.mark.parametrize("after", [False, True], ids=["refused", "reply-lost"])
def test_store_full_during_put(rig: Rig, tmp_path: Path, nth_put: int, after: bool) -> None:
    content = _source_tree(tmp_path / "src")
    rig.faulty.fail_after(nth_put, lambda: StoreFull("no space left (injected)"), after=after)
    with pytest.raises(StoreFull, match="injected"):
        vfs.put(rig.store, REPO, "main", "/", [str(tmp_path / "src")], recursive=True)
    assert _staged(rig.store) == {}
    assert rig.store.index.staging_base(REPO, "main") is None
    _assert_fsck_ok(rig.store)

    rig.faulty.clear()
    result = vfs.put(rig.store, REPO, "main", "/", [str(tmp_path / "src")], recursive=True)
    # The files cache was not updated by the failed put: every file is read again.
    assert result.read == len(content)
    rig.store.commit(REPO, "main", "after the disk was freed")
    assert _view(rig.store) == content


def test_failed_put_keeps_what_was_staged_before(rig: Rig, tmp_path: Path) -> None:
    (tmp_path / "early").write_bytes(os.urandom(50_000))
    vfs.put(rig.store, REPO, "main", "/early", [str(tmp_path / "early")])
    staged = _staged(rig.store)
    (tmp_path / "late").write_bytes(os.urandom(3 << 20))
    rig.faulty.fail_after(2, lambda: StoreFull("no space left (injected)"))
    with pytest.raises(StoreFull):
        vfs.put(rig.store, REPO, "main", "/late", [str(tmp_path / "late")])
    assert _staged(rig.store) == staged
    rig.faulty.clear()
    rig.store.commit(REPO, "main", "early only")
    assert _view(rig.store) == {"early": (tmp_path / "early").read_bytes()}


def test_store_full_during_put_stream(rig: Rig) -> None:
    data = random.Random(5).randbytes(3 << 20)
    rig.faulty.fail_after(2, lambda: StoreFull("quota (injected)"))
    with pytest.raises(StoreFull):
        vfs.put_stream(rig.store, REPO, "main", "/s.bin", io.BytesIO(data))
    assert _staged(rig.store) == {}
    rig.faulty.clear()
    vfs.put_stream(rig.store, REPO, "main", "/s.bin", io.BytesIO(data))
    rig.store.commit(REPO, "main", "stream")
    assert _view(rig.store) == {"s.bin": data}


def test_store_unavailable_during_commit_pack_upload(rig: Rig, tmp_path: Path) -> None:
    # The commit's own tree pack cannot be stored: the branch must not move.
    (tmp_path / "f").write_bytes(b"data" * 1000)
    vfs.put(rig.store, REPO, "main", "/d/f", [str(tmp_path / "f")])
    rig.faulty.fail_after(1, lambda: StoreUnavailable("connection reset (injected)"))
    with pytest.raises(StoreUnavailable):
        rig.store.commit(REPO, "main", "one")
    assert rig.store.head(REPO, "main").commit is None
    assert set(_staged(rig.store)) == {"d", "d/f"}
    rig.faulty.clear()
    commit = rig.store.commit(REPO, "main", "one")
    assert rig.store.head(REPO, "main").commit == commit.id
    assert _view(rig.store) == {"d/f": b"data" * 1000}


# -- the store failing around the ref move --------------------------------------------------------


@pytest.fixture
def keyed(tmp_path: Path) -> Iterator[tuple[Store, FailingKeys]]:
    """A local store whose wrapper can be told to fail puts of one key prefix."""
    wrapper = FailingKeys(LocalStore(str(tmp_path / "keyed-store"), create=True))
    store = Store(wrapper, create_config(wrapper), str(tmp_path / "keyed-cache"))
    store.create_repo(REPO)
    try:
        yield store, wrapper
        wrapper.disarm()
        _assert_fsck_ok(store)
    finally:
        store.close()


def _two_commits(store: Store, tmp_path: Path) -> vfs.Commit:
    (tmp_path / "a").write_bytes(os.urandom(4000))
    vfs.put(store, REPO, "main", "/a", [str(tmp_path / "a")])
    first = store.commit(REPO, "main", "first")
    (tmp_path / "b").write_bytes(os.urandom(300_000))
    vfs.put(store, REPO, "main", "/dir/b", [str(tmp_path / "b")])
    return first


def test_store_unavailable_before_the_ref_moves(keyed, tmp_path: Path) -> None:
    store, wrapper = keyed
    first = _two_commits(store, tmp_path)
    wrapper.arm(f"refs/{REPO}/")
    with pytest.raises(StoreUnavailable, match="injected"):
        store.commit(REPO, "main", "second")
    assert wrapper.failed == 1
    # The trees and the commit object were written, the branch did not move.
    assert store.head(REPO, "main").commit == first.id
    assert set(_staged(store)) == {"dir", "dir/b"}
    assert [e.new for e in store.reflog(REPO, "main")][-1] == first.id
    _assert_fsck_ok(store)

    wrapper.disarm()
    second = store.commit(REPO, "main", "second")
    assert second.parents == (first.id,)
    assert store.head(REPO, "main").commit == second.id
    assert set(_view(store)) == {"a", "dir/b"}
    assert store.reflog(REPO, "main")[-1].new == second.id


def test_ref_moved_but_the_reply_was_lost(keyed, tmp_path: Path) -> None:
    store, wrapper = keyed
    first = _two_commits(store, tmp_path)
    wrapper.arm(f"refs/{REPO}/", after=True)
    with pytest.raises(StoreUnavailable):
        store.commit(REPO, "main", "second")
    wrapper.disarm()
    head = store.head(REPO, "main").commit
    assert head != first.id  # the swap happened
    # The next look at the branch finishes the interrupted commit: the open commit is
    # gone (it is the head now) and the reflog records the move.
    assert _staged(store) == {}
    last = store.reflog(REPO, "main")[-1]
    assert (last.old, last.new) == (first.id, head)
    with pytest.raises(NothingToCommit):
        store.commit(REPO, "main", "again")
    assert set(_view(store)) == {"a", "dir/b"}


def test_ref_swap_retried_after_its_reply_was_lost(tmp_path: Path) -> None:
    """The ref swap lands, its answer is lost, RetryingStore tries again and the
    retry's If-Match fails: the commit happened and must be reported as such."""
    wrapper = FailingKeys(LocalStore(str(tmp_path / "store"), create=True))
    objects = RetryingStore(wrapper, sleep=lambda _: None)
    store = Store(objects, create_config(objects), str(tmp_path / "cache"))
    try:
        store.create_repo(REPO)
        first = _two_commits(store, tmp_path)
        wrapper.arm(f"refs/{REPO}/", after=True, once=True)
        second = store.commit(REPO, "main", "second")
        assert wrapper.failed == 1
        assert store.head(REPO, "main").commit == second.id
        assert _staged(store) == {}
        last = store.reflog(REPO, "main")[-1]
        assert (last.old, last.new) == (first.id, second.id)
        _assert_fsck_ok(store)
    finally:
        store.close()


@pytest.mark.expect_warnings
def test_reflog_append_fails_after_the_ref_moved(keyed, tmp_path: Path) -> None:
    store, wrapper = keyed
    first = _two_commits(store, tmp_path)
    wrapper.arm(f"reflog/{REPO}/")
    # The branch moved: the commit is made and returned (with a warning), not an error.
    second = store.commit(REPO, "main", "second")
    wrapper.disarm()
    head = store.head(REPO, "main").commit
    assert head == second.id and head != first.id
    # fsck finishes the interrupted commit itself (this node remembers what it sealed).
    _assert_fsck_ok(store)
    assert store.reflog(REPO, "main")[-1].new == head
    assert _staged(store) == {}
    assert store.read_commit(head).parents == (first.id,)


# -- damaged packs ----------------------------------------------------------------------------


def _pack_path(store: vfs.Store, pack_id: bytes) -> Path:
    return Path(store.objects.root) / pack_key(pack_id)


def _commit_file(store: vfs.Store, tmp_path: Path, data: bytes) -> list[bytes]:
    store.create_repo(REPO)
    (tmp_path / "f").write_bytes(data)
    vfs.put(store, REPO, "main", "/f", [str(tmp_path / "f")])
    store.commit(REPO, "main", "one")
    _, snapshot = store.snapshot(vfs.parse_ref(f"{REPO}@main"))
    return [digest for digest, _ in file_chunks(store.blobs, snapshot.lookup("f"))]


@pytest.mark.corrupts_store
@pytest.mark.parametrize("kind", ["raw", "zstd"])
def test_flipped_byte_in_a_pack_is_detected(store: vfs.Store, tmp_path: Path,
                                            kind: str) -> None:
    rnd = random.Random(3)
    if kind == "raw":
        data = rnd.randbytes(3 << 20)
    else:
        data = b"".join(b"line %d of a log file\n" % rnd.randint(0, 10**6)
                        for _ in range(150_000))
    chunks = _commit_file(store, tmp_path, data)
    assert len(chunks) >= 2
    victim = chunks[1]  # damage the second chunk: the first is returned before the error
    location = store.blobs.index.blob_location(victim)
    assert location is not None and location.kind == BlobKind.CHUNK
    path = _pack_path(store, location.pack_id)
    damaged = bytearray(path.read_bytes())
    damaged[location.offset + location.stored_len // 2] ^= 0x01
    path.write_bytes(bytes(damaged))

    spec = vfs.parse_ref(f"{REPO}@main:/f")
    with pytest.raises(Corruption, match=location.pack_id.hex()):
        vfs.read_file(store, spec)
    out = io.BytesIO()
    with pytest.raises(Corruption):
        vfs.cat(store, spec, out)
    # Whatever was written before the error is correct data, never damaged bytes.
    assert len(out.getvalue()) < len(data)
    assert data.startswith(out.getvalue())
    # get leaves no file, complete or partial.
    with pytest.raises(Corruption):
        vfs.get(store, spec, str(tmp_path / "got"))
    assert not (tmp_path / "got").exists()
    assert not list(tmp_path.glob("*.vfs-partial"))

    shallow = fsck.check(store)
    assert shallow.ok  # without --deep, pack contents are not read
    deep = fsck.check(store, deep=True)
    assert not deep.ok
    assert any(location.pack_id.hex() in p for p in deep.problems)
    assert any(victim.hex() in p for p in deep.problems)


@pytest.mark.corrupts_store
def test_damaged_pack_index_copy_is_reported(store: vfs.Store, tmp_path: Path) -> None:
    chunks = _commit_file(store, tmp_path, os.urandom(600_000))
    pack_id = store.blobs.index.blob_location(chunks[0]).pack_id
    index_path = Path(store.objects.root) / f"index/{pack_id.hex()}"
    damaged = bytearray(index_path.read_bytes())
    damaged[12] ^= 0xFF
    index_path.write_bytes(bytes(damaged))
    report = fsck.check(store)
    assert not report.ok
    assert any("checksum" in p for p in report.problems)


@pytest.mark.corrupts_store
@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_truncated_pack(store: vfs.Store, tmp_path: Path, damage: str) -> None:
    data = os.urandom(2 << 20)
    chunks = _commit_file(store, tmp_path, data)
    location = store.blobs.index.blob_location(chunks[-1])
    path = _pack_path(store, location.pack_id)
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: location.offset + 10])
    with pytest.raises(Corruption):
        vfs.read_file(store, vfs.parse_ref(f"{REPO}@main:/f"))
    report = fsck.check(store)
    assert not report.ok
    assert any(location.pack_id.hex() in p for p in report.problems)
