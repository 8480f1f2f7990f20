"""The ``runc`` runtime: a bundle per start and a container per datum, from a local image.

The image is a root filesystem directory, or an OCI image layout directory unpacked
once into a cached root filesystem (:mod:`daemon.runtimes.oci`). Each start gets a
bundle in the run's scratch directory: ``config.json`` and a ``root`` directory that
is only a skeleton; each datum of the start (a batch) runs in a container of its own
made from that bundle, one after the other, ``config.json`` naming its directories.
The image's top-level directories and files are bind-mounted read-only into that
skeleton, and its top-level symlinks copied, instead of using the
image directory itself as the root: runc creates the mount points it needs (``/pfs``,
``/proc``...) inside the root directory, and doing that in the user's image would
change the image (and its digest, and so every datum's hash) behind their back.

Inside: the image read-only, ``/proc``, a tmpfs ``/dev`` with runc's default devices,
``/dev/shm``, a read-only ``/sys``, a tmpfs ``/tmp``, and the datum under ``/pfs``;
new pid, ipc, uts and mount namespaces and a network namespace holding only a
loopback interface unless ``network`` is true; the datum's user (``user``, default
65534:65534, never root) with no capabilities at all and no new privileges; the
``/proc`` and ``/sys`` parts the OCI defaults hide masked or read-only; the
environment built from scratch (the image's ``Env``, the spec's ``env``, ``VFS_*``);
memory, cpu and pids limits as cgroup limits (without a pids controller, the pids
limit falls back to RLIMIT_NPROC of the datum's user).

A user namespace where the kernel allows: container ids 0-65535 are host ids
``userns_base`` + 0-65535 (default base 1,000,000,000, a range no host account or
subordinate id range uses), so even the container's root is nobody on the host, and
the datum (65534 inside) is ``userns_base + 65534`` there. The bundle, inputs and
outputs are handed to those host ids. It takes every directory above the bundle to be
searchable by others (runc's init, as the container's root, must reach it: true of
``/var/lib/vfs``, not of a 0700 cache directory), uids and gids below 65536, and
``user.max_user_namespaces`` > 0; otherwise the start runs without one (the datum's
uid is then the same inside and on the host, which owns no file of either).

``runc run`` stays in the foreground, its stdout and stderr (and so the command's) go
to the datum's log. Killing ``runc run`` would orphan the container, so a timeout or a
cancellation kills the container with ``runc kill`` and removes it with ``runc delete
--force``; containers live under their own state root (``runc --root``), so
``runc --root /run/vfs-runc list`` shows only ours.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import resource
import shutil
import stat
import subprocess
import uuid

import trio

from daemon.runtimes import oci
from daemon.runtimes.base import (
    PFS,
    ContainerRun,
    DatumIO,
    Runtime,
    check_run,
    datum_env,
    env_list,
    give_to_user,
    input_mounts,
    run_process_with_timeout,
    timed_out,
)
from daemon.runtimes.rootfs import check_rootfs, rootfs_digest
from vfs.errors import InvalidSpec

log = logging.getLogger("daemon.runtimes.runc")

DEFAULT_STATE_ROOT = "/run/vfs-runc"
_CPU_PERIOD = 100_000  # microseconds
# runc's default spec (``runc spec``): the hidden and read-only /proc parts.
_MASKED_PATHS = ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                 "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                 "/proc/sched_debug", "/sys/firmware", "/proc/scsi"]
_READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
# Top-level names of the image that the container gets from elsewhere.
_NOT_FROM_IMAGE = {"proc", "dev", "sys", "tmp", "pfs"}
_KILL_PATIENCE = 5.0  # seconds of `runc kill` attempts before killing `runc run` itself
#: The host id of the container's root in a user namespace (see the module docstring).
DEFAULT_USERNS_BASE = 1_000_000_000
_USERNS_SIZE = 65536


def _system_mounts() -> list[dict]:
    return [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "mode=1777"]},
    ]


def _bind(source: str, destination: str, writable: bool) -> dict:
    return {"destination": destination, "type": "bind", "source": source,
            "options": ["rbind", "rw" if writable else "ro"]}


def build_config(run: ContainerRun, datum: DatumIO, *, image_mounts: list[dict],
                 image_env: dict[str, str], memory_swap: bool = False,
                 supported: frozenset[str] = frozenset({"memory", "cpus", "pids"}),
                 userns_base: int | None = None) -> dict:
    """The OCI runtime ``config.json`` running ``run``'s command on ``datum`` (the root
    is the bundle's ``root``).

    Args:
        image_mounts: the read-only binds of the image's top-level entries.
        image_env: the image's own environment (under the spec's).
        memory_swap: also cap memory+swap at the memory limit (no swapping instead).
        supported: the limits this host's cgroups can enforce; others are left out.
        userns_base: the host id of the container's root in a user namespace (None:
            no user namespace).
    """
    system = _system_mounts()
    if userns_base is not None and run.network:
        # sysfs can be mounted only by the owner of the network namespace: on the
        # host's network, show the host's /sys read-only instead.
        system = [mount if mount["destination"] != "/sys" else
                  {"destination": "/sys", "type": "bind", "source": "/sys",
                   "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]}
                  for mount in system]
    mounts = [*image_mounts, *system,
              *(_bind(source, target, False) for source, target in input_mounts(run, datum)),
              _bind(datum.out_dir, f"{PFS}/out", True)]
    resources: dict = {"devices": [{"allow": False, "access": "rwm"}]}
    if run.memory is not None and "memory" in supported:
        resources["memory"] = {"limit": run.memory}
        if memory_swap:
            resources["memory"]["swap"] = run.memory
    if run.cpus is not None and "cpus" in supported:
        resources["cpu"] = {"quota": max(1000, int(run.cpus * _CPU_PERIOD)),
                            "period": _CPU_PERIOD}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    rlimits = [{"type": "RLIMIT_NOFILE", "soft": soft, "hard": hard}]
    if run.pids is not None:
        if "pids" in supported:
            resources["pids"] = {"limit": run.pids}
        else:
            rlimits.append({"type": "RLIMIT_NPROC", "soft": run.pids, "hard": run.pids})
    uid, gid = run.run_as or (os.getuid(), os.getgid())
    namespaces = [{"type": kind} for kind in ("pid", "ipc", "uts", "mount")]
    if not run.network:
        namespaces.append({"type": "network"})
    linux: dict = {}
    if userns_base is not None:
        namespaces.append({"type": "user"})
        mapping = [{"containerID": 0, "hostID": userns_base, "size": _USERNS_SIZE}]
        linux = {"uidMappings": mapping, "gidMappings": [dict(item) for item in mapping]}
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid, "additionalGids": []},
            "args": list(run.cmd),
            "env": env_list(datum_env(run, datum, base=image_env)),
            "cwd": "/",
            "capabilities": {kind: [] for kind in
                             ("bounding", "effective", "inheritable", "permitted", "ambient")},
            "rlimits": rlimits,
            "noNewPrivileges": True,
        },
        "root": {"path": "root", "readonly": True},
        "hostname": "vfs",
        "mounts": mounts,
        "linux": {
            **linux,
            "resources": resources,
            "namespaces": namespaces,
            "maskedPaths": list(_MASKED_PATHS),
            "readonlyPaths": list(_READONLY_PATHS),
        },
    }


def make_skeleton(rootfs: str, root: str, *, network: bool = False,
                  owner: int | None = None) -> list[dict]:
    """Create the bundle's ``root`` for image ``rootfs`` and return the binds filling it.

    Args:
        owner: the host id of the container's root in a user namespace, which must be
            able to create mount points in ``root``.
    """
    os.makedirs(root)
    if owner is not None:
        os.chown(root, owner, owner)
    mounts = []
    with os.scandir(rootfs) as entries:
        for entry in sorted(entries, key=lambda entry: entry.name):
            if entry.name in _NOT_FROM_IMAGE:
                continue
            target = os.path.join(root, entry.name)
            if entry.is_symlink():
                os.symlink(os.readlink(entry.path), target)
                continue
            if entry.is_dir():
                os.mkdir(target)
            elif entry.is_file():
                open(target, "wb").close()
            else:
                continue
            if owner is not None:
                os.chown(target, owner, owner)
            mounts.append(_bind(entry.path, f"/{entry.name}", False))
    if network:
        # A container on the host's network resolves names as the host does, when the
        # image has a file to put the host's over (runc cannot create one in it).
        for name in ("resolv.conf", "hosts"):
            in_image = os.path.join(rootfs, "etc", name)
            if (os.path.isfile(f"/etc/{name}") and os.path.isfile(in_image)
                    and not os.path.islink(in_image)):
                mounts.append(_bind(f"/etc/{name}", f"/etc/{name}", False))
    return mounts


def cgroup_support() -> tuple[frozenset[str], bool]:
    """The limits the host's cgroups can enforce, and whether swap is accounted."""
    unified = "/sys/fs/cgroup/cgroup.controllers"
    if os.path.exists(unified):
        with open(unified) as f:
            controllers = set(f.read().split())
        supported = ({"memory", "pids"} & controllers
                     | ({"cpus"} if "cpu" in controllers else set()))
        own = ""
        try:
            with open("/proc/self/cgroup") as f:
                own = next((line.split("::", 1)[1].strip() for line in f
                            if line.startswith("0::")), "")
        except OSError:
            pass
        swap = os.path.exists(f"/sys/fs/cgroup{own.rstrip('/')}/memory.swap.max")
        return frozenset(supported), swap
    supported = set()
    if os.path.isdir("/sys/fs/cgroup/memory"):
        supported.add("memory")
    if os.path.isdir("/sys/fs/cgroup/cpu"):
        supported.add("cpus")
    if os.path.isdir("/sys/fs/cgroup/pids"):
        supported.add("pids")
    swap = os.path.exists("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes")
    return frozenset(supported), swap


