"""Many readers and writers at once, in threads and in other processes.

A commit path must give its exact bytes to every reader while the branch it came
from is rewritten and committed; writers in different processes must not lose
each other's files.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fuse_writer import content

if TYPE_CHECKING:
    from conftest import Mount

WRITER = str(Path(__file__).with_name("fuse_writer.py"))


def write_in_another_process(mount: Mount, directory: Path,
                             *names: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, WRITER, str(directory), *names], env=mount.env)


def wait_all(*processes: subprocess.Popen) -> None:
    for process in processes:
        assert process.wait(timeout=120) == 0, process.args


class Reader(threading.Thread):
    """Reads a file again and again (past the page cache) and checks every read."""

    def __init__(self, path: Path, expected: bytes, stop: threading.Event, seed: int) -> None:
        super().__init__(daemon=True)
        self.path, self.expected, self.stop = path, expected, stop
        self.rng = random.Random(seed)
        self.rounds = 0
        self.failures: list[str] = []

    def run(self) -> None:
        digest = hashlib.sha256(self.expected).hexdigest()
        try:
            while not self.stop.is_set():
                self.read_once(digest)
                self.rounds += 1
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.failures.append(f"{self.path.name}: {exc!r}")

    def read_once(self, digest: str) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # make the daemon serve it
            hasher = hashlib.sha256()
            while piece := os.read(fd, self.rng.choice([4096, 100_000, 1 << 20, 5 << 20])):
                hasher.update(piece)
            if hasher.hexdigest() != digest:
                self.failures.append(f"round {self.rounds}: whole-file hash differs")
            for _ in range(20):
                offset = self.rng.randrange(len(self.expected))
                size = self.rng.choice([1, 4096, 300_000])
                if os.pread(fd, size, offset) != self.expected[offset : offset + size]:
                    self.failures.append(f"round {self.rounds}: pread({size}, {offset}) differs")
        finally:
            os.close(fd)


def test_commit_readers_see_exact_bytes_while_the_branch_moves(mount: Mount) -> None:
    mount.vfsctl("repo", "create", "data")
    branch = mount.path / "data@main"
    wait_all(write_in_another_process(mount, branch, f"big.bin:{12 << 20}"))
    commit = mount.commit("data@main")
    expected = content("big.bin", 12 << 20)

    stop = threading.Event()
    paths = [mount.path / f"data@{commit}", mount.path / f"data@{commit[:8]}"]
    readers = [Reader(paths[i % 2] / "big.bin", expected, stop, seed=i) for i in range(4)]
    for reader in readers:
        reader.start()
    try:
        for round_ in range(3):
            # Another process rewrites the branch's copy of the file while it is read...
            wait_all(write_in_another_process(mount, branch, f"big.bin:{(8 + round_) << 20}",
                                              f"round-{round_}.bin"))
            mount.commit("data@main", f"round {round_}")  # ...and vfsctl moves the branch
    finally:
        stop.set()
        for reader in readers:
            reader.join(timeout=60)
    assert [failure for reader in readers for failure in reader.failures] == []
    assert all(reader.rounds >= 2 for reader in readers), [r.rounds for r in readers]

    assert (paths[0] / "big.bin").read_bytes() == expected
    assert sorted(os.listdir(paths[1])) == ["big.bin"]
    log = json.loads(mount.vfsctl("log", "data@main", "--json").stdout)
    assert [entry["message"] for entry in log] == ["round 2", "round 1", "round 0", "test"]
    assert mount.vfsctl("cat", "data@main:/big.bin", text=False).stdout \
        == content("big.bin", 10 << 20)


def test_two_processes_write_different_files_in_one_branch(mount: Mount) -> None:
    mount.vfsctl("repo", "create", "data")
    branch = mount.path / "data@main"
    names = {writer: [f"{writer}-{i}.bin" for i in range(12)] for writer in ("left", "right")}
    # Each writer has a directory of its own, and both write into a shared one.
    wait_all(*(write_in_another_process(mount, branch / writer, *files)
               for writer, files in names.items()),
             *(write_in_another_process(mount, branch / "shared", *files)
               for files in names.values()))
    commit = mount.commit("data@main")

    committed = mount.path / f"data@{commit}"
    for writer, files in names.items():
        for directory in (writer, "shared"):
            assert sorted(os.listdir(committed / directory)) == sorted(
                names["left"] + names["right"] if directory == "shared" else files)
            for name in files:
                assert (committed / directory / name).read_bytes() == content(name), name
    assert mount.vfsctl("status", "data@main").stdout.startswith("nothing staged")


def test_overlapping_flushes_of_one_file_store_its_bytes(mount: Mount) -> None:
    """Every close(), even of a dup()ed descriptor, flushes the file: the daemon stores it.

    Flushes of one file that run at the same time must each store the whole file,
    and the last one stored must be the file's latest content.
    """
    mount.vfsctl("repo", "create", "data")
    path = mount.path / "data@main" / "shared.bin"
    data = random.Random(11).randbytes(4 << 20)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)

    def close_a_copy(barrier: threading.Barrier) -> None:
        copy = os.dup(fd)
        barrier.wait()
        os.close(copy)

    try:
        for _ in range(8):
            os.pwrite(fd, data, 0)  # the same bytes each round, but a dirty file to flush
            barrier = threading.Barrier(4)
            threads = [threading.Thread(target=close_a_copy, args=(barrier,)) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
    finally:
        os.close(fd)
    commit = mount.commit("data@main")
    stored = mount.vfsctl("cat", f"data@{commit}:/shared.bin", text=False).stdout
    assert (len(stored), hashlib.sha256(stored).hexdigest()) \
        == (len(data), hashlib.sha256(data).hexdigest())


def test_namespace_changes_during_commits_are_never_lost(mount: Mount) -> None:
    """mkdir, rename, symlink, unlink, rmdir and chmod race ``vfsctl commit`` of the
    same branch: each lands in the commit being sealed or in a later one, never in
    neither (a commit clears only what it sealed)."""
    mount.vfsctl("repo", "create", "ns")
    branch = mount.path / "ns@main"
    (branch / "seed").write_bytes(b"x")
    mount.commit("ns@main")
    stop = threading.Event()
    errors: list[str] = []
    commits = 0

    def committer() -> None:
        nonlocal commits
        while not stop.is_set():
            done = mount.vfsctl("commit", "ns@main", "-m", "race", check=False)
            if done.returncode == 0:
                commits += 1
            elif "nothing to commit" not in done.stderr:
                errors.append(done.stderr)

    thread = threading.Thread(target=committer)
    thread.start()
    expected: dict[str, str] = {"seed": "file"}
    try:
        i = -1
        deadline = time.monotonic() + 90
        while commits < 10 and time.monotonic() < deadline:
            i += 1
            d = f"d{i}"
            os.mkdir(branch / d)
            (branch / d / "f").write_bytes(b"%d" % i)
            expected.update({d: "dir", f"{d}/f": "file"})
            if i % 3 == 0:
                os.rename(branch / d / "f", branch / d / "g")
                del expected[f"{d}/f"]
                expected[f"{d}/g"] = "file"
            if i % 5 == 0:
                os.symlink("../seed", branch / d / "link")
                expected[f"{d}/link"] = "link"
            if i % 7 == 6:
                for name in os.listdir(branch / d):
                    os.unlink(branch / d / name)
                    del expected[f"{d}/{name}"]
                os.rmdir(branch / d)
                del expected[d]
                continue
            os.chmod(branch / d, 0o750)
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert commits >= 10  # the changes did race commits
    mount.vfsctl("commit", "ns@main", "-m", "last", check=False)
    head = json.loads(mount.vfsctl("log", "ns@main", "--json", "-n", "1").stdout)[0]
    commit_root = mount.path / f"ns@{head['id']}"
    found: dict[str, str] = {}
    for root, dirs, files in os.walk(commit_root):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, commit_root)
            found[rel] = "link" if os.path.islink(path) else \
                "dir" if os.path.isdir(path) else "file"
            if found[rel] == "dir":
                assert os.stat(path).st_mode & 0o777 == 0o750, rel
    assert found == expected
