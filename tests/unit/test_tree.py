"""Tree blobs, file refs and manifests: round trips and canonical encoding."""

from __future__ import annotations

import json
import random
import stat
import unittest.mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vfs.tree
from vfs.errors import Corruption
from vfs.snapshot import TreeCache
from vfs.tree import (
    DIR,
    EMPTY_TREE,
    FILE,
    SYMLINK,
    Entry,
    Tree,
    chunk_ref,
    decode_manifest,
    decode_tree,
    dir_entry,
    encode_manifest,
    encode_tree,
    inline_ref,
    manifest_ref,
    parse_file_ref,
    ref_blobs,
)

# File names are whatever a file system allows: any Unicode except "/" and NUL (and
# lone surrogates, which cannot be UTF-8 encoded; see test_store for how put treats them).
names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"),
    min_size=1,
    max_size=40,
).filter(lambda n: n not in (".", ".."))
hex64 = st.binary(min_size=32, max_size=32).map(bytes.hex)
modes = st.sampled_from([0o644, 0o755, 0o600, 0o4755, 0o777, 0o400])
sizes = st.integers(0, 2**50)
mtimes = st.integers(0, 2**63 - 1)


@st.composite
def entries(draw: st.DrawFn, name: str | None = None) -> Entry:
    name = name if name is not None else draw(names)
    kind = draw(st.sampled_from([FILE, DIR, SYMLINK]))
    if kind == FILE:
        ref = draw(st.one_of(
            st.binary(max_size=64).map(inline_ref),
            st.binary(min_size=32, max_size=32).map(chunk_ref),
            st.binary(min_size=32, max_size=32).map(manifest_ref),
        ))
        # Decoding a file entry gives it count 1 (its file_count); build it that way.
        return Entry(name, FILE, draw(modes), draw(sizes), draw(mtimes), ref, 1)
    if kind == DIR:
        return Entry(name, DIR, draw(modes), draw(sizes), draw(mtimes), draw(hex64),
                     draw(st.integers(0, 2**40)))
    target = draw(st.text(min_size=1, max_size=80).filter(lambda t: "\0" not in t)
                  .filter(lambda t: not any(0xD800 <= ord(c) <= 0xDFFF for c in t)))
    return Entry(name, SYMLINK, 0o777, len(target.encode()), draw(mtimes), target, 0)


@st.composite
def directories(draw: st.DrawFn) -> list[Entry]:
    unique = draw(st.lists(names, unique=True, max_size=25))
    return [draw(entries(name)) for name in unique]


@settings(max_examples=200, deadline=None)
@given(directories())
def test_tree_round_trip(items: list[Entry]) -> None:
    data = encode_tree(items)
    decoded = decode_tree(data)
    assert decoded == {e.name: e for e in items}
    assert list(decoded) == sorted(e.name for e in items)
    assert encode_tree(list(decoded.values())) == data


@settings(max_examples=100, deadline=None)
@given(directories(), st.randoms(use_true_random=False))
def test_tree_encoding_is_canonical(items: list[Entry], rnd: random.Random) -> None:
    # A directory's hash must depend on its contents only, not on the order in which
    # entries were added: otherwise identical trees would not dedup and diff would see
    # changes that are not there.
    shuffled = list(items)
    rnd.shuffle(shuffled)
    assert encode_tree(shuffled) == encode_tree(items)


def test_tree_encoding_is_compact_utf8_json() -> None:
    items = [
        Entry("zeta", FILE, 0o644, 3, 5, inline_ref(b"abc"), 1),
        Entry("Äpfel", DIR, 0o755, 10, 0, "ab" * 32, 2),
        Entry("link", SYMLINK, 0o777, 4, 1, "zeta", 0),
    ]
    data = encode_tree(items)
    assert b" " not in data
    assert "Äpfel".encode() in data  # not \u escaped
    raw = json.loads(data)
    assert raw["v"] == 1
    # Code point order: uppercase ASCII < lowercase ASCII < non-ASCII.
    assert [row[0] for row in raw["e"]] == ["link", "zeta", "Äpfel"]
    assert raw["e"][2] == ["Äpfel", "d", 0o755, 10, 0, "ab" * 32, 2]
    assert raw["e"][1] == ["zeta", "f", 0o644, 3, 5, inline_ref(b"abc")]


