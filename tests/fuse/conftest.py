"""A real vfsd mount in a child process, always unmounted in ``finally``.

The ``mount`` fixture gives each test a fresh store mounted by its own vfsd. At
teardown the daemon is stopped, the store must pass ``fsck --deep`` (unless the
test is marked ``corrupts_store``) and the daemon's log must hold no WARNING,
ERROR or traceback (unless the test is marked ``expect_warnings``): the rules of
``tests/conftest.py``, applied to the daemon, whose log is a file and not ours.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import vfs
import vfs.fsck

_notify_counter = itertools.count()


@dataclass
class Mount:
    path: Path
    store_dir: Path
    cache_dir: Path
    process: subprocess.Popen
    log: Path
    notify: socket.socket | None = None  # where the daemon says READY=1, STOPPING=1
    extra: tuple[str, ...] = ()  # vfsd options it was started with (and restarts with)

    @property
    def env(self) -> dict:
        return {**os.environ, "VFS_STORE": str(self.store_dir),
                "VFS_CACHE": str(self.cache_dir)}

    def vfsctl(self, *args: str, check: bool = True,
               text: bool = True) -> subprocess.CompletedProcess:
        """Run the real ``vfsctl`` on this mount's store (``text=False``: bytes out)."""
        done = subprocess.run([sys.executable, "-m", "cli.main", *args], env=self.env,
                              capture_output=True, text=text, timeout=120)
        if check and done.returncode != 0:
            raise AssertionError(f"vfsctl {' '.join(args)} failed: {done.stderr!r}")
        return done

    def commit(self, ref: str, message: str = "test") -> str:
        """``vfsctl commit`` through the daemon; returns the new commit id."""
        commit_id = self.vfsctl("commit", ref, "-m", message).stdout.strip()
        assert re.fullmatch(r"[0-9a-f]{64}", commit_id), commit_id
        return commit_id

    def start(self) -> None:
        """Start a new vfsd on this mount point (the old one must have exited).

        A stale mount left by a killed daemon is for the new daemon to clean up.
        """
        assert self.process.poll() is not None, "vfsd still runs"
        started = start_vfsd(self.store_dir, self.cache_dir, self.path, *self.extra)
        self.process, self.notify = started.process, started.notify

    def stop(self) -> None:
        """SIGTERM the daemon and wait for it (``stop_vfsd``)."""
        stop_vfsd(self)

    def restart(self) -> None:
        """Stop the daemon and start a new one on the same store, cache and mount point.

        The new process replaces :attr:`process`, so the fixture that made this
        mount still stops it at the end.
        """
        self.stop()
        self.start()


def _wait_ready(ready: socket.socket, mountpoint: Path, process: subprocess.Popen,
                log: Path) -> None:
    """Wait for the daemon's ``READY=1`` (sd_notify), sent once every service is up.

    Polling ``os.path.ismount`` is not enough: on a stale mount point left by a
    killed daemon it can answer True (from the kernel's attribute cache) before
    the new daemon has even started.
    """
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"vfsd exited with {process.returncode}:\n{log.read_text()}")
        try:
            if b"READY=1" in ready.recv(4096).split(b"\n"):
                assert os.path.ismount(mountpoint), f"vfsd is ready but {mountpoint} is no mount"
                return
        except TimeoutError:
            pass
    raise AssertionError(f"vfsd did not mount {mountpoint} in 30 s:\n{log.read_text()}")


