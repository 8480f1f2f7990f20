"""The ``bwrap`` runtime: a sandbox (bubblewrap) around the host's own programs.

What the command sees: the host's ``/usr``, ``/bin``, ``/lib*`` and ``/sbin``
read-only; an ``/etc`` made for the sandbox (:mod:`daemon.runtimes.hostetc`: its own
``passwd``, ``group``, ``hosts``, and only public host files such as the CA
certificates, never ``/etc/shadow`` or ``/etc/vfs``); a fresh ``/proc``, a minimal
``/dev``, an empty ``/tmp``, and the datum under ``/pfs``. Nothing else of the host:
no store, cache, spool, control socket, ``/root``, ``/home``, ``/run`` or ``/sys``.
The environment is built from scratch (the spec's ``env`` and ``VFS_*``).

How it runs: in new pid, ipc, uts, mount and network namespaces (the network one
holds only a loopback interface unless ``network`` is true), in a new session, dying
with us. When the daemon is root (a worker node), bwrap sets everything up as root
and ``setpriv`` then switches to the datum's user (``user``, default 65534) with no
capabilities, an empty bounding set and no new privileges, so the command owns no
file of the host. When the daemon is not root, bwrap makes a user namespace and the
command runs as the daemon's user.

Processes: a pids cgroup per datum (:mod:`daemon.runtimes.cgroups`) caps processes
and threads at ``pids``; where the host has none to give (no pids controller, not
delegated), the fallback is ``RLIMIT_NPROC`` for the datum's user, which counts all
processes of that uid on the node (every datum of every pipeline running as it); as
a non-root daemon there is no limit and the scheduler warns.
"""

from __future__ import annotations

import os
import shutil
import uuid

import trio

from daemon.runtimes.base import (
    PFS,
    ContainerRun,
    DatumIO,
    HostRuntime,
    check_run,
    datum_env,
    give_to_user,
    input_mounts,
    kill_process,
    memory_rlimit_argv,
    run_process_with_timeout,
    timed_out,
)
from daemon.runtimes.cgroups import PidsCgroup, PidsCgroups
from daemon.runtimes.hostetc import SandboxEtc
from vfs.errors import InvalidSpec

#: Host directories shown read-only inside (those present; symlinks are recreated).
HOST_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: Capabilities ``setpriv`` needs to switch to the datum's user (then drops them all).
_SWITCH_CAPABILITIES = ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP")


def switch_user_argv(user: tuple[int, int], setpriv: str, *, nproc: int | None = None
                     ) -> list[str]:
    """The command prefix that becomes ``user`` for good: no groups, no capabilities
    (inheritable, ambient and bounding sets empty), no new privileges; with ``nproc``,
    the RLIMIT_NPROC fallback for a pids limit."""
    uid, gid = user
    prefix = ["prlimit", f"--nproc={nproc}", "--"] if nproc is not None else []
    return [*prefix, setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]


def build_args(run: ContainerRun, datum: DatumIO, *, etc: str,
               host_paths: tuple[str, ...] = HOST_PATHS, bwrap: str = "bwrap",
               setpriv: str = "setpriv", nproc: int | None = None) -> list[str]:
    """The bwrap command line running ``run``'s command on ``datum``.

    Args:
        etc: the host directory shown read-only at ``/etc`` (see
            :class:`~daemon.runtimes.hostetc.SandboxEtc`).
        setpriv: the host's setpriv, used when ``run.run_as`` is set (the daemon is root).
        nproc: an RLIMIT_NPROC for the command (the fallback for a pids limit).
    """
    args = [bwrap, "--die-with-parent", "--new-session"]
    run_as = run.run_as
    if run_as is None:
        args.append("--unshare-all")  # includes a user namespace: we are not root
        if run.network:
            args.append("--share-net")
    else:
        # No user namespace: in one made by root only uid 0 exists, and setpriv could
        # not become the datum's user. The namespaces that isolate, then setpriv.
        args += ["--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-cgroup-try"]
        if not run.network:
            args.append("--unshare-net")
    args += ["--cap-drop", "ALL"]
    if run_as is not None:
        for capability in _SWITCH_CAPABILITIES:
            args += ["--cap-add", capability]
    args += ["--hostname", "vfs"]
    for path in host_paths:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    args += ["--ro-bind", etc, "/etc"]
    args += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/tmp"]
    args += ["--perms", "0755", "--dir", PFS]
    for source, target in input_mounts(run, datum):
        args += ["--ro-bind", source, target]
    args += ["--bind", datum.out_dir, f"{PFS}/out"]
    command = list(run.cmd)
    args += ["--chdir", "/", "--clearenv"]
    for key, value in datum_env(run, datum).items():
        args += ["--setenv", key, value]
    if run_as is not None:
        command = [*switch_user_argv(run_as, setpriv, nproc=nproc), *command]
    return [*args, "--", *command]


