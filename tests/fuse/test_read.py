"""Reading through a real mount: what ``vfsctl put`` stored, as ``os`` calls and tools see it.

One store, put and committed once per module (the ``dataset``), serves the tests
that only read it; the tests that move a branch get a mount of their own.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import stat
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import mounted
from fuse_checks import tree_of, wait_for

if TYPE_CHECKING:
    from conftest import Mount

MANY = 5_000  # files in one directory
MTIME_NS = 1_600_000_000_123_456_789


@dataclass
class Dataset:
    mount: Mount
    source: Path
    commit: str

    @property
    def branch(self) -> Path:
        return self.mount.path / "data@main"

    @property
    def commit_path(self) -> Path:
        return self.mount.path / f"data@{self.commit}"


def make_source(root: Path) -> None:
    """Small (inline), medium (one chunk) and large (many chunks) files, links, a big dir."""
    rng = random.Random(1)
    root.mkdir()
    (root / "small.txt").write_bytes(b"hello, vfs\n")
    (root / "empty").write_bytes(b"")
    (root / "medium.bin").write_bytes(rng.randbytes(300_000))
    (root / "large.bin").write_bytes(rng.randbytes(12 << 20))
    (root / "tool.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "tool.sh", 0o755)
    os.chmod(root / "small.txt", 0o600)
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / "nested" / "deeper" / "leaf.txt").write_bytes(b"leaf\n" * 1000)
    os.symlink("small.txt", root / "link-to-small")
    os.symlink("../small.txt", root / "nested" / "link-up")
    os.symlink("nowhere", root / "dangling")
    (root / "many").mkdir()
    for i in range(MANY):
        (root / "many" / f"file-{i:05d}.txt").write_text(f"{i}\n")
    for i, path in enumerate(sorted(p for p in root.rglob("*") if not p.is_symlink())):
        if path.is_file():
            os.utime(path, ns=(MTIME_NS + i, MTIME_NS + i))


@pytest.fixture(scope="module")
def dataset(module_mount: Mount, tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    source = tmp_path_factory.mktemp("read") / "source"
    make_source(source)
    module_mount.vfsctl("repo", "create", "data")
    module_mount.vfsctl("put", "-r", "data@main:/", f"{source}/")
    return Dataset(module_mount, source, module_mount.commit("data@main"))


@pytest.fixture(params=["branch", "commit"])
def root(request: pytest.FixtureRequest, dataset: Dataset) -> Path:
    """The dataset's files as ``data@main`` and as ``data@<commit id>``."""
    return dataset.branch if request.param == "branch" else dataset.commit_path


def test_whole_tree_matches_the_source(dataset: Dataset, root: Path) -> None:
    assert tree_of(root, modes=True) == tree_of(dataset.source, modes=True)


def test_stat_gives_sizes_modes_and_mtimes(dataset: Dataset, root: Path) -> None:
    for path in dataset.source.rglob("*"):
        relative = path.relative_to(dataset.source)
        expected, actual = os.lstat(path), os.lstat(root / relative)
        assert stat.S_IFMT(actual.st_mode) == stat.S_IFMT(expected.st_mode), relative
        if path.is_symlink():
            assert actual.st_size == len(os.readlink(path)), relative
        elif path.is_file():
            assert stat.S_IMODE(actual.st_mode) == stat.S_IMODE(expected.st_mode), relative
            assert actual.st_size == expected.st_size, relative
            assert actual.st_mtime_ns == expected.st_mtime_ns, relative


def test_ls_lists_the_names(dataset: Dataset, root: Path) -> None:
    listing = subprocess.run(["ls", "-1A", str(root)], capture_output=True, text=True,
                             check=True).stdout.split()
    assert listing == sorted(os.listdir(dataset.source))
    long = subprocess.run(["ls", "-lR", str(root / "nested")], capture_output=True, text=True,
                          check=True).stdout
    assert "leaf.txt" in long and "link-up -> ../small.txt" in long


@pytest.mark.parametrize("name", ["small.txt", "empty", "medium.bin", "large.bin",
                                  "nested/deeper/leaf.txt"])
