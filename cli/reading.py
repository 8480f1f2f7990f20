"""Reading commits and history: ``log``, ``ls``, ``cat``, ``get``, ``diff``, ``inspect``,
``reflog``."""

from __future__ import annotations

import json
import os
import sys

import click

import vfs
from cli import output
from cli.options import Options, json_option, need_path, pass_options, repo_only
from cli.output import emit_json, fields, human_size, note, repo_path, short, table
from vfs.errors import CommitNotFound, PathNotFound
from vfs.tree import permission_bits


@click.command()
@click.argument("target", metavar="REPO@REF[:/path]")
@click.option("-n", "--limit", type=click.IntRange(min=0), help="Show at most N commits.")
@json_option
@pass_options
def log(options: Options, target: str, limit: int | None, as_json: bool) -> None:
    """Commits, newest first (with a path: only those that changed it)."""
    spec = vfs.parse_ref(target)
    store = options.store()
    commits = list(store.log(spec, limit=limit, path=spec.path or None))
    if spec.path and not commits and limit != 0:
        # A deleted path still has a history; only a path no commit ever had is an error.
        if store.snapshot(spec)[1].lookup(spec.path) is None:
            raise PathNotFound(f"no commit of {spec.repo}@{spec.ref} changed "
                               f"{repo_path(spec.path)}: check the path with 'vfsctl ls'")
    if as_json:
        emit_json([output.commit_json(c) for c in commits])
        return
    table([(short(c.id), output.local_time(c.time), c.author, c.files, human_size(c.bytes),
            output.first_line(c.message)) for c in commits],
          ("COMMIT", "TIME", "AUTHOR", "FILES", "SIZE", "MESSAGE"))


@click.command()
@click.argument("target", metavar="REPO@REF[:/path]")
@click.option("-l", "long", is_flag=True, help="Long listing: type, mode, size, time.")
@click.option("-R", "recursive", is_flag=True, help="List subdirectories recursively.")
@json_option
@pass_options
def ls(options: Options, target: str, long: bool, recursive: bool, as_json: bool) -> None:
    """List the files of a commit or branch head."""
    spec = vfs.parse_ref(target)
    _, snapshot = options.store().snapshot(spec)
    entry = snapshot.lookup(spec.path)
    if entry is None:
        raise PathNotFound(f"no such file or directory in {spec.repo}@{spec.ref}: "
                           f"{repo_path(spec.path)}")
    if entry.kind != "d":
        items = [(spec.path, entry)]
    elif recursive:
        items = list(snapshot.walk(spec.path))
    else:
        items = [(f"{spec.path}/{n}" if spec.path else n, e)
                 for n, e in snapshot.listdir(spec.path).items()]
    if as_json:
        emit_json([output.entry_json(p, e) for p, e in items])
        return
    prefix = spec.path + "/" if spec.path else ""
    rows = []
    for path, item in items:
        name = path[len(prefix):] if entry.kind == "d" else item.name
        if item.kind == "d":
            name += "/"
        elif item.kind == "l":
            name += f" -> {item.ref}"
        if not long:
            click.echo(name)
            continue
        rows.append([item.kind if item.kind != "f" else "-", f"{permission_bits(item.mode):04o}",
                     human_size(item.size),
                     output.ns_time(item.mtime_ns) if item.mtime_ns else "-", name])
    if rows:
        width = max(len(r[2]) for r in rows)
        table([[*r[:2], r[2].rjust(width), *r[3:]] for r in rows])


@click.command()
@click.argument("target", metavar="REPO@REF:/path")
@pass_options
def cat(options: Options, target: str) -> None:
    """Write a file's bytes to stdout."""
    spec = vfs.parse_ref(target)
    need_path(target, spec, "cat")
    out = sys.stdout.buffer
    vfs.cat(options.store(), spec, out)
    out.flush()


@click.command()
@click.argument("source", metavar="REPO@REF[:/path]")
@click.argument("dest", type=click.Path())
@json_option
@pass_options
def get(options: Options, source: str, dest: str, as_json: bool) -> None:
    """Materialize files of a commit into a local directory (never overwrites)."""
    spec = vfs.parse_ref(source)
    store = options.store()
    total = None
    if sys.stderr.isatty():
        entry = store.snapshot(spec)[1].lookup(spec.path)
        total = entry.size if entry is not None else None
    with output.progress("writing", total) as advance:
        result = vfs.get(store, spec, dest, progress=advance)
    if as_json:
        emit_json({"dest": os.path.abspath(dest), "files": result.files, "bytes": result.bytes})
        return
    note(f"wrote {result.files} files ({human_size(result.bytes)}) to {dest}")


@click.command()
@click.argument("new", metavar="REPO@REF[:/path]")
@click.argument("old", metavar="[REPO@REF]", required=False)
@json_option
@pass_options
def diff(options: Options, new: str, old: str | None, as_json: bool) -> None:
    """Added (A), modified (M) and deleted (D) files: NEW against OLD, or its parent."""
    new_spec = vfs.parse_ref(new)
    old_spec = vfs.parse_ref(old) if old else None
    changes = options.store().diff(new_spec, old_spec)
    if as_json:
        emit_json([{"status": c.status, "path": repo_path(c.path),
                    "size": (c.new or c.old).size if (c.new or c.old) else 0,
                    "old_size": c.old.size if c.old else None} for c in changes])
        return
    for change in changes:
        click.echo(f"{change.status[0].upper()} {repo_path(change.path)}")


@click.command()
@click.argument("target", metavar="REPO@REF")
@json_option
@pass_options
def inspect(options: Options, target: str, as_json: bool) -> None:
    """Commit details: parents, tree hash, size, provenance."""
    spec = vfs.parse_ref(target, allow_path=False)
    found = options.store().resolve(spec)
    if found is None:
        raise CommitNotFound(f"{spec} has no commits yet")
    if as_json:
        emit_json(output.commit_json(found))
        return
    fields([
        ("commit", found.id),
        ("repo", found.repo),
        ("branch", found.branch),
        ("parents", ", ".join(found.parents) or "-"),
        ("tree", found.tree),
        ("author", found.author),
        ("time", f"{output.local_time(found.time)} ({found.time})"),
        ("message", found.message or "-"),
        ("files", found.files),
        ("bytes", f"{found.bytes} ({human_size(found.bytes)})"),
        ("provenance", _compact(found.provenance)),
        ("metadata", _compact(found.metadata)),
    ])


def _compact(value: dict) -> str:

    return json.dumps(value, sort_keys=True, ensure_ascii=False) if value else "-"


@click.command()
@click.argument("target", metavar="REPO[@BRANCH]")
@json_option
@pass_options
def reflog(options: Options, target: str, as_json: bool) -> None:
    """Every move of a branch (or of all branches of REPO): when, who, from, to, why."""
    if "@" in target.rstrip("@"):
        spec = vfs.parse_branch(target)
        repo_name, branch_name = spec.repo, spec.ref
    else:
        repo_name, branch_name = repo_only(target), None
    entries = options.store().reflog(repo_name, branch_name)
    if as_json:
        emit_json([output.reflog_json(e) for e in entries])
        return
    rows = [(output.local_time(e.when), e.who, short(e.old), short(e.new), e.why)
            for e in entries]
    headers = ("WHEN", "WHO", "FROM", "TO", "WHY")
    if branch_name is None:
        rows = [(*r[:1], e.branch, *r[1:]) for r, e in zip(rows, entries, strict=True)]
        headers = ("WHEN", "BRANCH", "WHO", "FROM", "TO", "WHY")
    table(rows, headers)
