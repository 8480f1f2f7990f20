"""A randomized soak: writer nodes in their own processes while gc collects in a loop.

Writers (``gc_soak_worker.py``) put files that share content across nodes and with
discarded data, commit, discard, remove files, and create and delete branches, each
with its own cache (its own node). A collector process runs gc with no grace period
and no reflog retention, so deleted branches and discarded puts are garbage at once.
Every commit that returned is recorded by its writer. At the end:

* every commit named by a ref or an ancestor of one was recorded, and its files read
  back byte-identical from a fresh node: a commit's files are its first parent's with
  its own staged changes applied (writers own their paths, or conflict);
* every recorded commit of a branch that still exists is an ancestor of its head;
* ``fsck --deep`` is clean on every node; then one more gc, and everything again.

The seed is printed; ``VFS_SOAK_SEED=N`` replays a run's choices (not its timing).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vfs
from vfs import fsck
from vfs.config import ChunkerParams, StoreConfig, create_config
from vfs.gc import collect
from vfs.objstore.local import LocalStore
from vfs.snapshot import Snapshot

WORKER = Path(__file__).with_name("gc_soak_worker.py")
REPO = "data"


def make_store(root: Path) -> str:
    store_dir = str(root / "store")
    objects = LocalStore(store_dir, create=True)
    # Small chunks and packs: many packs, multi-chunk files, partly dead packs.
    create_config(objects, StoreConfig(
        pack_target_size=96 * 1024,
        chunker=ChunkerParams(min_size=4096, avg_size=16384, max_size=65536)))
    with vfs.open_store(store_dir, cache_dir=str(root / "cache-setup")) as store:
        store.create_repo(REPO)
        store.create_branch(REPO, "shared")
    return store_dir


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def open_node(store_dir: str, cache: Path, name: str,
              monkeypatch: pytest.MonkeyPatch) -> vfs.Store:
    monkeypatch.setenv("VFS_NODE_NAME", name)
    return vfs.open_store(store_dir, cache_dir=str(cache))


def expected_files(commit_id: str, records: dict[str, dict],
                   memo: dict[str, dict[str, str]]) -> dict[str, str]:
    """path -> sha256 a recorded commit must hold: its first parent's plus its changes."""
    chain = []
    while commit_id not in memo:
        chain.append(commit_id)
        parents = records[commit_id]["parents"]
        if not parents:
            memo[""] = {}
            commit_id = ""
            break
        if parents[0] not in records:
            raise AssertionError(f"commit {parents[0]} is in the history but no writer made it")
        commit_id = parents[0]
    files = memo.get(commit_id, {})
    for child in reversed(chain):
        files = dict(files)
        for path, digest in records[child]["changes"].items():
            if digest is None:
                files.pop(path, None)
            else:
                files[path] = digest
        memo[child] = files
    return memo[chain[0]] if chain else files


def check_store(store: vfs.Store, records: dict[str, dict], created: set[str],
                deleted: set[str]) -> dict[str, int]:
    """Read every commit reachable from a ref and compare it with the records."""
    heads = {b.name: b.head for b in store.list_branches(REPO)}
    memo: dict[str, dict[str, str]] = {}
    read_refs: dict[str, str] = {}  # file ref -> sha256 of its bytes (read once)
    checked: set[str] = set()
    for branch, head in heads.items():
        ancestors: set[str] = set()
        stack = [head] if head else []
        while stack:
            commit_id = stack.pop()
            if commit_id in ancestors:
                continue
            ancestors.add(commit_id)
            assert commit_id in records, f"{branch}: commit {commit_id} was not made by a writer"
            commit = store.read_commit(commit_id)
            stack.extend(commit.parents)
            if commit_id in checked:
                continue
            actual = {}
            for path, entry in Snapshot(store.blobs, commit.tree).walk():
                if entry.kind != "f":
                    continue
                if entry.ref not in read_refs:
                    data = vfs.read_file(store, vfs.parse_ref(f"{REPO}@{commit_id}:/{path}"))
                    read_refs[entry.ref] = hashlib.sha256(data).hexdigest()
                actual[path] = read_refs[entry.ref]
            assert actual == expected_files(commit_id, records, memo), \
                f"{branch}: commit {commit_id} does not hold what was committed"
            checked.add(commit_id)
        # A branch that was never deleted keeps every commit made on it.
        if branch in ("main", "shared") or (branch in created and branch not in deleted):
            lost = [c for c, r in records.items() if r["branch"] == branch and c not in ancestors]
            assert not lost, f"{branch}: commits {lost} returned but are not in its history"
    return {"commits_checked": len(checked), "files_read": len(read_refs)}


