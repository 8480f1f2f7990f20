"""The smaller POSIX behaviours of the mount, and the documented exceptions to POSIX.

What the mount keeps and what it refuses is listed in README.md ("The mount"):
chown to another owner and special files are EPERM, extended attributes are not
supported, a directory's link count is 2 plus its subdirectories, an open file
works until its last close even after its name is gone. A damaged chunk is
reported once, and fails every later read at once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import socket
import stat
import subprocess
import threading
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from fuse_checks import staged

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


# -- owners ----------------------------------------------------------------------------


def test_chown_to_the_owner_shown_succeeds_and_to_another_is_eperm(mount: Mount,
                                                                  branch: Path) -> None:
    """Entries keep no owner: everything shows the daemon's user and group, a chown
    to them changes nothing and succeeds (cp -a, rsync -a, tar as root do it), and
    a chown to anyone else is EPERM rather than a success that changed nothing."""
    (branch / "dir").mkdir()
    (branch / "dir" / "f").write_bytes(b"f")
    os.symlink("f", branch / "dir" / "link")
    uid, gid = os.getuid(), os.getgid()  # the daemon runs as the test's user
    paths = [branch / "dir", branch / "dir" / "f"]
    for path in paths:
        st = os.stat(path)
        assert (st.st_uid, st.st_gid) == (uid, gid)
        os.chown(path, uid, gid)
        os.chown(path, -1, gid)
        os.chown(path, uid, -1)
    os.lchown(branch / "dir" / "link", uid, gid)
    other = uid + 1000
    calls = [lambda p: os.chown(p, other, -1), lambda p: os.chown(p, -1, other),
             lambda p: os.chown(p, other, other), lambda p: os.chown(p, uid, other)]
    for path in paths:
        for call in calls:
            with pytest.raises(OSError) as raised:
                call(path)
            assert raised.value.errno == errno.EPERM
        assert (os.stat(path).st_uid, os.stat(path).st_gid) == (uid, gid)
    with pytest.raises(OSError) as raised:
        os.lchown(branch / "dir" / "link", other, other)
    assert raised.value.errno == errno.EPERM
    with open(branch / "dir" / "f", "r+b") as f:
        os.fchown(f.fileno(), uid, gid)
        with pytest.raises(OSError) as raised:
            os.fchown(f.fileno(), other, gid)
        assert raised.value.errno == errno.EPERM
        f.write(b"g")
    assert (branch / "dir" / "f").read_bytes() == b"g"


# -- special files ---------------------------------------------------------------------


def test_special_files_are_eperm_and_mknod_of_a_regular_file_makes_one(mount: Mount,
                                                                       branch: Path) -> None:
    """FIFOs, sockets and devices have no place in a commit: EPERM, as on filesystems
    that cannot hold them (vfat). mknod of a regular file is an empty file."""
    with pytest.raises(OSError) as raised:
        os.mkfifo(branch / "fifo")
    assert raised.value.errno == errno.EPERM
    for kind in (stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFSOCK):
        with pytest.raises(OSError) as raised:
            os.mknod(branch / "special", kind | 0o600, os.makedev(1, 3))
        assert raised.value.errno == errno.EPERM, kind
    listener = socket.socket(socket.AF_UNIX)
    with listener, pytest.raises(OSError) as raised:
        listener.bind(str(branch / "socket"))
    assert raised.value.errno == errno.EPERM
    assert os.listdir(branch) == []

    os.mknod(branch / "empty", stat.S_IFREG | 0o640)
    st = os.stat(branch / "empty")
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640 and st.st_size == 0
    with pytest.raises(OSError) as raised:
        os.mknod(branch / "empty", stat.S_IFREG | 0o640)
    assert raised.value.errno == errno.EEXIST
    commit = mount.commit("data@main")
    assert os.listdir(mount.path / f"data@{commit}") == ["empty"]
    assert (mount.path / f"data@{commit}" / "empty").read_bytes() == b""
    with pytest.raises(OSError) as raised:
        os.mkfifo(mount.path / f"data@{commit}" / "fifo")
    assert raised.value.errno == errno.EROFS


# -- directory link counts -------------------------------------------------------------


def _links(directory: Path) -> dict[str, int]:
    """st_nlink of every directory under ``directory`` (and itself, as "."), listed
    first: in a commit the attributes then come from the listing (readdirplus)."""
    links = {".": os.stat(directory).st_nlink}
    for parent, subdirs, _ in os.walk(directory):
        for name in subdirs:
            path = Path(parent) / name
            if not path.is_symlink():
                links[str(path.relative_to(directory))] = os.stat(path).st_nlink
    return links


def test_a_directory_links_itself_its_parent_and_each_subdirectory(mount: Mount,
                                                                   branch: Path) -> None:
    for directory in ("a", "a/b", "a/c", "a/c/d", "e"):
        (branch / directory).mkdir()
    (branch / "a" / "f").write_bytes(b"f")
    os.symlink("b", branch / "a" / "link")  # to a directory: not one itself
    expected = {".": 4, "a": 4, "a/b": 2, "a/c": 3, "a/c/d": 2, "e": 2}
    assert _links(branch) == expected
    commit = mount.commit("data@main")
    assert _links(mount.path / f"data@{commit}") == expected

    # Changes over a committed tree: a new directory, one removed, one replaced by
    # a file, one moved elsewhere.
    steps = [(lambda: (branch / "a" / "new").mkdir(), 5),
             (lambda: (branch / "a" / "c" / "d").rmdir(), 5),
             (lambda: (branch / "a" / "b").rmdir(), 4),
             (lambda: (branch / "a" / "b").write_bytes(b"was a directory"), 4),
             (lambda: os.rename(branch / "e", branch / "a" / "c" / "e"), 4)]
    for step, links in steps:  # counted once, then kept up to date change by change
        step()
        assert os.stat(branch / "a").st_nlink == links
    expected = {".": 3, "a": 4, "a/c": 3, "a/c/e": 2, "a/new": 2}
    assert _links(branch) == expected
    commit = mount.commit("data@main")
    assert _links(mount.path / f"data@{commit}") == expected
    assert _links(branch) == expected


# -- holes -----------------------------------------------------------------------------


def _check_no_holes(path: Path) -> None:
    """st_blocks counts every byte (rounded up to 512), and the file is all data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        size = st.st_size
        assert st.st_blocks == (size + 511) // 512, (path, size, st.st_blocks)
        for offset in {0, size // 2, size - 1} - {-1, size}:
            assert os.lseek(fd, offset, os.SEEK_DATA) == offset
            assert os.lseek(fd, offset, os.SEEK_HOLE) == size
        for whence in (os.SEEK_DATA, os.SEEK_HOLE):  # at the end: nothing to find
            with pytest.raises(OSError) as raised:
                os.lseek(fd, size, whence)
            assert raised.value.errno == errno.ENXIO
    finally:
        os.close(fd)


def test_files_have_no_holes_and_count_every_byte_in_st_blocks(mount: Mount,
                                                               branch: Path) -> None:
    """The store keeps a file's bytes, zeros included (deduplicated and compressed,
    never as holes): a file written sparse reads back whole, and stat and lseek say
    so, in the branch while it is written, once stored, and in a commit."""
    sizes = [0, 1, 511, 512, 513, 100_000, (3 << 20) + 1]
    for size in sizes:
        (branch / f"f{size}").write_bytes(random.Random(size).randbytes(size))
    with open(branch / "sparse", "wb") as f:
        f.seek(5 << 20)
        f.write(b"end")
        f.flush()
        _check_no_holes(branch / "sparse")  # open, in its spool
    _check_no_holes(branch / "sparse")
    with open(branch / "sparse", "rb") as f:
        assert f.read(5 << 20) == bytes(5 << 20)
    commit = mount.commit("data@main")
    for root in (branch, mount.path / f"data@{commit}"):
        for name in [f"f{size}" for size in sizes] + ["sparse"]:
            _check_no_holes(root / name)


# -- extended attributes ---------------------------------------------------------------


def _xattr_errno(call, *args) -> int:
    with pytest.raises(OSError) as raised:
        call(*args)
    return raised.value.errno


def test_extended_attributes_are_not_supported(mount: Mount, branch: Path,
                                               tmp_path: Path) -> None:
    """As on a filesystem without them: listing gives none, and reading, setting or
    removing one is ENOTSUP (not ENODATA for a read: the kernel asks for
    security.capability before every write, and learns from ENOTSUP to stop)."""
    (branch / "d").mkdir()
    (branch / "d" / "f").write_bytes(b"f")
    os.symlink("f", branch / "d" / "link")
    commit = mount.commit("data@main")
    paths = [branch / "d", branch / "d" / "f", mount.path / f"data@{commit}" / "d" / "f"]
    for path in paths:
        assert os.listxattr(path) == []
        assert _xattr_errno(os.getxattr, path, "user.a") == errno.ENOTSUP
        assert _xattr_errno(os.getxattr, path, "security.capability") == errno.ENOTSUP
        assert _xattr_errno(os.setxattr, path, "user.a", b"1") == errno.ENOTSUP
        assert _xattr_errno(os.removexattr, path, "user.a") == errno.ENOTSUP
    link = branch / "d" / "link"
    assert os.listxattr(link, follow_symlinks=False) == []
    with open(branch / "d" / "f", "rb") as f:
        assert os.listxattr(f.fileno()) == []
        assert _xattr_errno(os.setxattr, f.fileno(), "user.a", b"1") == errno.ENOTSUP

    # cp -a of a file that has one copies the file and leaves the attribute behind.
    source = tmp_path / "source"
    source.write_bytes(b"with an attribute")
    try:
        os.setxattr(source, "user.note", b"kept elsewhere")
    except OSError:
        pytest.skip("the test's own filesystem has no user extended attributes")
    copied = subprocess.run(["cp", "-a", str(source), str(branch / "copied")],
                            capture_output=True, text=True)
    assert copied.returncode == 0, copied.stderr
    assert (branch / "copied").read_bytes() == b"with an attribute"


# -- open files whose name is gone -----------------------------------------------------


def _use_detached(fd: int, content: bytes) -> None:
    """Every call on a descriptor whose file lost its name keeps working on that file."""
    st = os.fstat(fd)
    assert st.st_nlink == 0 and st.st_size == len(content)
    assert os.pread(fd, len(content) + 10, 0) == content
    assert os.pwrite(fd, b"more", len(content)) == 4
    os.ftruncate(fd, 3)
    assert os.fstat(fd).st_size == 3
    os.ftruncate(fd, 10)
    assert os.pread(fd, 100, 0) == content[:3] + bytes(7)
    os.fchmod(fd, 0o600)
    os.utime(fd, ns=(1_000_000_000, 2_000_000_000))
    os.fsync(fd)
    st = os.fstat(fd)
    assert (st.st_nlink, st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns) == \
        (0, 10, 0o600, 2_000_000_000)


def test_an_unlinked_open_file_works_until_its_last_close_and_never_comes_back(
        mount: Mount, branch: Path) -> None:
    (branch / "written").write_bytes(b"written")
    (branch / "committed").write_bytes(b"committed")
    mount.commit("data@main")
    (branch / "new").write_bytes(b"new")
    with open(branch / "new", "r+b") as new, open(branch / "committed", "r+b") as committed:
        assert os.fstat(new.fileno()).st_nlink == 1
        os.unlink(branch / "new")
        os.unlink(branch / "committed")
        _use_detached(new.fileno(), b"new")
        _use_detached(committed.fileno(), b"committed")
        assert sorted(os.listdir(branch)) == ["written"]
        during = mount.commit("data@main")  # while they are open
    with open(branch / "written", "rb") as reader:  # read-only: no spool
        os.unlink(branch / "written")
        assert os.fstat(reader.fileno()).st_nlink == 0
        os.fchmod(reader.fileno(), 0o600)
        os.utime(reader.fileno(), ns=(1, 2))
        st = os.fstat(reader.fileno())
        assert (st.st_nlink, stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0, 0o600, 2)
        assert reader.read() == b"written"
    after = mount.commit("data@main")
    assert os.listdir(branch) == []
    assert os.listdir(mount.path / f"data@{during}") == ["written"]
    assert os.listdir(mount.path / f"data@{after}") == []
    mount.restart()  # nothing of them was left for a new daemon to stage
    assert os.listdir(branch) == []
    assert staged(mount) == {}


def test_a_file_renamed_over_an_open_one_leaves_that_one_working(mount: Mount,
                                                                branch: Path) -> None:
    (branch / "a").write_bytes(b"old a")
    (branch / "b").write_bytes(b"b")
    os.chmod(branch / "b", 0o640)
    with open(branch / "a", "r+b") as old:
        os.rename(branch / "b", branch / "a")
        _use_detached(old.fileno(), b"old a")
        assert (branch / "a").read_bytes() == b"b"
        assert stat.S_IMODE(os.stat(branch / "a").st_mode) == 0o640
        assert os.stat(branch / "a").st_nlink == 1
    assert os.listdir(branch) == ["a"]
    assert (branch / "a").read_bytes() == b"b"
    commit = mount.commit("data@main")
    assert (mount.path / f"data@{commit}" / "a").read_bytes() == b"b"
    assert os.listdir(mount.path / f"data@{commit}") == ["a"]


def test_opening_a_name_while_renames_replace_it_never_fails(mount: Mount,
                                                             branch: Path) -> None:
    """The write-then-rename idiom: a reader opening the name while a writer replaces
    it gets the old file or the new one, never ENOENT (the kernel looked the name up,
    then the rename took it from that inode before the open arrived)."""

    target = branch / "current"
    target.write_bytes(b"version 0\n")
    stop = threading.Event()
    renames = 0

    def replace() -> None:
        nonlocal renames
        while not stop.is_set():
            renames += 1
            temporary = branch / f".current.{renames % 2}"
            temporary.write_bytes(b"version %d\n" % renames)
            os.replace(temporary, target)

    writer = threading.Thread(target=replace)
    writer.start()
    failures: list[str] = []
    seen = set()
    try:
        for _ in range(3000):
            for call in ("read", "stat"):
                try:
                    if call == "read":
                        data = target.read_bytes()
                        assert data.startswith(b"version "), data
                        seen.add(data)
                    else:
                        os.stat(target)
                except OSError as exc:
                    failures.append(f"{call}: {errno.errorcode.get(exc.errno, exc.errno)}")
    finally:
        stop.set()
        writer.join()
    assert renames > 50 and len(seen) > 5, (renames, len(seen))
    assert not failures, f"{len(failures)} of 6000 calls failed: {Counter(failures)}"


@pytest.mark.expect_warnings  # the restart after kill -9 reports the readers' spools
def test_chmod_and_rename_of_a_file_open_only_to_read_are_staged_at_once(
        mount: Mount, branch: Path) -> None:
    """Files whose writer closed them, held open by readers that opened them while
    they were written: a chmod or a rename is staged as soon as for a closed file
    (not at the readers' close), so a kill -9 of the daemon meanwhile keeps it."""
    readers = []
    for name in ("f", "g"):
        with open(branch / name, "wb") as writer:
            writer.write(b"data of " + name.encode())
            writer.flush()
            readers.append(os.open(branch / name, os.O_RDONLY))  # shares the spool
    assert staged(mount) == {"/f": "added", "/g": "added"}  # stored: spools kept for readers
    os.chmod(branch / "f", 0o600)
    os.rename(branch / "g", branch / "h")
    assert stat.S_IMODE(os.stat(branch / "f").st_mode) == 0o600
    mount.process.kill()
    mount.process.wait()
    for fd in readers:
        with contextlib.suppress(OSError):
            os.close(fd)
    mount.start()
    assert stat.S_IMODE(os.stat(branch / "f").st_mode) == 0o600
    assert sorted(os.listdir(branch)) == ["f", "h"]
    assert (branch / "h").read_bytes() == b"data of g"
    commit = mount.commit("data@main")
    assert stat.S_IMODE(os.stat(mount.path / f"data@{commit}" / "f").st_mode) == 0o600