def start_vfsd(store_dir: Path, cache_dir: Path, mountpoint: Path, *extra: str) -> Mount:
    log = cache_dir.parent / f"vfsd-{mountpoint.name}.log"
    handle = open(log, "ab")  # noqa: SIM115 - owned by the child
    notify_name = f"vfs-test-notify-{os.getpid()}-{next(_notify_counter)}"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind("\0" + notify_name)  # abstract: no path, no length limit to mind
    notify.settimeout(0.1)
    process = subprocess.Popen(
        [sys.executable, "-m", "daemon.main", "--store", str(store_dir), "--cache",
         str(cache_dir), "--mount", str(mountpoint),
         "--socket", _socket_path(cache_dir.parent / f"vfsd-{mountpoint.name}.sock"), *extra],
        stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "NOTIFY_SOCKET": "@" + notify_name})
    handle.close()
    mount = Mount(mountpoint, store_dir, cache_dir, process, log, notify, extra)
    try:
        _wait_ready(notify, mountpoint, process, log)
    except BaseException:
        if process.poll() is None:  # hung: it must not outlive the test
            process.kill()
            process.wait()
        if os.path.ismount(mountpoint) or _stale(mountpoint):  # killed after mounting
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
        notify.close()
        raise
    return mount


def _socket_path(wanted: Path) -> str:
    """A private control socket per test (Unix socket paths must stay under 108 bytes)."""
    if len(str(wanted)) < 100:
        return str(wanted)
    import hashlib

    return f"/tmp/vfs-test-{hashlib.sha1(str(wanted).encode()).hexdigest()[:16]}.sock"


def stop_vfsd(mount: Mount) -> None:
    if mount.process.poll() is None:
        mount.process.send_signal(signal.SIGTERM)
        try:
            mount.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            mount.process.kill()
            mount.process.wait()
    if os.path.ismount(mount.path) or _stale(mount.path):
        subprocess.run(["fusermount3", "-u", "-z", str(mount.path)], check=False)
    if mount.notify is not None:
        mount.notify.close()


def daemon_log_problems(log: Path) -> list[str]:
    """Lines of a vfsd log at WARNING or above, and tracebacks."""
    if not log.exists():
        return []
    pattern = re.compile(r" (WARNING|ERROR|CRITICAL) |^Traceback ")
    return [line for line in log.read_text(errors="replace").splitlines()
            if pattern.search(line)]


def _stale(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError:
        return True
    return False


@contextlib.contextmanager
def mounted(tmp_path: Path, *extra: str, store_dir: Path | None = None,
            name: str = "pfs") -> Iterator[Mount]:
    store_dir = store_dir or tmp_path / "store"
    cache_dir = tmp_path / "cache"
    vfs.open_store(str(store_dir), cache_dir=str(cache_dir), create=True).close()
    mountpoint = tmp_path / name
    mountpoint.mkdir(exist_ok=True)
    mount = start_vfsd(store_dir, cache_dir, mountpoint, *extra)
    try:
        yield mount
    finally:
        stop_vfsd(mount)


def check_after(mount: Mount, *, log: bool = True, fsck: bool = True) -> None:
    """The invariants after a mount stopped: a quiet daemon log, a store that passes fsck."""
    if log:
        problems = daemon_log_problems(mount.log)
        assert not problems, "vfsd logged:\n" + "\n".join(problems)
    if fsck:
        store = vfs.open_store(str(mount.store_dir), cache_dir=str(mount.cache_dir))
        try:
            report = vfs.fsck.check(store, deep=True)
        finally:
            store.close()
        assert report.ok, report.problems


def _require_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this machine")


@pytest.fixture
def mount(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Mount]:
    """A fresh store mounted by its own vfsd, checked after the test (see the module doc)."""
    _require_fuse()
    with mounted(tmp_path) as m:
        yield m
    check_after(m, log=not request.node.get_closest_marker("expect_warnings"),
                fsck=not request.node.get_closest_marker("corrupts_store"))


@pytest.fixture
def branch(mount: Mount) -> Path:
    """``data@main`` of a fresh repository ``data`` on the test's mount."""
    mount.vfsctl("repo", "create", "data")
    return mount.path / "data@main"


@pytest.fixture(scope="module")
def module_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """One mount shared by the tests of a module (for data that is slow to put)."""
    _require_fuse()
    with mounted(tmp_path_factory.mktemp("module-mount")) as m:
        yield m
    check_after(m)
