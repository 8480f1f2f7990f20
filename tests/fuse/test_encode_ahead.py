"""Large files written in order are stored while they are being written (``--encode-ahead``).

The daemon runs with a small step (1 MiB) and DEBUG logging, so its flusher encodes
"heads" of the files below often and says so. Every test checks the bytes the
branch, the commit and a restarted daemon show against the bytes written, while the
writes race the flusher: appends, rewrites below what was already encoded, truncation,
renames and deletion of files whose head is being stored.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Mount

from conftest import check_after, mounted

MiB = 1 << 20


def _debug_mount(tmp_path: Path, encode_ahead: str) -> Iterator[Mount]:
    """A mount with repository ``data``, logging at DEBUG, checked afterwards."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this machine")
    with mounted(tmp_path, "--encode-ahead", encode_ahead, "--debug") as m:
        m.vfsctl("repo", "create", "data")
        yield m
    check_after(m)


@pytest.fixture
def ahead(tmp_path: Path) -> Iterator[Mount]:
    yield from _debug_mount(tmp_path, "1M")


@pytest.fixture
def not_ahead(tmp_path: Path) -> Iterator[Mount]:
    yield from _debug_mount(tmp_path, "0")


def stored_ahead(mount: Mount, name: str) -> int:
    """The longest head of ``name`` the daemon logged as stored ahead (0: none)."""
    pattern = re.compile(rf" {re.escape(name)}: (\d+) bytes stored ahead")
    return max((int(m.group(1)) for m in pattern.finditer(mount.log.read_text())), default=0)


def resumed_from(mount: Mount, name: str) -> list[int]:
    """Where each store of ``name`` that used a head started reading."""
    pattern = re.compile(rf"storing {re.escape(name)} from byte (\d+) ")
    return [int(m.group(1)) for m in pattern.finditer(mount.log.read_text())]


