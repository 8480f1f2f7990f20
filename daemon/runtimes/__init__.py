"""Container runtimes: how a pipeline's command runs on its datums, behind one interface.

The scheduler describes each container start as a :class:`ContainerRun` (the command,
its environment, the image, the inputs' names and commits, one or more
:class:`DatumIO`) and awaits :meth:`Runtime.run`, which returns one exit status per
datum. Inside, each datum's files of each input are read-only at
``/pfs/<input name>/<path>`` (an empty directory when it has none of that input), its
output directory is ``/pfs/out``, and the environment carries ``VFS_DATUM_ID``,
``VFS_JOB_ID``, ``VFS_INPUT_<NAME>_COMMIT`` per input (the name upper-cased, ``-`` and
``.`` written ``_``), ``VFS_INPUT_COMMIT`` too when there is a single input,
``VFS_PFS=/pfs``, ``VFS_NODE`` and the spec's ``env``.

========  ==============================  =========  ==================  ===========
runtime   image                           network    memory              cpus
========  ==============================  =========  ==================  ===========
runc      rootfs dir or OCI layout dir    isolated   cgroup              cgroup
podman    image name                      isolated   engine              engine
docker    image name                      isolated   engine              engine
bwrap     none (host programs)            isolated   RLIMIT_AS           not enforced
process   none (host, no isolation)       not        RLIMIT_AS           not enforced
========  ==============================  =========  ==================  ===========

Every runtime but ``process`` runs the command as an unprivileged user (``user``,
default 65534:65534) with no capabilities, no new privileges, a bounded number of
processes (``pids``, default 512), an environment built from scratch, and nothing of
the host's files but the programs (bwrap) or the image (runc, podman, docker).

``process`` has no ``/pfs``: commands use ``${VFS_PFS}`` (see :class:`ProcessRuntime`).
It isolates nothing, so a daemon running as root refuses it unless started with
``--allow-process-runtime``.
A start with several datums (``datum_batch``) runs them one after the other, each in
a sandbox of its own made as for a single datum (real directories at
``/pfs/<input name>`` and ``/pfs/out``, a fresh ``/tmp``, no process of another datum
alive, its exit status seen by the runtime outside the sandbox): a batch shares only
the preparation (image, bundle, ``/etc``), so it saves that per datum and is
indistinguishable from single datums to the command. ``timeout`` is per datum.
"""

from __future__ import annotations

from daemon.runtimes.base import KILLED, ContainerRun, DatumIO, Runtime
from daemon.runtimes.bwrap import BwrapRuntime
from daemon.runtimes.podman import DockerRuntime, PodmanRuntime
from daemon.runtimes.process import ProcessRuntime
from daemon.runtimes.runc import DEFAULT_USERNS_BASE, RuncRuntime
from vfs.errors import InvalidSpec

RUNTIMES: dict[str, type[Runtime]] = {
    "runc": RuncRuntime,
    "podman": PodmanRuntime,
    "docker": DockerRuntime,
    "bwrap": BwrapRuntime,
    "process": ProcessRuntime,
}


def get_runtime(name: str, *, cache_dir: str | None = None,
                allow_process_as_root: bool = False,
                userns_base: int | None = DEFAULT_USERNS_BASE) -> Runtime:
    """The runtime called ``name``.

    Args:
        cache_dir: where runc unpacks OCI image layouts (default ``$VFS_CACHE/images``).
        allow_process_as_root: let the unsandboxed ``process`` runtime run commands
            when this process is root (vfsd ``--allow-process-runtime``).
        userns_base: the host id of the root of runc's user namespaces (None: none).

    Raises:
        InvalidSpec: no runtime has that name.
    """
    try:
        runtime_class = RUNTIMES[name]
    except KeyError:
        raise InvalidSpec(f"unknown runtime {name!r}: use one of "
                          f"{', '.join(RUNTIMES)}") from None
    if runtime_class is RuncRuntime:
        return RuncRuntime(cache_dir=cache_dir, userns_base=userns_base)
    if runtime_class is ProcessRuntime:
        return ProcessRuntime(allow_as_root=allow_process_as_root)
    return runtime_class()


__all__ = ["KILLED", "RUNTIMES", "BwrapRuntime", "ContainerRun", "DatumIO", "DockerRuntime",
           "PodmanRuntime", "ProcessRuntime", "Runtime", "RuncRuntime", "get_runtime"]
