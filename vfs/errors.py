"""The exception hierarchy of vfs.

Every error a user can cause or act on is a :class:`VfsError` whose message says
what failed and what to do about it. The command line prints that message on one
line and exits with :attr:`VfsError.exit_code`; the FUSE layer maps each class to
an errno with :attr:`VfsError.errno`. Anything that is not a ``VfsError`` is a bug.
"""

from __future__ import annotations

import errno as _errno


class VfsError(Exception):
    """Base class of every error vfs reports to a user."""

    exit_code = 1
    errno = _errno.EIO


class InvalidName(VfsError):
    """A repository, branch or pipeline name does not follow the naming rule."""

    errno = _errno.EINVAL


class InvalidPath(VfsError):
    """A path is malformed or would escape its repository or destination."""

    errno = _errno.EINVAL


class PathTooLong(InvalidPath):
    """A path component over 255 bytes, or a path over 1024 bytes."""

    errno = _errno.ENAMETOOLONG


class InvalidRef(VfsError):
    """A ``REPO@REF[:/path]`` string cannot be parsed."""

    errno = _errno.EINVAL


class NotFound(VfsError):
    """Something named by the user does not exist."""

    errno = _errno.ENOENT


class RepoNotFound(NotFound):
    pass


class BranchNotFound(NotFound):
    pass


class CommitNotFound(NotFound):
    pass


class PathNotFound(NotFound):
    pass


class PipelineNotFound(NotFound):
    pass


class JobNotFound(NotFound):
    pass


class InvalidSpec(VfsError):
    """A pipeline spec is malformed or names something that cannot run."""

    errno = _errno.EINVAL


class JobFailed(VfsError):
    """A pipeline job failed, so a commit was not processed (``vfsctl wait``)."""


class Timeout(VfsError):
    """Waiting took longer than the caller allowed."""

    errno = _errno.ETIMEDOUT


class AmbiguousRef(VfsError):
    """A commit id prefix matches more than one commit."""

    errno = _errno.EINVAL


class AlreadyExists(VfsError):
    errno = _errno.EEXIST


class NotADirectory(VfsError):
    errno = _errno.ENOTDIR


class IsADirectory(VfsError):
    errno = _errno.EISDIR


class DirectoryNotEmpty(VfsError):
    errno = _errno.ENOTEMPTY


class ReadOnly(VfsError):
    """A change was attempted on something immutable (a commit)."""

    errno = _errno.EROFS


class Conflict(VfsError):
    """A branch moved while we were committing to it."""

    errno = _errno.EAGAIN


class HeadMoved(Conflict):
    """A commit that must go on one exact head found the branch elsewhere."""


class LeaseLost(VfsError):
    """Another node took over a claim this node held (its lease expired): what this
    node did under it must be forgotten."""

    errno = _errno.EAGAIN


class NothingToCommit(VfsError):
    errno = _errno.EINVAL


class StoreError(VfsError):
    """The object store failed or holds something it should not."""


class StoreNotFound(StoreError):
    """No store exists at the given location."""

    errno = _errno.ENOENT


class UnsupportedFormat(StoreError):
    """The store was written by a newer (or unknown) format version."""


class ObjectNotFound(StoreError):
    """A key is absent from the object store."""

    errno = _errno.ENOENT


class PreconditionFailed(StoreError):
    """A conditional write lost: the object exists, or changed, meanwhile."""

    errno = _errno.EAGAIN


class StoreUnavailable(StoreError):
    """The object store could not be reached or failed transiently."""


class StoreChanged(StoreUnavailable):
    """gc deleted a pack a write was using; doing the write again succeeds."""


class GcRefused(VfsError):
    """gc will not delete now: a node may hold references it has not published."""

    exit_code = 3


class GcAborted(StoreError):
    """gc could not read something it marks from, and deleted nothing."""


class StoreAccessDenied(StoreError):
    """The object store refused our credentials or has none to check.

    Permanent: retrying does not help, fixing the credentials or the policy does.
    """

    errno = _errno.EACCES


class StoreFull(StoreError):
    """The object store or the local disk has no space left."""

    errno = _errno.ENOSPC


class Corruption(StoreError):
    """Stored bytes do not match their hash or cannot be decoded.

    Never returned as data: a read that hits corruption fails.
    """

    errno = _errno.EIO


class Locked(VfsError):
    """Another process holds a lock this operation needs."""

    errno = _errno.EBUSY
