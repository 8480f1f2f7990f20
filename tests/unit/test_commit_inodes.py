"""Inode numbers inside commit views: the FUSE handlers called in-process (no mount).

Readdir needs a kernel request to reply to; tests/fuse covers it. Here: lookup,
getattr and forget, and what the daemon keeps once the kernel forgot everything.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import pyfuse3
import pytest
import trio

import vfs
from daemon.flusher import Flusher
from daemon.fs import VfsOperations
from daemon.reader import ChunkCache
from vfs.blobs import BlobKind
from vfs.tree import DIR, FILE, SYMLINK, Entry, dir_entry, encode_tree, inline_ref

MANY = 3000


def _commit(store: vfs.Store) -> str:
    """``many/`` (MANY files), ``sub/deeper/leaf.txt`` and a symlink, committed as is."""
    store.create_repo("data")
    files = {f"file-{i:05d}": Entry(f"file-{i:05d}", FILE, 0o644, len(b"%d" % i), 1000 + i,
                                    inline_ref(b"%d" % i), 1) for i in range(MANY)}
    leaf = {"leaf.txt": Entry("leaf.txt", FILE, 0o600, 4, 7, inline_ref(b"leaf"), 1)}
    with store.blobs.writer() as writer:
        def add(children: dict[str, Entry]) -> bytes:
            return writer.add_bytes(BlobKind.TREE, encode_tree(list(children.values())))

        deeper = {"deeper": dir_entry("deeper", add(leaf), leaf)}
        root = {"many": dir_entry("many", add(files), files),
                "sub": dir_entry("sub", add(deeper), deeper),
                "link": Entry("link", SYMLINK, 0o777, 8, 0, "many/x", 0)}
        root_hash = add(root)
    return store.commit("data", "main", "test", tree=root_hash.hex()).id


def _run(store: vfs.Store, tmp_path: Path,
         test: Callable[[VfsOperations, int], Awaitable[None]]) -> None:
    """Run ``test(operations, inode of /data@<commit>)`` in trio."""
    view = f"data@{_commit(store)}".encode()
    spool = tmp_path / "spool"
    spool.mkdir()

    async def main() -> None:
        cache = ChunkCache(store.blobs, None, limiter=trio.CapacityLimiter(2))
        ops = VfsOperations(store, str(spool), cache, flusher)
        root = await ops.lookup(pyfuse3.ROOT_INODE, view)
        await test(ops, root.st_ino)
        assert (await ops.lookup(pyfuse3.ROOT_INODE, view)).st_ino == root.st_ino

    flusher = Flusher(store)  # commits never use it
    try:
        trio.run(main)
    finally:
        flusher.close()


async def _errno(call: Awaitable[object]) -> int:
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await call
    return raised.value.errno


def test_lookup_getattr_and_forget_keep_inode_numbers(store: vfs.Store, tmp_path: Path) -> None:
    async def test(ops: VfsOperations, root: int) -> None:
        many = await ops.lookup(root, b"many")
        assert stat.S_ISDIR(many.st_mode) and many.st_nlink == 2
        first = await ops.lookup(many.st_ino, b"file-01234")
        assert first.st_size == 4 and first.st_mtime_ns == 1000 + 1234
        assert stat.S_IMODE(first.st_mode) == 0o644 and stat.S_ISREG(first.st_mode)
        assert (await ops.getattr(first.st_ino)).st_ino == first.st_ino
        neighbour = await ops.lookup(many.st_ino, b"file-01235")
        assert neighbour.st_ino == first.st_ino + 1  # one block of numbers per directory

        directory = ops.commit_inodes.directory(many.st_ino)
        assert directory is not None and directory.known == 2
        await ops.forget([(first.st_ino, 1), (neighbour.st_ino, 1)])
        assert directory.known == 0 and directory.lookups is None  # nothing kept per entry
        await ops.forget([(many.st_ino, 1), (root, 1)])
        # Looked up again after the kernel forgot them: the same numbers (and _run
        # checks the root of the view).
        assert (await ops.lookup(root, b"many")).st_ino == many.st_ino
        assert (await ops.lookup(many.st_ino, b"file-01234")).st_ino == first.st_ino
        # A lookup count of 2 needs two forgets' worth.
        await ops.lookup(many.st_ino, b"file-01234")
        await ops.forget([(first.st_ino, 1)])
        assert directory.lookup_count(first.st_ino - directory.base) == 1

    _run(store, tmp_path, test)


def test_dot_entries_symlinks_and_errors(store: vfs.Store, tmp_path: Path) -> None:
    async def test(ops: VfsOperations, root: int) -> None:
        sub = await ops.lookup(root, b"sub")
        deeper = await ops.lookup(sub.st_ino, b"deeper")
        assert (sub.st_nlink, deeper.st_nlink) == (3, 2)  # 2 + subdirectories
        leaf = await ops.lookup(deeper.st_ino, b"leaf.txt")
        assert stat.S_IMODE(leaf.st_mode) == 0o600
        assert (await ops.lookup(deeper.st_ino, b"..")).st_ino == sub.st_ino
        assert (await ops.lookup(sub.st_ino, b"..")).st_ino == root
        assert (await ops.lookup(root, b"..")).st_ino == pyfuse3.ROOT_INODE
        assert (await ops.lookup(deeper.st_ino, b".")).st_ino == deeper.st_ino
        link = await ops.lookup(root, b"link")
        assert stat.S_ISLNK(link.st_mode)
        assert await ops.readlink(link.st_ino) == b"many/x"

        assert await _errno(ops.lookup(root, b"missing")) == errno.ENOENT
        assert await _errno(ops.lookup(leaf.st_ino, b"x")) == errno.ENOTDIR
        assert await _errno(ops.getattr(10**12)) == errno.ENOENT
        assert await _errno(ops.lookup(10**12, b".")) == errno.ENOENT
        assert await _errno(ops.lookup(10**12, b"x")) == errno.ENOENT
        assert await _errno(ops.opendir(leaf.st_ino)) == errno.ENOTDIR
        assert await _errno(ops.mkdir(sub.st_ino, b"new", 0o755, None)) == errno.EROFS
        assert await _errno(ops.unlink(deeper.st_ino, b"leaf.txt", None)) == errno.EROFS
        assert ops.commit_inodes.directory(sub.st_ino).path == "sub"
        assert ops.commit_inodes.directory(deeper.st_ino).path == "sub/deeper"

    _run(store, tmp_path, test)


def test_a_directory_is_numbered_once(store: vfs.Store, tmp_path: Path) -> None:
    async def test(ops: VfsOperations, root: int) -> None:
        many = await ops.lookup(root, b"many")
        # Concurrent lookups while the tree is read: one block, the same numbers.
        results: list[int] = []

        async def look(name: bytes) -> None:
            results.append((await ops.lookup(many.st_ino, name)).st_ino)

        async with trio.open_nursery() as nursery:
            for name in (b"file-00001", b"file-00001", b"file-00002"):
                nursery.start_soon(look, name)
        assert sorted(results)[0] == sorted(results)[1] == sorted(results)[2] - 1
        assert len(ops.commit_inodes) == 2  # the root of the view and many/
        directory = ops.commit_inodes.directory(many.st_ino)
        assert directory is not None and directory.size == MANY

    _run(store, tmp_path, test)


def test_every_kind_of_entry_has_the_attributes_of_before(store: vfs.Store,
                                                         tmp_path: Path) -> None:
    # The commit fast path builds attributes from tree rows; they must be what
    # _attrs makes of the entries.
    async def test(ops: VfsOperations, root: int) -> None:
        for name in (b"many", b"sub", b"link"):
            fast = await ops.lookup(root, name)
            node = ops._get(fast.st_ino)
            entry = await ops._entry(node)
            slow = ops._attrs(node, entry,
                              await ops._subdirectories_of(node.view, node.path, entry))
            for field in ("st_ino", "st_mode", "st_nlink", "st_size", "st_blocks", "st_uid",
                          "st_gid", "st_mtime_ns", "st_blksize", "entry_timeout"):
                assert getattr(fast, field) == getattr(slow, field), (name, field)
        assert (await ops._entry(ops._get((await ops.lookup(root, b"many")).st_ino))).kind == DIR

    _run(store, tmp_path, test)
