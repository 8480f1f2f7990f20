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
from vfs.blobs import blob_hash, pack_key

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
