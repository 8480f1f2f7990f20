"""The store's ``config`` object: format version and the fixed data parameters.

Chunking, hashing and compression parameters are chosen when a store is created
and written here; every later writer reads them from the store, never from library
defaults, so a store keeps deduplicating against itself across library upgrades.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field

from vfs.errors import Corruption, ObjectNotFound, StoreNotFound, UnsupportedFormat
from vfs.objstore.base import ObjectStore

#: The format version this library writes. Stores with a higher version are refused.
FORMAT_VERSION = 1
CONFIG_KEY = "config"


@dataclass(frozen=True)
class ChunkerParams:
    """Content-defined chunking parameters (FastCDC 2020)."""

    algorithm: str = "fastcdc2020"
    min_size: int = 256 * 1024
    avg_size: int = 1024 * 1024
    max_size: int = 4 * 1024 * 1024
    normalization: int = 1
    seed: int = 0


@dataclass(frozen=True)
class StoreConfig:
    """Everything a reader or writer must agree on to use a store."""

    store_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    format_version: int = FORMAT_VERSION
    created: float = field(default_factory=time.time)
    hash: str = "blake3"
    compression: str = "zstd"
    compression_level: int = 3
    pack_target_size: int = 16 * 1024 * 1024
    inline_limit: int = 1024
    chunker: ChunkerParams = field(default_factory=ChunkerParams)

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, indent=1).encode() + b"\n"

    @classmethod
    def decode(cls, data: bytes) -> StoreConfig:
        try:
            raw = json.loads(data)
            version = int(raw["format_version"])
        except (ValueError, KeyError, TypeError) as exc:
            raise Corruption(f"the store's config object cannot be read: {exc}") from exc
        if version > FORMAT_VERSION:
            raise UnsupportedFormat(
                f"the store has format version {version}, this vfs reads up to "
                f"{FORMAT_VERSION}: upgrade vfs to use this store"
            )
        try:
            chunker = ChunkerParams(**raw.pop("chunker"))
            config = cls(chunker=chunker, **raw)
        except (TypeError, KeyError) as exc:
            raise Corruption(f"the store's config object is malformed: {exc}") from exc
        if config.hash != "blake3" or config.compression != "zstd":
            raise UnsupportedFormat(
                f"the store uses hash {config.hash!r} and compression {config.compression!r}, "
                "which this vfs does not support"
            )
        if config.chunker.algorithm != "fastcdc2020":
            raise UnsupportedFormat(f"unknown chunker {config.chunker.algorithm!r} in the store")
        return config


def load_config(objects: ObjectStore) -> StoreConfig:
    """Read the config of an existing store.

    Raises:
        StoreNotFound: there is no store at that location (no config object).
        UnsupportedFormat: the store was written by a newer vfs.
    """
    try:
        return StoreConfig.decode(objects.get(CONFIG_KEY))
    except ObjectNotFound:
        raise StoreNotFound(
            f"no vfs store at {objects.url}: create one with 'vfsctl init'"
        ) from None


def create_config(objects: ObjectStore, config: StoreConfig | None = None) -> StoreConfig:
    """Write a new config unless one exists; return the config now in force."""
    from vfs.errors import PreconditionFailed

    config = config or StoreConfig()
    try:
        objects.put(CONFIG_KEY, config.encode(), if_absent=True)
    except PreconditionFailed:
        # Someone else's config, or ours: a retried put whose first try landed
        # fails here too. Reading it back is right in both cases.
        return load_config(objects)
    return config
