"""gc under an object-store fault at every call it makes, one position at a time.

A store with two nodes and a bit of everything gc handles (commits on two branches,
a deleted branch whose packs are dead or mostly dead, a discarded put, another
node's open commit deduplicated onto that garbage) is built once. A clean gc run
is counted; then, for every call position N of that run, a fresh copy of the store
gets a gc whose N-th object-store call fails (before the store did the work, or
after it: the answer was lost). gc must then finish or raise a VfsError, never lose
committed or staged data, leave every node's fsck clean, and let the next gc finish.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import vfs
from vfs import fsck
from vfs.config import ChunkerParams, StoreConfig, create_config, load_config
from vfs.errors import StoreUnavailable, VfsError
from vfs.gc import collect
from vfs.nodes import ACTIVE
from vfs.objstore.local import LocalStore
from vfs.objstore.wrappers import FaultyStore

REPO = "data"
# Small chunks and packs: a few hundred KiB make several packs and multi-chunk files.
SMALL = ChunkerParams(min_size=4096, avg_size=16384, max_size=65536)
GC = {"grace": 0, "reflog_retention": 0, "wait_acks": 0}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Template:
    """A built store directory (``store``, ``cache-a``, ``cache-b``) and what it holds."""

    root: Path
    committed: dict[str, dict[str, str]]  # branch -> path -> sha256 of its bytes
    staged_on_b: dict[str, str]  # node b's open commit on main


def open_node(root: Path, name: str, monkeypatch: pytest.MonkeyPatch, *,
              objects=None) -> vfs.Store:
    monkeypatch.setenv("VFS_NODE_NAME", name)
    objects = objects or LocalStore(str(root / "store"))
    return vfs.Store(objects, load_config(objects), str(root / f"cache-{name}"))


def put(store: vfs.Store, root: Path, branch: str, files: dict[str, bytes]) -> None:
    src = root / "src" / f"{random.random()}"
    src.mkdir(parents=True)
    for i, (dest, data) in enumerate(files.items()):
        (src / str(i)).write_bytes(data)
        vfs.put(store, REPO, branch, dest, [str(src / str(i))])


def build(root: Path, monkeypatch: pytest.MonkeyPatch, *, pending: bool) -> Template:
    rng = random.Random(11)
    data = {name: rng.randbytes(size) for name, size in (
        ("keep", 150_000), ("side", 90_000), ("small", 40_000), ("big", 400_000),
        ("garbage", 120_000), ("fresh", 60_000), ("tiny", 300))}
    objects = LocalStore(str(root / "store"), create=True)
    create_config(objects, StoreConfig(pack_target_size=1 << 20, chunker=SMALL))
    a = open_node(root, "a", monkeypatch, objects=objects)
    a.create_repo(REPO)
    put(a, root, "main", {"/keep": data["keep"], "/tiny": data["tiny"]})
    a.commit(REPO, "main", "keep")
    a.create_branch(REPO, "side", vfs.parse_ref(f"{REPO}@main"))
    put(a, root, "side", {"/dir/side": data["side"]})
    a.commit(REPO, "side", "side")
    # One put of small + big on a branch that then goes: its pack is mostly dead once
    # main deduplicates small onto it (repacked), the tree packs wholly dead.
    a.create_branch(REPO, "tmp")
    src = root / "src" / "both"
    src.mkdir(parents=True)
    (src / "small").write_bytes(data["small"])
    (src / "big").write_bytes(data["big"])
    vfs.put(a, REPO, "tmp", "/", [str(src / "small"), str(src / "big")])
    a.commit(REPO, "tmp", "both")
    put(a, root, "main", {"/small": data["small"]})
    a.commit(REPO, "main", "small")
    a.delete_branch(REPO, "tmp")
    put(a, root, "main", {"/garbage": data["garbage"]})
    a.discard(REPO, "main")  # a pack no ref names
    b = open_node(root, "b", monkeypatch)
    # Node b's open commit: deduplicated onto the discarded garbage, plus new bytes.
    put(b, root, "main", {"/staged/again": data["garbage"], "/staged/fresh": data["fresh"]})
    time.sleep(0.05)  # the store's clock (file times) is coarser than the reflog's
    if pending:
        # A gc that condemned while node b was active: the run under test carries out
        # an older condemnation (phase 2 first), then condemns what it repacked.
        b.presence.publish(ACTIVE)
        report = collect(a, **GC)
        assert report.packs_condemned >= 2 and report.packs_deleted == 0, report
        b.settle()
    a.close()
    b.close()
    committed = {
        "main": {"keep": sha(data["keep"]), "tiny": sha(data["tiny"]),
                 "small": sha(data["small"])},
        "side": {"keep": sha(data["keep"]), "tiny": sha(data["tiny"]),
                 "dir/side": sha(data["side"])},
    }
    staged = {"staged/again": sha(data["garbage"]), "staged/fresh": sha(data["fresh"])}
    return Template(root, committed, staged)


@pytest.fixture(scope="module", params=["fresh", "pending"])
def template(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Template]:
    """``fresh``: nothing condemned yet; ``pending``: a condemnation awaits phase 2."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("VFS_USER", "tester@test")
        yield build(tmp_path_factory.mktemp("gc-faults") / "template", monkeypatch,
                    pending=request.param == "pending")


