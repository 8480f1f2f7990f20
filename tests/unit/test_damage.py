"""Damaged packs: a truncated pack is never indexed, a damaged blob is repaired by a re-put.

Every test here damages the store on purpose (``corrupts_store``). A second node is a
second ``open_store`` of the same directory with its own cache directory.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import pytest

import vfs
from vfs import fsck
from vfs.blobs import BlobKind, BlobLocation, Compression, blob_hash, pack_key
from vfs.errors import Corruption, StoreFull, StoreUnavailable
from vfs.index import Index
from vfs.snapshot import file_chunks

REPO = "data"


def _open(store_dir: Path, cache: Path, **kwargs) -> vfs.Store:
    return vfs.open_store(str(store_dir), cache_dir=str(cache), **kwargs)


def _pack_path(store: vfs.Store, pack_id: bytes) -> Path:
    return Path(store.objects.root) / pack_key(pack_id)


def _commit(store: vfs.Store, source: Path) -> str:
    vfs.put(store, REPO, "main", "/f", [str(source)])
    return store.commit(REPO, "main", "one").id


# -- 1. a truncated pack is not indexed ----------------------------------------------------

# How much of the pack is cut: into the trailer only, into the embedded index, or into
# the blob's own stored bytes. Each leaves a pack too short for what its index lists.
CUTS = {
    "trailer": lambda size, end: size - 1,
    "index": lambda size, end: end + 20,
    "records": lambda size, end: end - 10,
}


@pytest.fixture
def truncated(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, bytes, bytes]:
    """A store whose pack holding file /f's chunk is cut short: (store dir, chunk, pack id)."""
    data = random.Random(5).randbytes(5000)  # one raw chunk
    source = tmp_path / "f"
    source.write_bytes(data)
    with _open(tmp_path / "s", tmp_path / "c1", create=True) as one:
        one.create_repo(REPO)
        _commit(one, source)
        digest = blob_hash(data)
        location = one.index.blob_location(digest)
        assert location is not None
        path = _pack_path(one, location.pack_id)
    whole = path.read_bytes()
    end = location.offset + location.stored_len
    path.write_bytes(whole[: CUTS[request.param](len(whole), end)])
    return tmp_path / "s", digest, location.pack_id


