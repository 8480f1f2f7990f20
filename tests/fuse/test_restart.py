"""The daemon going away: ``kill -9`` (a stale mount, then recovery) and a clean SIGTERM.

What was committed is in the store; what was written through the mount and
closed (or fsync'd) is in the branch's open commit, which lives in this node's
index and must survive the daemon.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
from typing import TYPE_CHECKING

import pytest
from fuse_checks import staged

if TYPE_CHECKING:
    from conftest import Mount



def write_and_commit_base(mount: Mount) -> tuple[str, bytes]:
    mount.vfsctl("repo", "create", "data")
    branch = mount.path / "data@main"
    committed = random.Random(12).randbytes(3 << 20)
    (branch / "committed.bin").write_bytes(committed)
    (branch / "doomed.txt").write_text("doomed")
    return mount.commit("data@main"), committed


@pytest.mark.expect_warnings  # the new daemon warns that it cleans up a stale mount
def test_kill_9_leaves_a_stale_mount_the_next_daemon_cleans(mount: Mount) -> None:
    commit, committed = write_and_commit_base(mount)
    branch = mount.path / "data@main"
    big = random.Random(13).randbytes(5 << 20)
    (branch / "open" / "deeper").mkdir(parents=True)
    (branch / "open" / "a.txt").write_bytes(b"staged, not committed")
    (branch / "open" / "deeper" / "big.bin").write_bytes(big)
    with open(branch / "committed.bin", "r+b") as f:
        f.seek(1 << 20)
        f.write(b"changed")
    os.unlink(branch / "doomed.txt")
    fsynced = os.open(branch / "fsynced.txt", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fsynced, b"durable")
    os.fsync(fsynced)  # left open: the daemon dies with a handle on it

    mount.process.kill()
    mount.process.wait()
    for probe in (os.listdir, os.statvfs):  # requests the dead daemon cannot answer
        with pytest.raises(OSError) as raised:
            probe(mount.path)
        assert raised.value.errno == errno.ENOTCONN, probe.__name__
    with contextlib.suppress(OSError):
        os.close(fsynced)

    # At once, as systemd restarts a failed service: the kernel may still answer a
    # stat() of the mount point from its attribute cache, but the mount is stale.
    mount.start()
    assert "stale mount" in mount.log.read_text()
    assert (mount.path / f"data@{commit}" / "committed.bin").read_bytes() == committed
    assert staged(mount) == {"/committed.bin": "modified", "/doomed.txt": "deleted",
                             "/fsynced.txt": "added", "/open/a.txt": "added",
                             "/open/deeper/big.bin": "added"}
    changed = committed[: 1 << 20] + b"changed" + committed[(1 << 20) + 7 :]
    assert (branch / "committed.bin").read_bytes() == changed
    assert (branch / "open" / "deeper" / "big.bin").read_bytes() == big

    new = mount.commit("data@main")
    after = mount.path / f"data@{new}"
    assert sorted(os.listdir(after)) == ["committed.bin", "fsynced.txt", "open"]
    assert (after / "committed.bin").read_bytes() == changed
    assert (after / "fsynced.txt").read_bytes() == b"durable"
    assert (after / "open" / "a.txt").read_bytes() == b"staged, not committed"
    assert (after / "open" / "deeper" / "big.bin").read_bytes() == big


def sigterm(mount: Mount) -> int:
    """SIGTERM the daemon and wait, without the fixture's fallback unmount."""
    mount.process.send_signal(signal.SIGTERM)
    return mount.process.wait(timeout=30)


def test_sigterm_unmounts_cleanly(mount: Mount) -> None:
    commit, committed = write_and_commit_base(mount)
    (mount.path / "data@main" / "closed.txt").write_bytes(b"closed before SIGTERM")

    assert sigterm(mount) == 0
    assert not os.path.ismount(mount.path)
    assert os.listdir(mount.path) == []  # the empty directory again, not ENOTCONN
    assert "unmounted" in mount.log.read_text()

    mount.start()
    assert staged(mount) == {"/closed.txt": "added"}
    assert (mount.path / f"data@{commit[:8]}" / "committed.bin").read_bytes() == committed
    assert (mount.path / "data@main" / "closed.txt").read_bytes() == b"closed before SIGTERM"


def test_sigterm_keeps_what_was_written_to_files_still_open(mount: Mount) -> None:
    """A clean shutdown stores the bytes of files that are open (written, not yet closed)."""
    mount.vfsctl("repo", "create", "data")
    data = random.Random(14).randbytes(1 << 20)
    fd = os.open(mount.path / "data@main" / "open.bin", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, data)
        assert sigterm(mount) == 0
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    assert not os.path.ismount(mount.path)

    mount.start()
    assert staged(mount) == {"/open.bin": "added"}
    assert (mount.path / "data@main" / "open.bin").read_bytes() == data

