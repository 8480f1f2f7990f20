"""Spool files on local disk, their sidecars, and what a restarted daemon does with them.

A file written through the mount keeps its bytes in a *spool file* under
``<cache>/spool/`` until the flusher (:mod:`daemon.flusher`) has stored them as
blobs and staged the file in its branch's open commit. When a file is closed, a
*sidecar* is attached to its spool: one JSON object naming the repository,
branch, path, mode and mtime. The sidecar is what makes a closed file survive a
``kill -9`` of the daemon (not a power loss: it is written without fsync, like the
spool itself). It is the extended attribute ``user.vfs.sidecar`` of the spool
file: one syscall, replaced atomically, gone with the spool, and no second file
to create and delete for every file written (a small-file writer's closes were
waiting on exactly that). Where the filesystem has no user extended attributes
it is a file next to the spool (``spool-XXXX`` + ``.meta``). Its invariants:

* a spool with a sidecar holds a closed file that is not staged yet (or not
  with its latest bytes); the sidecar names the file's current path;
* a spool without a sidecar is a file that was open and never closed since it
  was last staged: a restarted daemon drops it (those writes were never closed,
  so nothing promised them);
* once the flusher has staged a spool's latest bytes it deletes the sidecar first
  and then the spool (one step when the sidecar is an attribute);
* an empty sidecar file is a first one whose write a crash interrupted: the close
  that wrote it never returned, so it counts as no sidecar.

:func:`recover_spools` runs before a new daemon mounts: it stages every spool
that has a sidecar into its branch's open commit (against the branch's current
state), and moves the ones it cannot stage to ``<cache>/lost+found/``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
from collections import deque
from dataclasses import dataclass

from vfs.errors import InvalidName, NotADirectory, NotFound, VfsError
from vfs.ingest import EncodedPrefix, encode_file
from vfs.names import normalize_path, parent_and_name
from vfs.tree import DIR, FILE, Entry, permission_bits

log = logging.getLogger("daemon.spools")

SPOOL_PREFIX = "spool-"
SIDECAR_XATTR = "user.vfs.sidecar"
SIDECAR_SUFFIX = ".meta"  # a sidecar file, where there are no extended attributes
_TEMP_SUFFIX = ".tmp"
LOST_AND_FOUND = "lost+found"
_STOCK = 64  # empty spool files made ahead of need
_RECYCLED = 1024  # at most this many spool files kept for reuse
_RECYCLE_MAX = 1 << 20  # larger spools are deleted, not truncated for reuse


@dataclass(frozen=True)
class Sidecar:
    """Where a closed, not yet staged file belongs."""

    repo: str
    branch: str
    path: str
    mode: int
    mtime_ns: int

    def encode(self) -> bytes:
        return json.dumps({"v": 1, "repo": self.repo, "branch": self.branch,
                           "path": self.path, "mode": self.mode,
                           "mtime_ns": self.mtime_ns}).encode()

    @classmethod
    def decode(cls, data: bytes) -> Sidecar:
        """Parse a sidecar.

        Raises:
            ValueError: not a sidecar this version wrote.
        """
        raw = json.loads(data)
        if not isinstance(raw, dict) or raw.get("v") != 1:
            raise ValueError("not a version 1 sidecar")
        sidecar = cls(str(raw["repo"]), str(raw["branch"]), str(raw["path"]),
                      int(raw["mode"]), int(raw["mtime_ns"]))
        try:
            normalized = normalize_path(sidecar.path)
        except VfsError as exc:
            raise ValueError(str(exc)) from None
        if not sidecar.path or normalized != sidecar.path:
            raise ValueError(f"bad path {sidecar.path!r}")
        return sidecar


_use_xattr = True  # until the spool directory's filesystem refuses one


def sidecar_path(spool_path: str) -> str:
    """Where the sidecar of a spool is kept when it is a file."""
    return spool_path + SIDECAR_SUFFIX


def write_sidecar(spool_path: str, sidecar: Sidecar, *, replace: bool, fd: int = -1) -> None:
    """Attach (or replace) the sidecar of a spool, without fsync.

    Args:
        spool_path: the spool file.
        sidecar: what to record.
        replace: a sidecar exists already (as a file it is then written aside and
            renamed over the old one, so a crash leaves one of the two whole; a
            first one is written in place: a crash leaves it whole or empty).
        fd: an open descriptor of the spool, or -1.
    """
    global _use_xattr
    data = sidecar.encode()
    if _use_xattr:
        try:
            os.setxattr(fd if fd >= 0 else spool_path, SIDECAR_XATTR, data)
            return
        except OSError as exc:
            if exc.errno != errno.ENOTSUP:
                raise
            _use_xattr = False
            log.info("the spool directory has no user extended attributes: sidecars are "
                     "files next to the spools")
    final = sidecar_path(spool_path)
    target = final + _TEMP_SUFFIX if replace else final
    out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(out, data)
    finally:
        os.close(out)
    if replace:
        os.replace(target, final)


def remove_sidecar(spool_path: str, *, fd: int = -1) -> None:
    """Detach the sidecar of a spool that stays (its latest bytes are staged)."""
    if _use_xattr:
        try:
            os.removexattr(fd if fd >= 0 else spool_path, SIDECAR_XATTR)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOENT):
                raise
    else:
        remove_sidecar_file(spool_path)


def remove_sidecar_file(spool_path: str) -> None:
    """Delete a sidecar kept as a file, if any (before its spool is deleted: an
    attribute goes with the spool by itself)."""
    try:
        os.unlink(sidecar_path(spool_path))
    except FileNotFoundError:
        pass


def read_sidecar(spool_path: str) -> bytes | None:
    """The sidecar of a spool (attribute or file), or None if it has none."""
    try:
        return os.getxattr(spool_path, SIDECAR_XATTR)
    except OSError as exc:
        if exc.errno not in (errno.ENODATA, errno.ENOTSUP):
            raise
    try:
        with open(sidecar_path(spool_path), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


class SpoolFiles:
    """Where spool files come from: made ahead of need, and recycled once staged.

    Making a file and deleting one are journaled metadata operations; a small-file
    writer would wait for one of each on every file it writes. Instead the flusher
    gives staged spools back here (sidecar detached, truncated) and tops the stock
    up between its rounds, so a create only takes a file that is ready.
    Thread-safe. A spool in the stock is empty and has no sidecar: a restarted
    daemon deletes it without a word.
    """

    def __init__(self, directory: str, *, stock: int = _STOCK,
                 recycled: int = _RECYCLED) -> None:
        self.directory = directory
        self.stock = stock
        self.recycled = recycled
        self._ready: deque[str] = deque()  # paths: open descriptors would run out

    def take(self) -> tuple[int, str]:
        """An empty spool file: its descriptor (read-write) and its path."""
        while True:
            try:
                path = self._ready.popleft()
            except IndexError:
                return tempfile.mkstemp(dir=self.directory, prefix=SPOOL_PREFIX)
            try:
                return os.open(path, os.O_RDWR), path
            except FileNotFoundError:
                continue  # deleted from under us: take another

    def give_back(self, fd: int, path: str, size: int) -> None:
        """A spool that is no longer needed (its sidecar already detached)."""
        try:
            if len(self._ready) >= self.recycled or size > _RECYCLE_MAX:
                os.unlink(path)
                return
            if size:
                os.truncate(fd if fd >= 0 else path, 0)
            self._ready.append(path)
        finally:
            if fd >= 0:
                os.close(fd)

    def top_up(self) -> None:
        """Make spool files ahead of need, if the stock ran low."""
        if len(self._ready) < self.stock // 4:
            while len(self._ready) < self.stock:
                fd, path = tempfile.mkstemp(dir=self.directory, prefix=SPOOL_PREFIX)
                os.close(fd)
                self._ready.append(path)

    def close(self) -> None:
        while self._ready:
            os.unlink(self._ready.popleft())


# -- recovery at start --------------------------------------------------------------------


_NO_HEAD = EncodedPrefix()


@dataclass(eq=False)  # compared and hashed by identity: the flusher keys on spools
class SpoolFile:
    """A file written through the mount and not staged yet; its bytes are in ``spool_path``.

    ``dirty`` means the spool holds bytes or attributes that are not staged.
    ``has_sidecar`` means it was closed since it was last staged (and a restarted
    daemon would stage it). ``fd`` is -1 while no handle is open.
    """

    spool_path: str
    fd: int
    size: int
    mode: int
    mtime_ns: int
    path: str = ""  # its name in the branch (kept by BranchView)
    opens: int = 0  # handles (and nameless inodes) holding it
    writers: int = 0  # those of them that may write: with none, it counts as closed
    dirty: bool = False
    generation: int = 0  # bumped by every change of the bytes or attributes
    has_sidecar: bool = False
    sidecar_generation: int = -1  # the generation its sidecar describes
    # Encoding ahead of the close, for files written in order. ``seq_end``: the
    # bytes from 0 up to it were written (in any order of writes that never skipped
    # ahead). ``head``: stored chunks of the first bytes, valid while ``epoch`` is
    # ``head_epoch``. A change below ``protected`` (the head, or what the flusher is
    # encoding now) bumps ``epoch``. All of these change under the view's lock; the
    # flusher sets ``protected`` before it reads the bytes.
    seq_end: int = 0
    head: EncodedPrefix = _NO_HEAD
    head_epoch: int = 0
    epoch: int = 0
    protected: int = 0
    head_busy: bool = False  # queued for or being encoded by the flusher

    @property
    def closed_since_staged(self) -> bool:
        return self.has_sidecar

    def wrote(self, offset: int, end: int) -> None:
        """Bytes ``[offset, end)`` were just written (call after the write)."""
        if offset < self.protected:
            self.epoch += 1  # the head (or the one being made) no longer matches
            self.protected = 0
        if offset <= self.seq_end < end:
            self.seq_end = end

    def truncated(self, size: int) -> None:
        """The file was cut or extended to ``size`` (call after the truncation)."""
        if size < self.protected:
            self.epoch += 1
            self.protected = 0
        self.seq_end = min(self.seq_end, size)

    def valid_head(self) -> EncodedPrefix:
        """The stored chunks of this file's first bytes (empty if there are none)."""
        return self.head if self.head_epoch == self.epoch else _NO_HEAD

    def bytes_to_store(self) -> int:
        """The bytes a flush of this file still has to read and store."""
        return max(0, self.size - self.valid_head().size)

    def wants_head(self, step: int) -> bool:
        """``step`` bytes were written in order since the head: encode more now."""
        return bool(step) and not self.head_busy and \
            self.seq_end - self.valid_head().size >= step

    def reopen(self) -> None:
        if self.fd < 0:
            self.fd = os.open(self.spool_path, os.O_RDWR)

    def close_fd(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def drop_sidecar(self) -> None:
        if self.has_sidecar:
            remove_sidecar(self.spool_path, fd=self.fd)
            self.has_sidecar = False
            self.sidecar_generation = -1

    def close(self, recycle: SpoolFiles | None = None) -> None:
        """Forget the spool: its sidecar first, then its bytes (or give the file back
        to ``recycle`` for another file)."""
        if self.has_sidecar:
            if recycle is not None:
                remove_sidecar(self.spool_path, fd=self.fd)
            else:
                remove_sidecar_file(self.spool_path)  # an attribute goes with the spool
            self.has_sidecar = False
        if recycle is not None:
            fd, self.fd = self.fd, -1
            recycle.give_back(fd, self.spool_path, self.size)
            return
        try:
            self.close_fd()
        finally:
            try:
                os.unlink(self.spool_path)
            except FileNotFoundError:
                pass


@dataclass(frozen=True)
class StoredSpool:
    """What the flusher made of a spool: stage ``ref`` if it is still that file."""

    spool: SpoolFile
    generation: int  # the spool's generation when its bytes were read
    mode: int
    mtime_ns: int
    ref: str
    size: int


@dataclass
class RecoveryReport:
    staged: int = 0  # closed files staged into their open commit
    dropped: int = 0  # spools of files still open at the crash
    lost: int = 0  # spools kept in lost+found


@dataclass
class _Recovered:
    spool_path: str
    sidecar: Sidecar
    ref: str = ""
    size: int = 0


def recover_spools(store, spool_dir: str) -> RecoveryReport:
    """Stage the closed files a dead daemon left in ``spool_dir``; drop partial writes.

    Runs before the mount serves, with nothing else writing. Each branch's files
    are staged in one index transaction after their blobs are durable. A file
    that cannot be staged (its branch is gone, or a file now stands where its
    parent directory was) is moved to ``<cache>/lost+found/`` with its sidecar
    and logged as an error: its bytes are never deleted.
    """
    report = RecoveryReport()
    names = set(os.listdir(spool_dir))
    groups: dict[tuple[str, str], list[_Recovered]] = {}
    for name in sorted(names):
        path = os.path.join(spool_dir, name)
        if name.endswith(_TEMP_SUFFIX):
            os.unlink(path)  # a sidecar being replaced at the crash; the old one stands
            continue
        if name.endswith(SIDECAR_SUFFIX):
            if name.removesuffix(SIDECAR_SUFFIX) not in names:
                os.unlink(path)  # its spool was deleted just before the crash
            continue
        data = read_sidecar(path)
        if not data:
            remove_sidecar_file(path)
            if os.path.getsize(path):  # an empty one is a spare: nothing was lost
                report.dropped += 1
            os.unlink(path)
            continue
        try:
            sidecar = Sidecar.decode(data)
        except (ValueError, KeyError, TypeError) as exc:
            _lose(store, path, f"its sidecar is unreadable ({exc})")
            report.lost += 1
            continue
        groups.setdefault((sidecar.repo, sidecar.branch), []).append(_Recovered(path, sidecar))
    if report.dropped:
        log.warning("dropped %d spool files of files that were open (never closed) when the "
                    "previous daemon stopped: their unclosed writes are lost",
                    report.dropped)
    for (repo, branch), files in groups.items():
        staged = _recover_branch(store, repo, branch, files)
        report.staged += staged
        report.lost += len(files) - staged
    if report.staged:
        log.info("staged %d files closed before the previous daemon stopped", report.staged)
    return report


def _recover_branch(store, repo: str, branch: str, files: list[_Recovered]) -> int:
    try:
        state, open_commit = store.open_commit(repo, branch)
    except (NotFound, InvalidName) as exc:  # the branch is gone: keep the bytes aside
        for item in files:
            _lose(store, item.spool_path, f"{repo}@{branch}:/{item.sidecar.path} cannot be "
                  f"staged: {exc}")
        return 0
    with store.lock(), store.blobs.writer() as writer:
        for item in files:
            fd = os.open(item.spool_path, os.O_RDONLY)
            try:
                item.ref, item.size = encode_file(store, fd, writer)  # type: ignore[misc]
            finally:
                os.close(fd)
    changes: dict[str, Entry | None] = {}
    placed: list[_Recovered] = []
    for item in files:
        sidecar = item.sidecar
        entry = Entry(parent_and_name(sidecar.path)[1], FILE, permission_bits(sidecar.mode),
                      item.size, sidecar.mtime_ns, item.ref)
        existing = open_commit.lookup(sidecar.path)
        try:
            if existing is not None and existing.kind == DIR:
                raise NotADirectory(f"/{sidecar.path} is now a directory")
            plan = open_commit.plan_set(sidecar.path, entry)
        except VfsError as exc:
            _lose(store, item.spool_path, f"{repo}@{branch}:/{sidecar.path} cannot be "
                  f"staged: {exc}")
            continue
        open_commit.apply(plan)
        changes.update(plan)
        placed.append(item)
    if changes:
        store.stage(state, changes)
        store.index.sync()  # staged for good before the spools go
    for item in placed:
        remove_sidecar_file(item.spool_path)
        os.unlink(item.spool_path)
    return len(placed)


def _lose(store, spool_path: str, why: str) -> None:
    """Keep a spool that cannot be staged in lost+found, and say so."""
    lost_dir = os.path.join(store.cache_dir, LOST_AND_FOUND)
    os.makedirs(lost_dir, exist_ok=True)
    name = os.path.basename(spool_path)
    os.replace(spool_path, os.path.join(lost_dir, name))
    if os.path.exists(sidecar_path(spool_path)):
        os.replace(sidecar_path(spool_path), os.path.join(lost_dir, name + SIDECAR_SUFFIX))
    log.error("%s; its bytes are kept in %s", why, os.path.join(lost_dir, name))


__all__ = ["LOST_AND_FOUND", "SIDECAR_SUFFIX", "SIDECAR_XATTR", "SPOOL_PREFIX",
           "RecoveryReport", "Sidecar", "SpoolFiles", "read_sidecar", "recover_spools",
           "remove_sidecar", "remove_sidecar_file", "sidecar_path", "write_sidecar"]
