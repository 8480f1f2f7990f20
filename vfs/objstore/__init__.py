"""Object store backends and :func:`open_object_store`, which picks one from a URL."""

from __future__ import annotations

import os

from vfs.errors import InvalidPath
from vfs.objstore.base import ObjectInfo, ObjectStore
from vfs.objstore.local import LocalStore
from vfs.objstore.memory import MemoryStore
from vfs.objstore.wrappers import RetryingStore

__all__ = ["ObjectInfo", "ObjectStore", "LocalStore", "MemoryStore", "open_object_store"]


def open_object_store(
    url: str, *, create: bool = False, s3_endpoint: str | None = None
) -> ObjectStore:
    """Open the object store at ``url``.

    Args:
        url: a directory path, ``file:///path``, ``s3://bucket/prefix`` or ``memory://``.
        create: create a local directory if it does not exist yet.
        s3_endpoint: endpoint URL of an S3-compatible service (MinIO, Ceph, moto);
            defaults to ``$VFS_S3_ENDPOINT``, then to AWS.

    An S3 store comes wrapped in a :class:`RetryingStore`: throttling, 5xx answers
    and broken connections are retried with backoff there (botocore's own retries
    are off). A local or memory store is not wrapped: its errors (EACCES, EIO,
    ENOSPC) do not go away by waiting.

    Raises:
        InvalidPath: the URL has an unknown scheme or no bucket.
    """
    if url.startswith("s3://"):
        from vfs.objstore.s3 import S3Store

        bucket, _, prefix = url[len("s3://") :].partition("/")
        if not bucket:
            raise InvalidPath(f"store URL {url!r} names no bucket: use s3://BUCKET[/PREFIX]")
        endpoint = s3_endpoint or os.environ.get("VFS_S3_ENDPOINT") or None
        # About 10 s of backoff in all before giving up: long enough to ride out a
        # burst of SlowDown or a restarting gateway, short enough for a user waiting.
        return RetryingStore(
            S3Store(bucket, prefix.strip("/"), endpoint_url=endpoint),
            attempts=8, base_delay=0.1, max_delay=5.0,
        )
    if url == "memory://":
        return MemoryStore()
    if url.startswith("file://"):
        url = url[len("file://") :]
    elif "://" in url:
        raise InvalidPath(f"unknown store URL scheme in {url!r}: use a path, file://, or s3://")
    return LocalStore(os.path.expanduser(url), create=create)
