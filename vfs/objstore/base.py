"""The byte store interface every backend implements.

An object store maps string keys (``/``-separated, no leading slash) to immutable
byte strings. Besides plain get/put/list/delete it offers the two conditional
writes the commit protocol needs:

* ``put(key, data, if_absent=True)`` creates the object only if no object has that
  key (S3 ``If-None-Match: *``), and
* ``put(key, data, if_match=tag)`` replaces the object only if its current *tag*
  equals ``tag`` (S3 ``If-Match: etag``): a compare-and-swap.

A *tag* is an opaque version token of an object's current content, returned by
:meth:`ObjectStore.get_tagged` and by :meth:`ObjectStore.put`. Backends raise only
:mod:`vfs.errors` exceptions: ``ObjectNotFound``, ``PreconditionFailed``,
``StoreUnavailable``, ``StoreFull``.

Cross-cutting behaviour (retries, fault injection, logging) is added by wrapping a
store in another store (see :mod:`vfs.objstore.wrappers`), never inside backends.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass

Buffers = bytes | bytearray | memoryview | list[bytes | memoryview]


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object."""

    key: str
    size: int
    mtime: float  # seconds since the epoch of the last write
    #: A token of the object's current version, the same in a listing and a
    #: :meth:`ObjectStore.stat`: it changes whenever different content is written
    #: (S3: the ETag; local: inode, mtime and size). Compare it only with other
    #: ``etag`` values: it is not the tag of ``put(if_match=...)``.
    etag: str = ""


class ObjectStore(abc.ABC):
    """Abstract byte store. Implementations must be safe to call from threads."""

    #: A short human-readable location (``/srv/store``, ``s3://bucket/prefix``).
    url: str = ""

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """Return the whole object.

        Raises:
            ObjectNotFound: no object has this key.
        """

    @abc.abstractmethod
    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """Return ``length`` bytes at ``offset`` (fewer only at the end of the object)."""

    @abc.abstractmethod
    def get_tagged(self, key: str) -> tuple[bytes, str]:
        """Return the object and its current tag, for a later ``put(if_match=tag)``."""

    @abc.abstractmethod
    def put(
        self,
        key: str,
        data: bytes | bytearray | memoryview,
        *,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> str:
        """Store ``data`` under ``key`` atomically and durably; return the new tag.

        A reader sees either the old object or the whole new one, never a part.
        When this returns, the object survives a crash of this machine.

        Raises:
            PreconditionFailed: ``if_absent`` and the key exists, or ``if_match``
                and the current tag differs (or the object is absent).
        """

    def put_deferred(self, key: str, data: Buffers) -> None:
        """Store ``data`` atomically; durable only after the next :meth:`sync`.

        ``data`` may be one buffer or a list of buffers to concatenate. Writers of
        many objects (packs) use this and call ``sync()`` once before anything
        refers to them. Backends whose puts are durable anyway (S3) just put.
        """
        self.put(key, data if not isinstance(data, list) else b"".join(data))

    def sync(self) -> None:  # noqa: B027 - optional hook
        """Make every object written with :meth:`put_deferred` durable."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; deleting an absent key is not an error."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Yield every object whose key starts with ``prefix``, in key order."""

    @abc.abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Return the size and modification time of one object.

        Raises:
            ObjectNotFound: no object has this key.
        """

    def exists(self, key: str) -> bool:
        """True if an object has this key."""
        from vfs.errors import ObjectNotFound

        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and file handles."""
