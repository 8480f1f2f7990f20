"""Fresh reads for every reader of a branch file (issue 11).

The kernel keeps the pages and attributes of a branch file between opens, which
is what makes a second read fast. Whatever changes the file, that must never show
old bytes afterwards: a write through another descriptor, a ``vfsctl`` put, rm,
discard or rollback, a commit, another node's commit. Readers here hold their
descriptors open across the change, as ``tail -f`` does, and read again through
them and through new opens, right after the change returned.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import daemon_log_problems, start_vfsd, stop_vfsd
from fuse_checks import wait_for

import vfs

if TYPE_CHECKING:
    from conftest import Mount

WORKER = str(Path(__file__).with_name("coherence_worker.py"))


def in_another_process(code: str, path: Path, data: bytes) -> None:
    """Run ``code`` in a new Python process, with ``path`` and ``data`` (its stdin)."""
    subprocess.run([sys.executable, "-c", f"import os, sys\n{code}", str(path)], input=data,
                   check=True, timeout=60)


def append_elsewhere(path: Path, data: bytes) -> None:
    in_another_process("fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)\n"
                       "os.write(fd, sys.stdin.buffer.read())\nos.close(fd)", path, data)


def overwrite_elsewhere(path: Path, data: bytes) -> None:
    """Write ``data`` over the start of the file (no truncation), then close it."""
    in_another_process("fd = os.open(sys.argv[1], os.O_WRONLY)\n"
                       "os.pwrite(fd, sys.stdin.buffer.read(), 0)\nos.close(fd)", path, data)


def write_kept_open(path: Path, data: bytes) -> int:
    """Write a file and keep it open for writing: a reader opened meanwhile reads it
    from its spool (the file being written), not from stored bytes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.write(fd, data)
    return fd


def read_at_start(fd: int) -> bytes:
    """The whole file through an open descriptor, from offset 0 (preads)."""
    parts = []
    offset = 0
    while piece := os.pread(fd, 1 << 20, offset):
        parts.append(piece)
        offset += len(piece)
    return b"".join(parts)


def wait_staged(mount: Mount) -> None:
    """Return once every closed file is stored: a reader opened now reads stored bytes."""
    mount.vfsctl("status", "data@main")


# -- writes through the mount ----------------------------------------------------------


@pytest.mark.parametrize("stored", [True, False], ids=["stored", "spooled"])
def test_a_reader_at_the_end_sees_lines_appended_through_the_mount(
        mount: Mount, branch: Path, stored: bool) -> None:
    path = branch / "log"
    if stored:
        path.write_bytes(b"line 0\n")
        wait_staged(mount)
    else:
        writer = write_kept_open(path, b"line 0\n")
    fd = os.open(path, os.O_RDONLY)
    try:
        seen = os.read(fd, 1 << 16)
        assert seen == b"line 0\n"
        assert os.read(fd, 1 << 16) == b""
        expected = seen
        for i in range(1, 4):
            line = f"line {i}\n".encode()
            append_elsewhere(path, line)
            expected += line

            def more() -> bytes:
                nonlocal seen
                seen += os.read(fd, 1 << 16)  # tail -f: read on after the end
                return seen

            assert wait_for(more, expected, timeout=2) == expected
            assert subprocess.run(["cat", str(path)], capture_output=True,
                                  check=True).stdout == expected
    finally:
        os.close(fd)
        if not stored:
            os.close(writer)
    assert path.read_bytes() == expected


@pytest.mark.parametrize("size", [100, 300_000], ids=["inline", "chunked"])
@pytest.mark.parametrize("stored", [True, False], ids=["stored", "spooled"])
def test_a_same_size_overwrite_reaches_the_old_reader_and_every_later_open(
        mount: Mount, branch: Path, size: int, stored: bool) -> None:
    path = branch / "f"
    rng = random.Random(size)
    old, new = rng.randbytes(size), rng.randbytes(size)
    if stored:
        path.write_bytes(old)
        wait_staged(mount)
    else:
        writer = write_kept_open(path, old)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert read_at_start(fd) == old  # now in the page cache
        overwrite_elsewhere(path, new)
        assert read_at_start(fd) == new
        assert path.read_bytes() == new
    finally:
        os.close(fd)
        if not stored:
            os.close(writer)
    assert path.read_bytes() == new  # not the old reader's pages, kept for every open
    wait_staged(mount)
    assert path.read_bytes() == new


