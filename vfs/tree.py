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

A decoded tree is a :class:`Tree`: it keeps the JSON text, the offset of each
row and the names, and turns a row into an :class:`Entry` only when asked. The
mount lists directories of a million entries this way without a million objects.
"""

from __future__ import annotations

import base64
import json
import stat
import struct
from array import array
from bisect import bisect_left
from collections.abc import ItemsView as _ItemsView
from collections.abc import Iterator, Mapping
from collections.abc import ValuesView as _ValuesView
from dataclasses import dataclass, fields

from vfs.errors import Corruption

FILE = "f"
DIR = "d"
SYMLINK = "l"

# A tree entry's mode keeps only the permission bits: setuid, setgid and sticky are
# dropped wherever a mode enters the store and masked wherever one leaves it (older
# versions stored them). Otherwise a datum, or anyone who can write to a branch,
# could plant a setuid program that ``get`` run as root writes out setuid-root.
PERMISSION_BITS = 0o777

_MANIFEST_MAGIC = b"VFSM"
_MANIFEST_ITEM = struct.Struct("<32sI")
_COUNT = struct.Struct("<I")


def permission_bits(mode: int) -> int:
    """The read, write and execute bits of ``mode``, the only ones a tree entry keeps."""
    return mode & PERMISSION_BITS


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
        """The entry of one tree row.

        Raises:
            Corruption: the row is malformed.
        """
        check_row(row)
        return cls.of_row(row)

    @staticmethod
    def of_row(row: list) -> Entry:
        """The entry of a row that passed :func:`check_row`."""
        # The frozen dataclass's __init__ goes through object.__setattr__ for each
        # field; setting the slots directly is 4x faster, which shows when a
        # listing of 100,000 entries is turned into entries.
        entry = _new_entry(Entry)
        kind = row[1]
        _set_name(entry, row[0])
        _set_kind(entry, kind)
        _set_mode(entry, row[2])
        _set_size(entry, row[3])
        _set_mtime_ns(entry, row[4])
        _set_ref(entry, row[5])
        _set_count(entry, row[6] if kind == DIR else (1 if kind == FILE else 0))
        return entry

    @property
    def file_count(self) -> int:
        return self.count if self.kind == DIR else (1 if self.kind == FILE else 0)

    @property
    def st_mode(self) -> int:
        """The full ``st_mode`` (type bits and permissions)."""
        kind_bits = {FILE: stat.S_IFREG, DIR: stat.S_IFDIR, SYMLINK: stat.S_IFLNK}[self.kind]
        return kind_bits | permission_bits(self.mode)

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


_new_entry = object.__new__
_set_name, _set_kind, _set_mode, _set_size, _set_mtime_ns, _set_ref, _set_count = (
    Entry.__dict__[f.name].__set__ for f in fields(Entry))
# of_row sets exactly these fields, in this order.
assert [f.name for f in fields(Entry)] == ["name", "kind", "mode", "size", "mtime_ns", "ref",
                                           "count"]


def check_row(row: object) -> None:
    """Check the shape and types of one tree row (see the module docstring).

    Extra trailing values are ignored, as in every version of the reader.

    Raises:
        Corruption: the row is malformed.
    """
    try:
        name, kind, mode, size, mtime_ns, ref = row[:6]  # type: ignore[index]
        count = row[6] if kind == DIR else 0  # type: ignore[index]
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise Corruption(f"malformed tree entry {row!r}") from exc
    if kind != FILE and kind != DIR and kind != SYMLINK:
        raise Corruption(f"tree entry {name!r} has unknown kind {kind!r}")
    # isinstance, not type(): JSON true and false are ints to Python and always were.
    if not (isinstance(name, str) and isinstance(ref, str) and isinstance(mode, int)
            and isinstance(size, int) and isinstance(mtime_ns, int)
            and isinstance(count, int)):
        raise Corruption(f"malformed tree entry {row!r}")


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


# The C scanner of the json module, which decodes one JSON value starting at an
# offset. It runs without releasing the GIL and calls no Python code for our
# rows (no objects, no floats), so threads may share it.
_scan = json.JSONDecoder().scan_once
_HEAD = '{"v":1,"e":['
_TAIL = "]}"
NAMES_KEPT = 1 << 16  # trees with more entries keep no list of names (see Tree)


class Tree(Mapping[str, Entry]):
    """A decoded tree blob: name -> :class:`Entry`, in name order.

    Decoding checks every row once (so a damaged tree fails as a whole, at once)
    and keeps the text and where each row starts, plus a list of the names unless
    the tree is huge, and counts the directories (:attr:`subdirectories`). A row
    becomes an :class:`Entry` only when it is looked up or iterated; :meth:`row`
    gives the raw values without even that, for callers that list many entries.
    Immutable, and safe to share between threads.

    Memory: the text (~60 bytes an entry with tiny inline files) plus 4 bytes,
    plus ~65 bytes for the name up to :data:`NAMES_KEPT` entries. Beyond that a
    lookup bisects the text itself (20 probes of ~0.5 us for a million names).
    """

    __slots__ = ("_text", "_starts", "_names", "subdirectories")

    def __init__(self, text: str, starts: array, names: list[str] | None,
                 subdirectories: int) -> None:
        self._text = text
        self._starts = starts
        self._names = names
        #: How many of the entries are directories (a directory's link count).
        self.subdirectories = subdirectories

    @classmethod
    def decode(cls, data: bytes) -> Tree:
        """Parse a tree blob.

        Raises:
            Corruption: not a tree blob, or a malformed or out-of-order entry.
        """
        try:
            text = data.decode()
        except UnicodeDecodeError:
            text = ""
        if not (text.startswith(_HEAD) and text.endswith(_TAIL)):
            # Not our layout (another writer's spacing or key order, or not a tree
            # at all): check it the slow way, then read its canonical form.
            text = _canonical(data)
        starts = array("I" if len(text) < 1 << 32 else "Q")
        names: list[str] | None = []
        end = len(text) - len(_TAIL)  # the "]" that closes the list of rows
        i = len(_HEAD)
        previous = None
        subdirectories = 0
        while i != end:
            starts.append(i)
            try:
                row, i = _scan(text, i)
            except (StopIteration, ValueError) as exc:
                raise Corruption(f"blob is not a tree: bad JSON at offset {i}") from exc
            check_row(row)
            if row[1] == DIR:
                subdirectories += 1
            name = row[0]
            # Lookups bisect the names: they must be unique and sorted (§6).
            if previous is not None and name <= previous:
                raise Corruption(f"tree entries are out of order or repeated at {name!r}")
            previous = name
            if names is not None:
                names.append(name)
                if len(names) > NAMES_KEPT:
                    names = None
            separator = text[i:i + 1]
            if separator == ",":
                i += 1
                if i == end:
                    raise Corruption("blob is not a tree: a comma ends the entries")
            elif i != end:
                raise Corruption(f"blob is not a tree: unexpected {separator!r} at offset {i}")
        return cls(text, starts, names, subdirectories)

    # -- positional access, for listings ------------------------------------------------

    def name(self, index: int) -> str:
        if self._names is not None:
            return self._names[index]
        return _scan(self._text, self._starts[index] + 1)[0]  # the row's first value

    def index(self, name: str) -> int | None:
        """The position of ``name``, or None."""
        names = self._names
        if names is not None:
            i = bisect_left(names, name)
            return i if i < len(names) and names[i] == name else None
        text, starts = self._text, self._starts
        lo, hi = 0, len(starts)
        while lo < hi:
            mid = (lo + hi) // 2
            probe = _scan(text, starts[mid] + 1)[0]
            if probe < name:
                lo = mid + 1
            elif probe == name:
                return mid
            else:
                hi = mid
        return None

    def raw(self, index: int) -> str:
        """The row at ``index`` as stored (its text): two trees hold the same entry
        exactly when their rows' texts are equal (the encoding is canonical, §6)."""
        starts = self._starts
        end = (starts[index + 1] - 1 if index + 1 < len(starts)
               else len(self._text) - len(_TAIL))
        return self._text[starts[index]:end]

    def row(self, index: int) -> list:
        """The checked row at ``index``: ``[name, kind, mode, size, mtime_ns, ref, ...]``."""
        return _scan(self._text, self._starts[index])[0]

    def entry(self, index: int) -> Entry:
        return Entry.of_row(self.row(index))

    @property
    def memory(self) -> int:
        """Roughly the bytes this tree holds (for cache budgets)."""
        names = 65 * len(self._names) if self._names is not None else 0
        return len(self._text) + self._starts.itemsize * len(self._starts) + names + 200

    # -- the mapping ----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._starts)

    def __iter__(self) -> Iterator[str]:
        if self._names is not None:
            return iter(self._names)
        return map(self.name, range(len(self._starts)))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.index(name) is not None

    def __getitem__(self, name: str) -> Entry:
        index = self.index(name) if isinstance(name, str) else None
        if index is None:
            raise KeyError(name)
        return self.entry(index)

    def get(self, name: str, default: Entry | None = None) -> Entry | None:  # type: ignore[override]
        index = self.index(name)
        return default if index is None else self.entry(index)

    def items(self) -> _TreeItems:
        return _TreeItems(self)

    def values(self) -> _TreeValues:
        return _TreeValues(self)

    def __repr__(self) -> str:
        return f"<Tree of {len(self)} entries>"


