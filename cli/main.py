"""``vfsctl``: the command line of vfs (see shared/CLI.md for the fixed interface).

This module holds the root group, error handling and the repository and branch
commands; the other commands live in :mod:`cli.changes`, :mod:`cli.reading`,
:mod:`cli.maintenance` and :mod:`cli.mounting`. Each command parses its
``REPO@REF[:/path]`` arguments with :func:`vfs.parse_ref` / :func:`vfs.parse_branch`,
calls the library (or, for a change while a vfsd owns the store, the daemon: see
:meth:`Options.daemon`), and prints either aligned text for a person or, with
``--json``, one JSON document for a script. Errors are handled in one place,
:meth:`VfsctlGroup.invoke`: a :class:`vfs.VfsError` becomes one line on stderr and
its exit code, never a traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import traceback

import click

import vfs
from cli import changes, maintenance, mounting, output, pipelines, reading
from cli.options import Options, json_option, pass_options, repo_only
from cli.output import emit_json, fields, note, short, table
from vfs.errors import VfsError

EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a process killed by SIGPIPE


# -- error handling --------------------------------------------------------------------


class VfsctlGroup(click.Group):
    """The root group: turns every failure of a command into one line and an exit code."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except VfsError as exc:
            note(f"vfsctl: error: {exc}")
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            note("vfsctl: interrupted")
            ctx.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:
            _silence_stdout()
            ctx.exit(EXIT_BROKEN_PIPE)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                _silence_stdout()
                ctx.exit(EXIT_BROKEN_PIPE)
            # A local file problem (permissions, disk full, ...) is the user's to fix.
            if _debug(ctx):
                traceback.print_exc()
            note(f"vfsctl: error: {exc.strerror or exc}"
                 + (f": {exc.filename}" if exc.filename else ""))
            ctx.exit(1)
        except Exception as exc:
            if _debug(ctx):
                traceback.print_exc()
                ctx.exit(1)
            note(f"vfsctl: internal error: {type(exc).__name__}: {exc} "
                 "(rerun with --debug for the traceback)")
            ctx.exit(1)
        return None


def _debug(ctx: click.Context) -> bool:
    return isinstance(ctx.obj, Options) and ctx.obj.debug


def _silence_stdout() -> None:
    """The reader went away (``vfsctl cat ... | head``): drop whatever is still buffered."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


# -- the group -------------------------------------------------------------------------


@click.group(cls=VfsctlGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--store", "store_url", envvar="VFS_STORE", metavar="URL",
              help="Store location: a directory, file:///path or s3://bucket/prefix "
                   "[env VFS_STORE; default ~/.local/share/vfs/store].")
@click.option("--cache", "cache_dir", envvar="VFS_CACHE", metavar="DIR",
              help="Node-local index and cache [env VFS_CACHE; default ~/.cache/vfs].")
@click.option("--s3-endpoint", envvar="VFS_S3_ENDPOINT", metavar="URL",
              help="Endpoint of an S3-compatible service [env VFS_S3_ENDPOINT].")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
@click.version_option(package_name="vfs", prog_name="vfsctl")
@click.pass_context
def cli(ctx: click.Context, store_url: str | None, cache_dir: str | None,
        s3_endpoint: str | None, debug: bool) -> None:
    """Versioned data: repositories, branches and immutable commits of plain files."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="vfsctl: %(levelname)s: %(message)s")
    ctx.obj = Options(store_url or None, cache_dir or None, s3_endpoint or None, debug)


@cli.command()
@pass_options
def init(options: Options) -> None:
    """Create the store (nothing happens if it exists)."""
    from vfs.errors import StoreNotFound

    try:
        store = options.store()
        existed = True
    except StoreNotFound:
        store = options.store(create=True)
        existed = False
    verb = "vfs store already exists at" if existed else "created vfs store at"
    click.echo(f"{verb} {store.objects.url}")
    note(f"store id {store.config.store_id}; local index in {store.cache_dir}")


# -- repositories ----------------------------------------------------------------------


@cli.group()
def repo() -> None:
    """Create, list, inspect and delete repositories."""


@repo.command("create")
@click.argument("name")
@click.option("--description", "-d", default="", help="What the repository holds.")
@pass_options
def repo_create(options: Options, name: str, description: str) -> None:
    """Create repository NAME with an empty main branch."""
    options.store().create_repo(name, description)
    note(f"created repository {name}")


