"""Blobs and packs: hashing, compression and the byte layout of pack objects.

A blob is an immutable byte string named by its BLAKE3 hash. Blobs are stored
zstd-compressed (or raw, when compression does not shrink them) inside *packs*:

    pack    := "VFSPACK1" record* index trailer
    record  := the stored bytes of one blob
    index   := "VFSIDX01" count:u32 entry*count checksum:32
    entry   := hash:32 kind:u8 compression:u8 offset:u32 stored_len:u32 plain_len:u32
    trailer := index_len:u32 "VFSE"

All integers are little-endian. ``offset`` counts from the first byte of the pack.
``checksum`` is the BLAKE3 hash of the index bytes before it. A pack is named by
the BLAKE3 hash of all its bytes; a copy of its index is stored separately so the
local index can be rebuilt without reading packs. See docs/format.md.
"""

from __future__ import annotations

import enum
import struct
import threading
from dataclasses import dataclass

import blake3
import zstandard

from vfs.errors import Corruption

PACK_MAGIC = b"VFSPACK1"
INDEX_MAGIC = b"VFSIDX01"
TRAILER_MAGIC = b"VFSE"
HASH_SIZE = 32

_ENTRY = struct.Struct("<32sBBIII")
_COUNT = struct.Struct("<I")
_TRAILER = struct.Struct("<I4s")


class BlobKind(enum.IntEnum):
    CHUNK = 0  # a piece of file data
    MANIFEST = 1  # a file's ordered list of chunks
    TREE = 2  # a directory


class Compression(enum.IntEnum):
    NONE = 0
    ZSTD = 1


def blob_hash(data: bytes | bytearray | memoryview) -> bytes:
    """The 32-byte BLAKE3 hash that names a blob."""
    return blake3.blake3(data).digest()


@dataclass(frozen=True, slots=True)
class BlobLocation:
    """Where a blob lives: which pack, where in it, and how it is stored."""

    pack_id: bytes
    kind: BlobKind
    compression: Compression
    offset: int
    stored_len: int
    plain_len: int


@dataclass(frozen=True, slots=True)
class EncodedBlob:
    """A blob ready to be packed: its hash and the bytes to store."""

    hash: bytes
    kind: BlobKind
    stored: bytes
    compression: Compression
    plain_len: int


class BlobCodec:
    """Hashes, compresses and decompresses blobs; safe to use from many threads.

    zstd contexts are not thread-safe, so each thread gets its own.
    """

    def __init__(self, level: int) -> None:
        self.level = level
        self._local = threading.local()

    def _compressor(self) -> zstandard.ZstdCompressor:
        compressor = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = self._local.compressor = zstandard.ZstdCompressor(level=self.level)
        return compressor

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        decompressor = getattr(self._local, "decompressor", None)
        if decompressor is None:
            decompressor = self._local.decompressor = zstandard.ZstdDecompressor()
        return decompressor

    def encode(self, kind: BlobKind, data: bytes | bytearray | memoryview) -> EncodedBlob:
        """Hash and compress one blob (keeps it raw if zstd does not shrink it)."""
        digest = blob_hash(data)
        compressed = self._compressor().compress(data)
        if len(compressed) < len(data):
            return EncodedBlob(digest, kind, compressed, Compression.ZSTD, len(data))
        # Stored as given (a view into a read block is fine: packing copies it once).
        return EncodedBlob(digest, kind, data, Compression.NONE, len(data))  # type: ignore[arg-type]

    def decode(self, expected_hash: bytes, location: BlobLocation, stored: bytes) -> bytes:
        """Decompress stored bytes and verify them against their hash.

        Raises:
            Corruption: the bytes do not decompress or do not hash to ``expected_hash``.
        """
        if len(stored) != location.stored_len:
            raise Corruption(
                f"blob {expected_hash.hex()} in pack {location.pack_id.hex()} is truncated "
                f"({len(stored)} of {location.stored_len} bytes)"
            )
        if location.compression == Compression.ZSTD:
            try:
                # A damaged frame header may claim any size: check it before allocating.
                claimed = zstandard.frame_content_size(stored)
                if claimed != location.plain_len:
                    raise zstandard.ZstdError(
                        f"frame claims {claimed} bytes, the index {location.plain_len}"
                    )
                plain = self._decompressor().decompress(
                    stored, max_output_size=location.plain_len
                )
            except (zstandard.ZstdError, MemoryError) as exc:
                raise Corruption(
                    f"blob {expected_hash.hex()} in pack {location.pack_id.hex()} "
                    f"does not decompress: {exc}"
                ) from exc
        else:
            plain = stored
        if blob_hash(plain) != expected_hash:
            raise Corruption(
                f"blob {expected_hash.hex()} in pack {location.pack_id.hex()} does not match "
                "its hash: the pack is corrupted (run 'vfsctl fsck --deep')"
            )
        return plain


