"""The daemon from the command line: ``mount``, ``unmount``, and ``status`` of the node.

``vfsctl mount`` starts ``vfsd`` (detached, logging to ``<store cache dir>/vfsd.log``,
or in the foreground with ``--foreground``) and returns once the daemon answers on
its control socket and the mount point is mounted. ``vfsctl unmount`` asks the
daemon to stop; a mount left behind by a dead daemon is unmounted lazily with
``fusermount3``.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import click

from cli.options import Options, pass_options
from cli.output import emit_json, fields, human_size, note, table
from daemon.protocol import DaemonClient, DaemonUnavailable, find_daemon, pid_alive
from vfs.errors import VfsError

DEFAULT_MOUNTPOINT = "/pfs"
LOG_NAME = "vfsd.log"
FUSE_TYPE = "fuse.vfs"  # vfsd mounts with subtype=vfs
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 30.0
_POLL = 0.1
_LOG_TAIL_LINES = 15


def vfsd_command() -> list[str]:
    """How to run ``vfsd``: the console script next to this Python, else the module."""
    script = Path(sys.executable).with_name("vfsd")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "daemon.main"]


# -- mount -----------------------------------------------------------------------------


@click.command()
@click.argument("mountpoint", metavar="[MOUNTPOINT]", default=DEFAULT_MOUNTPOINT,
                required=False)
@click.option("--foreground", is_flag=True,
              help="Run vfsd in this terminal (logs on stderr) instead of detached.")
@click.option("--chunk-cache-size", metavar="SIZE",
              help="On-disk chunk cache limit, e.g. 512M or 2G (vfsd's default otherwise).")
@click.option("--socket", "socket_path", metavar="PATH",
              help="Control socket (default /run/vfs/vfsd.sock for root, else in the "
                   "cache directory).")
@click.option("--allow-process-runtime", is_flag=True,
              help="Let pipelines use the unsandboxed 'process' runtime although vfsd "
                   "runs as root (development machines only).")
@click.option("--datum-timeout", metavar="DURATION",
              help="How long a datum may run when its pipeline's spec sets no "
                   "datum_timeout, e.g. 30m or 2h (vfsd's default: 1h; 0: no limit).")
@pass_options
def mount(options: Options, mountpoint: str, foreground: bool,
          chunk_cache_size: str | None, socket_path: str | None,
          allow_process_runtime: bool, datum_timeout: str | None) -> None:
    """Start vfsd mounting the store at MOUNTPOINT (default /pfs)."""
    mountpoint = os.path.abspath(mountpoint)
    store = options.store()
    daemon = options.daemon()
    if daemon is not None:
        raise VfsError(f"vfsd (pid {daemon.pid}) already mounts this store at {daemon.mount}:"
                       f" unmount it first with 'vfsctl unmount {daemon.mount}'")
    mounted = mount_type(mountpoint)
    if mounted is not None and not is_stale(mountpoint):
        raise VfsError(f"{mountpoint} is already a mount point ({mounted}): unmount it first "
                       "or choose another directory")
    if mounted is None:
        os.makedirs(mountpoint, exist_ok=True)  # (vfsd clears a stale mount itself)
    command = [*vfsd_command(), "--store", store.objects.url,
               "--cache", os.path.dirname(store.cache_dir), "--mount", mountpoint]
    if options.s3_endpoint:
        command += ["--s3-endpoint", options.s3_endpoint]
    if chunk_cache_size:
        command += ["--chunk-cache-size", chunk_cache_size]
    if socket_path:
        command += ["--socket", os.path.abspath(socket_path)]
    if allow_process_runtime:
        command.append("--allow-process-runtime")
    if datum_timeout:
        command += ["--datum-timeout", datum_timeout]
    if options.debug:
        command.append("--debug")
    if foreground:
        store.close()  # vfsd opens it again; nothing of this process survives the exec
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(command[0], command)
    _start_detached(command, store.cache_dir, store.config.store_id, store.objects.url,
                    mountpoint)


def _start_detached(command: list[str], cache_dir: str, store_id: str, store_url: str,
                    mountpoint: str) -> None:
    log_path = os.path.join(cache_dir, LOG_NAME)
    with open(log_path, "ab") as log:
        start_of_log = log.tell()
        # A session of its own: the daemon outlives this command and the terminal's
        # Ctrl-C; cwd / so it keeps no directory busy.
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True, cwd="/")
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        status = process.poll()
        if status is not None:
            raise VfsError(f"vfsd exited with status {status} before mounting {mountpoint}; "
                           f"the end of {log_path}:\n{_log_tail(log_path, start_of_log)}")
        try:
            daemon = find_daemon(cache_dir, store_id)
        except DaemonUnavailable:
            daemon = None  # still starting
        if daemon is not None and daemon.mount == mountpoint and os.path.ismount(mountpoint):
            note(f"mounted {store_url} at {mountpoint} (vfsd pid {daemon.pid}, log {log_path})")
            return
        time.sleep(_POLL)
    raise VfsError(f"vfsd (pid {process.pid}) has not mounted {mountpoint} after "
                   f"{_START_TIMEOUT:g} s and is still running: see {log_path}, and stop it "
                   f"with 'kill {process.pid}' if it is stuck")


def _log_tail(path: str, start: int) -> str:
    """The last lines this run of vfsd wrote to its log, indented."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError as exc:
        return f"  (cannot read it: {exc.strerror})"
    shown = [line for line in lines if line.strip()][-_LOG_TAIL_LINES:]
    return "\n".join(f"  {line}" for line in shown) or "  (empty)"