class RuncRuntime(Runtime):
    """Run the command with runc (see the module docstring).

    Args:
        cache_dir: where OCI image layouts are unpacked (default ``$VFS_CACHE/images``).
        state_root: runc's state directory for our containers (``runc --root``).
    """

    name = "runc"

    def __init__(self, *, cache_dir: str | None = None,
                 state_root: str = DEFAULT_STATE_ROOT,
                 userns_base: int | None = DEFAULT_USERNS_BASE) -> None:
        self._cache_dir = cache_dir
        self.state_root = state_root
        self.userns_base = userns_base  # None: never a user namespace
        self._cgroups: tuple[frozenset[str], bool] | None = None
        self._userns_refused: set[str] = set()

    @property
    def cache_dir(self) -> str:
        if self._cache_dir is None:
            from vfs.store import default_cache_dir

            return os.path.join(default_cache_dir(), "images")
        return self._cache_dir

    def _binary(self) -> str:
        path = shutil.which("runc")
        if path is None:
            raise InvalidSpec("runtime runc needs runc, which is not installed on this node: "
                              "install it (apt-get install runc) or use another runtime")
        return path

    def check(self, image: str | None) -> None:
        self._binary()
        if not image:
            raise InvalidSpec("runtime runc needs 'transform.image': a root filesystem "
                              "directory or an OCI image layout directory")
        image = os.path.abspath(image)
        if os.path.isdir(image) and oci.is_layout(image):
            oci.read_manifest(image, check_layers=True)
            # Whether a layout has /bin/sh is known once it is unpacked: run() checks.
            return
        check_rootfs(image)

    def image_digest(self, image: str | None) -> str:
        if not image:
            raise InvalidSpec("runtime runc needs 'transform.image'")
        image = os.path.abspath(image)
        if not os.path.isdir(image):
            raise InvalidSpec(f"image directory {image} does not exist")
        if oci.is_layout(image):
            return oci.read_manifest(image).digest
        return rootfs_digest(image)

    def _cgroup_support(self) -> tuple[frozenset[str], bool]:
        if self._cgroups is None:
            self._cgroups = cgroup_support()
        return self._cgroups

    def unsupported_limits(self, memory: int | None, cpus: float | None,
                           pids: int | None = None) -> list[str]:
        supported, _ = self._cgroup_support()
        # Without a pids controller, RLIMIT_NPROC of the datum's user still bounds it.
        return [name for name, value in (("memory", memory), ("cpus", cpus))
                if value is not None and name not in supported]

    async def run(self, run: ContainerRun) -> list[int]:
        check_run(run)
        runc = self._binary()
        if not run.image:
            raise InvalidSpec("runtime runc needs 'transform.image'")
        image = os.path.abspath(run.image)
        image_env: dict[str, str] = {}
        if os.path.isdir(image) and oci.is_layout(image):
            unpacked = await trio.to_thread.run_sync(
                oci.unpack, image, self.cache_dir, abandon_on_cancel=True)
            rootfs, image_env = unpacked.rootfs, unpacked.env
        else:
            rootfs = image
            if not os.path.isdir(rootfs):
                raise InvalidSpec(f"image directory {rootfs} does not exist")

        # One bundle for the start: the skeleton of the image is made once, and each
        # datum gets a container of its own from it, one after the other.
        bundle = os.path.join(run.workdir, _container_id(run, run.datums[0]))
        base = self.userns(run, bundle, rootfs)
        image_mounts = make_skeleton(rootfs, os.path.join(bundle, "root"), network=run.network,
                                     owner=base)
        owner = None
        if base is not None and run.run_as is not None:
            owner = (base + run.run_as[0], base + run.run_as[1])
        await trio.to_thread.run_sync(functools.partial(give_to_user, run, owner=owner))
        supported, swap = self._cgroup_support()
        statuses = []
        for datum in run.datums:
            config = build_config(run, datum, image_mounts=image_mounts, image_env=image_env,
                                  memory_swap=swap, supported=supported, userns_base=base)
            with open(os.path.join(bundle, "config.json"), "w") as f:
                json.dump(config, f)
            statuses.append(await self._run_container(run, datum, runc, bundle))
        return statuses

    async def _run_container(self, run: ContainerRun, datum: DatumIO, runc: str,
                             bundle: str) -> int:
        """``runc run`` of the bundle as it is configured for ``datum``; its status.

        The command is the pid 1 of the container's pid namespace: when ``runc run``
        returns, no process of this datum is left to meet the next one.
        """
        container_id = _container_id(run, datum)
        runc_cmd = [runc, "--root", self.state_root]

        async def deliver_cancel(process: trio.Process) -> None:
            # Killing the container's init ends `runc run` (which then removes the
            # container). It may not exist yet: `runc run` could still be creating it.
            deadline = trio.current_time() + _KILL_PATIENCE
            while trio.current_time() < deadline:
                await trio.run_process([*runc_cmd, "kill", container_id, "KILL"], check=False,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                await trio.sleep(0.05)
            process.kill()  # `runc run` is stuck: the delete below removes the container

        try:
            with open(datum.log_path, "ab") as log:
                status = await run_process_with_timeout(
                    [*runc_cmd, "run", "--bundle", bundle, container_id],
                    timeout=run.timeout, deliver_cancel=deliver_cancel, log=log)
        finally:
            with trio.CancelScope(shield=True):
                await self._delete(runc_cmd, container_id)
        return timed_out(run, datum) if status is None else status

    def userns(self, run: ContainerRun, bundle: str, rootfs: str) -> int | None:
        """The host id of the container's root if ``run`` gets a user namespace, else
        None (see the module docstring for when)."""
        if self.userns_base is None or run.run_as is None or max(run.run_as) >= _USERNS_SIZE:
            return None
        # runc's init, as the container's root, mounts these: it must reach them.
        sources = {os.path.dirname(bundle), rootfs}
        for datum in run.datums:
            # The inputs are the input directory's subdirectories: it must be reachable.
            sources |= {datum.input_dir, os.path.dirname(datum.out_dir),
                        os.path.dirname(datum.log_path)}
        reason = _userns_obstacle(sources)
        if reason is None:
            return self.userns_base
        if reason not in self._userns_refused:
            self._userns_refused.add(reason)
            log.info("runc: datums run without a user namespace: %s", reason)
        return None

    async def _delete(self, runc_cmd: list[str], container_id: str) -> None:
        """Remove the container if `runc run` did not (it does when it ends normally)."""
        if not os.path.exists(os.path.join(self.state_root, container_id)):
            return
        await trio.run_process([*runc_cmd, "delete", "--force", container_id], check=False,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _userns_obstacle(directories: set[str]) -> str | None:
    """Why a container whose bundle, image and datums are in ``directories`` cannot
    have a user namespace; None if it can."""
    try:
        with open("/proc/sys/user/max_user_namespaces") as f:
            if int(f.read()) <= 0:
                return "user.max_user_namespaces is 0"
    except (OSError, ValueError):
        return "the kernel has no user namespaces"
    seen: set[str] = set()
    for directory in directories:
        path = os.path.abspath(directory)
        while path not in seen:
            seen.add(path)
            try:
                mode = os.stat(path).st_mode
            except OSError as exc:
                return f"cannot stat {path}: {exc.strerror}"
            if not mode & stat.S_IXOTH:
                return (f"{path} is not searchable by others (mode {stat.S_IMODE(mode):o}): "
                        "the container's root could not reach the image or the datums")
            if path == "/":
                break
            path = os.path.dirname(path)
    return None


def _container_id(run: ContainerRun, datum: DatumIO) -> str:
    """A unique container id that says which job and datum it belongs to."""
    job = re.sub(r"[^\w.+-]", "_", run.job_id)[:16]
    datum_id = re.sub(r"[^\w.+-]", "_", datum.datum_id)[:16]
    return f"vfs-{job}-{datum_id}-{uuid.uuid4().hex[:8]}"