def files_of(store: vfs.Store, branch: str) -> dict[str, str]:
    """path -> sha256 of every file of a branch, each read (and verified) whole."""
    _, snapshot = store.snapshot(vfs.parse_ref(f"{REPO}@{branch}"))
    return {path: sha(vfs.read_file(store, vfs.parse_ref(f"{REPO}@{branch}:/{path}")))
            for path, entry in snapshot.walk() if entry.kind == "f"}


def check_all(root: Path, expected: dict[str, dict[str, str]], node: str,
              monkeypatch: pytest.MonkeyPatch, *others: vfs.Store) -> None:
    with open_node(root, node, monkeypatch) as fresh:
        for branch, files in expected.items():
            assert files_of(fresh, branch) == files, branch
        for store in (*others, fresh):
            report = fsck.check(store, deep=True)
            assert report.ok, (store.node.name, report.problems)


def clean_calls(template: Template, root: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    shutil.copytree(template.root, root)
    faulty = FaultyStore(LocalStore(str(root / "store")))
    with open_node(root, "a", monkeypatch, objects=faulty) as a:
        faulty.reset()
        report = collect(a, **GC)
        calls = faulty.total()
    # The run must have something to do, or the positions test little.
    assert report.packs_deleted >= 2, report
    return calls


def run_with_fault(template: Template, root: Path, position: int, after: bool,
                   monkeypatch: pytest.MonkeyPatch) -> str:
    """One trial; returns how the faulty gc ended (for the report)."""
    shutil.copytree(template.root, root)
    faulty = FaultyStore(LocalStore(str(root / "store")))
    a = open_node(root, "a", monkeypatch, objects=faulty)
    try:
        faulty.fail_once(position, lambda: StoreUnavailable("injected"), ops=None, after=after)
        try:
            collect(a, **GC)
            outcome = "completed"
        except VfsError as exc:
            outcome = type(exc).__name__
        faulty.clear()
        expected = {branch: dict(files) for branch, files in template.committed.items()}
        with open_node(root, "b", monkeypatch) as b:
            b.commit(REPO, "main", "staged on b")
            expected["main"].update(template.staged_on_b)
            check_all(root, expected, "c", monkeypatch, a, b)
            collect(a, **GC)  # the next run finishes
            check_all(root, expected, "d", monkeypatch, a, b)
            collect(a, **GC)
            check_all(root, expected, "e", monkeypatch, a, b)
    finally:
        a.close()
    return outcome


@pytest.mark.parametrize("after", [False, True], ids=["call-fails", "answer-lost"])
def test_gc_survives_a_fault_at_every_call(template: Template, tmp_path: Path, after: bool,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    count = clean_calls(template, tmp_path / "clean", monkeypatch)
    outcomes: dict[str, int] = {}
    failures = []
    for position in range(1, count + 1):
        try:
            outcome = run_with_fault(template, tmp_path / f"n{position}", position, after,
                                     monkeypatch)
        except Exception as exc:  # noqa: BLE001 - every position is reported together
            failures.append(f"call {position}: {type(exc).__name__}: {exc}")
            continue
        finally:
            shutil.rmtree(tmp_path / f"n{position}", ignore_errors=True)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    print(f"gc made {count} calls; {count} positions tried (after={after}): {outcomes}")
    assert not failures, "\n".join(failures)
    assert outcomes.get("completed", 0) < count  # the faults did reach gc
