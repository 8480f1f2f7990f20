"""The times a live branch view keeps beyond its tree entries: atime, ctime, and the
mtime of directories whose entries changed.

A tree entry carries one time, the mtime, and that is what a commit keeps (for files,
and for directories when it was set with ``touch``/``utimensat``). POSIX wants more of
a live filesystem: a directory's mtime and ctime move when an entry is added, removed
or renamed (Python's import system, make and rsync look at them); every change of an
inode moves its ctime (``chmod`` too, and ``touch -d`` cannot take it back); atime is
settable and moves on reads. A :class:`Times` keeps these, per path, for the daemon's
lifetime, on top of the entries; after a restart, or on another node, atime and ctime
are the mtime again and a directory shows the mtime its tree entry has.

atime follows ``relatime``: a read moves it when it is not newer than the mtime or the
ctime, or is more than a day old.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from vfs.names import parent_and_name

_DAY_NS = 86_400 * 10**9


@dataclass(slots=True)
class _Times:
    atime_ns: int = 0  # 0: not kept (show the mtime)
    ctime_ns: int = 0
    dir_mtime_ns: int = 0  # a directory's entries changed then


@dataclass(frozen=True, slots=True)
class Shown:
    """What ``stat`` shows of an inode."""

    atime_ns: int
    mtime_ns: int
    ctime_ns: int


class Times:
    """Per-path times of one branch view (see the module docstring).

    Changed under the view's lock by the namespace operations; ``accessed`` is called
    by readers without it (a lost atime update under a race is harmless).
    """

    def __init__(self) -> None:
        self._paths: dict[str, _Times] = {}

    def _of(self, path: str) -> _Times:
        times = self._paths.get(path)
        if times is None:
            times = self._paths[path] = _Times()
        return times

    def changed(self, path: str, now_ns: int | None = None) -> None:
        """``path`` changed (content, mode, times, name): its ctime is now."""
        self._of(path).ctime_ns = now_ns or time.time_ns()

    def entries_changed(self, path: str, now_ns: int | None = None) -> None:
        """An entry was added to, removed from or renamed in directory ``path``."""
        now_ns = now_ns or time.time_ns()
        times = self._of(path)
        times.dir_mtime_ns = times.ctime_ns = now_ns

    def parent_changed(self, path: str, now_ns: int | None = None) -> None:
        """``path`` was added or removed: its directory's entries changed."""
        self.entries_changed(parent_and_name(path)[0], now_ns)

    def set(self, path: str, *, atime_ns: int | None, mtime_set: bool) -> None:
        """``utimensat``: atime as given; an mtime set by hand replaces a directory's
        entries-changed time (``touch -d`` may backdate it); ctime is now."""
        times = self._of(path)
        if atime_ns is not None:
            times.atime_ns = atime_ns
        if mtime_set:
            times.dir_mtime_ns = 0
        times.ctime_ns = time.time_ns()

    def accessed(self, path: str, mtime_ns: int) -> None:
        """A read of ``path``: move its atime as ``relatime`` does."""
        times = self._paths.get(path)
        now = time.time_ns()
        if times is None:
            self._paths[path] = _Times(atime_ns=now)
            return
        atime = times.atime_ns or mtime_ns
        if atime <= max(mtime_ns, times.ctime_ns) or now - atime > _DAY_NS:
            times.atime_ns = now

    def moved(self, src: str, dst: str) -> None:
        """``src`` (and what is below it) is now ``dst``; the old times at ``dst`` go."""
        self.removed(dst)
        prefix = src + "/"
        for path in [p for p in self._paths if p == src or p.startswith(prefix)]:
            self._paths[dst + path[len(src):]] = self._paths.pop(path)

    def removed(self, path: str) -> None:
        prefix = path + "/"
        for gone in [p for p in self._paths if p == path or p.startswith(prefix)]:
            del self._paths[gone]

    def shown(self, path: str, mtime_ns: int) -> Shown | None:
        """The times of ``path`` whose entry has ``mtime_ns``; None if it keeps none (all
        three are the mtime: the common case, cheaply)."""
        times = self._paths.get(path)
        if times is None:
            return None
        mtime = max(mtime_ns, times.dir_mtime_ns)
        return Shown(times.atime_ns or mtime, mtime, max(mtime, times.ctime_ns))