# -- pack indexes --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IndexEntry:
    hash: bytes
    kind: BlobKind
    compression: Compression
    offset: int
    stored_len: int
    plain_len: int

    def location(self, pack_id: bytes) -> BlobLocation:
        return BlobLocation(
            pack_id, self.kind, self.compression, self.offset, self.stored_len, self.plain_len
        )


def encode_index(entries: list[IndexEntry]) -> bytes:
    """Serialize a pack index (the ``index`` production above)."""
    body = bytearray(INDEX_MAGIC)
    body += _COUNT.pack(len(entries))
    for e in entries:
        body += _ENTRY.pack(e.hash, e.kind, e.compression, e.offset, e.stored_len, e.plain_len)
    body += blob_hash(body)
    return bytes(body)


def decode_index(data: bytes, what: str = "pack index") -> list[IndexEntry]:
    """Parse and verify a pack index.

    Raises:
        Corruption: wrong magic, length or checksum.
    """
    header = len(INDEX_MAGIC) + _COUNT.size
    if len(data) < header + HASH_SIZE or data[: len(INDEX_MAGIC)] != INDEX_MAGIC:
        raise Corruption(f"{what} is not a vfs pack index")
    (count,) = _COUNT.unpack_from(data, len(INDEX_MAGIC))
    end = header + count * _ENTRY.size
    if len(data) != end + HASH_SIZE:
        raise Corruption(f"{what} has the wrong length for {count} entries")
    if blob_hash(data[:end]) != data[end:]:
        raise Corruption(f"{what} fails its checksum")
    entries = []
    for i in range(count):
        h, kind, comp, offset, stored_len, plain_len = _ENTRY.unpack_from(
            data, header + i * _ENTRY.size
        )
        try:
            entries.append(
                IndexEntry(h, BlobKind(kind), Compression(comp), offset, stored_len, plain_len)
            )
        except ValueError as exc:
            raise Corruption(f"{what} entry {i} is invalid: {exc}") from exc
    return entries


def read_stored_index(objects, pack_id: bytes) -> tuple[int, list[IndexEntry]]:
    """The size of pack ``pack_id`` and the entries of its ``index/`` copy, checked
    against each other (:func:`check_pack_size`): what a node needs to index it.

    Args:
        objects: the object store.
        pack_id: the pack.

    Raises:
        ObjectNotFound: the index copy or the pack is missing.
        Corruption: the index copy does not decode, or the pack is too short for it.
    """
    key = index_key(pack_id)
    index = objects.get(key)
    entries = decode_index(index, key)
    size = objects.stat(pack_key(pack_id)).size
    check_pack_size(entries, len(index), size, f"pack {pack_id.hex()}")
    return size, entries


def check_pack_size(entries: list[IndexEntry], index_len: int, size: int,
                    what: str = "pack") -> None:
    """Check that a pack of ``size`` bytes can hold what its index lists.

    A pack ends with its index and trailer after the last record, so it needs at
    least the end of the furthest record plus ``index_len`` plus the trailer. A
    shorter pack was cut short (an interrupted or damaged upload): indexing it
    would only move the failure to the first read of its blobs.

    Args:
        entries: the pack's index entries.
        index_len: length of the encoded index (``index/<id>`` holds exactly it).
        size: the pack object's length.
        what: names the pack in the error.

    Raises:
        Corruption: the pack is too short.
    """
    end = max((e.offset + e.stored_len for e in entries), default=len(PACK_MAGIC))
    needed = end + index_len + _TRAILER.size
    if size < needed:
        raise Corruption(
            f"{what} is truncated: {size} bytes, its index needs at least {needed}"
        )


