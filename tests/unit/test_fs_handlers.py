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
