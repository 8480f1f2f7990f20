"""A real full disk under the store: put fails cleanly, nothing is lost, retry works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from disks import full_from_when_moved, small_tmpfs

VFSCTL = [sys.executable, "-m", "cli.main"]


def run(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*VFSCTL, *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_put_onto_a_full_disk_loses_nothing_and_can_be_retried(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small", "6m") as small:
        env = {**os.environ, "VFS_STORE": str(small / "store"),
               "VFS_CACHE": str(tmp_path / "cache")}
        assert run(env, "init").returncode == 0
        assert run(env, "repo", "create", "data").returncode == 0
        (tmp_path / "note.txt").write_bytes(b"staged before the disk filled\n" * 100)
        assert run(env, "put", "data@main:/note.txt", str(tmp_path / "note.txt")).returncode == 0

        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(12 << 20))  # twice what the disk holds
        failed = run(env, "put", "data@main:/big.bin", str(big))
        assert failed.returncode == 1
        assert failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr
        assert "no space" in failed.stderr.lower()

        # The open commit still holds exactly what was staged before the failure.
        status = run(env, "status", "data@main", "--json")
        assert status.returncode == 0, status.stderr
        assert "note.txt" in status.stdout and "big.bin" not in status.stdout
        # No temporary files are left filling the disk.
        leftovers = [p for p in (small / "store").rglob("*") if p.name.endswith(".tmp")]
        assert leftovers == []
        assert run(env, "fsck", "--deep").returncode == 0

        committed = run(env, "commit", "data@main", "-m", "what fit")
        assert committed.returncode == 0, committed.stderr
        assert run(env, "cat", "data@main:/note.txt").stdout.startswith("staged before")

        # Once space is freed (here: a smaller file), the same commands work again.
        big.write_bytes(os.urandom(1 << 20))
        assert run(env, "put", "data@main:/big.bin", str(big)).returncode == 0
        assert run(env, "commit", "data@main", "-m", "retry").returncode == 0
        got = subprocess.run([*VFSCTL, "cat", "data@main:/big.bin"], env=env,
                             capture_output=True, timeout=60)
        assert got.stdout == big.read_bytes()
        fsck = run(env, "fsck", "--deep")
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_a_commit_that_landed_as_the_disk_filled_is_reported_made(tmp_path: Path) -> None:
    """The node-local disk (index, cache) fills the moment the branch moves: the commit
    is made, and vfsctl must say so (exit 0, its id), not report a failure."""
    with small_tmpfs(tmp_path / "cache", "32m") as cache:
        env = {**os.environ, "VFS_STORE": str(tmp_path / "store"), "VFS_CACHE": str(cache)}
        assert run(env, "init").returncode == 0
        assert run(env, "repo", "create", "data").returncode == 0
        (tmp_path / "a.txt").write_text("one")
        assert run(env, "put", "data@main:/a.txt", str(tmp_path / "a.txt")).returncode == 0
        assert run(env, "commit", "data@main").returncode == 0
        src = tmp_path / "src"
        src.mkdir()
        for i in range(6000):  # unstaging them needs more index pages than LMDB has free
            (src / f"f{i}.txt").write_text(f"file {i}")
        assert run(env, "put", "data@main:/src", str(src), "-r").returncode == 0
        ref = tmp_path / "store" / "refs" / "data" / "main"
        process = None
        with full_from_when_moved(cache, ref, lambda: process.pid if process else None):
            process = subprocess.Popen([*VFSCTL, "commit", "data@main", "-m", "filling"],
                                       env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
            out, err = process.communicate(timeout=120)
        head = json.loads(run(env, "log", "data@main", "--json").stdout)[0]["id"]
        assert process.returncode == 0, err
        assert "was made" in err  # the disk did fill between the move and the index
        assert out.strip() == head
        assert "nothing staged" in run(env, "status", "data@main").stdout
        fsck = run(env, "fsck", "--deep")
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
