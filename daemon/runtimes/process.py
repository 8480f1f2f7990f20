"""The ``process`` runtime: the command runs directly on the host, without isolation.

For development only, never a default: the command sees the whole host, runs as the
daemon's user and can reach the network whatever the spec says. On a worker node,
where vfsd runs as root and holds the store's credentials, that would give every
pipeline the whole host and the whole bucket: a root daemon refuses it unless it was
started with ``--allow-process-runtime``.
"""

from __future__ import annotations

import math
import os
import subprocess

import trio

from daemon.runtimes.base import (
    DEFAULT_PATH,
    ContainerRun,
    DatumIO,
    HostRuntime,
    check_run,
    datum_env,
    exit_status,
    input_mounts,
    kill_process_group,
    memory_rlimit_argv,
    note,
    timed_out,
)
from vfs.errors import InvalidSpec


class ProcessRuntime(HostRuntime):
    """Run the command as a plain host process.

    There is no ``/pfs`` on the host, so ``VFS_PFS`` names a host directory laid out
    like it: the datum's directory of each input and its output directory are moved to
    ``$VFS_PFS/<input name>`` and ``$VFS_PFS/out`` while it runs (real directories, as
    in the other runtimes), and back afterwards. **Commands meant to run under
    this runtime must use ``${VFS_PFS}`` instead of ``/pfs``**, e.g.
    ``["sh", "-c", "tr a-z A-Z < \"$VFS_PFS/docs/a.txt\" > \"$VFS_PFS/out/a.txt\""]``;
    ``${VFS_PFS}`` is ``/pfs`` in the other runtimes, so such a command runs in all.

    The environment is the spec's plus ``PATH`` and ``HOME`` of the daemon; the working
    directory is the run's scratch directory. ``memory`` is enforced as an address-space
    limit (RLIMIT_AS); ``cpus``, ``pids`` and ``user`` are not enforced; ``network``
    is ignored. A batch runs the datums one after the other, each with its own
    ``$VFS_PFS`` and ``timeout``. Each datum runs in its own process group, killed at
    the end, so background processes it leaves behind do not outlive it (one that
    calls ``setsid`` escapes, and any datum can reach any file of the host, other
    datums' directories included: no isolation here).
    """

    name = "process"
    isolates_network = False

    def __init__(self, *, allow_as_root: bool = False) -> None:
        self.allow_as_root = allow_as_root

    def check(self, image: str | None) -> None:
        super().check(image)
        if os.geteuid() == 0 and not self.allow_as_root:
            raise InvalidSpec(
                "runtime process runs commands unsandboxed, and this vfsd runs as root: "
                "they would see every file of the node, the store's credentials included. "
                "Use runtime bwrap or runc, or (development machines only) start vfsd "
                "with --allow-process-runtime")

    async def run(self, run: ContainerRun) -> list[int]:
        check_run(run)
        self.check(run.image)
        return [await self._run_datum(run, index, datum)
                for index, datum in enumerate(run.datums)]

    async def _run_datum(self, run: ContainerRun, index: int, datum: DatumIO) -> int:
        pfs = os.path.join(run.workdir, f"pfs-{index}")
        os.makedirs(pfs, exist_ok=True)
        moves = [*input_mounts(run, datum, pfs=pfs), (datum.out_dir, os.path.join(pfs, "out"))]
        moved: list[tuple[str, str]] = []
        try:
            for home, shown in moves:
                os.rename(home, shown)
                moved.append((home, shown))
            return await self._run_process(run, datum, pfs)
        finally:
            # Only what was moved goes back: a directory missing at home (the caller's
            # mistake) fails the datum without another error hiding that one.
            for home, shown in moved:
                try:
                    os.rename(shown, home)
                except FileNotFoundError:  # the command removed it: nothing stops it here
                    os.makedirs(home)

    async def _run_process(self, run: ContainerRun, datum: DatumIO, pfs: str) -> int:
        host = {"PATH": os.environ.get("PATH", DEFAULT_PATH),
                "HOME": os.environ.get("HOME", run.workdir)}
        env = datum_env(run, datum, base=host, pfs=pfs)
        try:
            with open(datum.log_path, "ab") as log:
                process = await trio.lowlevel.open_process(
                    [*memory_rlimit_argv(run.memory), *run.cmd], stdin=subprocess.DEVNULL,
                    stdout=log, stderr=log, env=env, cwd=run.workdir, start_new_session=True,
                )
        except OSError as exc:
            # The command is missing or not executable: the datum fails as under a shell.
            note(datum.log_path, f"cannot run {run.cmd[0]!r}: {exc.strerror}")
            return 127 if isinstance(exc, FileNotFoundError) else 126
        try:
            with trio.move_on_after(math.inf if run.timeout is None else run.timeout) as scope:
                await process.wait()
        finally:
            # Whether the leader exited, timed out or we are cancelled: anything left
            # in its process group goes too, and the leader is reaped before we return.
            kill_process_group(process.pid)
            with trio.CancelScope(shield=True):
                await process.wait()
        if scope.cancelled_caught:
            return timed_out(run, datum)
        assert process.returncode is not None
        return exit_status(process.returncode)
