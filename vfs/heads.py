"""Every branch head of a store, kept current with one listing of ``refs/`` per poll.

A process that follows many branches at once (vfsd's pipeline watcher, one input
branch per pipeline) asks :class:`Heads` instead of reading each ref in turn:
:meth:`Heads.poll` lists ``refs/`` once (one request per 1,000 refs on S3) and reads
only the refs whose listed version (etag, size, modification time) changed since the
previous poll. An idle poll therefore costs one request, however many branches there
are.

This relies on the store listing what was written before the listing began
(list-after-write consistency): S3 since December 2020, SeaweedFS, MinIO, moto and
the local and in-memory backends give it. On a store that lists stale versions, a
moved head is seen at a later poll, once the listing shows it.
"""

from __future__ import annotations

from vfs.errors import BranchNotFound, StoreUnavailable, VfsError
from vfs.refs import RefState, read_ref

_PREFIX = "refs/"


class Heads:
    """The heads of every branch as of the last :meth:`poll`.

    One caller at a time (it is not locked): vfsd's watcher polls once per round
    and asks :meth:`head` in between.

    Args:
        store: the :class:`vfs.Store` whose branches to follow.
    """

    def __init__(self, store) -> None:
        self.store = store
        self._listed: dict[str, tuple[str, int, float]] = {}  # ref key -> listed version
        self._heads: dict[str, RefState | VfsError] = {}  # ref key -> its head (or damage)
        # Branches asked for but not listed, answered by a full read: kept until the
        # listing changes, so a pipeline whose input is missing costs nothing per poll.
        self._unlisted: dict[str, RefState | VfsError] = {}

    def poll(self) -> set[tuple[str, str]]:
        """List ``refs/`` once and read the refs whose listing changed.

        Returns:
            The (repo, branch) pairs created, moved or deleted since the last poll
            (every listed branch at the first poll).

        Raises:
            StoreUnavailable: the listing or a read failed; nothing was updated and
                the next poll tries again.
        """
        objects = self.store.objects
        listed = {info.key: (info.etag, info.size, info.mtime)
                  for info in objects.list(_PREFIX)}
        heads = {}
        changed = set()
        for key, version in listed.items():
            if self._listed.get(key) == version and key in self._heads:
                heads[key] = self._heads[key]
                continue
            repo, _, branch = key[len(_PREFIX):].partition("/")
            try:
                heads[key] = read_ref(objects, repo, branch)
            except BranchNotFound:
                continue  # deleted since the listing: gone at this poll
            except StoreUnavailable:
                raise
            except VfsError as exc:  # a damaged ref: that branch's error, not the poll's
                heads[key] = exc
            changed.add((repo, branch))
        for key in self._heads.keys() - heads.keys():
            repo, _, branch = key[len(_PREFIX):].partition("/")
            changed.add((repo, branch))
        self._listed = {key: version for key, version in listed.items() if key in heads}
        self._heads = heads
        if changed:
            self._unlisted.clear()
        return changed

    def head(self, repo: str, branch: str) -> RefState:
        """The head of ``repo@branch`` as of the last poll.

        A branch the last listing did not hold is read in full (the exact error, or
        a branch the listing missed), once until the listing changes.

        Raises:
            RepoNotFound, BranchNotFound: as :meth:`vfs.Store.head`.
            Corruption: the ref is damaged.
        """
        key = f"{_PREFIX}{repo}/{branch}"
        found = self._heads.get(key)
        if found is None:
            found = self._unlisted.get(key)
        if found is None:
            try:
                found = self.store.head(repo, branch)
            except StoreUnavailable:
                raise
            except VfsError as exc:
                found = exc
            self._unlisted[key] = found
        if isinstance(found, VfsError):
            raise found.with_traceback(None)
        return found