# -- changes through the daemon ----------------------------------------------------------


def test_a_put_from_outside_reaches_open_readers_and_later_opens(
        mount: Mount, branch: Path, tmp_path: Path) -> None:
    path = branch / "f"
    path.write_bytes(b"a" * 5000)
    wait_staged(mount)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert read_at_start(fd) == b"a" * 5000
        before = os.stat(path)
        # Same size, same time: nothing in the attributes tells the kernel.
        source = tmp_path / "new"
        source.write_bytes(b"b" * 5000)
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
        mount.vfsctl("put", "data@main:/f", str(source))
        assert read_at_start(fd) == b"b" * 5000
        assert path.read_bytes() == b"b" * 5000
        # A bigger version: stat shows its size at once, not a second later.
        source.write_bytes(b"c" * 9000)
        mount.vfsctl("put", "data@main:/f", str(source))
        assert os.stat(path).st_size == 9000
        assert read_at_start(fd) == b"c" * 9000
        assert path.read_bytes() == b"c" * 9000
    finally:
        os.close(fd)


def test_a_put_replaces_a_file_an_open_reader_holds_unstored(
        mount: Mount, branch: Path, tmp_path: Path) -> None:
    path = branch / "f"
    path.write_bytes(b"a" * 3000)
    fd = os.open(path, os.O_RDONLY)  # opened before the flusher stored it
    try:
        assert read_at_start(fd) == b"a" * 3000
        source = tmp_path / "new"
        source.write_bytes(b"b" * 3000)
        mount.vfsctl("put", "data@main:/f", str(source))
        assert read_at_start(fd) == b"b" * 3000
        assert path.read_bytes() == b"b" * 3000
    finally:
        os.close(fd)
    assert path.read_bytes() == b"b" * 3000


def test_rm_from_outside_is_seen_at_once(mount: Mount, branch: Path) -> None:
    path = branch / "f"
    path.write_bytes(b"a" * 5000)
    wait_staged(mount)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert read_at_start(fd) == b"a" * 5000
        assert path.exists()
        mount.vfsctl("rm", "data@main:/f")
        assert not path.exists()
        with pytest.raises(FileNotFoundError):
            path.read_bytes()
        assert read_at_start(fd) == b"a" * 5000  # an open file lives on, as if unlinked
    finally:
        os.close(fd)


def test_discard_returns_open_readers_to_the_committed_content(
        mount: Mount, branch: Path) -> None:
    path = branch / "f"
    path.write_bytes(b"a" * 5000)
    mount.commit("data@main")
    path.write_bytes(b"b" * 5000)
    wait_staged(mount)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert read_at_start(fd) == b"b" * 5000
        mount.vfsctl("discard", "data@main")
        assert read_at_start(fd) == b"a" * 5000
        assert path.read_bytes() == b"a" * 5000
    finally:
        os.close(fd)


def test_rollback_reaches_open_readers_and_later_opens(mount: Mount, branch: Path) -> None:
    path = branch / "f"
    path.write_bytes(b"a" * 5000)
    first = mount.commit("data@main")
    path.write_bytes(b"b" * 5000)
    mount.commit("data@main")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert read_at_start(fd) == b"b" * 5000
        mount.vfsctl("rollback", "data@main", "--to", first)
        assert read_at_start(fd) == b"a" * 5000
        assert path.read_bytes() == b"a" * 5000
    finally:
        os.close(fd)


def test_a_commit_under_an_open_reader(mount: Mount, branch: Path) -> None:
    path = branch / "f"
    path.write_bytes(b"a" * 5000)
    first = mount.commit("data@main")
    fd = os.open(path, os.O_RDONLY)  # reads the committed bytes
    try:
        assert read_at_start(fd) == b"a" * 5000
        overwrite_elsewhere(path, b"b" * 5000)
        second = mount.commit("data@main")
        assert read_at_start(fd) == b"b" * 5000  # the branch's content
        assert path.read_bytes() == b"b" * 5000
    finally:
        os.close(fd)
    assert (mount.path / f"data@{first}" / "f").read_bytes() == b"a" * 5000
    assert (mount.path / f"data@{second}" / "f").read_bytes() == b"b" * 5000
    path.write_bytes(b"c" * 5000)
    assert (mount.path / f"data@{first}" / "f").read_bytes() == b"a" * 5000  # forever


