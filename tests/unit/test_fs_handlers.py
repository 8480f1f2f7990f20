"""FUSE handlers of the mount called in-process (no mount): the error boundary.

pyfuse3 ends ``main()`` (and the mount) on any exception a handler lets out, and
``forget`` cannot answer the kernel with an errno; a bug in it must be logged and
the mount must keep serving.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import pyfuse3
import pytest
import trio

import vfs
from daemon.flusher import Flusher
from daemon.fs import VfsOperations
from daemon.reader import ChunkCache


def _run(store: vfs.Store, tmp_path: Path,
         test: Callable[[VfsOperations], Awaitable[None]]) -> None:
    """Run ``test(operations)`` in trio, over ``data@main`` (an empty repository)."""
    store.create_repo("data")
    spool = tmp_path / "spool"
    spool.mkdir()
    flusher = Flusher(store, str(spool))
    flusher.start()

    async def main() -> None:
        cache = ChunkCache(store.blobs, None, limiter=trio.CapacityLimiter(2))
        await test(VfsOperations(store, str(spool), cache, flusher))

    try:
        trio.run(main)
    finally:
        flusher.close()


@pytest.mark.expect_warnings  # the bug is logged at ERROR, with its traceback
def test_a_bug_in_forget_is_logged_and_the_mount_keeps_serving(
        store: vfs.Store, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def test(ops: VfsOperations) -> None:
        view = await ops.lookup(pyfuse3.ROOT_INODE, b"data@main")

        def broken(inode: int) -> None:
            raise RuntimeError("a bug in the inode table")

        ops.commit_inodes.locate = broken  # type: ignore[method-assign]
        # An inode the table does not know goes to commit_inodes.locate.
        with caplog.at_level(logging.ERROR, logger="daemon.fs"):
            assert await ops.forget([(10**9, 1)]) is None
        assert "a bug in the inode table" in caplog.text
        assert any(record.exc_info for record in caplog.records)
        # Still serving.
        again = await ops.lookup(pyfuse3.ROOT_INODE, b"data@main")
        assert again.st_ino == view.st_ino
        assert (await ops.getattr(view.st_ino)).st_ino == view.st_ino

    _run(store, tmp_path, test)


def test_every_handler_goes_through_an_error_boundary() -> None:
    handlers = [name for name, member in vars(pyfuse3.Operations).items()
                if not name.startswith("_") and callable(member) and name in vars(VfsOperations)]
    assert "forget" in handlers and "read" in handlers
    unguarded = [name for name in handlers
                 if not hasattr(getattr(VfsOperations, name), "__wrapped__")]
    assert not unguarded, f"handlers without _errors: {unguarded}"


def test_an_open_after_a_rename_replaced_the_name_opens_the_old_file(
        store: vfs.Store, tmp_path: Path) -> None:
    """The kernel looked ``a`` up, then a rename replaced it, then the open came: it
    opens the old file (its spool, kept by the nameless inode, or its stored entry),
    and the spool is let go when the kernel forgets the inode."""
    import errno
    import os

    async def test(ops: VfsOperations) -> None:
        branch = (await ops.lookup(pyfuse3.ROOT_INODE, b"data@main")).st_ino

        async def write(name: bytes, data: bytes) -> int:
            info, attrs = await ops.create(branch, name, 0o644, os.O_WRONLY, None)
            await ops.write(info.fh, 0, data)
            await ops.flush(info.fh)
            await ops.release(info.fh)
            return attrs.st_ino

        async def read(inode: int, flags: int = os.O_RDONLY) -> bytes:
            info = await ops.open(inode, flags, None)
            try:
                return bytes(await ops.read(info.fh, 0, 100))
            finally:
                await ops.release(info.fh)

        old = await write(b"a", b"old bytes")
        spool = ops.views.branch("data", "main").spool("a")
        await write(b"b", b"new")
        await ops.rename(branch, b"b", branch, b"a", 0, None)
        assert await read(old) == b"old bytes"  # the not yet stored spool
        assert await read(old, os.O_RDWR) == b"old bytes"
        assert (await ops.getattr(old)).st_nlink == 0
        assert spool is not None and spool.opens == 1  # the nameless inode's
        await ops.forget([(old, 1)])
        assert spool.opens == 0 and spool.fd < 0
        with pytest.raises(pyfuse3.FUSEError) as gone:
            await ops.open(old, os.O_RDONLY, None)
        assert gone.value.errno == errno.ENOENT

        # A stored file keeps its entry: readable; to write, ESTALE (look again).
        await trio.to_thread.run_sync(ops.views.flush_branch, "data", "main")
        current = (await ops.lookup(branch, b"a")).st_ino
        await write(b"c", b"newer")
        await ops.rename(branch, b"c", branch, b"a", 0, None)
        assert await read(current) == b"new"
        with pytest.raises(pyfuse3.FUSEError) as stale:
            await ops.open(current, os.O_WRONLY, None)
        assert stale.value.errno == errno.ESTALE

    _run(store, tmp_path, test)
