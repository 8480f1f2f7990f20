"""Storage growth: small edits to a large file store only the chunks around the edit."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import vfs

REPO = "data"
SIZE = 16 << 20


def pack_bytes(store: vfs.Store) -> int:
    return sum(info.size for info in store.objects.list("packs/"))


@pytest.fixture
def big_file(tmp_path: Path) -> tuple[Path, bytearray]:
    data = bytearray(random.Random(2024).randbytes(SIZE))  # incompressible
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    return path, data


def _put_commit(store: vfs.Store, path: Path, data: bytes, message: str) -> int:
    path.write_bytes(data)
    before = pack_bytes(store)
    result = vfs.put(store, REPO, "main", "/big.bin", [str(path)])
    store.commit(REPO, "main", message)
    grown = pack_bytes(store) - before
    assert result.bytes_stored <= grown  # plus the commit's tree blobs
    assert vfs.read_file(store, vfs.parse_ref(f"{REPO}@main:/big.bin")) == data
    return grown


def test_edits_store_only_the_chunks_around_them(store: vfs.Store,
                                                 big_file: tuple[Path, bytearray]) -> None:
    path, data = big_file
    store.create_repo(REPO)
    first = _put_commit(store, path, bytes(data), "original")
    assert SIZE <= first < SIZE * 1.01  # random data is stored raw, plus pack overhead

    # Each edit touches one or two chunks (avg 1 MiB, max 4 MiB) and perhaps the next
    # cut point: far below re-storing the file. 40% of the file is a robust bound that
    # still fails loudly if chunking stopped being content-defined (then an insert
    # shifts every later boundary and the whole tail is stored again).
    limit = 0.4 * SIZE
    rnd = random.Random(7)

    data[SIZE // 2 : SIZE // 2] = rnd.randbytes(100)  # insert 100 bytes in the middle
    inserted = _put_commit(store, path, bytes(data), "insert")
    assert 0 < inserted < limit

    where = SIZE // 5
    data[where : where + 1024] = rnd.randbytes(1024)  # overwrite 1 KiB elsewhere
    overwritten = _put_commit(store, path, bytes(data), "overwrite")
    assert 0 < overwritten < limit

    where = (SIZE * 4) // 5
    del data[where : where + 1024]  # delete 1 KiB elsewhere
    deleted = _put_commit(store, path, bytes(data), "delete")
    assert 0 < deleted < limit

    assert pack_bytes(store) < SIZE * 2.2
    history = [c.message for c in store.log(vfs.parse_ref(f"{REPO}@main"))]
    assert history == ["delete", "overwrite", "insert", "original"]


def test_identical_reput_adds_no_bytes(store: vfs.Store, big_file: tuple[Path, bytearray],
                                       tmp_path: Path) -> None:
    path, data = big_file
    store.create_repo(REPO)
    _put_commit(store, path, bytes(data), "original")
    before = pack_bytes(store)

    # The same file again (the files cache answers) ...
    again = vfs.put(store, REPO, "main", "/big.bin", [str(path)])
    assert again.bytes_stored == 0 and again.changes == {}
    # ... the same bytes under another name and in another branch (read and chunked
    # again, every chunk deduplicated) ...
    copy = tmp_path / "copy.bin"
    copy.write_bytes(data)
    result = vfs.put(store, REPO, "main", "/copy.bin", [str(copy)])
    assert result.read == 1 and result.bytes_read == SIZE
    assert result.bytes_stored == 0
    store.create_branch(REPO, "other")
    assert vfs.put(store, REPO, "other", "/x/y.bin", [str(copy)]).bytes_stored == 0
    store.commit(REPO, "other", "copy elsewhere")
    # ... and the same bytes through a stream.
    with open(copy, "rb") as stream:
        assert vfs.put_stream(store, REPO, "main", "/streamed.bin", stream).bytes_stored == 0
    commit = store.commit(REPO, "main", "copies")
    assert commit.bytes == 3 * SIZE
    # Only tree blobs (a few hundred bytes) were added: no data.
    assert pack_bytes(store) - before < 4096
