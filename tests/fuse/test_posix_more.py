"""The smaller POSIX behaviours of the mount, and the documented exceptions to POSIX.

What the mount keeps and what it refuses is listed in README.md ("The mount"):
chown to another owner and special files are EPERM, extended attributes are not
supported, a directory's link count is 2 plus its subdirectories, an open file
works until its last close even after its name is gone. A damaged chunk is
reported once, and fails every later read at once.
"""

from __future__ import annotations

import errno
import os
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Mount


def _pack_files(store: Path) -> set[Path]:
    return {path for path in (store / "packs").rglob("*") if path.is_file()}


def _read_fails(path: Path) -> int:
    """Read a file to its end in 128 KiB pieces; how many reads failed with EIO."""
    failed = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        for offset in range(0, size, 128 << 10):
            try:
                os.pread(fd, 128 << 10, offset)
            except OSError as exc:
                assert exc.errno == errno.EIO, exc
                failed += 1
    finally:
        os.close(fd)
    return failed


# -- a damaged chunk -------------------------------------------------------------------


@pytest.mark.corrupts_store
@pytest.mark.expect_warnings  # the corruption report
def test_a_damaged_chunk_is_reported_once_and_not_fetched_again(mount: Mount,
                                                               tmp_path: Path) -> None:
    mount.vfsctl("repo", "create", "data")
    source = tmp_path / "a.bin"
    source.write_bytes(random.Random(4).randbytes(3 << 20))
    before = _pack_files(mount.store_dir)
    mount.vfsctl("put", "data@main:/a.bin", str(source))
    mount.commit("data@main")
    pack = max(_pack_files(mount.store_dir) - before, key=lambda path: path.stat().st_size)
    with open(pack, "r+b") as f:  # 64 bytes in the middle of the file's chunks
        f.seek(pack.stat().st_size // 2)
        original = f.read(64)
        f.seek(-len(original), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in original))

    path = mount.path / "data@main" / "a.bin"
    first = _read_fails(path)
    assert first
    assert _read_fails(path) == first  # every read of the damage still fails
    assert _read_fails(path) == first
    reports = re.findall(r"corruption report: blob ([0-9a-f]{64})", mount.log.read_text())
    # Each damaged chunk reported once: read again, it failed without a fetch.
    assert reports and len(reports) == len(set(reports)), reports
    assert mount.process.poll() is None
    # A put of the same bytes stores a good copy of the chunk: reads work again.
    mount.vfsctl("put", "data@main:/again.bin", str(source))
    assert path.read_bytes() == source.read_bytes()
