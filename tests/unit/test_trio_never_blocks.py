"""The mount's trio thread never waits for a branch view's lock.

A rename or unlink holds the view's lock in a worker thread and then asks the trio
thread to change the inode table (``trio.from_thread.run_sync``): a handler that took
the same lock on the trio thread (the head check of ``maybe_refresh`` once a second
did) would wait for that worker while the worker waits for it, and the whole mount
would hang. Here a worker holds the lock while requests that need a head check come.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pyfuse3
import trio
from test_fs_handlers import _run

import vfs
from daemon.fs import VfsOperations


def test_requests_on_a_branch_whose_lock_a_worker_holds_are_answered(
        store: vfs.Store, tmp_path: Path) -> None:
    async def test(ops: VfsOperations) -> None:
        async with trio.open_nursery() as nursery:
            ops.nursery = nursery
            branch = (await ops.lookup(pyfuse3.ROOT_INODE, b"data@main")).st_ino
            info, attrs = await ops.create(branch, b"f", 0o644, os.O_WRONLY, None)
            await ops.release(info.fh)
            view = ops.views.branch("data", "main")
            assert view is not None
            held, release = threading.Event(), threading.Event()

            def hold() -> None:
                with view.lock:
                    held.set()
                    release.wait(10)

            worker = threading.Thread(target=hold)
            worker.start()
            try:
                held.wait(5)
                view._checked = 0.0  # a head check is due
                started = time.monotonic()
                await ops.getattr(attrs.st_ino)
                await ops.lookup(branch, b"f")
                # A blocked trio thread cannot even be cancelled: measure the wait (the
                # lock is held for 10 s; answered from memory it takes milliseconds).
                assert time.monotonic() - started < 2
            finally:
                release.set()
                worker.join()
            nursery.cancel_scope.cancel()

    _run(store, tmp_path, test)