def test_a_stored_setuid_bit_is_kept_in_the_tree_but_never_shown() -> None:
    # Older versions stored setuid, setgid and sticky bits: the format still reads
    # and writes them as they are, and readers mask them.
    entry = Entry("id", FILE, 0o6755, 3, 5, inline_ref(b"abc"))
    assert decode_tree(encode_tree([entry]))["id"].mode == 0o6755
    assert oct(entry.st_mode) == oct(stat.S_IFREG | 0o755)
    assert oct(Entry("tmp", DIR, 0o1777, 0, 0, "ab" * 32, 0).st_mode) == oct(stat.S_IFDIR | 0o777)


def test_empty_tree() -> None:
    assert decode_tree(EMPTY_TREE) == {}
    assert encode_tree([]) == EMPTY_TREE


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b'{"v":1}',
        b'{"v":2,"e":[]}',
        b'{"e":[]}',
        b'{"v":1,"e":[["a","x",420,0,0,""]]}',  # unknown kind
        b'{"v":1,"e":[["a","f",420]]}',  # short row
        # Rows of the wrong shape must also be reported as Corruption (fsck and gc
        # catch only that), not escape as TypeError / IndexError.
        b'{"v":1,"e":[7]}',
        b'{"v":1,"e":5}',
        b'{"v":1,"e":[["a","d",493,0,0,"%s"]]}' % (b"ab" * 32),  # dir row without count
    ],
)
def test_decode_tree_rejects_non_trees(data: bytes) -> None:
    with pytest.raises(Corruption):
        decode_tree(data)


# -- the lazy Tree against a plain decode -------------------------------------------------


def eager_decode(data: bytes) -> dict[str, Entry]:
    """Every row through json.loads and Entry.decode, at once (the reader's first version)."""
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


@settings(max_examples=200, deadline=None)
@given(directories())
def test_a_lazy_tree_equals_an_eager_decode(items: list[Entry]) -> None:
    data = encode_tree(items)
    check_lazy_tree(data, decode_tree(data))
    # Huge trees keep no list of names and bisect their text: the same answers.
    with unittest.mock.patch.object(vfs.tree, "NAMES_KEPT", 3):
        check_lazy_tree(data, decode_tree(data))


def check_lazy_tree(data: bytes, tree: Tree) -> None:
    expected = eager_decode(data)
    assert isinstance(tree, Tree)
    assert dict(tree) == expected
    assert list(tree.items()) == list(expected.items())
    assert list(tree.values()) == list(expected.values())
    assert len(tree) == len(expected) and list(tree) == list(expected)
    rows = json.loads(data)["e"]
    for index, (name, entry) in enumerate(expected.items()):
        assert tree.index(name) == index and tree.name(index) == name
        assert name in tree and tree[name] == entry and tree.get(name) == entry
        assert tree.row(index)[:6] == rows[index][:6]
        assert tree.entry(index) == entry == Entry.of_row(rows[index])
    for missing in ("", "\0", "zzzz-not-there", "/"):
        if missing not in expected:
            assert missing not in tree and tree.get(missing) is None
            assert tree.index(missing) is None
            with pytest.raises(KeyError):
                tree[missing]


@settings(max_examples=50, deadline=None)
@given(directories())
def test_other_json_layouts_decode_to_the_same_tree(items: list[Entry]) -> None:
    # Another writer may space its JSON or order its keys differently: same tree.
    rows = json.loads(encode_tree(items))["e"]
    for data in (json.dumps({"e": rows, "v": 1}).encode(),
                 json.dumps({"v": 1, "e": rows}, indent=1).encode("utf-16")):
        assert dict(decode_tree(data)) == {e.name: e for e in items}


