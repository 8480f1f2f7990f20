"""A real small disk for tests of a full disk: a tmpfs mounted for the test (needs root)."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

_fillers = itertools.count()


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path``, unmounted afterwards; skips the test
    where mounting is not allowed."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path, *, leave: int = 0) -> None:
    """Take every free byte but ``leave`` of the filesystem at ``disk`` (with fallocate:
    at once). The fillers are files ``filler-*`` at its root."""
    free = os.statvfs(disk)
    size = free.f_bavail * free.f_frsize - leave
    if size <= 0:
        return
    fd = os.open(disk / f"filler-{next(_fillers)}", os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError:
        pass  # someone took a page meanwhile: the next round takes what is left
    finally:
        os.close(fd)


@contextlib.contextmanager
def full_from_when_moved(disk: Path, ref_file: Path, pid: Callable[[], int | None]
                         ) -> Iterator[None]:
    """Fill ``disk`` the moment ``ref_file`` is replaced (a branch moved), and keep it
    full until the block ends; then free it.

    The process ``pid()`` (the one moving the branch) is stopped from the moment the
    move is seen until the disk is full, so every write it makes after the move meets
    a full disk. The ref file is replaced by a rename: a new inode says it moved.
    """
    before = os.stat(ref_file).st_ino
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                moved = os.stat(ref_file).st_ino != before
            except FileNotFoundError:
                continue
            if moved:
                break
        else:
            return
        target = pid()
        if target is not None:
            os.kill(target, signal.SIGSTOP)
        try:
            fill(disk)
        finally:
            if target is not None:
                os.kill(target, signal.SIGCONT)
        while not done.wait(0.001):  # what a failed write gives back is taken again
            fill(disk)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        for filler in disk.glob("filler-*"):
            filler.unlink()
