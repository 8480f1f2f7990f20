"""Changing a branch: ``put``, ``rm``, ``status``, ``commit``, ``discard``, ``rollback``.

While a vfsd owns the store on this node (:meth:`Options.daemon`), the commands that
change state send their request to it instead of calling the library, so the mount
shows every change at once; what they print is the same either way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile

import click

import vfs
from cli import output
from cli.mounting import node_status
from cli.options import Options, json_option, need_path, pass_options
from cli.output import emit_json, human_size, note, repo_path, short, table
from daemon.protocol import DaemonClient, ordered_commit
from vfs.errors import VfsError
from vfs.refs import current_user


def _source_bytes(sources: list[str]) -> int:
    """The bytes of the regular files under ``sources``: the length of put's progress bar."""
    total = 0
    for src in sources:
        if os.path.isfile(src):
            total += os.path.getsize(src)
        elif os.path.isdir(src):
            for directory, _, files in os.walk(src):
                for name in files:
                    path = os.path.join(directory, name)
                    if not os.path.islink(path):
                        try:
                            total += os.path.getsize(path)
                        except OSError:
                            pass
    return total


_PUT_COUNTS = ("files", "staged", "read", "cached", "unchanged", "deleted", "bytes_read",
               "bytes_stored")


@click.command()
@click.argument("target", metavar="REPO@BRANCH[:/dest]")
@click.argument("sources", metavar="SRC...", nargs=-1, required=True)
@click.option("-r", "--recursive", is_flag=True, help="Put directories and their contents.")
@click.option("--delete", is_flag=True,
              help="Also remove what is under dest but not in SRC (mirror one directory).")
@json_option
@pass_options
def put(options: Options, target: str, sources: tuple[str, ...], recursive: bool,
        delete: bool, as_json: bool) -> None:
    """Stage local files and directories into the branch's open commit.

    '-' as the only SRC reads the file's bytes from stdin into dest.
    """
    spec = vfs.parse_branch(target, allow_path=True)
    store = options.store()
    if "-" in sources and (len(sources) != 1 or delete):
        raise click.UsageError("'-' (stdin) must be the only SRC, without --delete")
    daemon = options.daemon()
    if "-" in sources:
        if daemon is not None:
            counts = _put_stdin_through(daemon, store, spec)
        else:
            counts = _counts(vfs.put_stream(store, spec.repo, spec.ref, spec.path,
                                            sys.stdin.buffer))
    else:
        # A trailing '/' on the destination means "into this directory", like cp.
        dest = spec.path + "/" if target.endswith("/") and spec.path else spec.path
        if daemon is not None:
            counts = _put_through(daemon, spec, dest, list(sources), recursive, delete)
        else:
            total = _source_bytes(list(sources)) if sys.stderr.isatty() else None
            with output.progress("reading", total) as advance:
                counts = _counts(vfs.put(store, spec.repo, spec.ref, dest, list(sources),
                                         recursive=recursive, delete=delete,
                                         progress=advance))
    if as_json:
        emit_json({"repo": spec.repo, "branch": spec.ref, "dest": repo_path(spec.path),
                   **{key: counts[key] for key in _PUT_COUNTS}})
        return
    deleted = f", {counts['deleted']} deleted" if counts["deleted"] else ""
    note(f"{counts['files']} files: {counts['staged']} staged, {counts['unchanged']} "
         f"unchanged{deleted} ({counts['read']} read, {counts['cached']} from the files "
         f"cache), {human_size(counts['bytes_stored'])} new data")
    skipped = counts.get("skipped") or []
    if skipped:
        more = f" and {len(skipped) - 1} more" if len(skipped) > 1 else ""
        note(f"skipped {skipped[0]}{more}: FIFOs, sockets and devices are not put")


def _counts(result: vfs.PutResult) -> dict:
    """A put's result as the plain dict the daemon answers with."""
    return {**{key: getattr(result, key) for key in _PUT_COUNTS}, "skipped": result.skipped}


def _put_through(daemon: DaemonClient, spec: vfs.RefSpec, dest: str, sources: list[str],
                 recursive: bool, delete: bool) -> dict:
    """Put through the daemon, which has its own working directory: it gets absolute paths.

    Its errors name those absolute paths; they are put back as the user wrote them,
    so the message is the one a put without the daemon prints.
    """
    absolute = {os.path.abspath(src): src for src in sources}
    try:
        return daemon.call("put", repo=spec.repo, branch=spec.ref, dest=dest,
                           sources=[os.path.abspath(src) for src in sources],
                           recursive=recursive, delete=delete)
    except VfsError as exc:
        message = str(exc)
        for path in sorted(absolute, key=len, reverse=True):
            if path != absolute[path]:
                message = message.replace(path, absolute[path])
        if message == str(exc):
            raise
        raise type(exc)(message) from None


def _put_stdin_through(daemon: DaemonClient, store: vfs.Store, spec: vfs.RefSpec) -> dict:
    """Put stdin through the daemon: it cannot read our stdin, so spool it to a file first.

    The spool lives in the store's cache directory, which the daemon reads too.
    """
    fd, spool = tempfile.mkstemp(dir=store.cache_dir, prefix="stdin-", suffix=".spool")
    try:
        with os.fdopen(fd, "wb") as f:
            shutil.copyfileobj(sys.stdin.buffer, f, 1 << 20)
        return daemon.call("put", repo=spec.repo, branch=spec.ref, dest=spec.path,
                           sources=[spool], recursive=False, delete=False, stdin=True)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(spool)


