"""One process of the gc soak (tests/unit/test_gc_soak.py): a writer node or the collector.

Run as a script: ``python gc_soak_worker.py ROLE STORE CACHE NAME SEED SECONDS OUT``.
A writer does random operations on one repository for SECONDS and appends one JSON
line to OUT per successful commit, then a summary line. The collector runs gc in a
loop for as long. Any unexpected exception is written to OUT and ends the process
with status 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import tempfile
import time
import traceback

import vfs
from vfs.errors import Conflict, GcAborted, NothingToCommit, StoreChanged
from vfs.gc import collect

REPO = "data"
SHARED_BRANCHES = ("main", "shared")  # never deleted
# Outcomes an operation may have when other nodes and gc work at the same time.
EXPECTED = (Conflict, NothingToCommit, StoreChanged)


def content_pool(seed: int) -> list[bytes]:
    """Contents every writer draws from (the same for all: deduplication across nodes)."""
    rng = random.Random(seed)
    return [rng.randbytes(size) for size in (200, 900, 3000, 20_000, 40_000, 70_000,
                                             120_000, 150_000)]


class Writer:
    def __init__(self, store: vfs.Store, worker: str, seed: int, out) -> None:
        self.store = store
        self.worker = worker
        self.rng = random.Random(f"{seed}/{worker}")
        self.pool = content_pool(seed)
        self.out = out
        self.staged: dict[str, dict[str, str | None]] = {}  # branch -> path -> sha256|None
        self.temps: list[str] = []
        self.made = 0
        self.counts: dict[str, int] = {}
        self.src = tempfile.mkdtemp(prefix=f"soak-{worker}-")

    def write(self, line: dict) -> None:
        self.out.write(json.dumps(line) + "\n")
        self.out.flush()

    def branch(self) -> str:
        return self.rng.choice([*SHARED_BRANCHES, *self.temps])

    def data(self) -> bytes:
        roll = self.rng.random()
        if roll < 0.5:
            return self.rng.choice(self.pool)  # shared with other nodes and with garbage
        if roll < 0.75:  # shares chunks with the pool, new at the end
            return self.rng.choice(self.pool) + self.rng.randbytes(self.rng.randrange(1, 30_000))
        return self.rng.randbytes(self.rng.choice((100, 5000, 60_000)))

    def step(self) -> None:
        op = self.rng.choices(["put", "commit", "discard", "remove", "branch", "unbranch"],
                              [40, 25, 8, 7, 10, 10])[0]
        try:
            getattr(self, f"op_{op}")()
            outcome = op
        except EXPECTED as exc:
            outcome = f"{op}:{type(exc).__name__}"
        self.counts[outcome] = self.counts.get(outcome, 0) + 1

    def op_put(self) -> None:
        branch = self.branch()
        if self.rng.random() < 0.2:  # a file other writers change too
            path = f"common/f{self.rng.randrange(3)}"
            self.put_files(branch, "/common/", {path: self.data()})
            return
        # Several files in one put share packs: removing some later leaves packs
        # partly dead, which gc repacks.
        paths = {f"{self.worker}/f{k}" for k in self.rng.sample(range(6), self.rng.randrange(1, 4))}
        self.put_files(branch, f"/{self.worker}/", {p: self.data() for p in sorted(paths)})

    def put_files(self, branch: str, dest: str, files: dict[str, bytes]) -> None:
        src = tempfile.mkdtemp(dir=self.src)
        sources = []
        for path, data in files.items():
            sources.append(os.path.join(src, path.rsplit("/", 1)[1]))
            with open(sources[-1], "wb") as f:
                f.write(data)
        vfs.put(self.store, REPO, branch, dest, sources)
        # A file equal to what the branch shows already is not staged (as with git add):
        # only what the open commit holds now is this node's change.
        _, open_commit = self.store.open_commit(REPO, branch)
        for path, data in files.items():
            if path in open_commit.changes:
                self.staged.setdefault(branch, {})[path] = hashlib.sha256(data).hexdigest()

    def op_commit(self) -> None:
        branch = self.branch()
        changes = self.staged.get(branch, {})
        try:
            commit = self.store.commit(REPO, branch, f"{self.worker} {self.made}")
        except NothingToCommit:
            self.staged.pop(branch, None)  # the commit discarded what equals the head
            raise
        except Conflict:
            self.store.discard(REPO, branch)
            self.staged.pop(branch, None)
            raise
        self.made += 1
        self.staged.pop(branch, None)
        self.write({"commit": commit.id, "branch": branch, "parents": list(commit.parents),
                    "changes": changes})

    def op_discard(self) -> None:
        branch = self.branch()
        self.store.discard(REPO, branch)
        self.staged.pop(branch, None)

    def op_remove(self) -> None:
        branch = self.branch()
        _, open_commit = self.store.open_commit(REPO, branch)
        mine = [p for p, e in open_commit.walk(self.worker) if e.kind == "f"] \
            if open_commit.lookup(self.worker) else []
        if not mine:
            return
        path = self.rng.choice(sorted(mine))
        vfs.remove(self.store, REPO, branch, f"/{path}")
        self.staged.setdefault(branch, {})[path] = None

    def op_branch(self) -> None:
        name = f"{self.worker}-t{self.rng.randrange(10**9)}"  # never reused
        start = self.rng.choice([*SHARED_BRANCHES, *self.temps, None])
        head = self.store.head(REPO, start).commit if start else None
        spec = vfs.parse_ref(f"{REPO}@{head}") if head else None
        self.store.create_branch(REPO, name, spec)
        self.temps.append(name)
        self.write({"branch_created": name, "at": head})

    def op_unbranch(self) -> None:
        if not self.temps:
            return
        name = self.temps.pop(self.rng.randrange(len(self.temps)))
        self.store.delete_branch(REPO, name)
        self.staged.pop(name, None)
        self.write({"branch_deleted": name})


def run_writer(store: vfs.Store, worker: str, seed: int, seconds: float, out) -> None:
    writer = Writer(store, worker, seed, out)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        writer.step()
    writer.write({"summary": writer.counts, "commits": writer.made})


def run_collector(store: vfs.Store, seconds: float, out) -> None:
    runs, aborted, deleted, condemned, repacked = 0, 0, 0, 0, 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            report = collect(store, grace=0, reflog_retention=0, wait_acks=0.3)
        except GcAborted as exc:  # it read something another node changed meanwhile
            aborted += 1
            out.write(json.dumps({"aborted": str(exc)}) + "\n")
            continue
        runs += 1
        deleted += report.packs_deleted
        condemned += report.packs_condemned
        repacked += report.packs_repacked
    out.write(json.dumps({"summary": {"gc_runs": runs, "gc_aborted": aborted,
                                      "packs_condemned": condemned, "packs_deleted": deleted,
                                      "packs_repacked": repacked}}) + "\n")


def main(argv: list[str]) -> int:
    role, store_dir, cache, name, seed, seconds, out_path = argv
    os.environ["VFS_NODE_NAME"] = name
    with open(out_path, "a") as out, vfs.open_store(store_dir, cache_dir=cache) as store:
        try:
            if role == "gc":
                run_collector(store, float(seconds), out)
            else:
                run_writer(store, name, int(seed), float(seconds), out)
        except Exception:
            out.write(json.dumps({"error": traceback.format_exc()}) + "\n")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
