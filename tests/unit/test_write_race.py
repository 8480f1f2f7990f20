"""A write through the mount racing the flusher that stores the same file.

The flusher stores a spool that was closed (by one of its descriptors) while other
descriptors keep writing. It reads the spool's ``generation``, stores the bytes, and
marks the spool clean if the generation did not move meanwhile. A write changes the
spool's bytes, then its ``dirty`` and ``generation``: if the flusher's check and
"clean" land between those steps, the write is marked clean although its bytes
were never stored, and the last release drops the spool: the write is lost.

The test drives the real FUSE handlers in-process (create, write, flush, release)
with the real flusher thread, widens exactly that window (setting ``dirty`` from the
FUSE thread lets the other threads run for a moment), and checks that what the branch
holds is the last write of every file.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest
import trio

import vfs
from daemon.flusher import Flusher
from daemon.fs import VfsOperations
from daemon.reader import ChunkCache
from daemon.spools import SpoolFile
from vfs.snapshot import iter_file

FILES = 120  # at once, in each of WAVES waves (before the fix ~1 in 120 lost)
WAVES = 5
WINDOW = 0.002  # seconds the FUSE thread pauses inside a write, after setting dirty


class _SlowDirty:
    """``SpoolFile.dirty`` that, set to True by the FUSE (main) thread, lets the other
    threads run before the write's next step."""

    def __get__(self, spool: SpoolFile | None, owner: type) -> object:
        return self if spool is None else spool.__dict__.get("_dirty", False)

    def __set__(self, spool: SpoolFile, value: bool) -> None:
        spool.__dict__["_dirty"] = value
        if value and threading.current_thread() is threading.main_thread():
            time.sleep(WINDOW)


@pytest.fixture
def wide_window(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(SpoolFile, "dirty", _SlowDirty())
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def test_a_write_racing_the_flusher_is_never_marked_clean(store: vfs.Store, tmp_path: Path,
                                                          wide_window: None) -> None:
    store.create_repo("r")
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    flusher = Flusher(store, str(spool_dir), encode_ahead=0)
    flusher.start()
    expected: dict[str, bytes] = {}

    async def one_file(ops: VfsOperations, parent: int, number: int) -> None:
        name = f"f{number}"
        info, _ = await ops.create(parent, name.encode(), 0o644, 0o2, None)
        await ops.write(info.fh, 0, b"first version\n" * 300)
        await ops.flush(info.fh)  # close() of a dup: the flusher stores it...
        await trio.sleep(random.uniform(0, 0.08))
        last = f"last version of {name}\n".encode() * 400  # longer than the first
        await ops.write(info.fh, 0, last)  # ...while this write is under way
        expected[name] = last
        await ops.release(info.fh)

    async def main() -> None:
        cache = ChunkCache(store.blobs, None, limiter=trio.CapacityLimiter(2))
        ops = VfsOperations(store, str(spool_dir), cache, flusher)
        branch = await ops.lookup(pyfuse3.ROOT_INODE, b"r@main")
        for wave in range(WAVES):
            async with trio.open_nursery() as nursery:
                for number in range(wave * FILES, (wave + 1) * FILES):
                    nursery.start_soon(one_file, ops, branch.st_ino, number)
        await trio.to_thread.run_sync(ops.views.flush_everything)

    try:
        trio.run(main)
    finally:
        flusher.close()
    _, open_commit = store.open_commit("r", "main")
    lost = [name for name, data in expected.items()
            if b"".join(iter_file(store.blobs, open_commit.lookup(name))) != data]
    assert lost == [], f"{len(lost)} of {len(expected)} files lost their last write: {lost[:5]}"
