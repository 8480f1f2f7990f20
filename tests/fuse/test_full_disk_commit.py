"""A commit through vfsd whose node-local disk (cache and index) fills up as it lands.

The object store is the truth: once the branch moved, the commit is made, and a
failure of the node's own bookkeeping afterwards must not be reported as a failed
commit (the user would redo it). A commit that did not land must fail.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import pytest
from conftest import _require_fuse, check_after, mounted
from disks import fill, full_from_when_moved, small_tmpfs

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Mount

# Enough staged files that unstaging them needs more index pages than LMDB has free.
STAGED = 6000


def _stage_many(mount: Mount, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(STAGED):
        (src / f"f{i}.txt").write_text(f"file {i}")
    mount.vfsctl("put", "data@main:/src", str(src), "-r")


def _head(mount: Mount) -> str | None:
    log = json.loads(mount.vfsctl("log", "data@main", "--json").stdout or "[]")
    return log[0]["id"] if log else None


@pytest.mark.expect_warnings  # the index could not record the commit: logged
def test_a_commit_that_landed_is_reported_made_when_the_disk_fills_after(tmp_path) -> None:
    _require_fuse()
    with small_tmpfs(tmp_path / "cache", "32m"), mounted(tmp_path) as mount:
        mount.vfsctl("repo", "create", "data")
        (mount.path / "data@main" / "a.txt").write_text("one")
        mount.commit("data@main")
        _stage_many(mount, tmp_path)
        ref = mount.store_dir / "refs" / "data" / "main"
        with full_from_when_moved(mount.cache_dir, ref, lambda: mount.process.pid):
            done = mount.vfsctl("commit", "data@main", "-m", "as the disk fills",
                                check=False)
        head = _head(mount)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == head
        # Space is back: the node finishes recording the commit; nothing stays staged.
        assert "nothing staged" in mount.vfsctl("status", "data@main").stdout
        assert (mount.path / "data@main" / "src" / "f7.txt").read_text() == "file 7"
    check_after(mount, log=False)


def test_on_a_full_disk_the_exit_status_says_whether_the_commit_landed(tmp_path) -> None:
    """Commits with more and more room on the node's disk: each either moves the
    branch and exits 0 with its id, or leaves the branch and exits 1 saying why."""
    _require_fuse()
    with small_tmpfs(tmp_path / "cache", "32m"), mounted(tmp_path) as mount:
        mount.vfsctl("repo", "create", "data")
        src = tmp_path / "src"
        src.mkdir()
        failed = 0
        for room in range(0, 16, 4):  # KiB left free
            for i in range(40):
                (src / f"f{room}-{i}.txt").write_text(f"file {room} {i}")
            mount.vfsctl("put", "data@main:/src", str(src), "-r")
            before = _head(mount)
            fill(mount.cache_dir, leave=room << 10)
            try:
                done = mount.vfsctl("commit", "data@main", "-m", f"{room} KiB free",
                                    check=False)
            finally:
                for filler in mount.cache_dir.glob("filler-*"):
                    os.unlink(filler)
            after = _head(mount)
            if done.returncode == 0:
                assert after != before and done.stdout.strip() == after
            else:
                failed += 1
                assert after == before, done.stderr
                assert "no space" in done.stderr.lower(), done.stderr
        assert failed, "no commit met the full disk: the test tests nothing"
        # What a failed commit left staged went in with a later one: nothing is lost.
        assert len(list((mount.path / "data@main" / "src").iterdir())) == 4 * 40
    check_after(mount)