# -- unmount ---------------------------------------------------------------------------


@click.command()
@click.argument("mountpoint", metavar="[MOUNTPOINT]", default=DEFAULT_MOUNTPOINT,
                required=False)
@pass_options
def unmount(options: Options, mountpoint: str) -> None:
    """Stop the vfsd mounting MOUNTPOINT (default /pfs) and unmount it."""
    mountpoint = os.path.abspath(mountpoint)
    daemon = options.daemon()
    if daemon is not None and daemon.mount == mountpoint:
        _stop_daemon(daemon, mountpoint)
        return
    mounted = mount_type(mountpoint)
    if mounted is None:
        elsewhere = (f": this store's vfsd (pid {daemon.pid}) mounts {daemon.mount}"
                     if daemon is not None else "")
        raise VfsError(f"nothing is mounted at {mountpoint}{elsewhere}")
    stale = is_stale(mountpoint)
    if not stale and mounted != FUSE_TYPE:
        raise VfsError(f"{mountpoint} is a {mounted} mount, not a vfs one: unmount it with "
                       "the tool that mounted it")
    # No daemon of this store serves it: a dead daemon's mount, or a vfsd of another
    # store (or cache dir). A lazy unmount detaches it even while files are open.
    done = subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise VfsError(f"fusermount3 could not unmount {mountpoint}: "
                       f"{done.stderr.strip() or f'exit status {done.returncode}'}")
    if stale:
        note(f"unmounted {mountpoint}: it was the stale mount of a vfsd that is gone")
    else:
        note(f"unmounted {mountpoint}: no vfsd of this store served it (a vfsd of another "
             "store or cache directory, which now stops)")


def _stop_daemon(daemon: DaemonClient, mountpoint: str) -> None:
    pid = daemon.pid
    daemon.call("unmount")
    deadline = time.monotonic() + _STOP_TIMEOUT
    while pid is not None and pid_alive(pid):
        if time.monotonic() >= deadline:
            raise VfsError(f"vfsd (pid {pid}) is still running {_STOP_TIMEOUT:g} s after "
                           f"being asked to unmount {mountpoint}: see its log")
        time.sleep(_POLL)
    note(f"unmounted {mountpoint} (vfsd pid {pid} stopped)")


def mount_type(mountpoint: str) -> str | None:
    """The file system type mounted at ``mountpoint`` (``fuse.vfs``, ...), or None.

    Read from /proc/self/mountinfo rather than with ``os.path.ismount``, which
    cannot see a stale FUSE mount (its stat fails with ENOTCONN).
    """
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                before, _, after = line.partition(" - ")
                parts = before.split()
                if len(parts) >= 5 and _unescape(parts[4]) == mountpoint and after:
                    found = after.split()[0]  # the last one mounted there is what shows
    except OSError:
        return "mount" if os.path.ismount(mountpoint) else None
    return found


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as ``\\ooo`` octal escapes."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def is_stale(mountpoint: str) -> bool:
    """A FUSE mount whose daemon died: every request fails with ENOTCONN.

    Asked with statvfs, which always reaches the file system: a plain stat of the
    mount point may be answered from the kernel's attribute cache.
    """
    try:
        os.statvfs(mountpoint)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


# -- status of the node ----------------------------------------------------------------


def node_status(options: Options, as_json: bool) -> None:
    """``vfsctl status`` without a branch: the daemon, or the node's open commits."""
    store = options.store()
    daemon = options.daemon()
    if daemon is not None:
        state = daemon.call("status")
        document = {"running": True, "mount": state["mount"], "pid": state["pid"],
                    "store": state["store"], "cache": state["cache"],
                    "open_commits": state["open_commits"], "open_files": state["open_files"],
                    "jobs": state.get("jobs", [])}
    else:
        document = {"running": False, "mount": None, "pid": None, "store": store.objects.url,
                    "cache": None,
                    "open_commits": [
                        {"repo": repo, "branch": branch,
                         "changes": len(store.index.staged(repo, branch))}
                        for repo, branch in sorted(store.index.open_commits())],
                    "open_files": None, "jobs": []}
    if as_json:
        emit_json(document)
        return
    if document["running"]:
        cache = document["cache"]
        usage = (f"{human_size(cache['used_bytes'])} of {human_size(cache['limit_bytes'])}"
                 if cache["limit_bytes"] else "no chunk cache on disk")
        fields([("vfsd", f"pid {document['pid']}, mounted at {document['mount']}"),
                ("store", document["store"]),
                ("cache", f"{cache['dir']} ({usage})"),
                ("open files", document["open_files"]),
                ("running jobs", ", ".join(
                    f"{j['id']} ({j['datums_processed']}/{j['datums_total'] - j['datums_skipped']}"
                    " datums)" for j in document["jobs"]) or "none")])
    else:
        click.echo("no vfsd is running for this store")
    commits = document["open_commits"]
    if not commits:
        click.echo("no open commits on this node")
        return
    click.echo("open commits on this node:")
    table([(f"  {c['repo']}@{c['branch']}",
            f"{c['changes']} change" + ("" if c["changes"] == 1 else "s"))
           for c in commits])