@repo.command("list")
@json_option
@pass_options
def repo_list(options: Options, as_json: bool) -> None:
    """List the repositories."""
    repos = sorted(options.store().list_repos(), key=lambda r: r.name)
    if as_json:
        emit_json([{"name": r.name, "description": r.description, "created": r.created}
                   for r in repos])
        return
    table([(r.name, output.local_time(r.created), r.description) for r in repos],
          ("NAME", "CREATED", "DESCRIPTION"))


@repo.command("inspect")
@click.argument("name")
@json_option
@pass_options
def repo_inspect(options: Options, name: str, as_json: bool) -> None:
    """Show a repository and its branches."""
    store = options.store()
    info = store.repo(repo_only(name))
    branches = sorted(store.list_branches(info.name), key=lambda b: b.name)
    if as_json:
        emit_json({"name": info.name, "description": info.description,
                   "created": info.created,
                   "branches": [{"name": b.name, "head": b.head} for b in branches]})
        return
    fields([("name", info.name), ("description", info.description or "-"),
            ("created", output.local_time(info.created)),
            ("branches", ", ".join(f"{b.name} ({short(b.head)})" for b in branches) or "-")])


@repo.command("delete")
@click.argument("name")
@click.option("--force", is_flag=True, help="Delete even if the repository has commits.")
@pass_options
def repo_delete(options: Options, name: str, force: bool) -> None:
    """Delete a repository (its data is freed by the next gc)."""
    repo_name = repo_only(name)
    daemon = options.daemon()
    if daemon is not None:
        daemon.call("repo_delete", name=repo_name, force=force)
    else:
        options.store().delete_repo(repo_name, force=force)
    note(f"deleted repository {name}")


# -- branches --------------------------------------------------------------------------


@cli.group()
def branch() -> None:
    """Create, list and delete branches."""


@branch.command("create")
@click.argument("ref", metavar="REPO@BRANCH")
@click.option("--from", "start", metavar="REPO@REF", help="Start at this commit (default: empty).")
@pass_options
def branch_create(options: Options, ref: str, start: str | None) -> None:
    """Create a branch, empty or at the commit --from names."""
    spec = vfs.parse_branch(ref)
    start_spec = vfs.parse_ref(start, allow_path=False) if start else None
    daemon = options.daemon()
    if daemon is not None:
        head = daemon.call("branch_create", repo=spec.repo, branch=spec.ref,
                           **{"from": start})["head"]
    else:
        head = options.store().create_branch(spec.repo, spec.ref, start_spec).head
    note(f"created branch {spec.repo}@{spec.ref}"
         + (f" at {short(head)}" if head else " (empty)"))


@branch.command("list")
@click.argument("repo_name", metavar="REPO")
@json_option
@pass_options
def branch_list(options: Options, repo_name: str, as_json: bool) -> None:
    """List the branches of a repository and their heads."""
    store = options.store()
    branches = sorted(store.list_branches(repo_only(repo_name)), key=lambda b: b.name)
    if as_json:
        emit_json([{"repo": b.repo, "name": b.name, "head": b.head} for b in branches])
        return
    rows = []
    for b in branches:
        commit = store.read_commit(b.head) if b.head else None
        rows.append((b.name, short(b.head),
                     output.local_time(commit.time) if commit else "-",
                     output.first_line(commit.message) if commit else "(no commits)"))
    table(rows, ("BRANCH", "HEAD", "UPDATED", "MESSAGE"))


@branch.command("delete")
@click.argument("ref", metavar="REPO@BRANCH")
@pass_options
def branch_delete(options: Options, ref: str) -> None:
    """Delete a branch (its commits stay reachable through the reflog until gc)."""
    spec = vfs.parse_branch(ref)
    daemon = options.daemon()
    if daemon is not None:
        daemon.call("branch_delete", repo=spec.repo, branch=spec.ref)
    else:
        options.store().delete_branch(spec.repo, spec.ref)
    note(f"deleted branch {spec.repo}@{spec.ref}")


for _command in (changes.put, changes.rm, changes.status, changes.commit, changes.discard,
                 changes.rollback, reading.log, reading.ls, reading.cat, reading.get,
                 reading.diff, reading.inspect, reading.reflog, maintenance.gc, maintenance.nodes,
                 maintenance.fsck, maintenance.index, mounting.mount, mounting.unmount,
                 pipelines.pipeline, pipelines.job, pipelines.wait, pipelines.provenance):
    cli.add_command(_command)


def main() -> None:
    """Console entry point."""
    cli.main(prog_name="vfsctl")


if __name__ == "__main__":
    main()
