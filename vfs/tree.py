"""Merkle trees: directory entries, tree blobs and file manifests.

A *tree* blob is one directory, canonical JSON (UTF-8, no spaces, entries sorted
by name in code point order)::

    {"v":1,"e":[ENTRY, ...]}
    file:    [name, "f", mode, size, mtime_ns, ref]
    dir:     [name, "d", mode, total_size, mtime_ns, tree_hash_hex, file_count]
    symlink: [name, "l", mode, len(target), mtime_ns, target]

A file's ``ref`` says where its bytes are: ``"i:" + base64`` (inlined, for small
files), ``"c:" + hex`` (one chunk blob is the whole file) or ``"m:" + hex`` (a
manifest blob lists the chunks). A *manifest* blob is binary::

    "VFSM" count:u32 (chunk_hash:32 length:u32)*count     (little-endian)

Directory entries carry the total size and file count of their subtree, so a
commit's size is known without walking it.
"""

from __future__ import annotations

import base64
import json
import stat
import struct
from dataclasses import dataclass

from vfs.errors import Corruption

FILE = "f"
DIR = "d"
SYMLINK = "l"

_MANIFEST_MAGIC = b"VFSM"
_MANIFEST_ITEM = struct.Struct("<32sI")
_COUNT = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class Entry:
    """One name in a directory."""

    name: str
    kind: str
    mode: int
    size: int
    mtime_ns: int
    ref: str
    count: int = 0  # directories only: files below

    def encode(self) -> list:
        row: list = [self.name, self.kind, self.mode, self.size, self.mtime_ns, self.ref]
        if self.kind == DIR:
            row.append(self.count)
        return row

    @classmethod
    def decode(cls, row: list) -> Entry:
        try:
            name, kind, mode, size, mtime_ns, ref = row[:6]
            count = row[6] if kind == DIR else (1 if kind == FILE else 0)
        except (ValueError, TypeError, IndexError) as exc:
            raise Corruption(f"malformed tree entry {row!r}") from exc
        if kind not in (FILE, DIR, SYMLINK):
            raise Corruption(f"tree entry {name!r} has unknown kind {kind!r}")
        if not (isinstance(name, str) and isinstance(ref, str) and isinstance(mode, int)
                and isinstance(size, int) and isinstance(mtime_ns, int)
                and isinstance(count, int)):
            raise Corruption(f"malformed tree entry {row!r}")
        return cls(name, kind, mode, size, mtime_ns, ref, count)

    @property
    def file_count(self) -> int:
        return self.count if self.kind == DIR else (1 if self.kind == FILE else 0)

    @property
    def st_mode(self) -> int:
        """The full ``st_mode`` (type bits and permissions)."""
        kind_bits = {FILE: stat.S_IFREG, DIR: stat.S_IFDIR, SYMLINK: stat.S_IFLNK}[self.kind]
        return kind_bits | (self.mode & 0o7777)

    def same_content(self, other: Entry | None) -> bool:
        """True if both entries show the same bytes with the same type and mode."""
        return (
            other is not None
            and self.kind == other.kind
            and self.ref == other.ref
            and self.mode == other.mode
        )

    def renamed(self, name: str) -> Entry:
        return Entry(name, self.kind, self.mode, self.size, self.mtime_ns, self.ref, self.count)


# -- file refs ---------------------------------------------------------------------


def inline_ref(data: bytes) -> str:
    return "i:" + base64.b64encode(data).decode()


def chunk_ref(digest: bytes) -> str:
    return "c:" + digest.hex()


def manifest_ref(digest: bytes) -> str:
    return "m:" + digest.hex()


def parse_file_ref(ref: str) -> tuple[str, bytes]:
    """Split a file ref into its tag (``i``, ``c`` or ``m``) and payload bytes."""
    tag, _, payload = ref.partition(":")
    try:
        if tag == "i":
            return tag, base64.b64decode(payload, validate=True)
        if tag in ("c", "m") and len(payload) == 64:
            return tag, bytes.fromhex(payload)
    except ValueError:
        pass
    raise Corruption(f"malformed file reference {ref[:80]!r}")


def ref_blobs(entry: Entry) -> list[bytes]:
    """The blob hashes an entry points at directly (tree, chunk or manifest)."""
    if entry.kind == DIR:
        return [bytes.fromhex(entry.ref)]
    if entry.kind == FILE:
        tag, payload = parse_file_ref(entry.ref)
        if tag in ("c", "m"):
            return [payload]
    return []


# -- trees -------------------------------------------------------------------------


def encode_tree(entries: list[Entry]) -> bytes:
    """Serialize a directory; ``entries`` need not be sorted."""
    rows = [e.encode() for e in sorted(entries, key=lambda e: e.name)]
    return json.dumps({"v": 1, "e": rows}, separators=(",", ":"), ensure_ascii=False).encode()


def decode_tree(data: bytes) -> dict[str, Entry]:
    """Parse a tree blob into name -> entry (in name order).

    Raises:
        Corruption: not a tree blob.
    """
    try:
        raw = json.loads(data)
        rows = raw["e"]
        version = raw.get("v")
        entries = {row[0]: Entry.decode(row) for row in rows}
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise Corruption(f"blob is not a tree: {exc}") from exc
    if version != 1:
        raise Corruption(f"tree blob has unknown version {version!r}")
    return entries


EMPTY_TREE = encode_tree([])


def dir_entry(name: str, tree_hash: bytes, children: dict[str, Entry], mode: int = 0o755,
              mtime_ns: int = 0) -> Entry:
    """The entry of a directory whose tree blob is ``tree_hash``."""
    return Entry(
        name,
        DIR,
        mode,
        sum(e.size for e in children.values() if e.kind != SYMLINK),
        mtime_ns,
        tree_hash.hex(),
        sum(e.file_count for e in children.values()),
    )


# -- manifests ---------------------------------------------------------------------


def encode_manifest(chunks: list[tuple[bytes, int]]) -> bytes:
    out = bytearray(_MANIFEST_MAGIC)
    out += _COUNT.pack(len(chunks))
    for digest, length in chunks:
        out += _MANIFEST_ITEM.pack(digest, length)
    return bytes(out)


def decode_manifest(data: bytes) -> list[tuple[bytes, int]]:
    """Parse a manifest into ``[(chunk hash, length), ...]``.

    Raises:
        Corruption: not a manifest blob.
    """
    head = len(_MANIFEST_MAGIC) + _COUNT.size
    if data[: len(_MANIFEST_MAGIC)] != _MANIFEST_MAGIC or len(data) < head:
        raise Corruption("blob is not a file manifest")
    (count,) = _COUNT.unpack_from(data, len(_MANIFEST_MAGIC))
    if len(data) != head + count * _MANIFEST_ITEM.size:
        raise Corruption("file manifest has the wrong length")
    return [
        _MANIFEST_ITEM.unpack_from(data, head + i * _MANIFEST_ITEM.size) for i in range(count)
    ]