@pytest.mark.corrupts_store
@pytest.mark.expect_warnings
@pytest.mark.parametrize("truncated", list(CUTS), indirect=True)
def test_a_node_does_not_learn_a_truncated_pack(tmp_path: Path, truncated,
                                                caplog: pytest.LogCaptureFixture) -> None:
    store_dir, digest, pack_id = truncated
    with _open(store_dir, tmp_path / "c2") as two:
        assert two.blobs.learn_new_packs() >= 1  # the healthy packs (trees)
        assert two.index.blob_location(digest) is None
        assert pack_id not in two.index.packs()
        assert two.blobs.learn_new_packs() == 0  # and asking again changes nothing
        assert two.index.blob_location(digest) is None
    warnings = [r for r in caplog.records
                if r.levelno == logging.WARNING and pack_id.hex() in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert "truncated" in warnings[0].getMessage()


@pytest.mark.corrupts_store
@pytest.mark.parametrize("truncated", list(CUTS), indirect=True)
@pytest.mark.parametrize("node", ["same", "other"])
def test_rebuild_skips_a_truncated_pack(tmp_path: Path, truncated, node: str) -> None:
    store_dir, digest, pack_id = truncated
    cache = tmp_path / ("c1" if node == "same" else "c2")
    with _open(store_dir, cache) as store:
        report = fsck.rebuild_index(store)
        assert store.index.blob_location(digest) is None
        assert pack_id not in store.index.packs()
        assert report.packs == len(store.index.packs())
        skipped = [s for s in report.skipped if pack_id.hex() in s]
        assert len(skipped) == 1 and "truncated" in skipped[0], report.skipped


@pytest.mark.corrupts_store
@pytest.mark.parametrize("truncated", list(CUTS), indirect=True)
def test_fsck_reports_a_truncated_pack_without_deep(tmp_path: Path, truncated) -> None:
    store_dir, _, pack_id = truncated
    with _open(store_dir, tmp_path / "c1") as store:
        report = fsck.check(store)
        assert any(pack_id.hex() in p and "truncated" in p for p in report.problems), \
            report.problems


def test_a_healthy_store_rebuilds_every_pack(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(os.urandom(5000))
    with _open(tmp_path / "s", tmp_path / "c1", create=True) as one:
        one.create_repo(REPO)
        _commit(one, tmp_path / "f")
        known = one.index.packs()
    with _open(tmp_path / "s", tmp_path / "c2") as two:
        report = fsck.rebuild_index(two)
        assert report.skipped == []
        assert two.index.packs() == known


# -- 2. a re-put repairs a damaged blob ----------------------------------------------------


def _chunks(store: vfs.Store, commit_id: str) -> list[bytes]:
    _, snapshot = store.snapshot(vfs.parse_ref(f"{REPO}@{commit_id}"))
    return [digest for digest, _ in file_chunks(store.blobs, snapshot.lookup("f"))]


def _flip_a_byte(store: vfs.Store, digest: bytes) -> bytes:
    """Damage the blob's stored bytes in its pack; return that pack's id."""
    location = store.index.blob_location(digest)
    assert location is not None
    path = _pack_path(store, location.pack_id)
    damaged = bytearray(path.read_bytes())
    damaged[location.offset + location.stored_len // 2] ^= 0x01
    path.write_bytes(bytes(damaged))
    return location.pack_id


# 5000 bytes: one chunk, stored through BlobWriter.add_many (a batch of small files).
# 9 MiB: several chunks and a manifest, streamed through BlobWriter.add.
@pytest.mark.corrupts_store
@pytest.mark.parametrize("size", [5000, 9 << 20])
def test_a_reput_of_the_same_file_repairs_a_damaged_blob(store: vfs.Store, tmp_path: Path,
                                                        size: int) -> None:
    data = random.Random(size).randbytes(size)
    source = tmp_path / "f"
    source.write_bytes(data)
    store.create_repo(REPO)
    commit_id = _commit(store, source)
    chunks = _chunks(store, commit_id)
    victim = chunks[len(chunks) // 2]
    bad_pack = _flip_a_byte(store, victim)
    spec = vfs.parse_ref(f"{REPO}@{commit_id}:/f")
    with pytest.raises(Corruption, match=bad_pack.hex()):
        vfs.read_file(store, spec)

    # The same file, unchanged (its files cache entry matches): it stages nothing, but
    # the damaged chunk is stored again instead of deduplicated onto the bad copy.
    # (A lone 5000-byte chunk is re-stored in a pack byte-identical to the damaged one,
    # which the put replaces; the 9 MiB file's damaged chunk goes to a new pack.)
    vfs.put(store, REPO, "main", "/f", [str(source)])
    assert vfs.read_file(store, spec) == data
    assert store.index.has_blobs(chunks) == set(chunks)
    assert (store.index.blob_location(victim).pack_id == bad_pack) == (size == 5000)


@pytest.mark.corrupts_store
def test_another_node_learns_damage_from_fsck_deep(tmp_path: Path) -> None:
    data = random.Random(9).randbytes(5000)
    source = tmp_path / "f"
    source.write_bytes(data)
    victim = blob_hash(data)
    with _open(tmp_path / "s", tmp_path / "c1", create=True) as one:
        one.create_repo(REPO)
        commit_id = _commit(one, source)
        bad_pack = _flip_a_byte(one, victim)
        spec = vfs.parse_ref(f"{REPO}@{commit_id}:/f")
        with _open(tmp_path / "s", tmp_path / "c2") as two:
            report = fsck.check(two, deep=True)
            assert any(victim.hex() in p for p in report.problems), report.problems
            assert two.index.has_blobs([victim]) == set()  # it never read the blob itself
            # With another file, so the blob goes to a pack of another id.
            other = tmp_path / "other"
            other.write_bytes(os.urandom(5000))
            vfs.put(two, REPO, "main", "/g/", [str(source), str(other)])
            assert two.index.blob_location(victim).pack_id != bad_pack
            assert vfs.read_file(two, spec) == data
        # Node one never read the blob: its first read finds the damage, then the good
        # copy node two stored.
        assert one.index.blob_location(victim).pack_id == bad_pack
        assert vfs.read_file(one, spec) == data
        assert one.index.blob_location(victim).pack_id != bad_pack


# -- the index's record of damaged blobs ---------------------------------------------------

A, B = b"\x0a" * 32, b"\x0b" * 32  # pack ids
BLOB, OTHER = b"\x01" * 32, b"\x02" * 32


def _at(pack_id: bytes, offset: int = 8) -> BlobLocation:
    return BlobLocation(pack_id, BlobKind.CHUNK, Compression.NONE, offset, 10, 10)


@pytest.fixture
def index(tmp_path: Path) -> Index:
    opened = Index(str(tmp_path / "index"), "store")
    opened.add_pack(A, 100, [_at(A), _at(A, 18)], [BLOB, OTHER])
    yield opened
    opened.close()


def test_a_damaged_blob_is_not_stored_until_a_new_pack_holds_it(index: Index) -> None:
    assert index.has_blobs([BLOB, OTHER]) == {BLOB, OTHER}
    assert index.mark_damaged(BLOB, A)
    assert index.has_blobs([BLOB, OTHER]) == {OTHER}
    assert index.blob_location(BLOB) == _at(A)  # still readable, for what it is worth
    index.add_pack(B, 100, [_at(B)], [BLOB])
    assert index.blob_location(BLOB) == _at(B)
    assert index.has_blobs([BLOB, OTHER]) == {BLOB, OTHER}


def test_rewriting_the_damaged_pack_itself_repairs_it(index: Index) -> None:
    # The same blobs packed again give the same pack id, and the put replaces the
    # damaged object: a pack this node has just written holds good copies.
    index.mark_damaged(BLOB, A)
    index.add_pack(A, 100, [_at(A)], [BLOB])  # only learned again: still bad
    assert index.has_blobs([BLOB]) == set()
    index.add_pack(A, 100, [_at(A)], [BLOB], written=True)
    assert index.has_blobs([BLOB]) == {BLOB}
    assert index.damaged() == {}


def test_damage_of_a_copy_not_in_use_is_not_recorded(index: Index) -> None:
    index.add_pack(B, 100, [_at(B)], [BLOB])
    assert not index.mark_damaged(BLOB, A)  # the blob is read from B now
    assert not index.mark_damaged(b"\x03" * 32, A)  # unknown blob
    assert index.has_blobs([BLOB]) == {BLOB}


@pytest.mark.parametrize("order", [(A, B), (B, A)])
def test_a_rebuild_in_any_order_keeps_the_good_copy(index: Index, order) -> None:
    index.mark_damaged(BLOB, A)
    index.add_pack(B, 100, [_at(B)], [BLOB])
    index.clear_rebuildable()
    for pack_id in order:  # an index rebuild meets the packs in listing order
        if pack_id == A:
            index.add_pack(A, 100, [_at(A), _at(A, 18)], [BLOB, OTHER])
        else:
            index.add_pack(B, 100, [_at(B)], [BLOB])
    assert index.blob_location(BLOB) == _at(B)
    assert index.has_blobs([BLOB, OTHER]) == {BLOB, OTHER}


def test_forgetting_the_damaged_pack_forgets_its_damage(index: Index) -> None:
    index.mark_damaged(BLOB, A)
    with index.write() as txn:
        index.remove_pack_txn(txn, A)
    assert index.damaged() == {}
    index.add_pack(A, 100, [_at(A)], [BLOB])  # the same id: the same bytes, restored
    assert index.has_blobs([BLOB]) == {BLOB}


@pytest.mark.corrupts_store
def test_a_read_reports_the_damage_even_if_recording_it_fails(store: vfs.Store, tmp_path: Path,
                                                              monkeypatch) -> None:
    # Recording the damage and looking for a new copy are extras: a full index disk or
    # an unreachable store must not hide the Corruption (EIO at the FUSE boundary).
    data = random.Random(11).randbytes(5000)
    source = tmp_path / "f"
    source.write_bytes(data)
    store.create_repo(REPO)
    commit_id = _commit(store, source)
    bad_pack = _flip_a_byte(store, blob_hash(data))

    def full(*args, **kwargs):
        raise StoreFull("no space left for the local index")

    def unreachable(*args, **kwargs):
        raise StoreUnavailable("the store does not answer")

    monkeypatch.setattr(store.index, "mark_damaged", full)
    monkeypatch.setattr(store.blobs, "learn_new_packs", unreachable)
    with pytest.raises(Corruption, match=bad_pack.hex()):
        vfs.read_file(store, vfs.parse_ref(f"{REPO}@{commit_id}:/f"))