def staged_entry(mount: Mount, path: str) -> vfs.Entry | None:
    """What the open commit of data@main holds at ``path`` (read from the node's index
    here, not through a ``vfsctl`` process: starting one closes a copy of every
    descriptor this process holds, and each close tells the daemon to store a file)."""
    with vfs.open_store(str(mount.store_dir), cache_dir=str(mount.cache_dir)) as store:
        return store.open_commit("data", "main")[1].lookup(path)


@contextlib.contextmanager
def flusher_held(mount: Mount) -> Iterator[None]:
    """Hold the node lock, as gc does: no flusher round runs meanwhile."""
    with vfs.open_store(str(mount.store_dir), cache_dir=str(mount.cache_dir)) as store:
        lock = Path(store.cache_dir) / "gc.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def test_a_file_replaced_by_a_rename_is_never_missing_from_the_branch(
        mount: Mount, branch: Path) -> None:
    """Until the new file is stored, the open commit holds the old one at its name,
    not a deletion: a commit sealed meanwhile has one or the other, never neither."""
    (branch / "f").write_bytes(b"old")
    mount.commit("data@main")
    with flusher_held(mount):
        (branch / "f.new").write_bytes(b"new")  # closed, not stored yet
        os.rename(branch / "f.new", branch / "f")
        staged = staged_entry(mount, "f")
        assert staged is not None
        assert (branch / "f").read_bytes() == b"new"
    commit = mount.commit("data@main")
    assert (mount.path / f"data@{commit}" / "f").read_bytes() == b"new"


# -- another node ------------------------------------------------------------------------


def test_another_nodes_commit_reaches_readers_after_the_poll(
        mount: Mount, branch: Path, tmp_path: Path) -> None:
    path = branch / "f"
    path.write_bytes(b"a" * 5000)
    mount.commit("data@main")
    fd = os.open(path, os.O_RDONLY)
    other_path = tmp_path / "pfs-other"
    other_path.mkdir()
    other = start_vfsd(mount.store_dir, tmp_path / "cache-other", other_path, "--no-pipelines")
    try:
        assert read_at_start(fd) == b"a" * 5000
        assert path.read_bytes() == b"a" * 5000
        # The same size: only the bytes and the modification time tell.
        overwrite_elsewhere(other_path / "data@main" / "f", b"b" * 5000)
        commit = other.commit("data@main")
        assert wait_for(lambda: read_at_start(fd), b"b" * 5000, timeout=5) == b"b" * 5000
        assert path.read_bytes() == b"b" * 5000
        assert (mount.path / f"data@{commit}" / "f").read_bytes() == b"b" * 5000
    finally:
        os.close(fd)
        stop_vfsd(other)
    assert not daemon_log_problems(other.log)


# -- many processes at once ------------------------------------------------------------------

NAMES = ["a", "b", "c"]
_CHANGES = ("append", "overwrite", "truncate", "rename", "put")


def exercise(mount: Mount, branch: Path, tmp_path: Path, seconds: float) -> None:
    """Changers, readers and a committer at once, then every read checked (:func:`check_reads`)."""
    rng = random.Random(11)
    initial = {}
    for name in NAMES:
        data = rng.randbytes(rng.randrange(100, 3000))
        (branch / name).write_bytes(data)
        initial[name] = (data, os.stat(branch / name).st_ino)
    mount.commit("data@main")
    logs = tmp_path / "logs"
    logs.mkdir()
    processes = []
    for i, name in enumerate(NAMES):
        processes.append(("change", name, i))
    for i in range(3):
        processes.append(("read", ",".join(NAMES), 10 + i))
    processes.append(("commit", ",".join(NAMES), 20))
    started = [subprocess.Popen([sys.executable, WORKER, role, str(branch), names,
                                 str(logs / f"{role}-{seed}.jsonl"), str(seconds), str(seed)],
                                env=mount.env)
               for role, names, seed in processes]
    for process in started:
        assert process.wait(timeout=seconds + 120) == 0, process.args
    records = [json.loads(line) for log in sorted(logs.iterdir()) if log.suffix == ".jsonl"
               for line in log.read_text().splitlines()]
    problems = check_reads(initial, records)
    reads = sum(1 for r in records if r["op"] in ("held", "fresh", "stat"))
    changes = sum(1 for r in records if r["op"] in _CHANGES)
    assert reads > 100 and changes > 20, (reads, changes)
    assert not problems, f"{len(problems)} of {reads} reads were wrong:\n" + \
        "\n".join(problems[:20])