def wait_stored_ahead(mount: Mount, name: str, at_least: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while stored_ahead(mount, name) < at_least:
        assert time.monotonic() < deadline, f"{name}: not {at_least} bytes stored ahead"
        time.sleep(0.02)


def test_a_file_written_in_order_is_stored_ahead_and_reads_back(ahead: Mount) -> None:
    data = random.Random(1).randbytes(24 * MiB)
    path = ahead.path / "data@main" / "big.bin"
    with open(path, "wb") as f:
        for i in range(0, len(data), MiB):
            f.write(data[i:i + MiB])
            f.flush()
            if i == 12 * MiB:
                wait_stored_ahead(ahead, "big.bin", 4 * MiB)
        os.fsync(f.fileno())
    starts = resumed_from(ahead, "big.bin")
    assert starts and starts[-1] >= 4 * MiB  # the close stored only the rest
    assert path.read_bytes() == data
    commit = ahead.commit("data@main")
    assert (ahead.path / f"data@{commit}" / "big.bin").read_bytes() == data
    ahead.restart()
    assert (ahead.path / f"data@{commit}" / "big.bin").read_bytes() == data


def test_rewrites_below_the_head_and_truncation(ahead: Mount) -> None:
    """A write into what was already stored ahead, or a truncation below it, must
    not let the old chunks through."""
    rng = random.Random(2)
    expected = bytearray(rng.randbytes(10 * MiB))
    path = ahead.path / "data@main" / "rewritten.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(0, len(expected), MiB):
            os.write(fd, expected[i:i + MiB])
        wait_stored_ahead(ahead, "rewritten.bin", 4 * MiB)
        # Into the middle of the stored head, then more appends.
        patch = rng.randbytes(5000)
        os.pwrite(fd, patch, 3 * MiB + 17)
        expected[3 * MiB + 17:3 * MiB + 17 + len(patch)] = patch
        more = rng.randbytes(6 * MiB)
        os.pwrite(fd, more, len(expected))
        expected += more
        os.fsync(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == expected  # from the store: the spool is gone
    commit = ahead.commit("data@main")
    assert (ahead.path / f"data@{commit}" / "rewritten.bin").read_bytes() == expected

    # Reopened (the spool is filled from the stored file), cut below what gets
    # stored ahead of the next close, then grown again: a hole, then in order.
    fd = os.open(path, os.O_RDWR)
    try:
        more = rng.randbytes(8 * MiB)
        for i in range(0, len(more), MiB):
            os.pwrite(fd, more[i:i + MiB], len(expected) + i)
        expected += more
        wait_stored_ahead(ahead, "rewritten.bin", 16 * MiB)
        os.ftruncate(fd, 2 * MiB + 3)
        del expected[2 * MiB + 3:]
        tail = rng.randbytes(20 * MiB)  # longer than the head was: it must not be used
        for i in range(0, len(tail), MiB):
            os.pwrite(fd, tail[i:i + MiB], len(expected) + 4096 + i)
        expected += bytes(4096) + tail
        os.fsync(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == expected
    commit = ahead.commit("data@main")
    ahead.restart()
    assert (ahead.path / f"data@{commit}" / "rewritten.bin").read_bytes() == expected


def test_random_races_with_the_flusher(ahead: Mount, tmp_path: Path) -> None:
    """Appends with pauses, rewrites at random offsets, truncations, renames and
    deletes of files being stored ahead; a local file gets the same writes. Now and
    then a file is fsync'd, closed (so reads come from what was stored), compared
    and reopened."""
    rng = random.Random(3)
    plain = tmp_path / "plain"
    plain.mkdir()
    branch = ahead.path / "data@main"
    names = [f"f{i}" for i in range(3)]

    def open_both(name: str) -> tuple[int, int]:
        return (os.open(branch / name, os.O_RDWR | os.O_CREAT, 0o644),
                os.open(plain / name, os.O_RDWR | os.O_CREAT, 0o644))

    fds = {name: open_both(name) for name in names}
    compared = 0
    try:
        for _ in range(400):
            name = rng.choice(names)
            ours, theirs = fds[name]
            size = os.fstat(theirs).st_size
            roll = rng.random()
            if roll < 0.06:
                os.fsync(ours)
                os.close(ours)
                os.close(theirs)
                assert (branch / name).read_bytes() == (plain / name).read_bytes(), name
                compared += 1
                fds[name] = open_both(name)
                continue
            if roll < 0.8 or size < MiB:
                data = rng.randbytes(rng.choice([4096, 300_000, MiB]))
                offset = size
            elif roll < 0.93:
                data = rng.randbytes(rng.choice([1, 4096, 70_000]))
                offset = rng.randrange(size)
            else:
                cut = rng.randrange(size)
                os.ftruncate(ours, cut)
                os.ftruncate(theirs, cut)
                continue
            assert os.pwrite(ours, data, offset) == len(data)
            os.pwrite(theirs, data, offset)
            if rng.random() < 0.15:
                time.sleep(rng.random() * 0.05)  # let a round run mid-file
    finally:
        for ours, theirs in fds.values():
            os.close(ours)
            os.close(theirs)
    assert compared > 5
    assert any(resumed_from(ahead, name) for name in names)
    # A file renamed and one deleted while (perhaps) being stored ahead.
    os.rename(branch / "f0", branch / "renamed")
    os.rename(plain / "f0", plain / "renamed")
    os.unlink(branch / "f1")
    os.unlink(plain / "f1")
    commit = ahead.commit("data@main")
    expected = {p.name: p.read_bytes() for p in plain.iterdir()}
    assert {p.name: p.read_bytes() for p in branch.iterdir()} == expected
    ahead.restart()
    assert {p.name: p.read_bytes() for p in (ahead.path / f"data@{commit}").iterdir()} \
        == expected


def test_encode_ahead_off(not_ahead: Mount) -> None:
    """``--encode-ahead 0``: files are stored only when closed."""
    data = random.Random(4).randbytes(12 * MiB)
    path = not_ahead.path / "data@main" / "f.bin"
    with open(path, "wb") as f:
        for i in range(0, len(data), MiB):
            f.write(data[i:i + MiB])
        f.flush()
        time.sleep(0.5)
    not_ahead.commit("data@main")
    assert stored_ahead(not_ahead, "f.bin") == 0 and not resumed_from(not_ahead, "f.bin")
    assert path.read_bytes() == data


def test_appending_to_a_stored_file_stores_only_the_end(not_ahead: Mount) -> None:
    """Reopened for appending, a stored file's chunks (but its last) are reused, even
    with encoding ahead turned off."""
    mount = not_ahead
    rng = random.Random(5)
    data = rng.randbytes(12 * MiB)
    path = mount.path / "data@main" / "log.bin"
    path.write_bytes(data)
    mount.commit("data@main")
    more = rng.randbytes(3000)
    with open(path, "ab") as f:
        f.write(more)
        f.flush()
        os.fsync(f.fileno())
    starts = resumed_from(mount, "log.bin")
    assert starts and starts[-1] > 8 * MiB
    assert path.read_bytes() == data + more
    commit = mount.commit("data@main")
    mount.restart()
    assert (mount.path / f"data@{commit}" / "log.bin").read_bytes() == data + more
