"""The ``podman`` and ``docker`` runtimes: an image by name, run by the engine's CLI.

Both take the same command line (:func:`build_args`): ``run --rm`` with the datum's
inputs bound read-only at ``/pfs/<input name>`` and its output at ``/pfs/out``, no
network unless asked, the limits as ``--memory``/``--cpus``, and the command as the
entrypoint (``transform.cmd`` replaces the image's entrypoint and command). The
container runs as the datum's user (``--user``, default 65534:65534; never the
image's), without capabilities (``--cap-drop ALL``) or new privileges, on a read-only
root with a tmpfs ``/tmp``, with ``--pids-limit``. A timeout or a cancellation removes the
container with ``rm --force``, which stops it first.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid

import trio

from daemon.runtimes.base import (
    PFS,
    ContainerRun,
    DatumIO,
    Runtime,
    check_run,
    datum_env,
    give_to_user,
    input_mounts,
    run_process_with_timeout,
    timed_out,
)
from vfs.errors import InvalidSpec

_KILL_PATIENCE = 10.0


def _volume(source: str, target: str, writable: bool) -> str:
    return f"{source}:{target}" + ("" if writable else ":ro")


def build_args(run: ContainerRun, datum: DatumIO, *, name: str,
               engine: str = "podman") -> list[str]:
    """The ``<engine> run ...`` command line running ``run``'s command on ``datum``, the
    container being ``name``."""
    args = [engine, "run", "--rm", "--name", name, "--hostname", "vfs", "--workdir", "/"]
    uid, gid = run.run_as or (os.getuid(), os.getgid())
    args += ["--user", f"{uid}:{gid}", "--cap-drop", "ALL",
             "--security-opt", "no-new-privileges", "--read-only",
             "--tmpfs", "/tmp:rw,nosuid,nodev,mode=1777"]
    if not run.network:
        args.append("--network=none")
    if run.pids is not None:
        args += ["--pids-limit", str(run.pids)]
    if run.memory is not None:
        args += ["--memory", str(run.memory)]
    if run.cpus is not None:
        args += ["--cpus", f"{run.cpus:g}"]
    for source, target in input_mounts(run, datum):
        args += ["--volume", _volume(source, target, False)]
    args += ["--volume", _volume(datum.out_dir, f"{PFS}/out", True)]
    command = list(run.cmd)
    # The image's PATH and HOME are better guesses than ours for an image by name.
    for key, value in datum_env(run, datum).items():
        if key not in ("PATH", "HOME") or key in run.env:
            args += ["--env", f"{key}={value}"]
    assert run.image is not None
    return [*args, "--entrypoint", command[0], run.image, *command[1:]]


class PodmanRuntime(Runtime):
    """Run the command with podman (the image is an image name the engine knows)."""

    name = "podman"

    def _binary(self) -> str:
        path = shutil.which(self.name)
        if path is None:
            raise InvalidSpec(f"runtime {self.name} needs {self.name}, which is not installed "
                              "on this node: install it or use another runtime (runc takes "
                              "an OCI image layout directory, e.g. from skopeo copy)")
        return path

    def check(self, image: str | None) -> None:
        self._binary()
        if not image:
            raise InvalidSpec(f"runtime {self.name} needs 'transform.image' (an image name)")

    def image_digest(self, image: str | None) -> str:
        engine = self._binary()
        if not image:
            raise InvalidSpec(f"runtime {self.name} needs 'transform.image' (an image name)")
        try:
            result = subprocess.run([engine, "image", "inspect", "--format", "{{.Id}}", image],
                                    capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise InvalidSpec(f"cannot ask {self.name} about image {image}: {exc}") from None
        digest = result.stdout.strip()
        if result.returncode != 0 or not digest:
            raise InvalidSpec(f"{self.name} does not know image {image} "
                              f"({result.stderr.strip() or 'no id'}): pull or build it first")
        return digest

    def unsupported_limits(self, memory: int | None, cpus: float | None,
                           pids: int | None = None) -> list[str]:
        return []

    async def run(self, run: ContainerRun) -> list[int]:
        check_run(run)
        engine = self._binary()
        if not run.image:
            raise InvalidSpec(f"runtime {self.name} needs 'transform.image' (an image name)")
        await trio.to_thread.run_sync(give_to_user, run)
        return [await self._run_container(run, datum, engine) for datum in run.datums]

    async def _run_container(self, run: ContainerRun, datum: DatumIO, engine: str) -> int:
        """One container for ``datum`` (``run --rm``); its status."""
        job = re.sub(r"[^\w.-]", "_", run.job_id)[:16]
        name = f"vfs-{job}-{datum.datum_id[:16]}-{uuid.uuid4().hex[:8]}"
        argv = build_args(run, datum, name=name, engine=engine)

        async def remove() -> None:
            await trio.run_process([engine, "rm", "--force", name], check=False,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        async def deliver_cancel(process: trio.Process) -> None:
            # The container may not exist yet while `run` creates it: try until it ends.
            deadline = trio.current_time() + _KILL_PATIENCE
            while trio.current_time() < deadline:
                await remove()
                await trio.sleep(0.2)
            process.kill()

        finished = False
        try:
            with open(datum.log_path, "ab") as log:
                status = await run_process_with_timeout(
                    argv, timeout=run.timeout, deliver_cancel=deliver_cancel, log=log)
            finished = status is not None
        finally:
            if not finished:  # `run --rm` removes it only when it ends by itself
                with trio.CancelScope(shield=True):
                    await remove()
        return timed_out(run, datum) if status is None else status


class DockerRuntime(PodmanRuntime):
    """Run the command with docker (same command line as podman)."""

    name = "docker"
