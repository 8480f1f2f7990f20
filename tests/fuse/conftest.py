"""A real vfsd mount in a child process, always unmounted in ``finally``."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import vfs
import vfs.fsck


@dataclass
class Mount:
    path: Path
    store_dir: Path
    cache_dir: Path
    process: subprocess.Popen
    log: Path

    @property
    def env(self) -> dict:
        return {**os.environ, "VFS_STORE": str(self.store_dir),
                "VFS_CACHE": str(self.cache_dir)}

    def vfsctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "cli.main", *args], env=self.env,
                              capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            raise AssertionError(f"vfsctl {' '.join(args)} failed: {done.stderr}")
        return done


def _wait_mounted(path: Path, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"vfsd exited with {process.returncode}:\n{log.read_text()}")
        if os.path.ismount(path):
            return
        time.sleep(0.05)
    raise AssertionError(f"vfsd did not mount {path} in 30 s:\n{log.read_text()}")


def start_vfsd(store_dir: Path, cache_dir: Path, mountpoint: Path, *extra: str) -> Mount:
    log = cache_dir.parent / f"vfsd-{mountpoint.name}.log"
    handle = open(log, "ab")  # noqa: SIM115 - owned by the child
    process = subprocess.Popen(
        [sys.executable, "-m", "daemon.main", "--store", str(store_dir), "--cache",
         str(cache_dir), "--mount", str(mountpoint), *extra],
        stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    handle.close()
    mount = Mount(mountpoint, store_dir, cache_dir, process, log)
    _wait_mounted(mountpoint, process, log)
    return mount


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


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Mount]:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this machine")
    with mounted(tmp_path) as m:
        yield m
    fsck = vfs.fsck.check(vfs.open_store(str(m.store_dir), cache_dir=str(m.cache_dir)),
                          deep=True)
    assert fsck.ok, fsck.problems
