"""Walking everything a set of commits and open commits keeps alive (for gc and fsck)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from vfs.errors import Corruption, VfsError
from vfs.refs import parse_time, read_ref, read_reflog
from vfs.snapshot import Snapshot, file_chunks
from vfs.staging import decode_change
from vfs.tree import DIR, FILE, Entry, parse_file_ref


@dataclass
class Reachable:
    """Live commits and blobs, and what could not be read while walking."""

    commits: set[str] = field(default_factory=set)
    blobs: set[bytes] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)


def root_commits(store, *, reflog_since: float | None,
                 reflog_roots: set[str] | None = None) -> tuple[set[str], list[str]]:
    """Commit ids named by refs and (when given) by reflog entries newer than the time.

    The ones named only by the reflog are also added to ``reflog_roots`` when given
    (a gc run with a shorter retention may have collected them: not a problem).
    """
    roots: set[str] = set()
    problems: list[str] = []
    for repo_info in store.objects.list("refs/"):
        _, repo, branch = repo_info.key.split("/", 2)
        try:
            commit = read_ref(store.objects, repo, branch).commit
        except VfsError as exc:
            problems.append(f"ref {repo}@{branch}: {exc}")
            continue
        if commit:
            roots.add(commit)
    if reflog_since is not None:
        repos = {info.key.split("/")[1] for info in store.objects.list("reflog/")}
        for repo in repos:
            for entry in read_reflog(store.objects, repo):
                if parse_time(entry.when) >= reflog_since:
                    named = {c for c in (entry.old, entry.new) if c}
                    if reflog_roots is not None:
                        reflog_roots.update(named - roots)
                    roots.update(named)
    return roots, problems


def mark(store, commit_ids: Iterable[str], *, include_staging: bool = True,
         progress: Callable[[int], None] | None = None,
         missing_commits_are_problems: bool = True,
         extra_entries: Iterable[tuple[Entry, str]] = ()) -> Reachable:
    """Mark every commit reachable from ``commit_ids`` (all ancestors), their trees,
    manifests and chunks, plus everything the node's open commits, the pipelines'
    datum records and ``extra_entries`` ((entry, where) pairs: other nodes' pins)
    reference. What cannot be read is listed in ``problems``."""
    live = Reachable()
    stack = list(commit_ids)
    trees: list[str] = []
    while stack:
        commit_id = stack.pop()
        if commit_id in live.commits:
            continue
        try:
            commit = store.read_commit(commit_id)
        except VfsError as exc:
            if missing_commits_are_problems:
                live.problems.append(f"commit {commit_id}: {exc}")
            continue
        live.commits.add(commit_id)
        stack.extend(commit.parents)
        trees.append(commit.tree)
        if progress:
            progress(1)
    if include_staging:
        for repo, branch in store.index.open_commits():
            for path, value in store.index.staged(repo, branch).items():
                entry = decode_change(value)
                if entry is not None:
                    _mark_entry(store, live, entry, trees, f"open commit {repo}@{branch}:/{path}")
    for entry, where in extra_entries:
        _mark_entry(store, live, entry, trees, where)
    # Recorded datum outputs are reused by later jobs (a rollback of the input):
    # their blobs live as long as the records, even if no commit names them.
    from vfs.pipeline.records import all_datum_entries

    try:
        for path, entry, key in all_datum_entries(store.objects):
            _mark_entry(store, live, entry, trees, f"{key}:/{path}")
    except (VfsError, ValueError, KeyError, TypeError) as exc:
        live.problems.append(f"datum records: {exc!r}")
    snapshot = Snapshot(store.blobs, None)
    while trees:
        tree_hex = trees.pop()
        digest = bytes.fromhex(tree_hex)
        if digest in live.blobs:
            continue
        live.blobs.add(digest)
        try:
            entries = snapshot.tree(tree_hex)
        except Corruption as exc:
            live.problems.append(f"tree {tree_hex}: {exc}")
            continue
        for entry in entries.values():
            _mark_entry(store, live, entry, trees, f"tree {tree_hex}/{entry.name}")
    return live


def _mark_entry(store, live: Reachable, entry: Entry, trees: list[str], where: str) -> None:
    if entry.kind == DIR:
        if entry.ref:
            trees.append(entry.ref)
        return
    if entry.kind != FILE:
        return
    try:
        tag, payload = parse_file_ref(entry.ref)
        if tag == "i" or payload in live.blobs:
            return
        live.blobs.add(payload)
        if tag == "m":
            live.blobs.update(digest for digest, _ in file_chunks(store.blobs, entry))
    except Corruption as exc:
        live.problems.append(f"{where}: {exc}")