def check_reads(initial: dict[str, tuple[bytes, int]], records: list[dict]) -> list[str]:
    """What was wrong in the reads of :func:`exercise`.

    A file's versions are in the order its one changer made them; each belongs to a
    file identity (its inode number: a rename makes a new file, a put does not). A
    read through a descriptor of an identity may show the last version of that
    identity whose change had returned before the read started, or one whose change
    overlapped the read (torn between them, byte by byte, like any filesystem
    without locks). Anything older is a stale read. An open or stat never fails: a
    rename replaces a file atomically.
    """
    versions: dict[str, list[tuple[float, float, int, bytes, str]]] = defaultdict(list)
    for name, (data, ino) in initial.items():
        versions[name].append((float("-inf"), float("-inf"), ino, data, "written"))
    for r in records:
        if r["op"] in _CHANGES:
            versions[r["name"]].append((r["t0"], r["t1"], r["ino"], bytes.fromhex(r["data"]),
                                        r["op"]))
    problems = []
    for r in records:
        op = r["op"]
        if op == "enoent":
            # An open or stat racing a rename that replaces the file gets the old
            # file or the new one: the name is never missing.
            problems.append(f"{r['name']} missing at {r['t0']:.3f}")
        elif op in ("held", "fresh", "stat"):
            same = [v for v in versions[r["name"]] if v[2] == r["ino"]] or versions[r["name"]]
            before = [v for v in same if v[1] <= r["t0"]]
            allowed = before[-1:] + [v for v in same if v[0] < r["t1"] and v[1] > r["t0"]]
            contents = [v[3] for v in allowed]
            if op == "stat":
                if r["size"] not in {len(c) for c in contents}:
                    problems.append(f"stat of {r['name']} at {r['t0']:.3f}: size {r['size']}, "
                                    f"expected one of {sorted({len(c) for c in contents})}")
                continue
            data = bytes.fromhex(r["data"])
            if data in contents or (len(allowed) > 1 and _torn(data, contents)):
                continue
            problems.append(f"{op} read of {r['name']} (inode {r['ino']}) at "
                            f"{r['t0']:.3f}-{r['t1']:.3f}: "
                            f"{_describe(data, versions[r['name']])}; expected "
                            + " or ".join(_describe(c, versions[r["name"]]) for c in contents))
        elif op == "commit":
            missing = sorted(name for name, data in r["files"].items() if data is None)
            if missing:
                problems.append(f"commit {r['commit']} lacks {missing}")
        elif op == "reread" and r["files"] != r["first"]:
            problems.append(f"commit {r['commit']} changed: {r['first']} -> {r['files']}")
    return problems


def _torn(data: bytes, contents: list[bytes]) -> bool:
    """``data`` has the length of one of ``contents`` and each byte from one of them,
    or a zero past the end of a shorter one (a read racing a truncation)."""
    if len(data) not in {len(c) for c in contents}:
        return False
    shortest = min(len(c) for c in contents)
    return all(any(i < len(c) and c[i] == byte for c in contents) or
               (byte == 0 and i >= shortest) for i, byte in enumerate(data))


def _describe(data: bytes, versions: list[tuple[float, float, int, bytes, str]]) -> str:
    for i, version in enumerate(versions):
        if version[3] == data:
            return (f"version {i} ({version[4]} at {version[1]:.3f}, inode {version[2]}, "
                    f"{len(data)} bytes)")
    return f"{len(data)} bytes of no version ({data[:40]!r})"


def test_many_processes_read_what_the_file_holds(
        mount: Mount, branch: Path, tmp_path: Path) -> None:
    exercise(mount, branch, tmp_path, seconds=20)


@pytest.mark.slow
def test_many_processes_read_what_the_file_holds_for_long(
        mount: Mount, branch: Path, tmp_path: Path) -> None:
    exercise(mount, branch, tmp_path, seconds=180)

