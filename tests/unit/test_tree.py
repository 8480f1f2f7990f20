"""Tree blobs, file refs and manifests: round trips and canonical encoding."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfs.errors import Corruption
from vfs.tree import (
    DIR,
    EMPTY_TREE,
    FILE,
    SYMLINK,
    Entry,
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
