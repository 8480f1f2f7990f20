"""The ``bwrap`` runtime: a light sandbox (bubblewrap) around the host's own programs.

The command sees the host's ``/usr``, ``/bin``, ``/lib*``, ``/sbin`` and ``/etc``
read-only, a fresh ``/proc``, a minimal ``/dev``, an empty ``/tmp``, and the datum
under ``/pfs``; nothing else of the host's files. It runs in new pid, ipc, uts,
mount and network namespaces (the network one holds only a loopback interface unless
``network`` is true), with no capabilities, in a new session, and dies with us.
"""

from __future__ import annotations

import os
import shutil
import uuid

from daemon.runtimes.base import (
    KILLED,
    PFS,
    ContainerRun,
    HostRuntime,
    batch_argv,
    batch_mounts,
    batch_statuses,
    check_run,
    datum_env,
    kill_process,
    memory_rlimit_argv,
    note,
    run_process_with_timeout,
    timeout_message,
)
from vfs.errors import InvalidSpec

#: Host directories shown read-only inside (those present; symlinks are recreated).
HOST_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")


def build_args(run: ContainerRun, *, status_dir: str | None = None,
               host_paths: tuple[str, ...] = HOST_PATHS, bwrap: str = "bwrap") -> list[str]:
    """The bwrap command line of ``run`` (``status_dir``: where a batch writes statuses)."""
    args = [bwrap, "--die-with-parent", "--new-session", "--unshare-all"]
    if run.network:
        args.append("--share-net")
    # As root bwrap keeps every capability unless told otherwise.
    args += ["--cap-drop", "ALL", "--hostname", "vfs"]
    for path in host_paths:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    if run.batch:
        assert status_dir is not None
        args += ["--tmpfs", PFS]
        for mount in batch_mounts(run, status_dir):
            args += ["--bind" if mount.writable else "--ro-bind", mount.source, mount.target]
        env = datum_env(run)
        command = batch_argv(run)
    else:
        datum = run.datums[0]
        args += ["--ro-bind", datum.input_dir, f"{PFS}/{run.input_repo}",
                 "--bind", datum.out_dir, f"{PFS}/out"]
        env = datum_env(run, datum=datum)
        command = list(run.cmd)
    args += ["--chdir", "/", "--clearenv"]
    for key, value in env.items():
        args += ["--setenv", key, value]
    return [*args, "--", *command]


class BwrapRuntime(HostRuntime):
    """Run host programs in a bubblewrap sandbox (see the module docstring).

    ``memory`` is enforced as an address-space limit (RLIMIT_AS, see
    :func:`~daemon.runtimes.base.memory_rlimit_argv`); ``cpus`` is not enforced.
    The command runs as the daemon's user without capabilities.
    """

    name = "bwrap"

    def __init__(self, host_paths: tuple[str, ...] = HOST_PATHS) -> None:
        self.host_paths = host_paths

    def _binary(self) -> str:
        path = shutil.which("bwrap")
        if path is None:
            raise InvalidSpec("runtime bwrap needs bubblewrap, which is not installed on this "
                              "node: install it (apt-get install bubblewrap) or use another "
                              "runtime")
        return path

    def check(self, image: str | None, *, batch: bool = False) -> None:
        super().check(image, batch=batch)
        self._binary()
        if batch and not os.access("/bin/sh", os.X_OK):
            raise InvalidSpec("datum_batch > 1 needs /bin/sh, which this node lacks")

    async def run(self, run: ContainerRun) -> list[int]:
        check_run(run)
        bwrap = self._binary()
        status_dir = None
        if run.batch:
            status_dir = os.path.join(run.workdir, f"status-{uuid.uuid4().hex[:8]}")
            os.makedirs(status_dir)
        argv = memory_rlimit_argv(run.memory) + build_args(
            run, status_dir=status_dir, host_paths=self.host_paths, bwrap=bwrap)
        # Killing bwrap is enough: --die-with-parent takes its pid 1 with it, and the
        # kernel kills the rest of a pid namespace when its pid 1 dies.
        if not run.batch:
            datum = run.datums[0]
            with open(datum.log_path, "ab") as log:
                status = await run_process_with_timeout(
                    argv, timeout=run.timeout, deliver_cancel=kill_process, log=log)
            if status is None:
                note(datum.log_path, timeout_message(run, True))
                return [KILLED]
            return [status]
        assert status_dir is not None
        start_log = os.path.join(run.workdir, f"{os.path.basename(status_dir)}.log")
        with open(start_log, "ab") as log:
            status = await run_process_with_timeout(
                argv, timeout=run.timeout, deliver_cancel=kill_process, log=log)
        return batch_statuses(run, status_dir, status, start_log)