class _TreeItems(_ItemsView):
    """Items in order, decoded one row after the other (no lookup per name)."""

    _mapping: Tree

    def __iter__(self) -> Iterator[tuple[str, Entry]]:
        tree = self._mapping
        for index in range(len(tree)):
            entry = tree.entry(index)
            yield entry.name, entry


class _TreeValues(_ValuesView):
    _mapping: Tree

    def __iter__(self) -> Iterator[Entry]:
        tree = self._mapping
        for index in range(len(tree)):
            yield tree.entry(index)


def _canonical(data: bytes) -> str:
    """The text of a valid tree blob in another JSON layout, re-encoded in ours.

    Raises:
        Corruption: not a tree blob.
    """
    try:
        raw = json.loads(data)
        rows = raw["e"]
        version = raw.get("v")
        if not isinstance(rows, list):
            raise TypeError(f"its entries are a {type(rows).__name__}")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise Corruption(f"blob is not a tree: {exc}") from exc
    if version != 1:
        raise Corruption(f"tree blob has unknown version {version!r}")
    for row in rows:
        check_row(row)
    # ASCII escapes: any name survives (even a lone surrogate from a \u escape).
    return json.dumps({"v": 1, "e": rows}, separators=(",", ":"))


def decode_tree(data: bytes) -> Tree:
    """Parse a tree blob into name -> entry (in name order); see :class:`Tree`.

    Raises:
        Corruption: not a tree blob.
    """
    return Tree.decode(data)


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