class BwrapRuntime(HostRuntime):
    """Run host programs in a bubblewrap sandbox (see the module docstring).

    ``memory`` is enforced as an address-space limit (RLIMIT_AS, see
    :func:`~daemon.runtimes.base.memory_rlimit_argv`); ``cpus`` is not enforced.
    """

    name = "bwrap"

    def __init__(self, host_paths: tuple[str, ...] = HOST_PATHS, *,
                 cgroups: PidsCgroups | None = None, etc: SandboxEtc | None = None) -> None:
        """
        Args:
            cgroups: where to make pids cgroups (default: found on first use).
            etc: the sandboxes' ``/etc`` directories (default: made on first use).
        """
        self.host_paths = host_paths
        self._cgroups = cgroups
        self._etc = etc

    @property
    def etc(self) -> SandboxEtc:
        if self._etc is None:
            self._etc = SandboxEtc()
        return self._etc

    @property
    def cgroups(self) -> PidsCgroups:
        if self._cgroups is None:
            self._cgroups = PidsCgroups.find()
            self._cgroups.sweep()
        return self._cgroups

    def _binary(self) -> str:
        path = shutil.which("bwrap")
        if path is None:
            raise InvalidSpec("runtime bwrap needs bubblewrap, which is not installed on this "
                              "node: install it (apt-get install bubblewrap) or use another "
                              "runtime")
        return path

    def _setpriv(self) -> str:
        path = shutil.which("setpriv")
        if path is None or not path.startswith(("/usr/", "/bin/", "/sbin/")):
            raise InvalidSpec("runtime bwrap needs setpriv (util-linux) in /usr/bin to run "
                              "datums as an unprivileged user: install util-linux")
        return path

    def check(self, image: str | None) -> None:
        super().check(image)
        self._binary()
        if os.geteuid() == 0:
            self._setpriv()

    def unsupported_limits(self, memory: int | None, cpus: float | None,
                           pids: int | None = None) -> list[str]:
        unsupported = super().unsupported_limits(memory, cpus)
        # As root the fallback (RLIMIT_NPROC of the datum's user) still bounds a datum.
        if pids is not None and not self.cgroups.available and os.geteuid() != 0:
            unsupported.append("pids")
        return unsupported

    async def run(self, run: ContainerRun) -> list[int]:
        check_run(run)
        bwrap = self._binary()
        setpriv = self._setpriv() if run.run_as is not None else "setpriv"
        etc = await trio.to_thread.run_sync(self._prepare, run)
        nproc = None
        if run.pids is not None and not self.cgroups.available and run.run_as is not None:
            nproc = run.pids
        statuses = []
        for datum in run.datums:
            argv = memory_rlimit_argv(run.memory) + build_args(
                run, datum, etc=etc, host_paths=self.host_paths, bwrap=bwrap,
                setpriv=setpriv, nproc=nproc)
            statuses.append(await self._run_datum(run, datum, argv))
        return statuses

    def _prepare(self, run: ContainerRun) -> str:
        give_to_user(run)
        return self.etc.path(run.run_as, network=run.network)

    async def _run_datum(self, run: ContainerRun, datum: DatumIO, argv: list[str]) -> int:
        """One sandbox for one datum, in a pids cgroup of its own; its status."""
        cgroup: PidsCgroup | None = None
        if run.pids is not None and self.cgroups.available:
            cgroup = self.cgroups.create(uuid.uuid4().hex[:8], run.pids)
            argv = cgroup.wrap(argv)
        try:
            # Killing bwrap is enough: --die-with-parent takes its pid 1 with it, and
            # the kernel kills the rest of a pid namespace when its pid 1 dies. Closing
            # the cgroup then makes sure that nothing of this datum is left when the
            # next datum of the batch starts.
            with open(datum.log_path, "ab") as log:
                status = await run_process_with_timeout(
                    argv, timeout=run.timeout, deliver_cancel=kill_process, log=log)
        finally:
            if cgroup is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(cgroup.close)
        return timed_out(run, datum) if status is None else status