def index_from_pack(pack: bytes, what: str = "pack") -> list[IndexEntry]:
    """Read the index embedded at the end of a whole pack (fsck, recovery)."""
    return decode_index(embedded_index(pack, what), what)


def embedded_index(pack: bytes, what: str = "pack") -> bytes:
    """The index bytes embedded at the end of a whole pack (unverified).

    Raises:
        Corruption: the pack has no valid header or trailer.
    """
    if len(pack) < len(PACK_MAGIC) + _TRAILER.size or pack[: len(PACK_MAGIC)] != PACK_MAGIC:
        raise Corruption(f"{what} is not a vfs pack")
    index_len, magic = _TRAILER.unpack_from(pack, len(pack) - _TRAILER.size)
    if magic != TRAILER_MAGIC or index_len > len(pack) - _TRAILER.size - len(PACK_MAGIC):
        raise Corruption(f"{what} has a damaged trailer")
    start = len(pack) - _TRAILER.size - index_len
    return bytes(pack[start : len(pack) - _TRAILER.size])


# -- building packs ------------------------------------------------------------------


@dataclass(frozen=True)
class SealedPack:
    """A finished pack: its name, its bytes and its index."""

    pack_id: bytes
    data: bytes | bytearray
    index: bytes
    entries: list[IndexEntry]
    size: int = -1  # the pack's length once ``data`` has been dropped

    def __post_init__(self) -> None:
        if self.size < 0:
            object.__setattr__(self, "size", len(self.data))

    @property
    def key(self) -> str:
        return pack_key(self.pack_id)


def pack_key(pack_id: bytes) -> str:
    hexid = pack_id.hex()
    return f"packs/{hexid[:2]}/{hexid}"


def index_key(pack_id: bytes) -> str:
    return f"index/{pack_id.hex()}"


class PackBuilder:
    """Accumulates encoded blobs into one pack. Not thread-safe."""

    def __init__(self) -> None:
        # Parts are joined once at seal: appending to one growing buffer would copy
        # every byte again each time it reallocates.
        self._parts: list[bytes | memoryview] = [PACK_MAGIC]
        self._size = len(PACK_MAGIC)
        self._entries: list[IndexEntry] = []
        self._hashes: set[bytes] = set()

    def __len__(self) -> int:
        return self._size

    @property
    def blob_count(self) -> int:
        return len(self._entries)

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._hashes

    def add(self, blob: EncodedBlob) -> IndexEntry:
        """Append a blob (callers skip blobs already stored or already in this pack)."""
        entry = IndexEntry(
            blob.hash,
            blob.kind,
            blob.compression,
            self._size,
            len(blob.stored),
            blob.plain_len,
        )
        self._parts.append(blob.stored)
        self._size += len(blob.stored)
        self._entries.append(entry)
        self._hashes.add(blob.hash)
        return entry

    def seal(self) -> SealedPack:
        """Finish the pack: append index and trailer, and name it."""
        return self.seal_parts().finish()

    def seal_parts(self) -> PackParts:
        """Finish the pack but leave naming it (hashing every byte) to the caller,
        which may do it in another thread."""
        index = encode_index(self._entries)
        self._parts += [index, _TRAILER.pack(len(index), TRAILER_MAGIC)]
        parts, self._parts = self._parts, []
        return PackParts(parts, self._size + len(index) + _TRAILER.size, index, self._entries)


@dataclass(frozen=True)
class PackParts:
    """A finished but unnamed pack, as the list of buffers that make it up."""

    parts: list[bytes | memoryview]
    size: int
    index: bytes
    entries: list[IndexEntry]

    def pack_id(self) -> bytes:
        hasher = blake3.blake3()
        for part in self.parts:
            hasher.update(part)
        return hasher.digest()

    def finish(self) -> SealedPack:
        data = b"".join(self.parts)
        return SealedPack(blob_hash(data), data, self.index, self.entries)
