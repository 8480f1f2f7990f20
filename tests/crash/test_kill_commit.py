"""``kill -9`` of the real ``vfsctl`` in the middle of a commit or a big put.

The commit protocol promises (docs/format.md, "Commit protocol", I4): a crash leaves
each branch on its old head or its new one, never on a commit whose data is missing,
and the store checks clean afterwards. The CLI runs as a child process, is killed with
SIGKILL at a random (seeded) moment, and then:

* the branch head is the old head (content unchanged) or a new commit whose parent is
  the old head and whose content is exactly what was staged;
* ``vfsctl fsck --deep`` reports no problem;
* retrying the commit succeeds if the head did not move, or says "nothing to commit"
  if it did (the interrupted commit completed; the node recognises it as its own).

Kill moments are drawn over a window calibrated to an uninterrupted run of the same
command, so they land before, during and after the interesting steps (process start-up
takes a good part of it). The normal run does a few iterations; ``-m slow`` does many.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import vfs
from vfs.snapshot import read_file

REPO = "crash"
VFSCTL = [sys.executable, "-c", "from cli.main import main; main()"]


@dataclass
class Workspace:
    root: Path
    store: Path
    cache: Path
    src: Path
    outcomes: Counter = field(default_factory=Counter)

    def args(self, *args: str) -> list[str]:
        return [*VFSCTL, "--store", str(self.store), "--cache", str(self.cache), *args]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(self.args(*args), capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            raise AssertionError(f"vfsctl {' '.join(args)} failed ({done.returncode}):\n"
                                 f"{done.stdout}\n{done.stderr}")
        return done

    def timed(self, *args: str) -> float:
        start = time.monotonic()
        self.run(*args)
        return time.monotonic() - start

    def kill_during(self, delay: float, *args: str) -> int:
        """Start ``vfsctl args``, SIGKILL it after ``delay`` seconds; return its exit code."""
        proc = subprocess.Popen(self.args(*args), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        # Not proc.wait(timeout=...): it polls with a growing sleep and could kill late.
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
        # A run that finished before the kill must have succeeded.
        assert proc.returncode in (0, -signal.SIGKILL), stderr.decode()
        return proc.returncode

    def head(self) -> str | None:
        with self._open() as store:
            return store.head(REPO, "main").commit

    def tree(self, ref: str = f"{REPO}@main") -> dict[str, bytes]:
        with self._open() as store:
            _, snapshot = store.snapshot(vfs.parse_ref(ref))
            return {p: read_file(store.blobs, e) for p, e in snapshot.walk() if e.kind == "f"}

    def parents(self, commit_id: str) -> tuple[str, ...]:
        with self._open() as store:
            return store.read_commit(commit_id).parents

    def staged(self) -> list[dict]:
        return json.loads(self.run("status", f"{REPO}@main", "--json").stdout)["changes"]

    def assert_fsck_ok(self) -> None:
        done = self.run("fsck", "--deep", "--json", check=False)
        report = json.loads(done.stdout)
        assert done.returncode == 0 and report["ok"], report["problems"]

    def _open(self) -> vfs.Store:
        return vfs.open_store(str(self.store), cache_dir=str(self.cache))


def local_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    ws = Workspace(tmp_path, tmp_path / "store", tmp_path / "cache", tmp_path / "src")
    ws.src.mkdir()
    ws.run("init")
    ws.run("repo", "create", REPO)
    return ws


def _mutate(src: Path, rnd: random.Random, step: int) -> None:
    """Change two existing files and add new ones: a few MiB, chunked and inlined."""
    existing = sorted(p for p in src.rglob("*") if p.is_file())
    for path in rnd.sample(existing, min(2, len(existing))):
        path.write_bytes(rnd.randbytes(rnd.randint(10, 1_500_000)))
    (src / f"dir{step % 3}").mkdir(exist_ok=True)
    (src / f"dir{step % 3}" / f"new{step}.bin").write_bytes(rnd.randbytes(2_000_000))
    (src / f"small{step}.txt").write_text(f"iteration {step}\n")


def _kill_commit_iterations(ws: Workspace, iterations: int, seed: int) -> None:
    rnd = random.Random(seed)
    for i in range(4):
        (ws.src / f"base{i}.bin").write_bytes(rnd.randbytes(800_000))
    ws.run("put", f"{REPO}@main:/", str(ws.src), "-r")
    _mutate(ws.src, rnd, -1)
    ws.run("put", f"{REPO}@main:/", str(ws.src), "-r")
    # Calibrate on an uninterrupted commit of a similar change.
    window = 1.1 * ws.timed("commit", f"{REPO}@main", "-m", "base")
    before = local_tree(ws.src)

    for step in range(iterations):
        _mutate(ws.src, rnd, step)
        ws.run("put", f"{REPO}@main:/", str(ws.src), "-r")
        staged = local_tree(ws.src)
        old_head = ws.head()

        delay = rnd.uniform(0, window)
        code = ws.kill_during(delay, "commit", f"{REPO}@main", "-m", f"step {step}")

        new_head = ws.head()
        if new_head == old_head:
            ws.outcomes["old head"] += 1
            assert code != 0, "commit exited 0 but the branch did not move"
            assert ws.tree() == before
        else:
            ws.outcomes["new head"] += 1
            assert ws.parents(new_head) == (old_head,)
            assert ws.tree() == staged
        ws.assert_fsck_ok()

        start = time.monotonic()
        retry = ws.run("commit", f"{REPO}@main", "-m", f"retry {step}", check=False)
        if new_head == old_head:
            window = 1.1 * (time.monotonic() - start)  # a full commit: recalibrate
            assert retry.returncode == 0, retry.stderr
            assert ws.head() == retry.stdout.strip()
            assert ws.parents(retry.stdout.strip()) == (old_head,)
        else:
            assert retry.returncode == 1 and "nothing to commit" in retry.stderr, retry.stderr
            assert ws.head() == new_head
        assert ws.tree() == staged
        assert ws.staged() == []
        ws.assert_fsck_ok()
        before = staged
    print(f"kill during commit, {iterations} runs: {dict(ws.outcomes)}")  # shown with -s


def test_kill_commit(ws: Workspace) -> None:
    _kill_commit_iterations(ws, iterations=5, seed=20240501)


@pytest.mark.slow
def test_kill_commit_many(ws: Workspace) -> None:
    _kill_commit_iterations(ws, iterations=50, seed=7)
    # With the window calibrated, both outcomes must have happened in 50 tries.
    assert ws.outcomes["old head"] and ws.outcomes["new head"], ws.outcomes


# -- kill -9 during a big put ----------------------------------------------------------------


def _kill_put_iterations(ws: Workspace, iterations: int, seed: int) -> None:
    rnd = random.Random(seed)
    big = ws.src / "big.bin"
    big.write_bytes(rnd.randbytes(64 << 20))
    (ws.src / "note.txt").write_text("base\n")
    window = 1.1 * ws.timed("put", f"{REPO}@main:/", str(ws.src), "-r")
    ws.run("commit", f"{REPO}@main", "-m", "base")

    for step in range(iterations):
        big.write_bytes(rnd.randbytes(64 << 20))  # new data every time: nothing dedups
        (ws.src / "note.txt").write_text(f"step {step}\n")
        expected = local_tree(ws.src)
        old_head = ws.head()

        code = ws.kill_during(rnd.uniform(0, window), "put", f"{REPO}@main:/", str(ws.src), "-r")

        # A put is all or nothing for the open commit.
        staged = {c["path"].lstrip("/") for c in ws.staged()}
        if code == 0:
            ws.outcomes["completed"] += 1
            assert staged == {"big.bin", "note.txt"}
        else:
            ws.outcomes["killed"] += 1
            assert staged in (set(), {"big.bin", "note.txt"}), staged
        assert ws.head() == old_head
        ws.assert_fsck_ok()

        ws.run("put", f"{REPO}@main:/", str(ws.src), "-r")
        ws.run("commit", f"{REPO}@main", "-m", f"step {step}")
        assert ws.tree() == expected
        ws.assert_fsck_ok()
    print(f"kill during put, {iterations} runs: {dict(ws.outcomes)}")  # shown with -s


def test_kill_put(ws: Workspace) -> None:
    _kill_put_iterations(ws, iterations=2, seed=99)


@pytest.mark.slow
def test_kill_put_many(ws: Workspace) -> None:
    _kill_put_iterations(ws, iterations=10, seed=3)
