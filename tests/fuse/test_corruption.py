"""A damaged pack under a mount: EIO and a corruption report, never wrong bytes.

File A and file B are put in separate commits, so their chunks land in different
packs; then bytes in the middle of A's pack are flipped on disk. Reading A
through the mount must fail with EIO where (and only where) it touches the
damage, B must read as before, and the daemon must keep serving.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Mount

PIECE = 1 << 20


def pack_files(store: Path) -> set[Path]:
    return {path for path in (store / "packs").rglob("*") if path.is_file()}


def flip_bytes(path: Path, count: int = 64) -> None:
    """Invert ``count`` bytes in the middle of a file, in place."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        original = f.read(count)
        f.seek(-len(original), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in original))


@pytest.fixture
def damaged(mount: Mount, tmp_path: Path) -> dict[str, bytes]:
    """Files A (its pack damaged) and B (intact), committed on data@main."""
    mount.vfsctl("repo", "create", "data")
    contents = {"a.bin": random.Random(15).randbytes(12 << 20),
                "b.bin": random.Random(16).randbytes(12 << 20)}
    packs: dict[str, set[Path]] = {}
    for name, data in contents.items():
        before = pack_files(mount.store_dir)
        (tmp_path / name).write_bytes(data)
        mount.vfsctl("put", f"data@main:/{name}", str(tmp_path / name))
        mount.commit("data@main", f"add {name}")
        packs[name] = pack_files(mount.store_dir) - before
    assert packs["a.bin"] and packs["b.bin"]
    # Nothing has read A through the mount yet, so no cache holds its chunks.
    flip_bytes(max(packs["a.bin"], key=lambda path: path.stat().st_size))
    return contents


def read_in_pieces(path: Path, expected: bytes) -> list[int]:
    """Read the whole file piece by piece; the positions where a read failed with EIO.

    Every byte a read returns must be the right one. A read that crosses into a
    damaged chunk may come back short (the kernel returns what it had read
    before the error); the next read, at the damage, gets the EIO, and reading
    goes on at the next piece.
    """
    failed = []
    fd = os.open(path, os.O_RDONLY)
    try:
        position = 0
        while position < len(expected):
            try:
                data = os.pread(fd, PIECE, position)
            except OSError as exc:
                assert exc.errno == errno.EIO, exc
                failed.append(position)
                position = (position // PIECE + 1) * PIECE
                continue
            assert data, f"end of file at {position} of {len(expected)}"
            assert data == expected[position : position + len(data)], \
                f"wrong bytes at {position}"
            position += len(data)
    finally:
        os.close(fd)
    return failed


@pytest.mark.corrupts_store
@pytest.mark.expect_warnings  # the daemon logs a corruption report at ERROR
def test_a_damaged_pack_gives_eio_never_wrong_bytes(mount: Mount,
                                                    damaged: dict[str, bytes]) -> None:
    branch = mount.path / "data@main"
    failed = read_in_pieces(branch / "a.bin", damaged["a.bin"])
    assert 0 < len(failed) <= 5  # the damaged chunk (at most 4 MiB), not the whole file
    assert read_in_pieces(branch / "a.bin", damaged["a.bin"])  # and again: nothing cached it

    with pytest.raises(OSError) as raised:
        (branch / "a.bin").read_bytes()
    assert raised.value.errno == errno.EIO
    cat = subprocess.run(["cat", str(branch / "a.bin")], capture_output=True)
    assert cat.returncode != 0
    assert damaged["a.bin"].startswith(cat.stdout)  # what came before the damage only

    assert read_in_pieces(branch / "b.bin", damaged["b.bin"]) == []
    assert (branch / "b.bin").read_bytes() == damaged["b.bin"]
    assert mount.process.poll() is None
    assert sorted(os.listdir(branch)) == ["a.bin", "b.bin"]
    assert "corruption report" in mount.log.read_text()


@pytest.mark.corrupts_store
@pytest.mark.expect_warnings
def test_a_damaged_pack_under_a_commit_path(mount: Mount, damaged: dict[str, bytes]) -> None:
    head = json.loads(mount.vfsctl("log", "data@main", "-n", "1", "--json").stdout)[0]["id"]
    committed = mount.path / f"data@{head[:8]}"
    assert read_in_pieces(committed / "a.bin", damaged["a.bin"])
    assert read_in_pieces(committed / "a.bin", damaged["a.bin"])
    assert (committed / "b.bin").read_bytes() == damaged["b.bin"]
    assert mount.process.poll() is None
    assert "corruption report" in mount.log.read_text()