@click.command()
@click.argument("target", metavar="REPO@BRANCH:/path")
@click.option("-r", "--recursive", is_flag=True, help="Remove a directory and its contents.")
@pass_options
def rm(options: Options, target: str, recursive: bool) -> None:
    """Stage the deletion of a file or (with -r) a directory."""
    spec = vfs.parse_branch(target, allow_path=True)
    need_path(target, spec, "rm")
    daemon = options.daemon()
    if daemon is not None:
        count = daemon.call("rm", repo=spec.repo, branch=spec.ref, path=spec.path,
                            recursive=recursive)["files"]
    else:
        count = vfs.remove(options.store(), spec.repo, spec.ref, spec.path,
                           recursive=recursive)
    note(f"staged deletion of {repo_path(spec.path)} ({count} files)")


@click.command()
@click.argument("target", metavar="REPO@BRANCH")
@click.option("-m", "--message", default="", help="What this commit is about.")
@json_option
@pass_options
def commit(options: Options, target: str, message: str, as_json: bool) -> None:
    """Seal the open commit and move the branch to it; prints the new commit id."""
    spec = vfs.parse_branch(target)
    daemon = options.daemon()
    if daemon is not None:
        new = ordered_commit(daemon.call("commit", repo=spec.repo, branch=spec.ref,
                                         message=message, author=current_user()))
    else:
        new = output.commit_json(options.store().commit(spec.repo, spec.ref, message))
    if as_json:
        emit_json(new)
    else:
        click.echo(new["id"])


@click.command()
@click.argument("target", metavar="REPO@BRANCH")
@pass_options
def discard(options: Options, target: str) -> None:
    """Drop the open commit: every staged change is forgotten."""
    spec = vfs.parse_branch(target)
    daemon = options.daemon()
    if daemon is not None:
        count = daemon.call("discard", repo=spec.repo, branch=spec.ref)["changes"]
    else:
        count = options.store().discard(spec.repo, spec.ref)
    note(f"discarded {count} staged changes on {spec.repo}@{spec.ref}")


def _staged_changes(open_commit) -> list[tuple[str, str, vfs.Entry]]:
    """``(status, path, entry)`` for what the open commit changes relative to its head.

    Only staged paths are examined (not the whole tree); directories appear only
    when they are new and empty, deleted directories as the files they held.
    """
    head, staged = open_commit.head, open_commit.changes
    found: dict[str, tuple[str, vfs.Entry]] = {}

    def deleted_below(path: str) -> None:
        for sub, entry in head.walk(path):
            if entry.kind != "d" and open_commit.lookup(sub) is None:
                found[sub] = ("deleted", entry)

    for path in sorted(staged):
        new, old = staged[path], head.lookup(path)
        if new is None:
            if old is not None and old.kind == "d":
                deleted_below(path)
            elif old is not None:
                found[path] = ("deleted", old)
        elif new.kind == "d":
            if old is not None and old.kind == "d":
                if not new.ref:  # a fresh directory replaced the head's one
                    deleted_below(path)
                continue
            if old is not None:
                found[path] = ("deleted", old)
            prefix = path + "/" if path else ""
            if not any(p.startswith(prefix) and p != path for p in staged):
                found[path + "/"] = ("added", new)
        elif old is None:
            found[path] = ("added", new)
        elif old.kind == "d":
            deleted_below(path)
            found[path] = ("added", new)
        elif not new.same_content(old):
            found[path] = ("modified", new)
    return [(status, path, entry) for path, (status, entry) in sorted(found.items())]


@click.command()
@click.argument("target", metavar="[REPO@BRANCH]", required=False)
@json_option
@pass_options
def status(options: Options, target: str | None, as_json: bool) -> None:
    """Show what the open commit changes: added, modified and deleted paths.

    Without REPO@BRANCH: the state of this node's vfsd (mount, cache, open
    commits), or the node's open commits when no vfsd runs.
    """
    if target is None:
        node_status(options, as_json)
        return
    spec = vfs.parse_branch(target)
    daemon = options.daemon()
    if daemon is not None:  # files closed through the mount are staged in the background
        daemon.call("wait_staged", repo=spec.repo, branch=spec.ref)
    state, open_commit = options.store().open_commit(spec.repo, spec.ref)
    changes = _staged_changes(open_commit)
    if as_json:
        emit_json({"repo": spec.repo, "branch": spec.ref, "head": state.commit,
                   "changes": [{"status": s, "path": repo_path(p), "size": e.size,
                                "type": output.kind_name(e.kind)} for s, p, e in changes]})
        return
    if not changes:
        click.echo(f"nothing staged on {spec.repo}@{spec.ref} (head {short(state.commit)})")
        return
    table([(s, repo_path(p)) for s, p, _ in changes])


@click.command()
@click.argument("target", metavar="REPO@BRANCH")
@click.option("--to", "to", required=True, metavar="REF",
              help="The commit (REPO@REF, a commit id prefix or a branch) to return to.")
@click.option("-m", "--message", default="", help="Message of the rollback commit.")
@json_option
@pass_options
def rollback(options: Options, target: str, to: str, message: str, as_json: bool) -> None:
    """Make a new commit whose files equal REF's; history is kept."""
    spec = vfs.parse_branch(target)
    to_text = to if "@" in to else f"{spec.repo}@{to}"
    to_spec = vfs.parse_ref(to_text, allow_path=False)
    daemon = options.daemon()
    if daemon is not None:
        new = ordered_commit(daemon.call("rollback", repo=spec.repo, branch=spec.ref,
                                         to=to_text, message=message,
                                         author=current_user()))
    else:
        new = output.commit_json(options.store().rollback(spec.repo, spec.ref, to_spec,
                                                          message))
    if as_json:
        emit_json(new)
        return
    click.echo(new["id"])
    note(f"{spec.repo}@{spec.ref} now has the files of {to_spec}")
