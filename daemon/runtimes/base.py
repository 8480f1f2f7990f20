"""What every container runtime shares: the run description, the interface, the batch wrapper.

A runtime runs a pipeline's command on one or more datums in one *container start*.
The scheduler prepares, on the host, an input and an output directory per datum and
describes the start as a :class:`ContainerRun`; :meth:`Runtime.run` returns one exit
status per datum.

Exit statuses follow the shell's convention whatever the runtime: ``0``-``255`` as the
command exited, ``128 + N`` when it was killed by signal ``N`` (so ``137`` for a
SIGKILL: out of memory under a cgroup limit, or a timeout). A datum that timed out,
or that a batch never reached because of a timeout, gets :data:`KILLED` and a line
starting with ``vfs:`` in its log saying so.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import IO

import trio

from vfs.errors import InvalidSpec
from vfs.pipeline.spec import DEFAULT_PIDS, DEFAULT_USER

#: Exit status of a datum killed with SIGKILL (by us on a timeout, or by the kernel).
KILLED = 128 + signal.SIGKILL
#: The ``PATH`` inside a container unless the image or the spec sets one.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Where the datum's files are inside a container.
PFS = "/pfs"


@dataclass
class DatumIO:
    """One datum's directories and log on the host."""

    datum_id: str  # e.g. 16 hex chars
    input_dir: str  # host dir, shown read-only at /pfs/<input_repo>
    out_dir: str  # host dir, empty, shown writable at /pfs/out
    log_path: str  # host file receiving this datum's stdout+stderr (appended to)


@dataclass
class ContainerRun:
    """One container start: the command, its environment and the datums it processes."""

    job_id: str
    input_repo: str
    input_commit: str
    cmd: list[str]
    env: dict[str, str]
    # runc: a root filesystem directory or an OCI image layout directory;
    # podman/docker: an image name; bwrap/process: None (host binaries).
    image: str | None
    datums: list[DatumIO]  # more than one: datum_batch, all in ONE container start
    workdir: str  # host scratch dir the runtime may use (bundle...); removed by the caller
    network: bool = False
    memory: int | None = None  # bytes
    cpus: float | None = None
    timeout: float | None = None  # seconds for the whole start (None = no limit)
    user: tuple[int, int] = DEFAULT_USER  # uid, gid of the command (see run_as)
    pids: int | None = DEFAULT_PIDS  # processes and threads at once (None = no limit)

    @property
    def batch(self) -> bool:
        return len(self.datums) > 1

    @property
    def run_as(self) -> tuple[int, int] | None:
        """The uid and gid the command runs as; None where the daemon cannot switch
        (it is not root), so the command runs as the daemon's own, unprivileged, user."""
        return self.user if os.geteuid() == 0 else None


class Runtime:
    """A way to run a pipeline command in isolation; one subclass per runtime."""

    name: str = ""
    #: False where the command can reach the network whatever ``network`` says.
    isolates_network: bool = True

    def check(self, image: str | None, *, batch: bool = False) -> None:
        """Check that this node can run ``image`` with this runtime.

        Args:
            image: the spec's ``transform.image``.
            batch: the spec batches datums (``datum_batch > 1``), which needs ``/bin/sh``
                (and ``ln``) in the image.

        Raises:
            InvalidSpec: the runtime's program is not installed, or the image is
                missing or unusable; the message says which and what to do.
        """
        raise NotImplementedError

    def image_digest(self, image: str | None) -> str:
        """A stable identifier of the image's content (part of every datum's hash).

        Synchronous and possibly slow (a root filesystem is hashed the first time):
        call it from a worker thread.

        Raises:
            InvalidSpec: the image cannot be read or identified.
        """
        raise NotImplementedError

    def unsupported_limits(self, memory: int | None, cpus: float | None,
                           pids: int | None = None) -> list[str]:
        """The names (``"memory"``, ``"cpus"``, ``"pids"``) of the requested limits this
        runtime cannot enforce here, so the scheduler can warn; empty when all are."""
        raise NotImplementedError

    async def run(self, run: ContainerRun) -> list[int]:
        """Run ``run.cmd`` once per datum of ``run`` in one container start.

        Cancelling the surrounding scope stops everything the start created (processes,
        containers) before this returns or raises.

        Returns:
            The exit status of each datum, in the order of ``run.datums``.

        Raises:
            InvalidSpec: the run cannot start (program or image missing, bad layout).
        """
        raise NotImplementedError