def test_cat_and_cmp_give_the_exact_bytes(dataset: Dataset, root: Path, name: str) -> None:
    subprocess.run(["cmp", str(dataset.source / name), str(root / name)], check=True)
    cat = subprocess.run(["cat", str(root / name)], capture_output=True, check=True)
    assert cat.stdout == (dataset.source / name).read_bytes()


def test_random_offset_reads(dataset: Dataset, root: Path) -> None:
    expected = (dataset.source / "large.bin").read_bytes()
    rng = random.Random(2)
    fd = os.open(root / "large.bin", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # make the daemon serve them
        for _ in range(300):
            offset = rng.randrange(len(expected) + 4096)
            size = rng.choice([1, 17, 4096, 65_536, 1 << 20, 3 << 20])
            assert os.pread(fd, size, offset) == expected[offset : offset + size], offset
    finally:
        os.close(fd)


def test_symlinks(dataset: Dataset, root: Path) -> None:
    assert os.readlink(root / "link-to-small") == "small.txt"
    assert os.readlink(root / "nested" / "link-up") == "../small.txt"
    assert os.readlink(root / "dangling") == "nowhere"
    assert (root / "nested" / "link-up").read_bytes() == b"hello, vfs\n"
    with pytest.raises(FileNotFoundError):
        (root / "dangling").read_bytes()
    with pytest.raises(OSError) as raised:
        os.readlink(root / "small.txt")
    assert raised.value.errno == errno.EINVAL


@pytest.mark.parametrize("name", [
    "data@no-such-branch", "nope@main", "data@0123456789ab", "data@abc", "no-at-sign",
    "data@main/no-such-file", "data@main/nested/no-such-file", "data@main/small.txt/below",
])
def test_unknown_names_are_enoent(dataset: Dataset, name: str) -> None:
    with pytest.raises(OSError) as raised:
        os.stat(dataset.mount.path / name)
    assert raised.value.errno in (errno.ENOENT, errno.ENOTDIR), name
    if "/" not in name:
        assert raised.value.errno == errno.ENOENT


def test_unknown_path_in_a_commit_is_enoent(dataset: Dataset) -> None:
    with pytest.raises(FileNotFoundError):
        os.stat(dataset.commit_path / "no-such-file")


def _attempts(base: Path) -> dict[str, object]:
    return {
        "open for writing": lambda: os.open(base / "small.txt", os.O_WRONLY),
        "open for appending": lambda: os.open(base / "small.txt", os.O_RDWR | os.O_APPEND),
        "create": lambda: os.open(base / "new.txt", os.O_WRONLY | os.O_CREAT, 0o644),
        "truncate": lambda: os.truncate(base / "small.txt", 0),
        "mkdir": lambda: os.mkdir(base / "newdir"),
        "rmdir": lambda: os.rmdir(base / "nested" / "deeper"),
        "unlink": lambda: os.unlink(base / "small.txt"),
        "rename": lambda: os.rename(base / "small.txt", base / "renamed.txt"),
        "rename a directory": lambda: os.rename(base / "nested", base / "moved"),
        "chmod": lambda: os.chmod(base / "small.txt", 0o777),
        "utime": lambda: os.utime(base / "small.txt", (1, 1)),
        "symlink": lambda: os.symlink("small.txt", base / "new-link"),
    }


@pytest.mark.parametrize("attempt", list(_attempts(Path("/"))))
def test_commit_paths_are_read_only(dataset: Dataset, attempt: str) -> None:
    for base in (dataset.commit_path, dataset.mount.path / f"data@{dataset.commit[:8]}"):
        with pytest.raises(OSError) as raised:
            _attempts(base)[attempt]()
        assert raised.value.errno == errno.EROFS, (attempt, base.name)
    assert (dataset.commit_path / "small.txt").read_bytes() == b"hello, vfs\n"
    assert tree_of(dataset.commit_path / "nested") == tree_of(dataset.source / "nested")


def test_inode_numbers_are_stable(dataset: Dataset, root: Path) -> None:
    names = ["small.txt", "large.bin", "nested", "link-to-small"]
    first = {name: os.lstat(root / name).st_ino for name in names}
    assert len(set(first.values())) == len(names)
    assert {name: os.lstat(root / name).st_ino for name in names} == first
    for _ in range(2):
        listed = {entry.name: entry.inode() for entry in os.scandir(root)}
        assert {name: listed[name] for name in names} == first
        assert len(set(listed.values())) == len(listed)  # no two names share one
    assert {name: os.lstat(root / name).st_ino for name in names} == first


def test_a_large_directory_lists_each_name_once(dataset: Dataset, root: Path) -> None:
    expected = sorted(os.listdir(dataset.source / "many"))
    directory = root / "many"
    assert sorted(os.listdir(directory)) == expected
    assert sorted(entry.name for entry in os.scandir(directory)) == expected
    # find reads the directory with many getdents calls, each one continuing at
    # the offset of the last entry the previous call returned.
    found = subprocess.run(["find", str(directory), "-mindepth", "1", "-printf", "%f\n"],
                           capture_output=True, text=True, check=True).stdout.split()
    duplicates = [name for name, count in Counter(found).items() if count > 1]
    assert not duplicates
    assert sorted(found) == expected
    assert (directory / "file-04321.txt").read_text() == "4321\n"


class _Directory:
    """A directory read with libc's opendir/readdir/telldir/seekdir (os has no seekdir)."""

    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.opendir.restype = ctypes.c_void_p
    _libc.opendir.argtypes = [ctypes.c_char_p]
    _libc.readdir.restype = ctypes.c_void_p
    _libc.readdir.argtypes = [ctypes.c_void_p]
    _libc.telldir.restype = ctypes.c_long
    _libc.telldir.argtypes = [ctypes.c_void_p]
    _libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
    _libc.closedir.argtypes = [ctypes.c_void_p]
    _NAME = 8 + 8 + 2 + 1  # struct dirent: d_ino, d_off, d_reclen, d_type, d_name (glibc)

    def __init__(self, path: Path) -> None:
        self._dir = self._libc.opendir(os.fsencode(path))
        assert self._dir, os.strerror(ctypes.get_errno())

    def read(self) -> tuple[str, int] | None:
        """The next name and the position after it (for seekdir), or None at the end."""
        entry = self._libc.readdir(self._dir)
        if not entry:
            return None
        name = ctypes.string_at(entry + self._NAME).decode()
        return name, self._libc.telldir(self._dir)

    def seek(self, position: int) -> None:
        self._libc.seekdir(self._dir, position)

    def close(self) -> None:
        self._libc.closedir(self._dir)


def test_directory_offsets_stay_valid_across_calls_and_opens(dataset: Dataset,
                                                           root: Path) -> None:
    directory = root / "many"
    first = _Directory(directory)
    listing = []
    while (item := first.read()) is not None:
        listing.append(item)
    names = [name for name, _ in listing if name not in (".", "..")]
    assert sorted(names) == sorted(os.listdir(dataset.source / "many"))
    # Going back to any position, in this handle or in another one opened later,
    # continues with the entry that followed it: offsets are positions that last.
    second = _Directory(directory)
    rng = random.Random(5)
    try:
        for k in sorted(rng.sample(range(len(listing) - 1), 40)) + [0, len(listing) - 2]:
            for handle in (first, second):
                handle.seek(listing[k][1])
                following = handle.read()
                assert following is not None and following[0] == listing[k + 1][0], k
        first.seek(listing[-1][1])
        assert first.read() is None
    finally:
        first.close()
        second.close()


def test_inode_numbers_survive_the_kernel_forgetting_them(dataset: Dataset) -> None:
    # Commits number their entries once for the life of the mount: after the kernel
    # dropped its inodes (and sent FORGET for them) a path keeps its number.
    if os.geteuid() != 0:
        pytest.skip("dropping the kernel's inode cache needs root")
    root = dataset.commit_path
    paths = [root / "small.txt", root / "nested", root / "nested" / "deeper" / "leaf.txt",
             root / "many" / "file-04321.txt", root / "link-to-small"]
    before = {path: os.lstat(path).st_ino for path in paths}
    listed = {entry.name: entry.inode() for entry in os.scandir(root / "many")}
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")  # dentries and inodes
    assert {path: os.lstat(path).st_ino for path in paths} == before
    assert {entry.name: entry.inode() for entry in os.scandir(root / "many")} == listed
    assert listed["file-04321.txt"] == before[root / "many" / "file-04321.txt"]


# -- tests that move branches: each gets its own mount ------------------------------------


def _put_bytes(mount: Mount, dest: str, data: bytes, tmp_path: Path) -> None:
    source = tmp_path / "put-source"
    source.write_bytes(data)
    mount.vfsctl("put", dest, str(source))


def test_a_commit_path_keeps_its_bytes_after_the_branch_moves(mount: Mount,
                                                               tmp_path: Path) -> None:
    mount.vfsctl("repo", "create", "data")
    first = random.Random(3).randbytes(5 << 20)
    _put_bytes(mount, "data@main:/file.bin", first, tmp_path)
    _put_bytes(mount, "data@main:/gone.txt", b"removed later", tmp_path)
    old = mount.commit("data@main")
    by_id, by_prefix = mount.path / f"data@{old}", mount.path / f"data@{old[:8]}"
    assert (by_id / "file.bin").read_bytes() == first
    assert (by_prefix / "file.bin").read_bytes() == first

    second = random.Random(4).randbytes(3 << 20)
    _put_bytes(mount, "data@main:/file.bin", second, tmp_path)
    mount.vfsctl("rm", "data@main:/gone.txt")
    _put_bytes(mount, "data@main:/new.txt", b"new", tmp_path)
    new = mount.commit("data@main")

    branch = mount.path / "data@main"
    assert wait_for(lambda: sorted(os.listdir(branch)), ["file.bin", "new.txt"]) \
        == ["file.bin", "new.txt"]
    assert wait_for(lambda: (branch / "file.bin").read_bytes(), second) == second
    for path in (by_id, by_prefix, mount.path / f"data@{old[:12]}",
                 mount.path / "data@main~1"):
        assert sorted(os.listdir(path)) == ["file.bin", "gone.txt"], path.name
        assert (path / "file.bin").read_bytes() == first, path.name
        assert (path / "gone.txt").read_bytes() == b"removed later", path.name
    assert (mount.path / f"data@{new[:8]}" / "file.bin").read_bytes() == second


def test_the_root_lists_every_branch_and_no_commit(mount: Mount, tmp_path: Path) -> None:
    mount.vfsctl("repo", "create", "data")
    mount.vfsctl("repo", "create", "other")
    _put_bytes(mount, "data@main:/a.txt", b"a", tmp_path)
    commit = mount.commit("data@main")
    mount.vfsctl("branch", "create", "data@dev", "--from", "data@main")
    mount.vfsctl("branch", "create", "data@empty")
    assert (mount.path / f"data@{commit[:8]}" / "a.txt").read_bytes() == b"a"

    expected = ["data@dev", "data@empty", "data@main", "other@main"]
    assert sorted(os.listdir(mount.path)) == expected
    assert sorted(entry.name for entry in os.scandir(mount.path)
                  if entry.is_dir(follow_symlinks=False)) == expected
    assert os.listdir(mount.path / "data@dev") == ["a.txt"]
    assert os.listdir(mount.path / "data@empty") == []
    assert os.listdir(mount.path / "other@main") == []


def _read_ahead_kb(mountpoint: Path) -> int:
    device = os.stat(mountpoint).st_dev
    return int(Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
               .read_text())


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may set a device's read-ahead")
def test_the_mount_reads_ahead_1_mib_or_as_told(dataset: Dataset, tmp_path: Path) -> None:
    # The kernel's own default for a FUSE mount is 128 KiB, which splits a sequential
    # read into 128 KiB requests.
    assert _read_ahead_kb(dataset.mount.path) == 1024
    with mounted(tmp_path, "--read-ahead-kb", "512") as other:
        assert _read_ahead_kb(other.path) == 512


def test_sequential_and_random_reads_of_one_handle_interleaved(dataset: Dataset,
                                                               root: Path) -> None:
    """A handle that streams, jumps, and streams again gets the exact bytes throughout."""
    expected = (dataset.source / "large.bin").read_bytes()
    rng = random.Random(7)
    with open(root / "large.bin", "rb", buffering=0) as f:
        position = 0
        for _ in range(40):
            if rng.random() < 0.3:
                position = rng.randrange(len(expected))
            size = rng.choice([4096, 65536, 1 << 20])
            assert os.pread(f.fileno(), size, position) == expected[position : position + size]
            position = min(position + size, len(expected))
