"""Fresh reads of branch files, with the kernel's caches of them kept where they are right.

The kernel keeps the pages and attributes of a branch file from one open to the
next (``keep_cache``: a second read runs at page-cache speed). That is right as
long as three things hold; :mod:`daemon.fs` calls what is here to keep them:

1. Every read the daemon answers gives what the file holds at that moment. A
   read-only handle *follows* its file: the spool it is being written to, or its
   stored bytes, not the bytes it had when it was opened (:func:`reads_current`,
   :func:`follow_spool`). Writes, truncations and renames through the mount go
   through the kernel, which keeps its pages right for them.
2. Every change the kernel did not see drops what it caches. A put, rm, discard,
   rollback or commit through the daemon, and another node's commit, reload a
   branch view (:class:`daemon.views.Reload`): :func:`changed_nodes` finds the
   inodes whose path now holds something else, and :func:`drop` has the kernel
   forget their pages and attributes, and the name of a file that went away.
3. A file that loses its name (unlinked, replaced by a rename, removed outside the
   mount) keeps what it held for the handles still open on it, as an unlinked
   file does (:func:`let_go`), and those no longer follow the name.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator

import pyfuse3
import trio

from daemon.handles import Handle, Handles
from daemon.inodes import Inodes, Node
from daemon.reader import FileReader
from daemon.views import BranchView, Reload, SpoolFile
from vfs.blobstore import BlobStore
from vfs.errors import VfsError
from vfs.names import parent_and_name
from vfs.snapshot import NotCached
from vfs.tree import FILE, Entry

log = logging.getLogger("daemon.fs")

# How long a request waits for a check of its branch's head that is under way
# before it is answered from the view as it is: a store that answers in time
# (the usual case) shows another node's commit to the next request, and a slow
# or unreachable one delays requests on that branch by this much, once a check.
REFRESH_WAIT = 0.05

# -- read-only handles follow their file ----------------------------------------------------


def reads_current(handle: Handle, view: BranchView) -> bool:
    """Does a following handle read what its file holds now?

    Cheap and without the view's lock (every read of a branch file that reaches the
    daemon asks): a wrong answer only sends the read to :func:`follow_spool`, which
    decides under the lock.
    """
    path = handle.node.path
    spool = view.spools.get(path)
    if spool is not None:
        return spool is handle.spool
    try:
        entry = view.open_commit.lookup_nowait(path)
    except NotCached:
        return False  # follow_spool decides, in a worker thread
    if entry is None or entry.kind != FILE:
        return True  # gone: its handles read on what they had (see let_go)
    return handle.reader is not None and handle.reader.entry.ref == entry.ref


def follow_spool(handle: Handle, view: BranchView) -> Entry | None:
    """Point a following handle at the spool its file is being written to, if there
    is one (call it holding the view's lock).

    Returns:
        The stored entry the handle must read instead, if it reads other bytes
        now (the caller loads its :class:`FileReader` and calls :func:`switch`).
    """
    spool = view.spool(handle.node.path)
    if spool is not None:
        if spool is not handle.spool:
            spool.reopen()
            spool.opens += 1
            switch(handle, view, spool, None)
        return None
    entry = view.lookup(handle.node.path)
    if entry is None or entry.kind != FILE:
        return None
    return stored_target(handle, entry)


def stored_target(handle: Handle, entry: Entry) -> Entry | None:
    """``entry``, unless the handle reads its bytes already."""
    if handle.spool is None and handle.reader is not None and \
            handle.reader.entry.ref == entry.ref:
        return None
    return entry


def read_spool(handle: Handle, offset: int, size: int) -> bytes | None:
    """Read a following handle's spool (hold the view's lock: another read of the
    handle may switch it to other bytes and close this spool); None if it has none."""
    spool = handle.spool
    return None if spool is None else os.pread(spool.fd, size, offset)


def switch(handle: Handle, view: BranchView, spool: SpoolFile | None,
           reader: FileReader | None) -> None:
    """Make a following handle read ``spool`` (already counted open) or ``reader``
    (call it holding the view's lock)."""
    old = handle.spool
    handle.spool, handle.reader = spool, reader
    if old is not None:
        view.release(old)


def let_go(view: BranchView, handles: Iterable[Handle], blobs: BlobStore,
           target: Callable[[Handle], Entry | None]) -> list[Handle]:
    """A file loses its name: its following handles read on the stored entry
    ``target`` gives each (None: what it reads now) and no longer follow the name.

    Call it holding the view's lock, in a worker thread (it reads manifests).
    Returns those handles (:func:`follow_again` undoes it if the name stays).
    """
    handles = [handle for handle in handles if handle.follows]
    for handle in handles:
        entry = target(handle)
        if entry is not None:
            switch(handle, view, None, FileReader.load(blobs, entry))
        handle.follows = False
    return handles


def follow_again(handles: Iterable[Handle]) -> None:
    for handle in handles:
        handle.follows = True


# -- changes the kernel did not see ----------------------------------------------------------


def changed_nodes(view: BranchView, changes: Reload, by_key: dict[tuple[str, str], int],
                  nodes: dict[int, Node]) -> list[Node]:
    """The nodes of ``view`` (inodes the kernel may know) whose path holds something else.

    Runs in a worker thread (it may read trees): the trio thread changes ``by_key``
    and ``nodes`` meanwhile, one whole operation at a time.
    """
    changed: dict[int, Node] = {}
    below = []
    for path in changes.paths():
        inode = by_key.get((view.name, path))
        node = nodes.get(inode) if inode is not None else None
        if node is None:
            continue  # the kernel knows nothing of it
        here, deeper = changes.compare(path)
        if here:
            changed[node.inode] = node
        if deeper:
            below.append(path + "/" if path else "")
    if below:
        prefixes = tuple(below)
        for node in list(nodes.values()):
            if node.view is view and node.inode not in changed and \
                    node.path.startswith(prefixes) and changes.compare(node.path)[0]:
                changed[node.inode] = node
    return list(changed.values())


def times_moved(view: BranchView, changes: Reload) -> set[str]:
    """The times of what a reload changed (a put, rm, discard or rollback, another
    node's commit), as if done through the mount: the directory of each entry that
    came or went gets a new mtime and ctime, an entry changed in place a new ctime.

    Runs in a worker thread (it may read trees); changes the times under the view's
    lock. Returns the directories whose entries came or went.
    """
    came_or_went, changed = [], []
    for path in changes.paths():
        if not path:
            continue
        try:
            before, after = changes.entries(path)
        except VfsError:
            continue
        if before is None or after is None:
            came_or_went.append((path, after is None))
        elif before.kind != after.kind or before.ref != after.ref or \
                before.mode != after.mode or before.mtime_ns != after.mtime_ns:
            changed.append(path)
    if not came_or_went and not changed:
        return set()
    now = time.time_ns()
    with view.lock:
        for path, went in came_or_went:
            if went:
                view.times.removed(path)
            view.times.parent_changed(path, now)
        for path in changed:
            view.times.changed(path, now)
    return {parent_and_name(path)[0] for path, _ in came_or_went}


def gone(view: BranchView, changes: Reload, nodes: Iterable[Node]) -> list[tuple[Node, Entry]]:
    """The nodes whose file went away (nothing is at its path now, or a directory),
    each with the entry it had (a file's, or None)."""
    out = []
    for node in nodes:
        try:
            before, after = changes.entries(node.path)
        except VfsError:
            continue  # unreadable: its pages and attributes are dropped all the same
        if node.path and view.spool(node.path) is None and before is not None and (
                after is None or after.kind != before.kind):
            out.append((node, before))
    return out


class _Check:
    """A check of a branch's head under way (:meth:`Coherence.refresh`)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline  # requests wait for it until then (trio's clock)
        self.done = trio.Event()


def drop(inodes: Iterable[int], names: Iterable[tuple[int, bytes]]) -> None:
    """Have the kernel forget the pages and attributes of ``inodes``, then the
    ``names`` (parent inode, name) of files that went away.

    Blocks until it has, which waits for requests on those inodes and names in
    flight: call it from a worker thread holding no lock a request handler may
    wait for (a view's lock, a branch's sealing lock), never from the trio thread.
    """
    for inode in inodes:
        try:
            pyfuse3.invalidate_inode(inode, attr_only=False)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the kernel holds nothing of it
                log.debug("cannot invalidate inode %d: %s", inode, exc)
    for parent, name in names:
        try:
            pyfuse3.invalidate_entry(parent, name)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.debug("cannot invalidate the entry %r in inode %d: %s", name, parent, exc)


# -- the mount's side ------------------------------------------------------------------------


class Coherence:
    """What the mount's handlers and the control socket call to keep the rules above.

    Args:
        inodes, handles: the mount's tables (changed in the trio thread only).
        blobs: to load the manifests of stored files.
    """

    def __init__(self, inodes: Inodes, handles: Handles, blobs: BlobStore) -> None:
        self.inodes = inodes
        self.handles = handles
        self.blobs = blobs
        self.nursery: trio.Nursery | None = None  # set while mounted
        self._checking: dict[BranchView, _Check] = {}  # checks of heads under way
        self._failing: set[BranchView] = set()  # views whose last check failed

    def due(self, view: BranchView) -> bool:
        """Would :meth:`refresh` do anything? (Cheap: the warm path of every
        request on a branch asks, and skips the call when it would not.)"""
        return bool(self._checking) or view.refresh_due()

    async def refresh(self, view: BranchView, *, wait: bool = True) -> None:
        """Notice a head moved by another node (a request handler calls it in passing):
        what the kernel caches of the files it changed is dropped soon after.

        The check reads the store, so it runs in a worker thread, at most one per
        branch at a time; the request waits for it up to :data:`REFRESH_WAIT`
        after it started (``wait=False``: not at all), then is answered from
        the view as it is. Never raises: a store that cannot be read leaves the
        view as it was, and is logged.
        """
        check = self._checking.get(view) if self._checking else None
        if check is None:
            if not view.refresh_due():
                return  # the warm path: one clock read
            if self.nursery is None:  # handlers called without a mount (tests)
                await self._check(view, _Check(trio.current_time()))
                return
            check = self._checking[view] = _Check(trio.current_time() + REFRESH_WAIT)
            self.nursery.start_soon(self._check, view, check)
        if wait and trio.current_time() < check.deadline:
            with trio.move_on_at(check.deadline):
                await check.done.wait()

    async def _check(self, view: BranchView, check: _Check) -> None:
        """Check a branch's head in a worker thread (:meth:`refresh`), and drop
        what the kernel caches of what a moved head changed."""
        changes = None
        try:
            changes = await trio.to_thread.run_sync(view.maybe_refresh, abandon_on_cancel=True)
        except VfsError as exc:
            if view not in self._failing:
                self._failing.add(view)
                log.warning("cannot check the head of %s in the store: %s (answering from "
                            "what this node has; checked again in a second)", view.name, exc)
            else:
                log.debug("cannot check the head of %s: %s", view.name, exc)
        except Exception:  # a bug: logged, and the mount keeps serving
            log.exception("internal error checking the head of %s", view.name)
        else:
            if view in self._failing:
                self._failing.discard(view)
                log.info("the head of %s can be checked again", view.name)
        finally:
            if self._checking.get(view) is check:
                del self._checking[view]
            check.done.set()
        if changes is not None and self.nursery is not None:
            try:
                await self._drop_changed_soon(view, changes)
            except VfsError as exc:  # a manifest of a file that went cannot be read
                log.warning("cannot follow the change of %s everywhere: %s", view.name, exc)
            except Exception:
                log.exception("internal error following the change of %s", view.name)

    async def follow(self, handle: Handle, view: BranchView) -> None:
        """Point a read-only handle at what its file holds now: the spool it is being
        written to, or its stored bytes (a changed file, not the one opened)."""

        def choose() -> Entry | None:  # holding the lock
            if not handle.follows:
                return None  # its file lost its name meanwhile
            return follow_spool(handle, view)

        def choose_nowait() -> Entry | None:
            view.lookup_nowait(handle.node.path)  # all follow_spool looks up
            return choose()

        def follow() -> None:
            entry = view.locked(choose, choose_nowait)
            if entry is not None:  # its manifest is read without the lock
                reader = FileReader.load(self.blobs, entry)
                with view.lock:
                    if handle.follows:
                        switch(handle, view, None, reader)

        await trio.to_thread.run_sync(follow)

    @contextlib.contextmanager
    def freezing(self, view: BranchView, path: str | None) -> Iterator[None]:
        """Around an unlink or a rename that may take the name ``path`` from its file:
        the file's read-only handles read on what it holds now (call it in a worker
        thread holding the view's lock), and follow the name again if it stays."""
        handles = [] if path is None else let_go(
            view, self.handles_of(view, path), self.blobs,
            functools.partial(follow_spool, view=view))
        try:
            yield
        except BaseException:
            follow_again(handles)
            raise

    def handles_of(self, view: BranchView, path: str) -> list[Handle]:
        """The open handles of the file at ``path`` (any thread)."""
        inode = self.inodes.by_key.get((view.name, path))
        node = self.inodes.nodes.get(inode) if inode is not None else None
        return [] if node is None else self.handles.of_node(node)

    def drop_cached(self, reloaded: tuple[BranchView, Reload] | None) -> None:
        """Make the kernel drop what it caches of the files a reload changed.

        Call it from a worker thread holding no lock (not a branch's sealing lock
        either: a rename waiting for it would keep the kernel from dropping a name).
        It returns once the kernel is done, so every read after a ``vfsctl put``
        (rm, discard, rollback, commit) returned sees it.
        """
        if reloaded is not None and self.nursery is not None:  # None: not mounted
            self._drop_changed(*reloaded)

    def _drop_changed(self, view: BranchView, changes: Reload, *, stale: bool = False) -> None:
        """What :meth:`drop_cached` does (in a trio worker thread). With ``stale``,
        each changed node's next open drops its pages too: this may come late."""
        directories = times_moved(view, changes)
        nodes = changed_nodes(view, changes, self.inodes.by_key, self.inodes.nodes)
        for node in nodes:
            node.stale = node.stale or stale
        went = gone(view, changes, nodes)
        for node, before in went:
            with view.lock:  # its handles read on what it held when it went
                let_go(view, self.handles_of(view, node.path), self.blobs,
                       functools.partial(stored_target, entry=before)
                       if before.kind == FILE else lambda handle: None)
        names = trio.from_thread.run_sync(self._unlinked, view, went) if went else []
        # The directories whose times moved: their attributes (and listings) too.
        inodes = {node.inode for node in nodes}
        for path in directories:
            inode = self.inodes.by_key.get((view.name, path))
            if inode is not None:
                inodes.add(inode)
        drop(sorted(inodes), names)

    def _unlinked(self, view: BranchView,
                  went: list[tuple[Node, Entry]]) -> list[tuple[int, bytes]]:
        """Forget the names of nodes whose file went away outside FUSE (in the trio
        thread): a new lookup finds what is there now, a request on its way the
        file as it was (:attr:`Node.kept`). Returns the (parent inode, name) of
        each, for the kernel to forget too."""
        names = []
        for node, before in went:
            path = node.path
            if self.inodes.by_key.get((view.name, path)) != node.inode:
                continue  # renamed or forgotten meanwhile
            parent, _, name = path.rpartition("/")
            node.kept = before
            self.inodes.forget_path(view, path)
            parent_inode = self.inodes.by_key.get((view.name, parent))
            if parent_inode is not None:
                names.append((parent_inode, os.fsencode(name)))
        return names

    async def _drop_changed_soon(self, view: BranchView, changes: Reload) -> None:
        await trio.to_thread.run_sync(functools.partial(self._drop_changed, view, changes,
                                                        stale=True))


__all__ = ["Coherence", "changed_nodes", "drop", "follow_again", "follow_spool", "gone", "let_go",
           "read_spool", "reads_current", "stored_target", "switch"]
