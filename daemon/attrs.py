"""The attributes the mount answers with (``stat``), filled from tree entries.

Entries keep no owner: every inode shows the daemon's user and group. Commit
paths never change, so the kernel may cache them for a day; branch paths and
the mount root for a second.
"""

from __future__ import annotations

import stat

import pyfuse3

from vfs.tree import DIR, FILE, permission_bits

COMMIT_TIMEOUT = 24 * 3600.0  # commits never change: let the kernel cache them
BRANCH_TIMEOUT = 1.0  # a moved head shows within a second
ROOT_TIMEOUT = 1.0
BLOCK_SIZE = 128 * 1024
_S_IFDIR, _S_IFREG, _S_IFLNK = stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK


def new_attrs(uid: int, gid: int, timeout: float) -> pyfuse3.EntryAttributes:
    """Attributes with the fields every inode shares filled in."""
    attrs = pyfuse3.EntryAttributes()
    attrs.st_uid = uid
    attrs.st_gid = gid
    attrs.st_blksize = BLOCK_SIZE
    attrs.entry_timeout = timeout
    attrs.attr_timeout = timeout
    return attrs


def fill_attrs(attrs: pyfuse3.EntryAttributes, inode: int, kind: str, mode: int, size: int,
               mtime_ns: int, subdirectories: int = 0, *, atime_ns: int | None = None,
               ctime_ns: int | None = None) -> None:
    """The fields that differ from one entry to the next (see :func:`new_attrs`); atime
    and ctime are the mtime unless given (a branch view keeps them: daemon.times)."""
    attrs.st_ino = inode
    if kind == DIR:
        # New directories (staged, never committed) have mode 0: show 0755.
        attrs.st_mode = _S_IFDIR | (permission_bits(mode) or 0o755)
        # Its name, its "." and the ".." of each subdirectory (find and fts may
        # rely on it to skip leaves).
        attrs.st_nlink = 2 + subdirectories
        size = 4096
    else:
        attrs.st_mode = (_S_IFREG if kind == FILE else _S_IFLNK) | permission_bits(mode)
        attrs.st_nlink = 1
    attrs.st_size = size
    # Every byte counts: the store keeps no holes (zeros are stored, deduplicated
    # and compressed), a file reads back whole, and lseek's SEEK_HOLE finds only
    # its end (the kernel answers that itself: there is no lseek handler).
    attrs.st_blocks = (size + 511) // 512
    attrs.st_mtime_ns = mtime_ns
    attrs.st_atime_ns = mtime_ns if atime_ns is None else atime_ns
    attrs.st_ctime_ns = mtime_ns if ctime_ns is None else ctime_ns
