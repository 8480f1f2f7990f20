"""Spool files on local disk, their sidecars, and what a restarted daemon does with them.

A file written through the mount keeps its bytes in a *spool file* under
``<cache>/spool/`` until the flusher (:mod:`daemon.flusher`) has stored them as
blobs and staged the file in its branch's open commit. When a file is closed, a
*sidecar* is written next to its spool (``spool-XXXX`` + ``.meta``): one JSON
object naming the repository, branch, path, mode and mtime. The sidecar is what
makes a closed file survive a ``kill -9`` of the daemon (not a power loss: it is
written without fsync, like the spool itself). Its invariants:

* a spool with a sidecar holds a closed file that is not staged yet (or not
  with its latest bytes); the sidecar names the file's current path;
* a spool without a sidecar is a file that was open and never closed since it
  was last staged: a restarted daemon drops it (those writes were never closed,
  so nothing promised them);
* once the flusher has staged a spool's latest bytes it deletes the sidecar first
  and then the spool;
* an empty sidecar is a first one whose write a crash interrupted: the close that
  wrote it never returned, so it counts as no sidecar.

:func:`recover_spools` runs before a new daemon mounts: it stages every spool
that has a sidecar into its branch's open commit (against the branch's current
state), and moves the ones it cannot stage to ``<cache>/lost+found/``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from vfs.errors import InvalidName, NotADirectory, NotFound, VfsError
from vfs.ingest import encode_file
from vfs.names import normalize_path, parent_and_name
from vfs.tree import DIR, FILE, Entry

log = logging.getLogger("daemon.spools")

SPOOL_PREFIX = "spool-"
SIDECAR_SUFFIX = ".meta"
_TEMP_SUFFIX = ".tmp"
LOST_AND_FOUND = "lost+found"


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
        if not sidecar.path or normalize_path(sidecar.path) != sidecar.path:
            raise ValueError(f"bad path {sidecar.path!r}")
        return sidecar


def sidecar_path(spool_path: str) -> str:
    return spool_path + SIDECAR_SUFFIX


def write_sidecar(spool_path: str, sidecar: Sidecar, *, replace: bool) -> None:
    """Write the sidecar of a spool, without fsync.

    A first sidecar is written in place (one small write: a crash leaves it whole
    or empty). One that ``replace`` s an existing sidecar is written aside and
    renamed over it, so a crash leaves the old one or the new one, never neither.
    """
    final = sidecar_path(spool_path)
    target = final + _TEMP_SUFFIX if replace else final
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, sidecar.encode())
    finally:
        os.close(fd)
    if replace:
        os.replace(target, final)


def remove_sidecar(spool_path: str) -> None:
    try:
        os.unlink(sidecar_path(spool_path))
    except FileNotFoundError:
        pass


# -- recovery at start --------------------------------------------------------------------


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
        if name + SIDECAR_SUFFIX not in names or \
                os.path.getsize(sidecar_path(path)) == 0:
            remove_sidecar(path)
            os.unlink(path)
            report.dropped += 1
            continue
        try:
            with open(sidecar_path(path), "rb") as f:
                sidecar = Sidecar.decode(f.read())
        except (OSError, ValueError, KeyError, TypeError) as exc:
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
        entry = Entry(parent_and_name(sidecar.path)[1], FILE, sidecar.mode & 0o7777,
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
        remove_sidecar(item.spool_path)
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


__all__ = ["LOST_AND_FOUND", "SIDECAR_SUFFIX", "SPOOL_PREFIX", "RecoveryReport", "Sidecar",
           "recover_spools", "remove_sidecar", "sidecar_path", "write_sidecar"]
