"""Content-defined chunking: pinned boundaries and the properties dedup relies on."""

from __future__ import annotations

import io
import json
import random

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfs.chunker import Chunker
from vfs.config import ChunkerParams

# -- golden boundaries -------------------------------------------------------------------

# Chunk boundaries are part of the storage format. Every store holds chunks cut with
# these exact cut points; if an upgrade of vfs or pyfastcdc (gear table, normalization,
# cut-point skipping) moved them, new puts of unchanged data would produce new chunks and
# stop deduplicating against everything already stored (borg pins its chunker the same
# way: test_chunkpoints_fastcdc_unchanged). Never "fix" this list: fix the chunker.
GOLDEN_INPUT_SEED = b"vfs-golden"
GOLDEN_INPUT_SIZE = 24 << 20
GOLDEN_BOUNDARIES = [
    (0, 569123),
    (569123, 338342),
    (907465, 669916),
    (1577381, 1894783),
    (3472164, 2149786),
    (5621950, 1268900),
    (6890850, 1271881),
    (8162731, 862393),
    (9025124, 491233),
    (9516357, 1598407),
    (11114764, 1947658),
    (13062422, 1738272),
    (14800694, 1347545),
    (16148239, 1567532),
    (17715771, 1201166),
    (18916937, 3517438),
    (22434375, 1567006),
    (24001381, 451902),
    (24453283, 712541),
]
GOLDEN_DIGEST = "097080de65285a197effb34b679cde97fc68ea67c46fd82b230d1ff240e1de3a"


@pytest.fixture(scope="module")
def golden_input() -> bytes:
    return blake3.blake3(GOLDEN_INPUT_SEED).digest(length=GOLDEN_INPUT_SIZE)


def test_store_default_chunker_params_are_pinned() -> None:
    # New stores write these into their config; changing a default silently gives new
    # stores a chunking that cannot dedup against data exported from old ones.
    assert ChunkerParams() == ChunkerParams(
        algorithm="fastcdc2020",
        min_size=256 * 1024,
        avg_size=1024 * 1024,
        max_size=4 * 1024 * 1024,
        normalization=1,
        seed=0,
    )


def test_golden_boundaries_unchanged(golden_input: bytes) -> None:
    boundaries = Chunker(ChunkerParams()).boundaries(golden_input)
    assert boundaries == GOLDEN_BOUNDARIES
    assert blake3.blake3(json.dumps(boundaries).encode()).hexdigest() == GOLDEN_DIGEST


def test_golden_boundaries_same_when_streamed(golden_input: bytes) -> None:
    # Files of 8 MiB and more are chunked as streams by put: same cut points required.
    lengths = [len(c) for c in Chunker(ChunkerParams()).split_stream(io.BytesIO(golden_input))]
    assert lengths == [length for _, length in GOLDEN_BOUNDARIES]


# -- properties (small parameters, for speed) ------------------------------------------------

SMALL = ChunkerParams(min_size=64, avg_size=256, max_size=1024)

data_strategy = st.one_of(
    st.binary(max_size=8192),
    # Long runs of one byte never hit a content-defined cut: they exercise max_size.
    st.builds(lambda b, n: bytes([b]) * n, st.integers(0, 255), st.integers(0, 6000)),
    # Random bytes big enough for many chunks, generated cheaply from a seed.
    st.builds(lambda seed, n: random.Random(seed).randbytes(n),
              st.integers(0, 2**32), st.integers(0, 40000)),
)


class _ShortReads:
    """A stream returning at most a few bytes per call, like a pipe or a socket."""

    def __init__(self, data: bytes, seed: int, use_readinto: bool) -> None:
        self._data = data
        self._pos = 0
        self._random = random.Random(seed)
        if use_readinto:
            self.readinto = self._readinto

    def _next(self, n: int) -> bytes:
        size = min(n, self._random.randint(1, 300))
        out = self._data[self._pos : self._pos + size]
        self._pos += len(out)
        return out

    def read(self, n: int) -> bytes:
        return self._next(n)

    def _readinto(self, buffer: memoryview) -> int:
        out = self._next(len(buffer))
        buffer[: len(out)] = out
        return len(out)


