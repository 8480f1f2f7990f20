"""An in-memory object store for unit tests and short-lived experiments."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

from vfs.errors import ObjectNotFound, PreconditionFailed
from vfs.objstore.base import ObjectInfo, ObjectStore


class MemoryStore(ObjectStore):
    """Object store held in a dict; every write gets a fresh tag."""

    def __init__(self) -> None:
        self.url = "memory://"
        self._objects: dict[str, tuple[bytes, str, float]] = {}
        self._lock = threading.Lock()
        self._versions = itertools.count(1)

    def _entry(self, key: str) -> tuple[bytes, str, float]:
        try:
            return self._objects[key]
        except KeyError:
            raise ObjectNotFound(f"object {key} does not exist") from None

    def get(self, key: str) -> bytes:
        with self._lock:
            return self._entry(key)[0]

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        with self._lock:
            return self._entry(key)[0][offset : offset + length]

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        with self._lock:
            data, tag, _ = self._entry(key)
            return data, tag

    def put(
        self,
        key: str,
        data: bytes | bytearray | memoryview,
        *,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> str:
        with self._lock:
            current = self._objects.get(key)
            if if_absent and current is not None:
                raise PreconditionFailed(f"object {key} already exists")
            if if_match is not None and (current is None or current[1] != if_match):
                raise PreconditionFailed(f"object {key} changed meanwhile")
            tag = f"v{next(self._versions)}"
            self._objects[key] = (bytes(data), tag, time.time())
            return tag

    def delete(self, key: str) -> None:
        with self._lock:
            self._objects.pop(key, None)

    def stat(self, key: str) -> ObjectInfo:
        with self._lock:
            data, tag, mtime = self._entry(key)
            return ObjectInfo(key, len(data), mtime, tag)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        with self._lock:
            items = sorted(
                (key, len(data), mtime, tag)
                for key, (data, tag, mtime) in self._objects.items()
                if key.startswith(prefix)
            )
        return iter(ObjectInfo(*item) for item in items)

    def set_mtime(self, key: str, mtime: float) -> None:
        """Backdate an object (tests of grace periods)."""
        with self._lock:
            data, tag, _ = self._entry(key)
            self._objects[key] = (data, tag, mtime)
