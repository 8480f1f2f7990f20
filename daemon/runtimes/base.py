"""What every container runtime shares: the run description, the interface, the helpers.

A runtime runs a pipeline's command on one or more datums (a batch, ``datum_batch``)
in one *start*. The scheduler prepares, on the host, an input and an output
directory per datum and describes the start as a :class:`ContainerRun`;
:meth:`Runtime.run` returns one exit status per datum.

A pipeline has one or more inputs, each with a name. A datum's input directory holds
one subdirectory per input name (empty when the datum has no file of that input),
and each is shown read-only at ``/pfs/<name>``; ``VFS_INPUT_<NAME>_COMMIT`` names the
commit each input was read from (:func:`datum_env`).

A batch must look to the command exactly like single datums: every datum of a start
runs in a sandbox of its own, one after the other, with its inputs and output as real
directories at ``/pfs/<name>`` and ``/pfs/out``, a fresh ``/tmp``, and no process of
the datums before it still alive. What a start shares between its datums is the
preparation on the host (the image, the runtime's bundle, the pids cgroup, the
sandbox's ``/etc``), never a directory or a process. Each datum's exit status is the
one its sandbox's process ends with, seen by the runtime on the host: nothing inside
a sandbox can write the status of a datum. Nothing per datum goes on a command line
but that datum's own paths, so a batch has no size limit of its own.

Exit statuses follow the shell's convention whatever the runtime: ``0``-``255`` as the
command exited, ``128 + N`` when it was killed by signal ``N`` (so ``137`` for a
SIGKILL: out of memory under a cgroup limit, or a timeout). A datum that ran longer
than ``timeout`` gets :data:`KILLED`, ``DatumIO.timed_out`` and a line starting with
``vfs:`` in its log saying so.
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
from vfs.pipeline.inputs import commit_env_var
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
    # host dir holding one dir per input name (made by the caller, empty when the datum
    # has no file of that input): <input_dir>/<name> is shown read-only at /pfs/<name>
    input_dir: str
    out_dir: str  # host dir, empty, shown writable at /pfs/out
    log_path: str  # host file receiving this datum's stdout+stderr (appended to)
    timed_out: bool = False  # set by the runtime: it killed the datum at its timeout


@dataclass
class ContainerRun:
    """One start: the command, its environment and the datums it processes."""

    job_id: str
    # (name, commit id) per input, in the spec's order; the name is the directory under
    # /pfs (the repository's name for a pipeline with one input)
    inputs: list[tuple[str, str]]
    cmd: list[str]
    env: dict[str, str]
    # runc: a root filesystem directory or an OCI image layout directory;
    # podman/docker: an image name; bwrap/process: None (host binaries).
    image: str | None
    datums: list[DatumIO]  # more than one: datum_batch, one sandbox each (see above)
    workdir: str  # host scratch dir the runtime may use (bundle...); removed by the caller
    network: bool = False
    memory: int | None = None  # bytes
    cpus: float | None = None
    timeout: float | None = None  # seconds each datum may run (None = no limit)
    user: tuple[int, int] = DEFAULT_USER  # uid, gid of the command (see run_as)
    pids: int | None = DEFAULT_PIDS  # processes and threads at once (None = no limit)
    node: str = ""  # the name of the node running it ($VFS_NODE)

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

    def check(self, image: str | None) -> None:
        """Check that this node can run ``image`` with this runtime.

        Args:
            image: the spec's ``transform.image``.

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
        """Run ``run.cmd`` once per datum of ``run``, one after the other, each datum in a
        sandbox of its own (see the module docstring).

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

    def check(self, image: str | None) -> None:
        if image is not None:
            raise InvalidSpec(f"runtime {self.name} runs host binaries: remove "
                              "'transform.image' or use runtime runc, podman or docker")

    def image_digest(self, image: str | None) -> str:
        return "host"

    def unsupported_limits(self, memory: int | None, cpus: float | None,
                           pids: int | None = None) -> list[str]:
        return ["cpus"] if cpus is not None else []


def check_run(run: ContainerRun) -> None:
    """Reject a run whose input names would not make a layout under ``/pfs``.

    Raises:
        InvalidSpec: the command is empty, or an input's name is ``out``, is not a
            plain directory name, is another input's too, or gives the same commit
            variable as another's; the message says which.
        ValueError: the run has no datum or no input (the caller's mistake).
    """
    if not run.cmd:
        raise InvalidSpec("the transform's cmd is empty")
    if not run.datums:
        raise ValueError("a container run needs at least one datum")
    if not run.inputs:
        raise ValueError("a container run needs at least one input")
    named: dict[str, str] = {}  # commit variable: the input that sets it
    for name, _ in run.inputs:
        if name == "out":
            raise InvalidSpec(f"input {name!r} cannot be shown at {PFS}/{name}: {PFS}/out is "
                              "the output directory; give the input another name")
        if not name or "/" in name or name.startswith(".") or "\0" in name:
            raise InvalidSpec(f"input name {name!r} cannot be a directory under {PFS}: a name "
                              "must be non-empty, hold no '/' and not start with '.'; give "
                              "the input another name")
        variable = commit_env_var(name)
        other = named.get(variable)
        if other == name:
            raise InvalidSpec(f"two inputs are named {name!r}: each input needs a directory "
                              f"of its own under {PFS}; give one of them another name")
        if other is not None:
            # Both directories could exist, but the command could not tell their commits
            # apart (VFS_INPUT_RAW_LOGS_COMMIT for raw-logs and raw_logs).
            raise InvalidSpec(f"inputs {other!r} and {name!r} would both set {variable}: "
                              "give one of them another name")
        named[variable] = name


def datum_env(run: ContainerRun, datum: DatumIO, *, base: dict[str, str] | None = None,
              pfs: str = PFS) -> dict[str, str]:
    """The environment of the command on ``datum``: base (image), spec, then ``VFS_*``.

    Every input's commit is ``VFS_INPUT_<NAME>_COMMIT``; with a single input it is also
    ``VFS_INPUT_COMMIT``, as before pipelines had several inputs (with several, which
    one it would be is not obvious, so it is not set).
    """
    env = {"PATH": DEFAULT_PATH, "HOME": "/tmp"}
    env.update(base or {})
    env.update(run.env)
    env["VFS_JOB_ID"] = run.job_id
    env.update({commit_env_var(name): commit for name, commit in run.inputs})
    if len(run.inputs) == 1:
        env["VFS_INPUT_COMMIT"] = run.inputs[0][1]
    env.update({"VFS_PFS": pfs, "VFS_DATUM_ID": datum.datum_id, "VFS_NODE": run.node})
    return env


def input_mounts(run: ContainerRun, datum: DatumIO, *, pfs: str = PFS
                 ) -> list[tuple[str, str]]:
    """Where each of ``datum``'s input directories is shown: (host dir, dir under
    ``pfs``) per input, in the order of ``run.inputs``."""
    return [(os.path.join(datum.input_dir, name), f"{pfs}/{name}") for name, _ in run.inputs]


def give_to_user(run: ContainerRun, *, owner: tuple[int, int] | None = None) -> None:
    """Hand a start's directories to the user the command runs as (when the daemon can
    switch users): the inputs (read-only inside, but the user must be able to read
    files stored with mode 0600) and the output directories. Blocking: call from a
    thread.

    Args:
        owner: the host's uid and gid for that user, when they differ from the ids in
            the container (a user namespace); default ``run.run_as``.
    """
    run_as = run.run_as
    if run_as is None:
        return
    uid, gid = owner or run_as
    paths: list[str] = []
    for datum in run.datums:
        paths.append(datum.out_dir)
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


def note(log_path: str, message: str) -> None:
    """Append a line of our own to a datum's log, marked so it is not the command's."""
    with open(log_path, "ab") as log:
        log.write(f"vfs: {message}\n".encode())


def timed_out(run: ContainerRun, datum: DatumIO) -> int:
    """Record that ``datum`` was killed at its timeout; its status, :data:`KILLED`."""
    datum.timed_out = True
    note(datum.log_path, f"killed: the datum ran longer than its timeout ({run.timeout:g} s)")
    return KILLED


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
