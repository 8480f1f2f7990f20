"""Root filesystem directories used as images: checks and content digests.

The digest of a root filesystem identifies the transform's image in every datum's
hash, so it must change when anything the command could observe changes, and must
not change otherwise. It is BLAKE3 over every entry, sorted by relative path, of:
the path, the mode (type and permission bits), the symlink target, the device
number, and the BLAKE3 of the content of regular files. Owners and timestamps are
left out (copying an image elsewhere keeps its digest). Hashing the content of a
large image takes a while, so file hashes are cached in memory by (path, size,
mtime_ns, inode): a later digest of the same image only stats its files. The cache
of an image holds the files its last digest saw, so it does not grow with every
version of an image rebuilt in place.
"""

from __future__ import annotations

import os
import shutil
import stat
import struct
import subprocess
import threading
from collections.abc import Iterator

from blake3 import blake3

from vfs.errors import InvalidSpec

# The top-level entries of which a root filesystem has at least one.
_ROOTFS_MARKERS = ("bin", "usr", "sbin", "lib", "etc")
_READ_SIZE = 1 << 20

# Per image root: relative path -> (size, mtime_ns, inode, BLAKE3 of the content).
_FileHashes = dict[bytes, tuple[int, int, int, bytes]]
_file_hashes: dict[str, _FileHashes] = {}
_file_hashes_lock = threading.Lock()


def make_busybox_rootfs(root: str, busybox: str = "/bin/busybox") -> str:
    """Make a minimal root filesystem at ``root`` (which must not exist) from a static
    busybox (Debian: busybox-static): busybox and all its applets in ``/bin``, the
    directories a runc container needs, and a root user. Enough to try the runc
    runtime; the tests and benchmarks use it. Returns ``root``."""
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for directory in ("bin", "etc", "tmp", "proc", "dev", "pfs", "root"):
        os.makedirs(os.path.join(root, directory))
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    shutil.copy2(busybox, os.path.join(root, "bin", "busybox"))
    for applet in applets:
        if applet != "busybox" and "/" not in applet:
            os.symlink("busybox", os.path.join(root, "bin", applet))
    os.makedirs(os.path.join(root, "usr"))
    os.symlink("../bin", os.path.join(root, "usr", "bin"))
    with open(os.path.join(root, "etc", "passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\n")
    with open(os.path.join(root, "etc", "group"), "w") as f:
        f.write("root:x:0:\n")
    return root


def check_rootfs(path: str) -> None:
    """Check that ``path`` is a usable root filesystem directory.

    Raises:
        InvalidSpec: it is missing, not a directory, or does not look like a root
            filesystem.
    """
    if not os.path.exists(path):
        raise InvalidSpec(f"image directory {path} does not exist")
    if not os.path.isdir(path):
        raise InvalidSpec(f"image {path} is not a directory (runc needs a root filesystem "
                          "directory or an OCI image layout directory)")
    try:
        entries = set(os.listdir(path))
    except OSError as exc:
        raise InvalidSpec(f"image directory {path} cannot be read: {exc.strerror}") from None
    if not entries & set(_ROOTFS_MARKERS):
        raise InvalidSpec(
            f"image directory {path} is neither a root filesystem (none of "
            f"{', '.join(_ROOTFS_MARKERS)} at its top) nor an OCI image layout "
            "(no oci-layout and index.json)")


def rootfs_digest(root: str) -> str:
    """``blake3:<hex>`` of the root filesystem at ``root`` (see the module docstring).

    Raises:
        InvalidSpec: ``root`` cannot be read.
    """
    hasher = blake3()
    try:
        entries = sorted(_walk(os.fsencode(root), b""))
    except OSError as exc:
        raise InvalidSpec(f"image directory {root} cannot be read: {exc}") from None
    key = os.path.abspath(root)
    with _file_hashes_lock:
        known = _file_hashes.get(key, {})
    seen: _FileHashes = {}
    for relative, host_path, st in entries:
        kind = stat.S_IFMT(st.st_mode)
        if kind == stat.S_IFLNK:
            detail = os.readlink(host_path)
        elif kind == stat.S_IFREG:
            cached = known.get(relative)
            if cached is not None and cached[:3] == (st.st_size, st.st_mtime_ns, st.st_ino):
                detail = cached[3]
            else:
                detail = _content_hash(host_path)
            seen[relative] = (st.st_size, st.st_mtime_ns, st.st_ino, detail)
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            detail = struct.pack(">Q", st.st_rdev)
        else:
            detail = b""
        hasher.update(struct.pack(">I", len(relative)) + relative
                      + struct.pack(">II", st.st_mode, len(detail)) + detail)
    with _file_hashes_lock:
        _file_hashes[key] = seen
    return "blake3:" + hasher.hexdigest()


def _walk(root: bytes, relative: bytes) -> Iterator[tuple[bytes, bytes, os.stat_result]]:
    with os.scandir(os.path.join(root, relative) if relative else root) as scan:
        for entry in scan:
            path = os.path.join(relative, entry.name) if relative else entry.name
            st = entry.stat(follow_symlinks=False)
            yield path, entry.path, st
            if stat.S_ISDIR(st.st_mode):
                yield from _walk(root, path)


def _content_hash(host_path: bytes) -> bytes:
    hasher = blake3()
    with open(host_path, "rb") as f:
        while chunk := f.read(_READ_SIZE):
            hasher.update(chunk)
    return hasher.digest()
