"""Blob encoding and the byte layout of packs and pack indexes."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfs.blobs import (
    INDEX_MAGIC,
    PACK_MAGIC,
    TRAILER_MAGIC,
    BlobCodec,
    BlobKind,
    BlobLocation,
    Compression,
    IndexEntry,
    PackBuilder,
    blob_hash,
    check_pack_size,
    decode_index,
    encode_index,
    index_from_pack,
)
from vfs.errors import Corruption, VfsError

codec = BlobCodec(level=3)

blob_data = st.one_of(
    st.binary(max_size=4096),
    st.builds(lambda b, n: bytes([b]) * n, st.integers(0, 255), st.integers(1, 20000)),
    st.builds(lambda text, n: (text * n).encode(), st.text(min_size=1, max_size=20),
              st.integers(1, 300)),
)
kinds = st.sampled_from(list(BlobKind))


def _location(blob, pack_id: bytes = b"\x01" * 32, offset: int = 8) -> BlobLocation:
    return BlobLocation(pack_id, blob.kind, blob.compression, offset, len(blob.stored),
                        blob.plain_len)


def _pack(blobs: list[bytes]):
    builder = PackBuilder()
    entries = []
    for i, data in enumerate(blobs):
        entries.append(builder.add(codec.encode(BlobKind(i % 3), data)))
    return builder.seal(), entries


# -- the codec ---------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(kinds, blob_data)
def test_codec_round_trip(kind: BlobKind, data: bytes) -> None:
    blob = codec.encode(kind, data)
    assert blob.hash == blob_hash(data)
    assert blob.plain_len == len(data)
    assert blob.kind == kind
    assert codec.decode(blob.hash, _location(blob), blob.stored) == data


def test_compressible_data_is_stored_compressed() -> None:
    data = b"all work and no play " * 10_000
    blob = codec.encode(BlobKind.CHUNK, data)
    assert blob.compression == Compression.ZSTD
    assert len(blob.stored) < len(data) // 10
    assert codec.decode(blob.hash, _location(blob), blob.stored) == data


def test_random_data_is_stored_raw() -> None:
    data = random.Random(1).randbytes(100_000)
    blob = codec.encode(BlobKind.CHUNK, data)
    assert blob.compression == Compression.NONE
    assert blob.stored == data
    assert codec.decode(blob.hash, _location(blob), blob.stored) == data


def test_encode_accepts_memoryview() -> None:
    data = b"0123456789" * 500
    blob = codec.encode(BlobKind.CHUNK, memoryview(data)[10:])
    assert blob.hash == blob_hash(data[10:])
    assert codec.decode(blob.hash, _location(blob), blob.stored) == data[10:]


@settings(max_examples=200, deadline=None)
@given(blob_data, st.data())
def test_decode_of_a_flipped_byte_raises_corruption(data: bytes, draw: st.DataObject) -> None:
    blob = codec.encode(BlobKind.CHUNK, data)
    if not blob.stored:
        return
    position = draw.draw(st.integers(0, len(blob.stored) - 1), label="position")
    flip = draw.draw(st.integers(1, 255), label="xor")
    damaged = bytearray(blob.stored)
    damaged[position] ^= flip
    # Corruption, never another exception (a crash) and never the wrong bytes. A flip
    # of a bit the decoder ignores (zstd's frame header has an unused one) gives the
    # right bytes back, verified against the hash: that is fine.
    try:
        plain = codec.decode(blob.hash, _location(blob), bytes(damaged))
    except Corruption:
        return
    assert plain == data


def test_decode_truncated_raises_corruption() -> None:
    blob = codec.encode(BlobKind.CHUNK, b"x" * 5000)
    with pytest.raises(Corruption, match="truncated"):
        codec.decode(blob.hash, _location(blob), blob.stored[:-1])


def test_decode_with_the_wrong_hash_raises_corruption() -> None:
    blob = codec.encode(BlobKind.CHUNK, b"some bytes" * 300)
    with pytest.raises(Corruption, match="does not match its hash"):
        codec.decode(blob_hash(b"other"), _location(blob), blob.stored)


def test_corruption_is_a_vfs_error() -> None:
    assert issubclass(Corruption, VfsError)


# -- pack indexes ---------------------------------------------------------------------------

index_entries = st.lists(
    st.builds(
        IndexEntry,
        st.binary(min_size=32, max_size=32),
        kinds,
        st.sampled_from(list(Compression)),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
    ),
    max_size=50,
)


@settings(max_examples=100, deadline=None)
@given(index_entries)
def test_index_round_trip(entries: list[IndexEntry]) -> None:
    encoded = encode_index(entries)
    assert encoded.startswith(INDEX_MAGIC)
    assert len(encoded) == len(INDEX_MAGIC) + 4 + 46 * len(entries) + 32
    assert decode_index(encoded) == entries


def test_decode_index_rejects_bad_magic() -> None:
    encoded = bytearray(encode_index([]))
    encoded[0:8] = b"NOTANIDX"
    with pytest.raises(Corruption, match="not a vfs pack index"):
        decode_index(bytes(encoded), "index/x")


@pytest.mark.parametrize("cut", [1, 10, 46])
def test_decode_index_rejects_wrong_length(cut: int) -> None:
    entries = [IndexEntry(bytes([i]) * 32, BlobKind.CHUNK, Compression.ZSTD, 8, 10, 20)
               for i in range(3)]
    encoded = encode_index(entries)
    with pytest.raises(Corruption):
        decode_index(encoded[:-cut])
    with pytest.raises(Corruption, match="wrong length"):
        decode_index(encoded + b"\0" * cut)


def test_decode_index_rejects_a_count_that_lies() -> None:
    encoded = bytearray(encode_index([]))
    struct.pack_into("<I", encoded, len(INDEX_MAGIC), 1000)
    with pytest.raises(Corruption, match="wrong length"):
        decode_index(bytes(encoded))


def test_decode_index_rejects_bad_checksum() -> None:
    entries = [IndexEntry(b"\x07" * 32, BlobKind.TREE, Compression.NONE, 8, 10, 10)]
    encoded = bytearray(encode_index(entries))
    encoded[len(INDEX_MAGIC) + 4 + 3] ^= 0x40  # inside the entry's hash
    with pytest.raises(Corruption, match="checksum"):
        decode_index(bytes(encoded))


def test_decode_index_rejects_unknown_kind_even_with_valid_checksum() -> None:
    body = bytearray(INDEX_MAGIC) + struct.pack("<I", 1)
    body += struct.pack("<32sBBIII", b"\x01" * 32, 9, 0, 8, 1, 1)
    body += blob_hash(body)
    with pytest.raises(Corruption, match="invalid"):
        decode_index(bytes(body))


@pytest.mark.parametrize("data", [b"", b"VFSIDX01", b"garbage" * 20])
def test_decode_index_rejects_junk(data: bytes) -> None:
    with pytest.raises(Corruption):
        decode_index(data)


# -- packs ----------------------------------------------------------------------------------


def test_pack_layout_and_embedded_index() -> None:
    blobs = [b"first blob", b"z" * 10_000, random.Random(3).randbytes(3000)]
    sealed, entries = _pack(blobs)
    assert sealed.data.startswith(PACK_MAGIC)
    assert sealed.data.endswith(TRAILER_MAGIC)
    assert sealed.pack_id == blob_hash(sealed.data)
    assert sealed.key == f"packs/{sealed.pack_id.hex()[:2]}/{sealed.pack_id.hex()}"
    assert sealed.entries == entries
    # The pack's own index and the separately stored copy decode to the same entries.
    assert index_from_pack(sealed.data) == entries
    assert decode_index(sealed.index) == entries
    (index_len,) = struct.unpack_from("<I", sealed.data, len(sealed.data) - 8)
    assert index_len == len(sealed.index)
    assert sealed.data[-8 - index_len : -8] == sealed.index
    # Records follow the magic back to back, and every blob decodes from its place.
    assert entries[0].offset == len(PACK_MAGIC)
    for data, entry in zip(blobs, entries, strict=True):
        stored = sealed.data[entry.offset : entry.offset + entry.stored_len]
        assert codec.decode(entry.hash, entry.location(sealed.pack_id), stored) == data


@settings(max_examples=50, deadline=None)
@given(st.lists(blob_data, max_size=12, unique=True))
def test_pack_round_trip(blobs: list[bytes]) -> None:
    sealed, entries = _pack(blobs)
    assert index_from_pack(sealed.data) == entries == decode_index(sealed.index)
    for data, entry in zip(blobs, entries, strict=True):
        stored = sealed.data[entry.offset : entry.offset + entry.stored_len]
        assert codec.decode(entry.hash, entry.location(sealed.pack_id), stored) == data


def test_pack_builder_tracks_contents() -> None:
    builder = PackBuilder()
    blob = codec.encode(BlobKind.CHUNK, b"hello" * 100)
    assert blob.hash not in builder
    assert len(builder) == len(PACK_MAGIC)
    builder.add(blob)
    assert blob.hash in builder
    assert builder.blob_count == 1
    assert len(builder) == len(PACK_MAGIC) + len(blob.stored)


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: b"NOTAPACK" + d[8:],  # magic
        lambda d: d[:-4] + b"XXXX",  # trailer magic
        lambda d: d[:-8] + struct.pack("<I", len(d)) + d[-4:],  # index length too big
        lambda d: d[:-1],  # truncated
        lambda d: d[:7],  # shorter than any pack
    ],
)
def test_index_from_pack_rejects_damage(damage) -> None:
    sealed, _ = _pack([b"a" * 2000, b"b" * 2000])
    with pytest.raises(Corruption):
        index_from_pack(damage(sealed.data))


def test_index_from_pack_rejects_a_damaged_embedded_index() -> None:
    sealed, _ = _pack([b"a" * 2000])
    damaged = bytearray(sealed.data)
    damaged[-8 - len(sealed.index) + 20] ^= 1
    with pytest.raises(Corruption, match="checksum"):
        index_from_pack(bytes(damaged))


def test_check_pack_size_accepts_exactly_the_whole_pack() -> None:
    sealed, entries = _pack([b"a" * 2000, random.Random(4).randbytes(3000)])
    check_pack_size(entries, len(sealed.index), len(sealed.data), "pack p")
    check_pack_size([], len(encode_index([])), len(PACK_MAGIC) + len(encode_index([])) + 8)


@pytest.mark.parametrize("short", [1, 8, 50])
def test_check_pack_size_rejects_a_pack_too_short_for_its_index(short: int) -> None:
    # Cut into the trailer, the embedded index, or the last blob's stored bytes.
    sealed, entries = _pack([b"a" * 2000, random.Random(4).randbytes(3000)])
    cut = short if short < 50 else 8 + len(sealed.index) + short
    with pytest.raises(Corruption, match="pack p is truncated"):
        check_pack_size(entries, len(sealed.index), len(sealed.data) - cut, "pack p")


def test_check_pack_size_looks_at_the_record_that_ends_last() -> None:
    # Index entries need not be in offset order: the furthest record decides.
    sealed, entries = _pack([b"a" * 2000, random.Random(4).randbytes(3000)])
    size = len(sealed.data)
    check_pack_size(entries[::-1], len(sealed.index), size)
    with pytest.raises(Corruption):
        check_pack_size(entries[::-1], len(sealed.index), size - 1)
