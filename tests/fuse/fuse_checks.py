"""What the FUSE tests compare: whole trees as plain dicts, and a branch view catching up.

A tree is summarised as ``{relative path: (kind, ...)}`` so that ``assert a == b``
in a test shows pytest's dict diff: exactly which paths differ and how.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            digest.update(piece)
    return digest.hexdigest()


def tree_of(root: str | Path, *, modes: bool = False) -> dict[str, tuple]:
    """Every path under ``root`` (not ``root`` itself) with its kind, size and content.

    Files are ``("file", size, sha256)``, directories ``("dir",)`` and symlinks
    ``("symlink", target)``; with ``modes`` the permission bits of files and
    directories are added. Symlinks are never followed.
    """
    tree: dict[str, tuple] = {}
    for directory, dirnames, filenames in os.walk(root, onerror=_raise):
        for name in dirnames + filenames:
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, root)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                tree[relative] = ("symlink", os.readlink(path))
                continue
            if stat.S_ISDIR(st.st_mode):
                summary: tuple = ("dir",)
            elif stat.S_ISREG(st.st_mode):
                summary = ("file", st.st_size, file_digest(path))
            else:
                summary = ("other", stat.S_IFMT(st.st_mode))
            if modes:
                summary += (oct(stat.S_IMODE(st.st_mode)),)
            tree[relative] = summary
    return tree


def _raise(error: OSError) -> None:
    raise error


def wait_for(probe: Callable[[], T], expected: T, timeout: float = 5.0) -> T:
    """Call ``probe`` until it returns ``expected`` or ``timeout`` passes; its last answer.

    Branch paths are cached by the kernel for about a second, so a change made
    outside the mount (``vfsctl put``, ``commit``) shows there within that time.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value == expected or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def until(condition: Callable[[], T], what: str, timeout: float = 30) -> T:
    """Poll ``condition`` until it returns something true, and return that; fail
    naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def staged(mount) -> dict[str, str]:
    """``vfsctl status data@main``: path → added / modified / deleted.

    Directories appear only as ``/dir/`` when nothing is staged below them
    (a new empty directory, or one moved as a whole).
    """
    status = json.loads(mount.vfsctl("status", "--json", "data@main").stdout)
    return {change["path"]: change["status"] for change in status["changes"]}
