"""Looking after the store: ``gc``, ``fsck`` and ``index rebuild``.

The work is done by :mod:`vfs.gc` and :mod:`vfs.fsck`, imported when a command runs
so that everyday commands do not pay for them.
"""

from __future__ import annotations

import click

from cli import output
from cli.options import Duration, Options, json_option, pass_options
from cli.output import emit_json, human_size, note, table


@click.command()
@click.option("--dry-run", is_flag=True, help="Report what would be removed; change nothing.")
@click.option("--grace", type=Duration(), default="1h", show_default=True,
              help="Keep unreferenced data younger than this (writers may still need it).")
@click.option("--reflog-retention", type=Duration(), default="30d", show_default=True,
              help="Reflog entries younger than this keep their commits alive.")
@click.option("--ignore-node", "ignore_nodes", multiple=True, metavar="NAME",
              help="Do not wait for this node (name or id); its published pins still count.")
@click.option("--node-expiry", type=Duration(), default="1d", show_default=True,
              help="A node silent for this long is taken as gone and not waited for.")
@click.option("--wait", "wait_acks", type=Duration(), default="0s", show_default=True,
              help="How long to wait for active nodes to acknowledge what gc condemns.")
@click.option("--delete-delay", type=Duration(), default="0s", show_default=True,
              help="Keep condemned data at least this long before deleting it.")
@json_option
@pass_options
def gc(options: Options, dry_run: bool, grace: float, reflog_retention: float,
       ignore_nodes: tuple[str, ...], node_expiry: float, wait_acks: float,
       delete_delay: float, as_json: bool) -> None:
    """Remove data no branch, reflog entry, open commit or node needs any more, and
    the claims of jobs that finished longer than the grace period ago.

    Deletion has two phases: gc condemns what is dead, and deletes it once every
    active node has acknowledged the condemnation (at once when no other node is
    active; else in this run with --wait, or in a later run).
    """
    from vfs.gc import collect

    with output.progress("examining packs", unit="packs") as advance:
        report = collect(options.store(), grace=grace, reflog_retention=reflog_retention,
                         dry_run=dry_run, progress=advance, ignore_nodes=ignore_nodes,
                         node_expiry=node_expiry, wait_acks=wait_acks,
                         delete_delay=delete_delay)
    if as_json:
        emit_json(report.as_dict())
        return
    for line in report.notes:
        note(f"note: {line}")
    if report.dry_run:
        click.echo(f"{report.packs_condemned} packs would be condemned "
                   f"({report.packs_repacked} after repacking), {report.commits_condemned} "
                   f"commits would be condemned, {human_size(report.bytes_freed)} would be freed; "
                   f"{report.claims_deleted} claim objects of finished jobs would be deleted")
        note("dry run: nothing was changed")
        return
    click.echo(f"{report.packs_deleted} packs deleted, {report.packs_repacked} repacked, "
               f"{report.commits_deleted} commits deleted, {report.packs_pardoned} pardoned, "
               f"{human_size(report.bytes_freed)} freed; {report.claims_deleted} claim objects "
               "of finished jobs deleted")
    if report.waiting_for:
        note(f"condemned data waits for node {', '.join(report.waiting_for)} to acknowledge; "
             "a later gc deletes it")


@click.command()
@click.option("--expiry", type=Duration(), default="1d", show_default=True,
              help="A node silent for this long shows as expired (as gc's --node-expiry).")
@json_option
@pass_options
def nodes(options: Options, expiry: float, as_json: bool) -> None:
    """The nodes using the store: name, id, last heartbeat, alive, running datums.

    Every vfsd is a node: its record in the store is its heartbeat, refreshed every
    third of its --node-ttl; a node silent for longer is not alive. Ages are in the
    store's time. Command-line processes working on the store directly show as
    nodes too (idle once they finished). STATUS is what gc makes of a node.
    """
    from vfs.nodes import describe_nodes

    store = options.store()
    found = describe_nodes(store.objects, store.node.id, expiry=expiry)
    if as_json:
        emit_json(found)
        return
    if not found:
        note("no node has written to this store yet")
        return
    table([[n["name"], n["id"][:12], "yes" if n["alive"] else "no",
            n["running"] if n["vfsd"] else "-", f"{n['seen_seconds_ago']:.0f}s ago",
            n["status"], n["gc_seen"]] for n in found],
          headers=["NAME", "ID", "ALIVE", "RUNNING", "LAST SEEN", "STATUS", "GC SEEN"])


@click.command()
@click.option("--deep", is_flag=True, help="Also read every blob and verify its hash.")
@json_option
@pass_options
def fsck(options: Options, deep: bool, as_json: bool) -> None:
    """Verify the store: reachability, and with --deep every blob's hash."""
    from vfs.fsck import check

    with output.progress("checking") as advance:
        report = check(options.store(), deep=deep, progress=advance)
    if as_json:
        emit_json(report.as_dict())
    else:
        for line in getattr(report, "notes", []):
            note(f"note: {line}")
        for problem in report.problems:
            click.echo(f"problem: {problem}")
        click.echo(f"checked {report.packs} packs, {report.blobs} blobs, {report.commits} "
                   f"commits: " + ("no problems" if report.ok
                                   else f"{len(report.problems)} problems"))
    if not report.ok:
        if not as_json:
            note(f"vfsctl: error: fsck found {len(report.problems)} problems; "
                 "see above ('vfsctl index rebuild' repairs a damaged local index)")
        click.get_current_context().exit(1)


@click.group()
def index() -> None:
    """The node-local index."""


@index.command("rebuild")
@json_option
@pass_options
def index_rebuild(options: Options, as_json: bool) -> None:
    """Rebuild the local index from the object store."""
    from vfs.fsck import rebuild_index

    with output.progress("reading packs", unit="packs") as advance:
        report = rebuild_index(options.store(), progress=advance)
    if as_json:
        emit_json(report.as_dict())
        return
    click.echo(f"rebuilt the index: {report.packs} packs, {report.blobs} blobs, "
               f"{report.commits} commits")
    for skipped in getattr(report, "skipped", []):
        note(f"skipped: {skipped}")
