"""Files closed through the mount are stored in the background: what each step promises.

close() makes a file visible and safe against a crash of the daemon (its spool and
sidecar stay on disk until the flusher has staged it); fsync and ``vfsctl commit``
wait until it is stored. These tests write through a real mount, kill the daemon at
awkward moments and check what the open commit holds afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from disks import small_tmpfs
from fuse_checks import staged

import vfs
from daemon.spools import SIDECAR_XATTR, read_sidecar

if TYPE_CHECKING:
    from conftest import Mount

from conftest import check_after, mounted


def store_cache(mount: Mount) -> Path:
    """The store's own directory under the cache (spool/, lost+found/, the index)."""
    store = vfs.open_store(str(mount.store_dir), cache_dir=str(mount.cache_dir))
    try:
        return Path(store.cache_dir)
    finally:
        store.close()


def kill_9(mount: Mount) -> None:
    mount.process.kill()
    mount.process.wait()


@contextlib.contextmanager
def flusher_held(mount: Mount) -> Iterator[None]:
    """Hold the store's node lock as gc does: no flusher round can run meanwhile,
    so every file closed inside stays pending (a spool and its sidecar)."""
    fd = os.open(store_cache(mount) / "gc.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def pending_spools(mount: Mount) -> int:
    """Spools with a sidecar: closed files a restarted daemon would stage."""
    spools = store_cache(mount) / "spool"
    return sum(1 for name in os.listdir(spools) if read_sidecar(str(spools / name)))


def spools_left(mount: Mount) -> list[str]:
    """Spool files holding anything: the rest are empty spares made ahead of need."""
    spools = store_cache(mount) / "spool"
    return [name for name in os.listdir(spools)
            if (spools / name).stat().st_size or read_sidecar(str(spools / name))]


def test_every_file_closed_before_a_commit_is_in_it(mount: Mount, branch: Path) -> None:
    rng = random.Random(20)
    files = {f"d{i % 5}/f{i:04d}.txt": rng.randbytes(rng.choice([0, 7, 4096, 70_000]))
             for i in range(800)}
    for directory in {name.split("/")[0] for name in files}:
        (branch / directory).mkdir()
    for name, data in files.items():
        (branch / name).write_bytes(data)

    assert staged(mount) == {f"/{name}": "added" for name in files}  # status waits for them
    commit = mount.commit("data@main")
    committed = mount.path / f"data@{commit}"
    for name, data in files.items():
        assert (committed / name).read_bytes() == data, name
    assert mount.vfsctl("status", "data@main").stdout.startswith("nothing staged")
    assert spools_left(mount) == []


@pytest.mark.expect_warnings  # the new daemon cleans up the stale mount
def test_files_closed_just_before_a_kill_9_are_in_the_open_commit(mount: Mount,
                                                                  branch: Path) -> None:
    rng = random.Random(21)
    files = {f"f{i:03d}.bin": rng.randbytes(rng.choice([0, 10, 5000, 300_000]))
             for i in range(300)}
    files["big.bin"] = rng.randbytes(20 << 20)
    with flusher_held(mount):
        for name, data in files.items():
            (branch / name).write_bytes(data)
        os.chmod(branch / "f000.bin", 0o600)
        # Visible and readable at once, before they are stored.
        assert sorted(os.listdir(branch)) == sorted(files)
        assert (branch / "big.bin").read_bytes() == files["big.bin"]
        assert pending_spools(mount) == len(files)
        kill_9(mount)

    mount.start()
    assert f"staged {len(files)} files closed before the previous daemon" in \
        mount.log.read_text()
    assert staged(mount) == {f"/{name}": "added" for name in files}
    for name, data in files.items():
        assert (branch / name).read_bytes() == data, name
    assert oct(os.stat(branch / "f000.bin").st_mode & 0o777) == oct(0o600)
    assert spools_left(mount) == []
    commit = mount.commit("data@main")
    assert (mount.path / f"data@{commit}" / "big.bin").read_bytes() == files["big.bin"]


@pytest.mark.expect_warnings  # the new daemon cleans up the stale mount
def test_renames_and_unlinks_just_after_close_survive_a_kill_9(mount: Mount,
                                                               branch: Path) -> None:
    (branch / "dir" / "deeper").mkdir(parents=True)
    with flusher_held(mount):
        for i in range(40):
            (branch / "dir" / "deeper" / f"a{i}.txt").write_bytes(f"a{i}".encode() * 1000)
        (branch / "src.txt").write_bytes(b"renamed" * 1000)
        os.rename(branch / "src.txt", branch / "dst.txt")
        (branch / "doomed.txt").write_bytes(b"doomed")
        os.unlink(branch / "doomed.txt")
        (branch / "over.txt").write_bytes(b"old")
        (branch / "new.txt").write_bytes(b"new")
        os.rename(branch / "new.txt", branch / "over.txt")
        os.rename(branch / "dir", branch / "moved")  # spools below a directory move with it
        os.truncate(branch / "moved" / "deeper" / "a0.txt", 3)
        assert pending_spools(mount) == 42
        kill_9(mount)
    expected = {"/dst.txt": "added", "/over.txt": "added",
                **{f"/moved/deeper/a{i}.txt": "added" for i in range(40)}}

    mount.start()
    assert staged(mount) == expected
    assert sorted(os.listdir(branch)) == ["dst.txt", "moved", "over.txt"]
    assert (branch / "dst.txt").read_bytes() == b"renamed" * 1000
    assert (branch / "over.txt").read_bytes() == b"new"
    assert (branch / "moved" / "deeper" / "a0.txt").read_bytes() == b"a0a"
    for i in range(1, 40):
        assert (branch / "moved" / "deeper" / f"a{i}.txt").read_bytes() == f"a{i}".encode() * 1000


@pytest.mark.expect_warnings  # the new daemon cleans up the stale mount
def test_fsync_then_kill_9_keeps_the_file(mount: Mount, branch: Path) -> None:
    data = random.Random(22).randbytes(3 << 20)
    fd = os.open(branch / "synced.bin", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)  # returns once stored and staged
        os.write(fd, b"never closed")  # lost with the daemon: never closed or synced
        kill_9(mount)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    mount.start()
    assert staged(mount) == {"/synced.bin": "added"}
    assert (branch / "synced.bin").read_bytes() == data
    assert "dropped 1 spool files" in mount.log.read_text()


def test_a_write_during_a_background_flush_of_the_same_file_is_kept(mount: Mount,
                                                                    branch: Path) -> None:
    rng = random.Random(23)
    path = branch / "busy.bin"
    expected = bytearray(rng.randbytes(40 << 20))
    for round_ in range(4):
        path.write_bytes(expected)  # closed: the flusher starts storing it...
        with open(path, "r+b") as f:  # ...and it changes while that is under way
            offset = rng.randrange(len(expected) - 100)
            f.seek(offset)
            f.write(b"round %d" % round_)
        expected[offset : offset + 7] = b"round %d" % round_
        os.chmod(path, 0o600 if round_ % 2 else 0o640)
    assert path.read_bytes() == expected
    commit = mount.commit("data@main")
    committed = mount.path / f"data@{commit}" / "busy.bin"
    assert committed.read_bytes() == expected
    assert oct(os.stat(committed).st_mode & 0o777) == oct(0o600)


@pytest.mark.expect_warnings  # dropped partial writes, lost+found: checked below
def test_a_new_daemon_stages_spools_with_a_sidecar_and_drops_the_others(
        mount: Mount, branch: Path) -> None:
    (branch / "sub").mkdir()
    (branch / "file.txt").write_bytes(b"a file")
    mount.stop()
    cache = store_cache(mount)
    spools = cache / "spool"

    def spool(name: str, data: bytes, *, as_file: bool = True, **sidecar: object) -> None:
        (spools / name).write_bytes(data)
        if sidecar:
            record = json.dumps({"v": 1, "repo": "data", "branch": "main", "mode": 0o640,
                                 "mtime_ns": 1_600_000_000_123_456_789, **sidecar})
            if as_file:  # as a daemon on a filesystem without extended attributes does
                (spools / f"{name}.meta").write_text(record)
            else:
                os.setxattr(spools / name, SIDECAR_XATTR, record.encode())

    spool("spool-closed", b"closed before the crash", path="sub/closed.txt", as_file=False)
    spool("spool-big", random.Random(24).randbytes(9 << 20), path="big.bin")
    spool("spool-open", b"never closed")
    spool("spool-gone", b"of a deleted branch", path="x.txt", branch="gone", as_file=False)
    spool("spool-blocked", b"under a file", path="file.txt/inside.txt")
    (spools / "spool-stale.meta").write_text("{}")  # its spool was deleted: nothing to do

    mount.start()
    assert staged(mount) == {"/sub/closed.txt": "added", "/big.bin": "added",
                             "/file.txt": "added"}
    st = os.stat(branch / "sub" / "closed.txt")
    assert (oct(st.st_mode & 0o777), st.st_mtime_ns) == (oct(0o640), 1_600_000_000_123_456_789)
    assert (branch / "sub" / "closed.txt").read_bytes() == b"closed before the crash"
    assert (branch / "big.bin").read_bytes() == random.Random(24).randbytes(9 << 20)
    assert spools_left(mount) == []
    assert sorted(os.listdir(cache / "lost+found")) == [
        "spool-blocked", "spool-blocked.meta", "spool-gone"]
    assert b'"branch": "gone"' in read_sidecar(str(cache / "lost+found" / "spool-gone"))
    log = mount.log.read_text()
    assert "dropped 1 spool files" in log
    assert "data@gone:/x.txt cannot be staged" in log
    assert "data@main:/file.txt/inside.txt cannot be staged" in log


def test_a_full_store_fails_fsync_and_commit_and_keeps_the_file(tmp_path: Path) -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this machine")
    big = os.urandom(16 << 20)  # twice what the store's disk holds
    with small_tmpfs(tmp_path / "small", "8m") as small:
        with mounted(tmp_path, store_dir=small / "store") as mount:
            mount.vfsctl("repo", "create", "data")
            branch = mount.path / "data@main"
            (branch / "note.txt").write_bytes(b"fits")
            fd = os.open(branch / "big.bin", os.O_CREAT | os.O_WRONLY, 0o644)
            try:
                os.write(fd, big)  # into the spool, on the cache's disk: fine
                with pytest.raises(OSError) as raised:
                    os.fsync(fd)
                assert raised.value.errno == errno.ENOSPC
            finally:
                os.close(fd)
            assert (branch / "big.bin").read_bytes() == big  # kept, still readable
            failed = mount.vfsctl("commit", "data@main", "-m", "too big", check=False)
            assert failed.returncode == 1, failed
            assert "no space" in failed.stderr.lower()

            os.unlink(branch / "big.bin")  # space for what remains
            commit = mount.commit("data@main")
            assert os.listdir(mount.path / f"data@{commit}") == ["note.txt"]
        log = mount.log.read_text()
        assert "could not store 1 closed files written to data@main" in log
        check_after(mount, log=False)