def test_a_big_tree_is_decoded_lazily_and_fails_whole() -> None:
    items = [Entry(f"f{i:06d}", FILE, 0o644, i, i, inline_ref(b"%d" % i), 1)
             for i in range(20_000)]
    data = encode_tree(items)
    tree = decode_tree(data)
    assert tree.index("f012345") == 12345 and tree["f012345"] == items[12345]
    # One bad row deep inside makes the whole blob corrupt, at decode time.
    bad = data.replace(b'["f015000","f",420,', b'["f015000","f","420",')
    assert bad != data
    with pytest.raises(Corruption, match="malformed tree entry"):
        decode_tree(bad)


@pytest.mark.parametrize(
    "data",
    [
        b'{"v":1,"e":[["a","f",420,0,0,""],]}',  # trailing comma
        b'{"v":1,"e":[["a","f",420,0,0,""]]}{"v":1,"e":[]}',  # two trees
        b'{"v":1,"e":[["a","f",420,0,0,""]["b","f",420,0,0,""]]}',  # no comma
        b'{"v":1,"e":[["a","f",420,0,0,""],["b","f",420,0,0,""]}',  # unclosed list
        b'{"v":1,"e":[{"a":1}]}',
        b'{"v":1,"e":[["a","f",420,0,0,""],5]}',
        b'{"v":1,"e":[["a","f",420,0,0,"\\x"]]}',  # bad escape
        b'{"v":1,"e":[["a","f",4.5,0,0,""]]}',  # a float
        b'{"v":1,"e":[[1,"f",420,0,0,""]]}',  # a number for a name
        b'{"v":1,"e":[["\xff","f",420,0,0,""]]}',  # not UTF-8
        b'{"v":1,"e":[["a","d",420,0,0,"","7"]]}',  # count is a string
    ],
)
def test_damaged_trees_are_corrupt_for_both_decoders(data: bytes) -> None:
    with pytest.raises(Corruption):
        eager_decode(data)
    with pytest.raises(Corruption):
        decode_tree(data)


@pytest.mark.parametrize("names", [["b", "a"], ["a", "a"], ["a", "c", "b"]])
def test_trees_out_of_order_are_corrupt(names: list[str]) -> None:
    # Lookups bisect the names; an unsorted tree (no writer of ours makes one) would
    # hide some of them, so it is refused as a whole (docs/format.md §6).
    rows = [[name, "f", 420, 0, 0, inline_ref(b"")] for name in names]
    with pytest.raises(Corruption, match="out of order"):
        decode_tree(json.dumps({"v": 1, "e": rows}, separators=(",", ":")).encode())


def test_rows_keep_trailing_values_and_json_booleans_as_before() -> None:
    # Older readers ignored extra values and took JSON true as 1 (Python bools are
    # ints): a tree that decoded before still decodes.
    data = b'{"v":1,"e":[["a","f",420,true,0,"i:","extra"]]}'
    assert dict(decode_tree(data)) == eager_decode(data)


def test_the_tree_cache_keeps_to_its_budget_but_keeps_the_newest() -> None:
    trees = {f"{i:064x}": decode_tree(encode_tree(
        [Entry(f"f{j}", FILE, 0o644, 1, 0, inline_ref(b"x"), 1) for j in range(100 * i)]))
        for i in range(1, 6)}
    sizes = [tree.memory for tree in trees.values()]
    cache = TreeCache(budget=sizes[3] + sizes[4])
    for name, tree in trees.items():
        cache.put(name, tree)
    assert cache.memory <= cache.budget
    assert [name for name in trees if cache.get(name) is not None] == list(trees)[3:]
    # Using a tree makes it the most recent: the next one in evicts the other.
    assert cache.get(list(trees)[3]) is not None
    cache.put("ff" * 32, decode_tree(EMPTY_TREE))
    assert cache.get(list(trees)[4]) is None and cache.get(list(trees)[3]) is not None
    # A tree over the whole budget still stays while it is the newest.
    small = TreeCache(budget=10)
    small.put("aa" * 32, trees[list(trees)[0]])
    assert small.get("aa" * 32) is not None