class HostRuntime(Runtime):
    """A runtime that runs the node's own binaries (no image): process, bwrap.

    ``memory`` is enforced as an address-space limit (RLIMIT_AS); ``cpus`` is not.
    """

    def check(self, image: str | None, *, batch: bool = False) -> None:
        if image is not None:
            raise InvalidSpec(f"runtime {self.name} runs host binaries: remove "
                              "'transform.image' or use runtime runc, podman or docker")

    def image_digest(self, image: str | None) -> str:
        return "host"

    def unsupported_limits(self, memory: int | None, cpus: float | None,
                           pids: int | None = None) -> list[str]:
        return ["cpus"] if cpus is not None else []


def check_run(run: ContainerRun) -> None:
    """Reject a run whose names would collide with the layout under ``/pfs``."""
    if not run.cmd:
        raise InvalidSpec("the transform's cmd is empty")
    if not run.datums:
        raise ValueError("a container run needs at least one datum")
    repo = run.input_repo
    if repo == "out" or not repo or "/" in repo or repo.startswith(".") or "\0" in repo:
        raise InvalidSpec(
            f"input repository {repo!r} cannot be shown at {PFS}/{repo}: "
            f"{PFS}/out is the output directory; rename the repository"
        )


def datum_env(run: ContainerRun, *, base: dict[str, str] | None = None,
              datum: DatumIO | None = None, pfs: str = PFS) -> dict[str, str]:
    """The environment of the command: base (image), spec, then the ``VFS_*`` variables.

    ``VFS_DATUM_ID`` is set only when ``datum`` is given (a batch sets it per datum).
    """
    env = {"PATH": DEFAULT_PATH, "HOME": "/tmp"}
    env.update(base or {})
    env.update(run.env)
    env.update({"VFS_JOB_ID": run.job_id, "VFS_INPUT_COMMIT": run.input_commit, "VFS_PFS": pfs})
    if datum is not None:
        env["VFS_DATUM_ID"] = datum.datum_id
    return env


def give_to_user(run: ContainerRun, *writable: str | None,
                 owner: tuple[int, int] | None = None) -> None:
    """Hand a start's directories to the user the command runs as (when the daemon can
    switch users): the inputs (read-only inside, but the user must be able to read
    files stored with mode 0600), the output directories, the batch logs, and
    ``writable`` (e.g. a batch's status directory). Blocking: call from a thread.

    Args:
        owner: the host's uid and gid for that user, when they differ from the ids in
            the container (a user namespace); default ``run.run_as``.
    """
    run_as = run.run_as
    if run_as is None:
        return
    uid, gid = owner or run_as
    paths: list[str] = [path for path in writable if path is not None]
    for datum in run.datums:
        paths.append(datum.out_dir)
        if run.batch:
            touch(datum.log_path)
            paths.append(datum.log_path)
        for directory, subdirs, files in os.walk(datum.input_dir):
            paths.append(directory)
            paths += [os.path.join(directory, name) for name in files]
            # Symlinks to directories are listed with the directories, never walked.
            paths += [os.path.join(directory, name) for name in subdirs
                      if os.path.islink(os.path.join(directory, name))]
    for path in paths:
        os.lchown(path, uid, gid)


def env_list(env: dict[str, str]) -> list[str]:
    return [f"{key}={value}" for key, value in env.items()]


def exit_status(returncode: int) -> int:
    """The shell's view of a status: a kill by signal N is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def touch(path: str) -> None:
    """Make sure a log file exists (it is bind-mounted, or appended to)."""
    with open(path, "ab"):
        pass


def note(log_path: str, message: str) -> None:
    """Append a line of our own to a datum's log, marked so it is not the command's."""
    with open(log_path, "ab") as log:
        log.write(f"vfs: {message}\n".encode())


def timeout_message(run: ContainerRun, reached: bool) -> str:
    if reached:
        return f"killed: the container start ran longer than its timeout ({run.timeout:g} s)"
    return (f"not run: the container start reached its timeout ({run.timeout:g} s) "
            "before this datum's turn")


def memory_rlimit_argv(memory: int | None) -> list[str]:
    """A command prefix limiting the address space to ``memory`` bytes (RLIMIT_AS).

    Only an approximation of a memory limit: it counts reserved, not used, memory, so
    programs that reserve large arenas (Go, Java) need more than they use. Done by
    util-linux's ``prlimit`` rather than a ``preexec_fn``, which is unsafe in a
    process with threads (the daemon has worker threads).
    """
    if memory is None:
        return []
    return ["prlimit", f"--as={memory}", "--"]


#: What of the daemon's environment a runtime's own program (bwrap, runc, podman,
#: docker) gets: how to find programs and reach a container engine, nothing else. The
#: daemon's environment holds the store's credentials (AWS_*), and a sandbox's pid 1
#: is a copy of the runtime's program, environment included.
_RUNTIME_ENV = ("PATH", "HOME", "LANG", "TMPDIR", "XDG_RUNTIME_DIR", "DOCKER_HOST",
                "DOCKER_CONFIG", "CONTAINER_HOST", "CONTAINERS_CONF")


def runtime_env() -> dict[str, str]:
    """The environment of a runtime's own program (see :data:`_RUNTIME_ENV`)."""
    env = {key: os.environ[key] for key in _RUNTIME_ENV if key in os.environ}
    env.setdefault("PATH", DEFAULT_PATH)
    return env


