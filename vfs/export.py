"""``get`` and ``cat``: reading files of a commit back out, byte for byte.

Chunks are fetched, decompressed and verified by worker threads, a bounded
number ahead of the writer, so a large file streams with bounded memory and
both cores busy. Every byte written has been checked against its hash; a
damaged chunk stops the transfer with :class:`vfs.errors.Corruption` and leaves
no partial file behind (files are written to a temporary name and renamed).
"""

from __future__ import annotations

import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

from vfs.blobstore import BlobStore
from vfs.errors import AlreadyExists, Corruption, IsADirectory, PathNotFound
from vfs.names import RefSpec
from vfs.snapshot import Snapshot, file_chunks
from vfs.tree import DIR, FILE, SYMLINK, Entry, parse_file_ref, permission_bits

_AHEAD = 8


@dataclass
class GetResult:
    files: int = 0
    bytes: int = 0


def _check_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise Corruption(f"the store holds an invalid file name {name!r}: refusing to write it")
    return name


def stream_file(blobs: BlobStore, entry: Entry, pool: ThreadPoolExecutor) -> Iterator[bytes]:
    """Yield a file's verified bytes, fetching chunks ahead in ``pool``."""
    if entry.kind != FILE:
        raise IsADirectory(f"{entry.name} is not a regular file")
    tag, payload = parse_file_ref(entry.ref)
    if tag == "i":
        yield payload
        return
    ahead: deque[Future[bytes]] = deque()
    for digest, _ in file_chunks(blobs, entry):
        ahead.append(pool.submit(blobs.read, digest))
        if len(ahead) > _AHEAD:
            yield ahead.popleft().result()
    while ahead:
        yield ahead.popleft().result()


def cat(store, spec: RefSpec, out: BinaryIO) -> int:
    """Write the file at ``spec`` to ``out``; return its size.

    Raises:
        PathNotFound, IsADirectory, Corruption.
    """
    _, snapshot = store.snapshot(spec)
    entry = snapshot.lookup(spec.path)
    if entry is None:
        raise PathNotFound(f"no such file in {spec.repo}@{spec.ref}: /{spec.path}")
    if entry.kind == DIR:
        raise IsADirectory(f"/{spec.path} is a directory: use 'vfsctl ls' or 'vfsctl get'")
    if entry.kind == SYMLINK:
        raise PathNotFound(f"/{spec.path} is a symbolic link to {entry.ref}")
    size = 0
    with ThreadPoolExecutor(2, thread_name_prefix="vfs-cat") as pool:
        for data in stream_file(store.blobs, entry, pool):
            out.write(data)
            size += len(data)
    return size


def get(store, spec: RefSpec, dest: str, *,
        progress: Callable[[int], None] | None = None) -> GetResult:
    """Materialize the file or directory at ``spec`` into the local path ``dest``.

    A file goes to ``dest`` (or ``dest/name`` when ``dest`` is a directory); a
    directory's contents go under ``dest``. Existing files are never overwritten:
    if any target exists, nothing is written.

    Raises:
        PathNotFound, AlreadyExists, Corruption.
    """
    _, snapshot = store.snapshot(spec)
    entry = snapshot.lookup(spec.path)
    if entry is None:
        raise PathNotFound(f"no such file or directory in {spec.repo}@{spec.ref}: /{spec.path}")
    dest = os.path.abspath(dest)
    if entry.kind == DIR:
        plan = [(os.path.join(dest, *p[len(spec.path):].lstrip("/").split("/")), e)
                for p, e in _walk_checked(snapshot, spec.path)]
        directories = [dest] + [t for t, e in plan if e.kind == DIR]
    else:
        name = _check_name(entry.name) if spec.path else "file"
        target = os.path.join(dest, name) if os.path.isdir(dest) else dest
        plan = [(target, entry)]
        directories = [os.path.dirname(target)]
    clashes = [t for t, e in plan if e.kind != DIR and os.path.lexists(t)]
    if clashes:
        more = f" and {len(clashes) - 1} more" if len(clashes) > 1 else ""
        raise AlreadyExists(f"{clashes[0]}{more} already exists: refusing to overwrite")
    for directory in directories:
        if os.path.lexists(directory) and not os.path.isdir(directory):
            raise AlreadyExists(f"{directory} exists and is not a directory")
    result = GetResult()
    for directory in directories:
        os.makedirs(directory, exist_ok=True)
    with ThreadPoolExecutor(2, thread_name_prefix="vfs-get") as pool:
        for target, item in plan:
            if item.kind == FILE:
                _write_file(store.blobs, item, target, pool, progress)
                result.files += 1
                result.bytes += item.size
            elif item.kind == SYMLINK:
                os.symlink(item.ref, target)
                result.files += 1
    # Directory times last: writing files inside changes them.
    for target, item in reversed(plan):
        if item.kind == DIR:
            os.chmod(target, permission_bits(item.mode) or 0o755)
            if item.mtime_ns:
                os.utime(target, ns=(item.mtime_ns, item.mtime_ns))
    return result


def _walk_checked(snapshot: Snapshot, path: str) -> Iterator[tuple[str, Entry]]:
    for sub, entry in snapshot.walk(path):
        _check_name(entry.name)
        yield sub, entry


def _write_file(blobs: BlobStore, entry: Entry, target: str, pool: ThreadPoolExecutor,
                progress: Callable[[int], None] | None) -> None:
    # A fresh, unique temporary beside the target: never a name a user's file could have.
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target),
                               prefix=f".{os.path.basename(target)[:200]}.", suffix=".vfs-partial")
    try:
        with os.fdopen(fd, "wb") as f:
            for data in stream_file(blobs, entry, pool):
                f.write(data)
                if progress is not None:
                    progress(len(data))
        # Never a setuid bit an older version stored (vfs.tree.PERMISSION_BITS).
        os.chmod(tmp, permission_bits(entry.mode))
        os.utime(tmp, ns=(entry.mtime_ns, entry.mtime_ns))
        # link() refuses to replace a file that appeared meanwhile; rename() would not.
        os.link(tmp, target)
        os.unlink(tmp)
    except FileExistsError:
        os.unlink(tmp)
        raise AlreadyExists(f"{target} appeared while writing it: refusing to overwrite") from None
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