def test_dir_entry_sums_its_children() -> None:
    children = {
        "a": Entry("a", FILE, 0o644, 100, 0, inline_ref(b"x"), 1),
        "b": Entry("b", DIR, 0o755, 50, 0, "cd" * 32, 7),
        "l": Entry("l", SYMLINK, 0o777, 1000, 0, "a", 0),
    }
    entry = dir_entry("d", b"\x05" * 32, children, 0o700, 9)
    assert entry == Entry("d", DIR, 0o700, 150, 9, "05" * 32, 8)
    assert entry.file_count == 8


def test_same_content_ignores_time_and_name() -> None:
    a = Entry("a", FILE, 0o644, 3, 1, inline_ref(b"abc"))
    assert a.same_content(Entry("b", FILE, 0o644, 3, 99, inline_ref(b"abc")))
    assert not a.same_content(Entry("a", FILE, 0o755, 3, 1, inline_ref(b"abc")))
    assert not a.same_content(Entry("a", FILE, 0o644, 3, 1, inline_ref(b"abd")))
    assert not a.same_content(None)


# -- file refs ---------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2048), st.binary(min_size=32, max_size=32))
def test_file_ref_round_trip(data: bytes, digest: bytes) -> None:
    assert parse_file_ref(inline_ref(data)) == ("i", data)
    assert parse_file_ref(chunk_ref(digest)) == ("c", digest)
    assert parse_file_ref(manifest_ref(digest)) == ("m", digest)


def test_ref_blobs() -> None:
    digest = b"\x09" * 32
    assert ref_blobs(Entry("f", FILE, 0o644, 1, 0, chunk_ref(digest))) == [digest]
    assert ref_blobs(Entry("f", FILE, 0o644, 1, 0, manifest_ref(digest))) == [digest]
    assert ref_blobs(Entry("f", FILE, 0o644, 1, 0, inline_ref(b"x"))) == []
    assert ref_blobs(Entry("d", DIR, 0o755, 0, 0, digest.hex())) == [digest]
    assert ref_blobs(Entry("l", SYMLINK, 0o777, 1, 0, "target")) == []


@pytest.mark.parametrize(
    "ref",
    [
        "",
        "x:00",
        "i:not base64!",
        "i:abc",  # bad padding
        "c:" + "ab" * 31,  # too short
        "c:" + "ab" * 33,  # too long
        "m:" + "zz" * 32,  # not hex
        "c" + "ab" * 32,  # no colon
        "C:" + "ab" * 32,  # tags are lowercase
    ],
)
def test_parse_file_ref_rejects_malformed(ref: str) -> None:
    with pytest.raises(Corruption, match="malformed file reference"):
        parse_file_ref(ref)


# -- manifests ----------------------------------------------------------------------------

manifest_items = st.lists(
    st.tuples(st.binary(min_size=32, max_size=32), st.integers(0, 2**32 - 1)), max_size=100
)


@settings(max_examples=100, deadline=None)
@given(manifest_items)
def test_manifest_round_trip(chunks: list[tuple[bytes, int]]) -> None:
    data = encode_manifest(chunks)
    assert len(data) == 8 + 36 * len(chunks)
    assert decode_manifest(data) == chunks


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"VFSM",
        b"XXXX\0\0\0\0",
        b"VFSM\x01\0\0\0",  # claims one chunk, has none
        encode_manifest([(b"\1" * 32, 5)])[:-1],
        encode_manifest([(b"\1" * 32, 5)]) + b"\0",
    ],
)
def test_decode_manifest_rejects_damage(data: bytes) -> None:
    with pytest.raises(Corruption):
        decode_manifest(data)