async def run_process_with_timeout(
    argv: list[str], *, timeout: float | None,
    deliver_cancel: Callable[[trio.Process], Awaitable[None]], log: IO[bytes],
) -> int | None:
    """Run ``argv`` to its end, its stdout and stderr to ``log``; None if ``timeout``
    expired first (and it was stopped).

    ``deliver_cancel`` stops it on a timeout and on a cancellation from outside; trio
    waits, shielded, for the process to exit before this returns or raises.
    """
    with trio.move_on_after(math.inf if timeout is None else timeout):
        process = await trio.run_process(argv, check=False, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, env=runtime_env(),
                                         deliver_cancel=deliver_cancel)
        return exit_status(process.returncode)
    return None


async def kill_process(process: trio.Process) -> None:
    """deliver_cancel for a process whose death takes everything it started with it."""
    process.kill()


def kill_process_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# The batch wrapper, run by the image's /bin/sh. Arguments: the input repo, the number
# of datums N, N datum ids, then the command. Datum i's input is bound at /pfs/.in/i,
# its output at /pfs/.out/i and its log at /pfs/.log/i; /pfs is a tmpfs, so the
# unprivileged wrapper can point /pfs/<repo> and /pfs/out at datum i's directories
# with symlinks (remounting would need privileges the command must not have). The
# exit status of each datum is written to /pfs/.status/i, where the host reads it: a
# missing file means the datum never finished.
BATCH_SCRIPT = r"""
repo=$1; n=$2; shift 2
ids=
while [ "$n" -gt 0 ]; do ids="$ids $1"; shift; n=$((n - 1)); done
i=0
for id in $ids; do
  ln -sfn ".in/$i" "/pfs/$repo" && ln -sfn ".out/$i" /pfs/out || exit 125
  VFS_DATUM_ID=$id "$@" </dev/null >>"/pfs/.log/$i" 2>&1
  echo $? >"/pfs/.status/$i"
  i=$((i + 1))
done
"""


def batch_argv(run: ContainerRun, shell: str = "/bin/sh") -> list[str]:
    """The command line running :data:`BATCH_SCRIPT` over the datums of ``run``."""
    return [shell, "-c", BATCH_SCRIPT, "vfs-batch", run.input_repo, str(len(run.datums)),
            *(datum.datum_id for datum in run.datums), *run.cmd]


@dataclass
class BatchMount:
    """Where each part of a batched datum goes inside the container."""

    source: str
    target: str
    writable: bool


def batch_mounts(run: ContainerRun, status_dir: str) -> list[BatchMount]:
    """The binds a batch needs under the ``/pfs`` tmpfs; creates the datums' log files
    if they do not exist yet, as a bind needs its source."""
    mounts = []
    for index, datum in enumerate(run.datums):
        touch(datum.log_path)
        mounts.append(BatchMount(datum.input_dir, f"{PFS}/.in/{index}", False))
        mounts.append(BatchMount(datum.out_dir, f"{PFS}/.out/{index}", True))
        mounts.append(BatchMount(datum.log_path, f"{PFS}/.log/{index}", True))
    mounts.append(BatchMount(status_dir, f"{PFS}/.status", True))
    return mounts


def batch_statuses(run: ContainerRun, status_dir: str, start_status: int | None,
                   start_log: str | None) -> list[int]:
    """Each datum's status from the wrapper's files, explaining in its log any that is missing.

    Args:
        start_status: the container start's own status, None if it timed out.
        start_log: a file holding the runtime's own output (why it could not start).
    """
    statuses: list[int] = []
    reached = True  # the first datum without a status is the one the timeout hit
    for index, datum in enumerate(run.datums):
        try:
            with open(os.path.join(status_dir, str(index))) as f:
                statuses.append(int(f.read().strip()))
            continue
        except (FileNotFoundError, ValueError):
            pass
        if start_status is None:
            note(datum.log_path, timeout_message(run, reached))
            reached = False
            statuses.append(KILLED)
            continue
        detail = ""
        if start_log is not None:
            try:
                with open(start_log, "rb") as f:
                    detail = f.read()[-4000:].decode(errors="replace").strip()
            except FileNotFoundError:
                pass
        note(datum.log_path, f"the batch container ended with status {start_status} "
                             "before this datum finished" + (f":\n{detail}" if detail else ""))
        statuses.append(start_status if start_status != 0 else 1)
    return statuses
