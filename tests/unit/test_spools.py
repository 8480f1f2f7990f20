"""Spool files and their sidecars (daemon/spools.py): writing, reading, recovery at start.

The mount tests (tests/fuse/test_write_pending.py) kill a real daemon; these check
the same rules directly on a spool directory, fast and without FUSE.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

import vfs
from daemon import spools
from daemon.spools import (
    LOST_AND_FOUND,
    Sidecar,
    SpoolFiles,
    read_sidecar,
    recover_spools,
    remove_sidecar,
    remove_sidecar_file,
    write_sidecar,
)

SIDECAR = Sidecar("data", "main", "dir/a.txt", 0o640, 1_600_000_000_000_000_001)


@pytest.fixture(params=["attribute", "file"])
def sidecar_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a sidecar is kept: an extended attribute, or a file where there are none."""
    if request.param == "file":
        monkeypatch.setattr(spools, "_use_xattr", False)
    return request.param


def test_a_sidecar_is_written_replaced_and_removed(tmp_path: Path, sidecar_kind: str) -> None:
    tmp_path = tmp_path / "spool"
    tmp_path.mkdir()
    spool = tmp_path / "spool-x"
    spool.write_bytes(b"bytes")
    assert read_sidecar(str(spool)) is None
    write_sidecar(str(spool), SIDECAR, replace=False)
    assert Sidecar.decode(read_sidecar(str(spool))) == SIDECAR  # type: ignore[arg-type]
    moved = Sidecar("data", "main", "b.txt", 0o600, 7)
    write_sidecar(str(spool), moved, replace=True)
    assert Sidecar.decode(read_sidecar(str(spool))) == moved  # type: ignore[arg-type]
    expected = ["spool-x"] if sidecar_kind == "attribute" else ["spool-x", "spool-x.meta"]
    assert sorted(os.listdir(tmp_path)) == expected
    remove_sidecar(str(spool))
    assert read_sidecar(str(spool)) is None
    assert os.listdir(tmp_path) == ["spool-x"]
    remove_sidecar(str(spool))  # removing twice is fine
    remove_sidecar_file(str(spool))


@pytest.mark.parametrize("bad", [b"{}", b"not json", b'{"v": 2}',
                                 b'{"v": 1, "repo": "r", "branch": "b", "path": "../x", '
                                 b'"mode": 420, "mtime_ns": 0}'])
def test_a_sidecar_that_is_not_one_is_refused(bad: bytes) -> None:
    with pytest.raises((ValueError, KeyError)):
        Sidecar.decode(bad)


def test_spool_files_are_made_ahead_and_recycled(tmp_path: Path) -> None:
    tmp_path = tmp_path / "spool"
    tmp_path.mkdir()
    files = SpoolFiles(str(tmp_path), stock=4, recycled=5)
    files.top_up()
    assert len(os.listdir(tmp_path)) == 4
    taken = [files.take() for _ in range(6)]  # four from the stock, two made on demand
    assert len({path for _, path in taken}) == 6
    for fd, _ in taken:
        os.write(fd, b"x" * 10)
    for fd, path in taken:
        files.give_back(fd, path, 10)
    # Five kept (emptied) for reuse, the sixth deleted.
    assert sorted(os.path.getsize(tmp_path / name) for name in os.listdir(tmp_path)) == [0] * 5
    fd, path = files.take()
    assert os.fstat(fd).st_size == 0
    files.give_back(fd, path, 0)
    files.close()
    assert os.listdir(tmp_path) == []


def _spool(directory: Path, name: str, data: bytes, sidecar: Sidecar | None) -> Path:
    path = directory / name
    path.write_bytes(data)
    if sidecar is not None:
        write_sidecar(str(path), sidecar, replace=False)
    return path


@pytest.mark.expect_warnings  # dropped partial writes and lost+found: checked below
def test_recovery_stages_closed_files_and_keeps_what_it_cannot(
        store: vfs.Store, tmp_path: Path, sidecar_kind: str,
        caplog: pytest.LogCaptureFixture) -> None:
    store.create_repo("data")
    directory = tmp_path / "spool"
    directory.mkdir()
    big = random.Random(1).randbytes(9 << 20)  # streamed in chunks, not read whole
    _spool(directory, "spool-a", b"small", SIDECAR)
    # An older daemon kept setuid bits in the sidecar: only the permission bits are staged.
    _spool(directory, "spool-big", big, Sidecar("data", "main", "big.bin", 0o4755, 5))
    _spool(directory, "spool-open", b"never closed", None)
    _spool(directory, "spool-spare", b"", None)
    _spool(directory, "spool-gone", b"branch gone", Sidecar("data", "gone", "x", 0o644, 5))
    _spool(directory, "spool-norepo", b"repo gone", Sidecar("nope", "main", "x", 0o644, 5))
    (directory / "spool-empty-sidecar").write_bytes(b"its close never returned")
    (directory / "spool-empty-sidecar.meta").write_bytes(b"")

    report = recover_spools(store, str(directory))

    assert (report.staged, report.dropped, report.lost) == (2, 2, 2)
    assert os.listdir(directory) == []
    lost = sorted(os.listdir(Path(store.cache_dir) / LOST_AND_FOUND))
    assert [name for name in lost if not name.endswith(".meta")] == ["spool-gone", "spool-norepo"]
    _, open_commit = store.open_commit("data", "main")
    entry = open_commit.lookup("dir/a.txt")
    assert entry is not None
    assert (entry.size, entry.mode, entry.mtime_ns) == (5, 0o640, SIDECAR.mtime_ns)
    assert open_commit.lookup("dir") is not None  # the missing parent was made
    assert oct(open_commit.lookup("big.bin").mode) == oct(0o755)  # type: ignore[union-attr]
    commit = store.commit("data", "main", "recovered")
    assert vfs.read_file(store, vfs.parse_ref(f"data@{commit.id}:/big.bin")) == big
    assert vfs.read_file(store, vfs.parse_ref(f"data@{commit.id}:/dir/a.txt")) == b"small"
    messages = caplog.text
    assert "dropped 2 spool files" in messages
    assert "data@gone:/x cannot be staged" in messages
    assert "nope@main:/x cannot be staged" in messages
