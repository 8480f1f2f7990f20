"""An fsx-style exerciser: the same seeded random operations on the mount and on a plain dir.

Every operation (create, write at a random offset, truncate, rename, unlink,
mkdir, rmdir, and writes through a file handle kept open across other
operations, as fsx does) is applied to ``data@main/fsx`` and to a directory on
the local disk; the two must give the same outcome, and every ``BATCH``
operations the whole trees must be equal. At the end the committed tree and,
after a daemon restart, the branch and the commit must still equal the plain dir.

A failure names the seed and the last operations, which is all it takes to
replay it.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from fuse_checks import tree_of

if TYPE_CHECKING:
    from conftest import Mount

BATCH = 200
MAX_OFFSET = 1_500_000  # files up to ~1.5 MiB: several chunks at most, fast flushes
WRITE_SIZES = [1, 7, 512, 4096, 10_000, 65_536, 200_000]


class Exerciser:
    """Random operations applied to two roots that must stay equal."""

    def __init__(self, mounted: Path, plain: Path, seed: int) -> None:
        self.roots = (mounted, plain)
        self.rng = random.Random(seed)
        self.seed = seed
        self.files: set[str] = set()
        self.dirs: set[str] = {""}
        self.held: tuple[int, int] | None = None  # (mounted fd, plain fd)
        self.log: list[str] = []
        self._names = 0

    # -- choosing ------------------------------------------------------------------------

    def _new_name(self) -> str:
        self._names += 1
        parent = self.rng.choice(sorted(self.dirs))
        return os.path.join(parent, f"n{self._names}")

    def _size(self, path: str) -> int:
        return os.stat(self.roots[1] / path).st_size

    def _data(self) -> bytes:
        return self.rng.randbytes(self.rng.choice(WRITE_SIZES))

    def _offset(self, size: int) -> int:
        if self.rng.random() < 0.6:
            return self.rng.randrange(size + 1)  # inside or appending
        return self.rng.randrange(MAX_OFFSET)  # often past the end: a hole

    def _both(self, description: str, action: Callable[[Path], object]) -> None:
        """Apply ``action`` to both roots; they must succeed or fail alike."""
        self.log.append(description)
        outcomes = []
        for root in self.roots:
            try:
                action(root)
                outcomes.append("ok")
            except OSError as exc:
                outcomes.append(f"{type(exc).__name__} errno {exc.errno}")
        assert outcomes[0] == outcomes[1], self.context(f"mount: {outcomes[0]}, "
                                                        f"plain: {outcomes[1]}")

    def context(self, what: str) -> str:
        recent = "\n  ".join(self.log[-15:])
        return f"seed {self.seed}, after {len(self.log)} operations: {what}\n  {recent}"

    # -- operations ----------------------------------------------------------------------

    def step(self) -> None:
        operations = [
            (30, self.write), (8, self.truncate), (10, self.create), (10, self.rename),
            (7, self.unlink), (7, self.mkdir), (5, self.rmdir), (5, self.hold),
            (10, self.write_held), (4, self.release),
        ]
        weights = [w for w, _ in operations]
        self.rng.choices([op for _, op in operations], weights)[0]()

    def create(self) -> None:
        path = self._new_name()
        data = self._data() if self.rng.random() < 0.5 else b""

        def create(root: Path) -> None:
            fd = os.open(root / path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)

        self._both(f"create {path} with {len(data)} bytes", create)
        self.files.add(path)

    def write(self) -> None:
        if not self.files:
            return self.create()
        path = self.rng.choice(sorted(self.files))
        offset, data = self._offset(self._size(path)), self._data()

        def write(root: Path) -> None:
            fd = os.open(root / path, os.O_WRONLY)
            try:
                os.pwrite(fd, data, offset)
            finally:
                os.close(fd)

        self._both(f"write {len(data)} bytes at {offset} to {path}", write)

    def truncate(self) -> None:
        if not self.files:
            return None
        path = self.rng.choice(sorted(self.files))
        size = self.rng.choice([0, self.rng.randrange(MAX_OFFSET),
                                self.rng.randrange(self._size(path) + 1)])
        self._both(f"truncate {path} to {size}", lambda root: os.truncate(root / path, size))

    def rename(self) -> None:
        movable = sorted(self.files | (self.dirs - {""}))
        if not movable:
            return
        src = self.rng.choice(movable)
        is_dir = src in self.dirs
        replaceable = sorted(self.files - {src})
        if not is_dir and replaceable and self.rng.random() < 0.3:
            dst = self.rng.choice(replaceable)  # replaces an existing file
        else:
            dst = self._new_name()
            if is_dir and (dst + "/").startswith(src + "/"):
                return  # a directory cannot move into itself
        self._both(f"rename {src} -> {dst}", lambda root: os.rename(root / src, root / dst))
        if is_dir:
            self.dirs = {_moved(p, src, dst) for p in self.dirs}
            self.files = {_moved(p, src, dst) for p in self.files}
        else:
            self.files.discard(src)
            self.files.add(dst)

    def unlink(self) -> None:
        if self.files:
            path = self.rng.choice(sorted(self.files))
            self._both(f"unlink {path}", lambda root: os.unlink(root / path))
            self.files.discard(path)

    def mkdir(self) -> None:
        path = self._new_name()
        self._both(f"mkdir {path}", lambda root: os.mkdir(root / path))
        self.dirs.add(path)

    def rmdir(self) -> None:
        occupied = {os.path.dirname(p) for p in self.files | self.dirs}
        empty = sorted(self.dirs - occupied - {""})
        if empty:
            path = self.rng.choice(empty)
            self._both(f"rmdir {path}", lambda root: os.rmdir(root / path))
            self.dirs.discard(path)

    def hold(self) -> None:
        """Open a file and keep it open across other operations, as fsx does."""
        if self.held is not None or not self.files:
            return
        path = self.rng.choice(sorted(self.files))
        fds: list[int] = []
        self._both(f"hold {path} open",
                   lambda root: fds.append(os.open(root / path, os.O_RDWR)))
        self.held = (fds[0], fds[1])

    def write_held(self) -> None:
        if self.held is None:
            return
        offset, data = self._offset(os.fstat(self.held[1]).st_size), self._data()
        fds = dict(zip(self.roots, self.held, strict=True))
        self._both(f"write {len(data)} bytes at {offset} through the held file",
                   lambda root: os.pwrite(fds[root], data, offset))
        try:
            mounted, plain = (os.pread(fd, len(data), offset) for fd in self.held)
        except OSError as exc:
            raise AssertionError(self.context(f"a read after the write: {exc}")) from exc
        assert mounted == plain == data, self.context("a read after the write differs")

    def release(self) -> None:
        if self.held is not None:
            fds = dict(zip(self.roots, self.held, strict=True))
            self._both("close the held file", lambda root: os.close(fds[root]))
            self.held = None

    # -- checking --------------------------------------------------------------------------

    def check(self) -> None:
        mounted, plain = (tree_of(root) for root in self.roots)
        assert mounted == plain, self.context("the trees differ")


def _moved(path: str, src: str, dst: str) -> str:
    if path == src or path.startswith(src + "/"):
        return dst + path[len(src):]
    return path


def run_fsx(mount: Mount, tmp_path: Path, operations: int, seed: int) -> None:
    mount.vfsctl("repo", "create", "data")
    mounted = mount.path / "data@main" / "fsx"
    plain = tmp_path / "plain"
    mounted.mkdir()
    plain.mkdir()
    exerciser = Exerciser(mounted, plain, seed)
    for done in range(1, operations + 1):
        exerciser.step()
        if done % BATCH == 0:
            exerciser.check()
    exerciser.release()
    exerciser.check()
    expected = tree_of(plain)

    commit = mount.commit("data@main", f"fsx seed {seed}")
    committed = mount.path / f"data@{commit}" / "fsx"
    assert tree_of(committed) == expected, exerciser.context("the commit differs")

    mount.restart()
    assert tree_of(mount.path / "data@main" / "fsx") == expected, "the branch after a restart"
    assert tree_of(committed) == expected, "the commit after a restart"


def test_fsx(mount: Mount, tmp_path: Path) -> None:
    run_fsx(mount, tmp_path, operations=2_000, seed=20_240_601)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("seed", [1, 2])
def test_fsx_long(mount: Mount, tmp_path: Path, seed: int) -> None:
    run_fsx(mount, tmp_path, operations=20_000, seed=seed)