@settings(max_examples=150, deadline=None)
@given(data_strategy)
def test_chunks_concatenate_and_respect_size_limits(data: bytes) -> None:
    chunks = [bytes(c) for c in Chunker(SMALL).split_bytes(data)]
    assert b"".join(chunks) == data
    assert all(chunks), "empty chunk"
    for chunk in chunks[:-1]:
        assert SMALL.min_size <= len(chunk) <= SMALL.max_size
    if chunks:
        assert len(chunks[-1]) <= SMALL.max_size


@settings(max_examples=150, deadline=None)
@given(data_strategy)
def test_boundaries_match_split_bytes(data: bytes) -> None:
    chunker = Chunker(SMALL)
    offsets = []
    position = 0
    for chunk in chunker.split_bytes(data):
        offsets.append((position, len(chunk)))
        position += len(chunk)
    assert chunker.boundaries(data) == offsets


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data_strategy, st.integers(0, 2**32), st.booleans())
def test_split_stream_equals_split_bytes(data: bytes, seed: int, use_readinto: bool) -> None:
    chunker = Chunker(SMALL)
    expected = [bytes(c) for c in chunker.split_bytes(data)]
    assert list(chunker.split_stream(io.BytesIO(data))) == expected
    # Short reads (stdin is a pipe) must not move cut points either.
    assert list(chunker.split_stream(_ShortReads(data, seed, use_readinto))) == expected


def test_split_stream_chunks_stay_valid_after_later_reads() -> None:
    # Chunks are views into the block they were read into; reading on must never
    # overwrite a chunk already handed out (each block is a fresh buffer).
    data = random.Random(7).randbytes(5_000_000)
    chunks = list(Chunker(SMALL).split_stream(io.BytesIO(data), block=64 * 1024))
    assert len(chunks) > 1000
    assert b"".join(chunks) == data


def test_empty_input_has_no_chunks() -> None:
    chunker = Chunker(SMALL)
    assert list(chunker.split_bytes(b"")) == []
    assert list(chunker.split_stream(io.BytesIO(b""))) == []
    assert chunker.boundaries(b"") == []


# -- dedup: an edit changes only the chunks around it ------------------------------------------


def _chunk_set(chunker: Chunker, data: bytes) -> list[bytes]:
    return [blake3.blake3(c).digest() for c in chunker.split_bytes(data)]


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    where=st.floats(0.05, 0.95),
    insert=st.binary(min_size=1, max_size=200),
)
def test_insert_in_the_middle_changes_few_chunks(seed: int, where: float, insert: bytes) -> None:
    chunker = Chunker(SMALL)
    data = random.Random(seed).randbytes(200_000)  # ~600 chunks
    cut = int(len(data) * where)
    edited = data[:cut] + insert + data[cut:]
    before = _chunk_set(chunker, data)
    after = _chunk_set(chunker, edited)
    new = [h for h in after if h not in set(before)]
    # The chunk holding the edit changes, and the cut points after it may move: with
    # normalized chunking a cut point's mask depends on its distance from the chunk
    # start, so an edit can occasionally ripple over a few chunks before the cuts
    # resynchronise (hypothesis found 11 of ~600 with these tiny parameters; the
    # store's real parameters change one chunk for a 100-byte insert, see
    # test_dedup.py). What must hold is that the change stays local.
    assert 1 <= len(new) <= 20, f"{len(new)} of {len(after)} chunks changed"
    assert len(set(before) & set(after)) >= len(before) - 20


def test_insert_with_store_defaults_keeps_most_chunks(golden_input: bytes) -> None:
    chunker = Chunker(ChunkerParams())
    data = golden_input[: 16 << 20]
    edited = data[: 8 << 20] + b"inserted bytes" + data[8 << 20 :]
    before = set(_chunk_set(chunker, data))
    after = _chunk_set(chunker, edited)
    assert sum(1 for h in after if h not in before) <= 3
