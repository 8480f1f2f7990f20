"""``vfsd``: mount the store under /pfs and serve ``vfsctl`` on a control socket.

One trio run, one top-level nursery: the FUSE loop, the control socket and the
signal watcher are services started with ``nursery.start`` and READY=1 is sent to
systemd only once all of them are up. SIGTERM or SIGINT unmounts cleanly.
"""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import os
import signal
import subprocess
import sys
import tomllib

import pyfuse3
import trio

import vfs
from daemon import sdnotify
from daemon.flusher import ENCODE_AHEAD, Flusher
from daemon.fs import VfsOperations
from daemon.handler import ControlHandler
from daemon.protocol import default_socket_path, remove_daemon_file, write_daemon_file
from daemon.reader import MEMORY_LIMIT, ChunkCache, DiskCache, limit_malloc_arenas
from daemon.spools import recover_spools
from vfs.pipeline.claims import DEFAULT_LEASE_TTL
from vfs.pipeline.spec import DEFAULT_DATUM_TIMEOUT, parse_duration

log = logging.getLogger("daemon")

_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
# Sizes that may be written as "512M" in the TOML file.
_SIZE_OPTIONS = ("chunk_cache_size", "memory_cache_size", "encode_ahead")


def parse_size(text: str) -> int:
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = text[-1:] if text[-1:] in _SIZE_UNITS and not text[-1:].isdigit() else ""
    number = text[: len(text) - len(unit)]
    try:
        size = int(float(number) * _SIZE_UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 512M or 2G") from None
    if size < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a size cannot be negative")
    return size


def parse_timeout(text: object) -> float:
    """A ``--datum-timeout``: ``90``, ``30s``, ``10m``, ``1h``...; ``0``: no limit."""
    if str(text).strip() in ("0", "0.0", "0s"):
        return 0.0
    return parse_duration(text, "--datum-timeout", argparse.ArgumentTypeError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vfsd", description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="store URL (default $VFS_STORE or the local default)")
    parser.add_argument("--mount", default="/pfs", help="mount point (default /pfs)")
    parser.add_argument("--cache", help="node-local index and cache directory")
    parser.add_argument("--config", help="TOML file with any of these options as keys")
    parser.add_argument("--s3-endpoint", help="endpoint of an S3-compatible service")
    parser.add_argument("--socket", help="control socket path")
    parser.add_argument("--chunk-cache-size", type=parse_size, default=None,
                        help="on-disk chunk cache limit (default: 0 for a local store, "
                             "2G otherwise)")
    parser.add_argument("--memory-cache-size", type=parse_size, default=MEMORY_LIMIT,
                        metavar="SIZE", help="decoded chunks kept in memory for random readers "
                             f"(default {MEMORY_LIMIT >> 20}M)")
    parser.add_argument("--read-ahead-kb", type=int, default=1024, metavar="KB",
                        help="the kernel's read-ahead on the mount (default 1024: 1 MiB "
                             "reads; 0 keeps the kernel's 128)")
    parser.add_argument("--encode-ahead", type=parse_size, default=ENCODE_AHEAD, metavar="SIZE",
                        help="store a file written in order in steps of this size while it "
                             "is being written, so its close and fsync store only the rest "
                             f"(default {ENCODE_AHEAD >> 20}M; 0: store files only when "
                             "closed)")
    parser.add_argument("--poll-interval", type=float, default=2.0, metavar="S",
                        help="how often the pipeline watcher looks for branch heads moved "
                             "by other writers, with one listing of the store's refs "
                             "whatever the number of pipelines (default 2 s; commits made "
                             "through this daemon start jobs at once)")
    parser.add_argument("--node-name", default=None, metavar="NAME",
                        help="this node's name in the store, shown by 'vfsctl nodes' and "
                             "used by 'vfsctl gc --ignore-node' (default $VFS_NODE_NAME, then "
                             "the host name; a vfsd refuses a name another running vfsd "
                             "has, and a taken host name becomes HOST-<id prefix>)")
    parser.add_argument("--node-ttl", type=float, default=60.0, metavar="S",
                        help="how long this node's record in the store stays fresh; vfsd "
                             "refreshes it (its heartbeat) every third of that, 'vfsctl "
                             "nodes' shows a node silent for longer as not alive, and gc "
                             "refuses to delete while a node's record is older (default 60 s)")
    parser.add_argument("--allow-process-runtime", action="store_true",
                        help="let pipelines use the unsandboxed 'process' runtime although "
                             "vfsd runs as root (development machines only: its commands "
                             "see the whole node, the store's credentials included)")
    parser.add_argument("--userns-base", type=int, default=1_000_000_000, metavar="ID",
                        help="runc datums get a user namespace whose root is this host "
                             "uid/gid, their user (65534 inside) this + 65534 (default "
                             "1000000000; 0: no user namespace)")
    parser.add_argument("--datum-timeout", type=parse_timeout, default=DEFAULT_DATUM_TIMEOUT,
                        metavar="DURATION",
                        help="how long a datum may run when its pipeline's spec sets no "
                             "datum_timeout: seconds or e.g. 30s, 10m, 1h (default 1h; 0: "
                             "no limit)")
    parser.add_argument("--lease-ttl", type=float, default=DEFAULT_LEASE_TTL, metavar="S",
                        help="how long this node's claim of a pipeline datum (or of a job's "
                             "output commit) stays valid in the store; vfsd renews it every "
                             "third of that while the datum runs, and other nodes take the "
                             "datum over once it expires, e.g. when this node dies "
                             f"(default {DEFAULT_LEASE_TTL:g} s)")
    parser.add_argument("--no-pipelines", action="store_true",
                        help="do not run pipeline jobs on this node")
    parser.add_argument("--debug", action="store_true", help="log at DEBUG level")
    return parser


def load_options(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    options = parser.parse_args(argv)
    if options.config and not os.path.exists(options.config) and \
            options.config == "/etc/vfs/vfsd.toml":
        options.config = None  # the unit names the default file; it need not exist
    if options.config:
        try:
            with open(options.config, "rb") as f:
                config = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            parser.error(f"cannot read {options.config}: {exc}")
        for key, value in config.items():
            attr = key.replace("-", "_")
            if not hasattr(options, attr):
                parser.error(f"{options.config}: unknown option {key!r}")
            if getattr(options, attr) in (None, parser.get_default(attr)):
                if attr in _SIZE_OPTIONS and isinstance(value, str):
                    value = parse_size(value)
                if attr == "datum_timeout":
                    try:
                        value = parse_timeout(value)
                    except argparse.ArgumentTypeError as exc:
                        parser.error(f"{options.config}: {exc}")
                setattr(options, attr, value)
    if options.encode_ahead < 0 or 0 < options.encode_ahead < 1 << 20:
        parser.error("--encode-ahead: 0 (off) or at least 1M")
    if not options.node_ttl >= 3:  # also refuses NaN
        parser.error("--node-ttl: at least 3 seconds")
    if not 3 <= options.lease_ttl <= 86400:  # also refuses NaN
        parser.error("--lease-ttl: from 3 seconds to a day")
    if not 0 < options.poll_interval <= 3600:
        parser.error("--poll-interval: more than 0 and at most 3600 seconds")
    if options.userns_base and not 1 <= options.userns_base <= (1 << 32) - 1 - (1 << 16):
        parser.error("--userns-base: a host id from 1 to 4294901759, or 0 for none")
    return options


def clean_stale_mount(mountpoint: str) -> None:
    """A mount point left by a killed daemon answers ENOTCONN: unmount it first.

    ``stat`` may still succeed from the kernel's cache; ``statvfs`` asks the
    (dead) filesystem and fails.
    """
    try:
        os.statvfs(mountpoint)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise vfs.VfsError(f"cannot use {mountpoint} as a mount point: {exc}") from exc
        log.warning("%s is a stale mount of a dead daemon: unmounting it", mountpoint)
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False)
    os.makedirs(mountpoint, exist_ok=True)
    if os.path.ismount(mountpoint):
        raise vfs.VfsError(f"{mountpoint} is already a mount point: unmount it first")


def set_read_ahead(mountpoint: str, kilobytes: int) -> None:
    """Set the kernel's read-ahead for the mount (best effort).

    The kernel gives a FUSE mount 128 KiB of read-ahead, so a sequential reader
    reaches the daemon as 128 KiB READ requests; with 1 MiB the requests are 1 MiB
    and the per-request cost is paid an eighth as often. The setting lives on the
    mount's backing device (``/sys/class/bdi/MAJOR:MINOR``) and must be written
    after the kernel has had the daemon's INIT reply, which may only lower it:
    ``stat`` of the mount root waits for that (call this from a worker thread while
    the FUSE loop runs).
    """
    try:
        device = os.stat(mountpoint).st_dev
        path = f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
        with open(path, "w") as f:
            f.write(str(kilobytes))
    except OSError as exc:  # not root, or /sys read-only in a container: keep the default
        log.debug("cannot set read-ahead of %s to %d KiB: %s", mountpoint, kilobytes, exc)
        return
    log.debug("read-ahead of %s (%s) set to %d KiB", mountpoint, path, kilobytes)


async def _heartbeat(store: vfs.Store, ttl: float) -> None:
    """Keep this node's record fresh and acknowledge gc (docs/format.md §10.2)."""
    while True:
        await trio.sleep(ttl / 3)
        try:
            await trio.to_thread.run_sync(store.heartbeat)
        except vfs.VfsError as exc:
            log.warning("cannot refresh this node's record in the store: %s", exc)


async def serve(options: argparse.Namespace, store: vfs.Store) -> None:
    name = await trio.to_thread.run_sync(functools.partial(
        store.claim_node_name, chosen=bool(os.environ.get("VFS_NODE_NAME"))))
    log.info("node %s (id %s)", name, store.node.id)
    # Active before anything of this process writes: the node's record tells gc that
    # writes may be in flight for as long as vfsd runs. It is also the node's
    # heartbeat (vfsctl nodes), refreshed every node_ttl / 3.
    await trio.to_thread.run_sync(store.keep_active, options.node_ttl)
    spool_dir = os.path.join(store.cache_dir, "spool")
    os.makedirs(spool_dir, exist_ok=True)
    # Files a dead daemon had closed are staged now, before the mount serves;
    # spools of files it still had open are dropped (daemon/spools.py).
    recover_spools(store, spool_dir)
    for name in os.listdir(store.cache_dir):  # stdin spools of killed 'vfsctl put -'
        if name.startswith("stdin-") and name.endswith(".spool"):
            os.unlink(os.path.join(store.cache_dir, name))
    limit = options.chunk_cache_size
    if limit is None:
        limit = 0 if getattr(store.objects, "root", None) else 2 << 30
    disk = DiskCache(os.path.join(store.cache_dir, "chunks"), limit) if limit else None
    cache = ChunkCache(store.blobs, disk, limiter=trio.CapacityLimiter(4),
                       memory_limit=options.memory_cache_size)
    flusher = Flusher(store, spool_dir, encode_ahead=options.encode_ahead)
    flusher.start()
    operations = VfsOperations(store, spool_dir, cache, flusher)
    mountpoint = os.path.abspath(options.mount)
    clean_stale_mount(mountpoint)
    fuse_options = set(pyfuse3.default_options)
    fuse_options.discard("default_permissions")
    fuse_options |= {"fsname=vfs", "subtype=vfs", "default_permissions"}
    if os.getuid() == 0:
        fuse_options.add("allow_other")
    # Imported before the mount, not while it already serves its first requests.
    from daemon.control import serve_control
    from daemon.watcher import Watcher

    pyfuse3.init(operations, mountpoint, fuse_options)
    socket_path = options.socket or default_socket_path(store.cache_dir)
    handler = ControlHandler(store, operations, mountpoint, disk)
    try:
        async with trio.open_nursery() as nursery:
            operations.nursery = nursery
            handler.stop = lambda: trio.from_thread.run_sync(pyfuse3.terminate)
            nursery.start_soon(_fuse_main, nursery)
            nursery.start_soon(_heartbeat, store, options.node_ttl)
            if options.read_ahead_kb:
                await trio.to_thread.run_sync(set_read_ahead, mountpoint, options.read_ahead_kb,
                                              abandon_on_cancel=True)
            await nursery.start(serve_control, socket_path, handler)
            if not options.no_pipelines:
                watcher = Watcher(store, os.path.join(store.cache_dir, "jobs"),
                                  poll_interval=options.poll_interval,
                                  allow_process_runtime=options.allow_process_runtime,
                                  userns_base=options.userns_base or None,
                                  datum_timeout=options.datum_timeout or None,
                                  lease_ttl=options.lease_ttl,
                                  on_commit=operations.branch_changed)
                handler.watcher = watcher
                store.presence.running_datums = watcher.running_datums
                await nursery.start(watcher.run)
            write_daemon_file(store.cache_dir, {"socket": socket_path, "pid": os.getpid(),
                                                "mount": mountpoint,
                                                "store_id": store.config.store_id})
            nursery.start_soon(_watch_signals, nursery)
            sdnotify.notify_ready()
            log.info("vfsd ready: %s mounted at %s", store.objects.url, mountpoint)
    finally:
        sdnotify.notify_stopping()
        remove_daemon_file(store.cache_dir)
        # Files still open keep what was written to them: store it before going.
        operations.views.flush_everything()
        pyfuse3.close(unmount=True)
        flusher.close()
        store.index.sync()
        log.info("unmounted %s", mountpoint)


async def _fuse_main(nursery: trio.Nursery) -> None:
    try:
        await pyfuse3.main()
    finally:
        nursery.cancel_scope.cancel()  # the mount is gone: stop every other service


async def _watch_signals(nursery: trio.Nursery) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


def main(argv: list[str] | None = None) -> None:
    options = load_options(argv)
    logging.basicConfig(
        level=logging.DEBUG if options.debug else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    limit_malloc_arenas()  # before any worker thread allocates
    if options.node_name:
        os.environ["VFS_NODE_NAME"] = options.node_name
    try:
        store = vfs.open_store(options.store, cache_dir=options.cache,
                               s3_endpoint=options.s3_endpoint, durable_index=False)
    except vfs.VfsError as exc:
        print(f"vfsd: error: {exc}", file=sys.stderr)
        sys.exit(1)
    status = 0
    try:
        trio.run(serve, options, store)
    except* vfs.VfsError as group:
        for exc in group.exceptions:
            print(f"vfsd: error: {exc}", file=sys.stderr)
        status = 1
    except* KeyboardInterrupt:
        pass
    finally:
        store.close()
    sys.exit(status)


if __name__ == "__main__":
    main()
