"""A pids cgroup per sandbox, for the runtimes that do not make one themselves (bwrap).

A datum must not be able to fork-bomb the node: every container start gets a cgroup
whose ``pids.max`` bounds the processes and threads of everything it starts. runc
manages its own cgroups (``linux.resources.pids``); bwrap does not, so the daemon
makes one here, under its own cgroup:

- cgroup v1 (a ``pids`` hierarchy, e.g. ``/sys/fs/cgroup/pids``):
  ``<daemon's pids cgroup>/vfs-datums/<pid>-<name>``;
- cgroup v2 (the unified hierarchy at ``/sys/fs/cgroup``, with ``pids`` delegated to
  the daemon, as the systemd unit's ``Delegate=pids`` does):
  ``<daemon's cgroup>/vfs-datum-<pid>-<name>``. A cgroup with processes cannot give
  controllers to children ("no internal processes"), so the daemon first moves itself
  into a leaf ``<daemon's cgroup>/vfsd``.

The process enters its cgroup before it execs the sandbox (:meth:`PidsCgroup.wrap`),
so nothing it starts is ever outside. Closing the cgroup kills whatever is left in it
(a process that escaped the sandbox's pid namespace cannot escape its cgroup) and
removes it. Cgroups named after a daemon pid that no longer runs are leftovers of a
killed daemon: :meth:`PidsCgroups.sweep` removes them.

Where neither is possible (no pids controller, not root, nothing delegated),
:meth:`PidsCgroups.find` says why and the caller falls back (see the bwrap runtime).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time

from daemon.protocol import pid_alive

log = logging.getLogger("daemon.runtimes.cgroups")

CGROUP_ROOT = "/sys/fs/cgroup"
_V1_DIR = "vfs-datums"
_V2_PREFIX = "vfs-datum-"
_V2_DAEMON_LEAF = "vfsd"
# Sandboxes end with their pid namespace's init; the kernel needs a moment to reap.
_EMPTY_PATIENCE = 5.0


class PidsCgroup:
    """One sandbox's cgroup (see the module docstring)."""

    def __init__(self, path: str) -> None:
        self.path = path

    @property
    def procs(self) -> str:
        return os.path.join(self.path, "cgroup.procs")

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run so that it enters this cgroup before it starts anything."""
        return ["/bin/sh", "-c", 'echo $$ >"$0" && exec "$@"', self.procs, *argv]

    def pids(self) -> list[int]:
        try:
            with open(self.procs) as f:
                return [int(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def close(self) -> None:
        """Kill what is left in the cgroup and remove it. Blocking (up to a few seconds):
        call it from a worker thread."""
        deadline = time.monotonic() + _EMPTY_PATIENCE
        pause = 0.0005  # the sandbox has just ended: its last processes are being reaped
        while True:
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    log.warning("cannot remove cgroup %s: %s", self.path, exc.strerror)
                    return
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


class PidsCgroups:
    """Where this daemon makes sandbox cgroups, found once per daemon."""

    def __init__(self, parent: str | None, prefix: str, reason: str = "") -> None:
        self.parent = parent  # None: no cgroups here, see reason
        self.prefix = prefix
        self.reason = reason

    @property
    def available(self) -> bool:
        return self.parent is not None

    @classmethod
    def find(cls, root: str = CGROUP_ROOT, self_cgroup: str = "/proc/self/cgroup"
             ) -> PidsCgroups:
        """Find (and prepare) where this process can make pids cgroups."""
        if os.geteuid() != 0:
            return cls(None, "", "vfsd does not run as root")
        try:
            with open(self_cgroup) as f:
                lines = f.read().splitlines()
        except OSError as exc:
            return cls(None, "", f"cannot read {self_cgroup}: {exc.strerror}")
        own_v1 = own_v2 = None
        for line in lines:
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                own_v2 = path
            elif "pids" in controllers.split(","):
                own_v1 = path
        v1 = os.path.join(root, "pids")
        if own_v1 is not None and os.path.isdir(v1):
            parent = os.path.join(v1, own_v1.lstrip("/"), _V1_DIR)
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as exc:
                return cls(None, "", f"cannot create {parent}: {exc.strerror}")
            return cls(parent, "")
        if own_v2 is not None and os.path.isfile(os.path.join(root, "cgroup.controllers")):
            return cls._find_v2(os.path.join(root, own_v2.lstrip("/")))
        return cls(None, "", "the host has no pids cgroup controller")

    @classmethod
    def _find_v2(cls, own: str) -> PidsCgroups:
        try:
            with open(os.path.join(own, "cgroup.controllers")) as f:
                controllers = f.read().split()
        except OSError as exc:
            return cls(None, "", f"cannot read {own}/cgroup.controllers: {exc.strerror}")
        if "pids" not in controllers:
            return cls(None, "", f"the pids controller is not delegated to {own} (the "
                                 "systemd unit's Delegate=pids does)")
        subtree = os.path.join(own, "cgroup.subtree_control")
        try:
            _write(subtree, "+pids")
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                return cls(None, "", f"cannot enable pids in {own}: {exc.strerror}")
            # Processes in `own`: move the daemon into a leaf, then try again.
            try:
                leaf = os.path.join(own, _V2_DAEMON_LEAF)
                os.makedirs(leaf, exist_ok=True)
                _write(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))
                _write(subtree, "+pids")
            except OSError as exc2:
                return cls(None, "", f"cannot enable pids in {own} (other processes "
                                     f"share it?): {exc2.strerror}")
        return cls(own, _V2_PREFIX)

    def create(self, name: str, limit: int) -> PidsCgroup:
        """A new cgroup for one sandbox, allowing ``limit`` processes and threads.

        Raises:
            OSError: it cannot be created (the caller fails the start).
        """
        assert self.parent is not None
        path = os.path.join(self.parent, f"{self.prefix}{os.getpid()}-{name}")
        os.mkdir(path)
        try:
            _write(os.path.join(path, "pids.max"), str(limit))
        except OSError:
            os.rmdir(path)
            raise
        return PidsCgroup(path)

    def sweep(self) -> int:
        """Remove the cgroups of daemons that are gone (killed with their sandboxes
        running); returns how many."""
        if self.parent is None:
            return 0
        removed = 0
        try:
            names = os.listdir(self.parent)
        except OSError:
            return 0
        for name in names:
            if not name.startswith(self.prefix):
                continue
            pid_text = name[len(self.prefix):].split("-", 1)[0]
            if not pid_text.isdigit() or pid_alive(int(pid_text)):
                continue
            PidsCgroup(os.path.join(self.parent, name)).close()
            removed += 1
        return removed


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