def soak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, writers: int,
         seconds: float) -> dict:
    seed = int(os.environ.get("VFS_SOAK_SEED", "1"))
    print(f"\ngc soak: seed {seed} (replay with VFS_SOAK_SEED={seed}), {writers} writers, "
          f"{seconds} s")
    store_dir = make_store(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    names = [f"w{i}" for i in range(writers)] + ["gc"]
    procs = {}
    for name in names:
        role = "gc" if name == "gc" else "writer"
        procs[name] = subprocess.Popen(
            [sys.executable, str(WORKER), role, store_dir, str(tmp_path / f"cache-{name}"), name,
             str(seed), str(seconds), str(tmp_path / f"{name}.jsonl")], env=env)
    codes = {name: proc.wait(timeout=seconds + 240) for name, proc in procs.items()}
    lines = {name: read_lines(tmp_path / f"{name}.jsonl") for name in names}
    errors = [f"{name}: {line['error']}" for name, out in lines.items() for line in out
              if "error" in line]
    assert not errors, "\n".join(errors)
    assert codes == dict.fromkeys(names, 0), codes

    records = {line["commit"]: line for name in names for line in lines[name] if "commit" in line}
    created = {line["branch_created"] for out in lines.values() for line in out
               if "branch_created" in line}
    deleted = {line["branch_deleted"] for out in lines.values() for line in out
               if "branch_deleted" in line}
    summaries = {name: next(line for line in out if "summary" in line)
                 for name, out in lines.items()}
    stats = {
        "seed": seed,
        "operations": sum(sum(s["summary"].values()) for n, s in summaries.items() if n != "gc"),
        "commits": len(records),
        "branches_created": len(created),
        "branches_deleted": len(deleted),
        **summaries["gc"]["summary"],
        "outcomes": {},
    }
    for name, summary in summaries.items():
        if name != "gc":
            for outcome, count in summary["summary"].items():
                stats["outcomes"][outcome] = stats["outcomes"].get(outcome, 0) + count

    nodes = [open_node(store_dir, tmp_path / f"cache-{name}", name, monkeypatch)
             for name in names]
    try:
        for round_ in ("after the soak", "after one more gc"):
            with open_node(store_dir, tmp_path / f"cache-check-{len(round_)}", "checker",
                           monkeypatch) as fresh:
                stats[round_] = check_store(fresh, records, created, deleted)
                for store in (*nodes, fresh):
                    report = fsck.check(store, deep=True)
                    assert report.ok, (round_, store.node.name, report.problems)
            if round_ == "after the soak":
                final = collect(nodes[-1], grace=0, reflog_retention=0)
                stats["final_gc_packs_deleted"] = final.packs_deleted
    finally:
        for store in nodes:
            store.close()
    print(f"gc soak: {json.dumps(stats)}")
    assert stats["commits"] > 0 and stats["gc_runs"] > 0  # the soak did something
    return stats


def test_gc_soak_short(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                       record_property) -> None:
    stats = soak(tmp_path, monkeypatch, writers=2, seconds=15)
    record_property("gc_soak", json.dumps(stats))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_gc_soak_long(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      record_property) -> None:
    stats = soak(tmp_path, monkeypatch, writers=3, seconds=300)
    record_property("gc_soak", json.dumps(stats))
