"""Encoding a file ahead of its close: a prefix encoded in steps, then the rest, gives
exactly the file ref (and blobs) that encoding the whole file at once gives."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

import vfs
from vfs.ingest import EncodedPrefix, encode_file, encode_prefix
from vfs.snapshot import iter_file
from vfs.tree import FILE, Entry

MiB = 1 << 20


def _encode_file(store: vfs.Store, path: Path,
                 prefix: EncodedPrefix | None = None) -> tuple[str, int]:
    """encode_file of the file at ``path`` (after ``prefix``, if given)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        with store.blobs.writer() as writer:
            result = encode_file(store, fd, writer, prefix=prefix)
    finally:
        os.close(fd)
    assert result is not None
    return result


def _encode_prefix(store: vfs.Store, path: Path, prefix: EncodedPrefix,
                   end: int) -> EncodedPrefix:
    """encode_prefix of the file at ``path``, up to ``end``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        with store.blobs.writer() as writer:
            return encode_prefix(store, fd, prefix, end, writer)
    finally:
        os.close(fd)


def _encode_in_steps(store: vfs.Store, path: Path, data: bytes,
                     steps: list[int]) -> tuple[tuple[str, int], EncodedPrefix]:
    """Write ``data`` to ``path`` growing it to each step, encoding a prefix each time
    (as vfsd does while a writer appends), then encode the rest."""
    prefix = EncodedPrefix()
    with open(path, "wb") as f:
        for end in steps:
            f.seek(0, os.SEEK_END)
            f.write(data[f.tell():end])
            f.flush()
            longer = _encode_prefix(store, path, prefix, end)
            assert longer.size >= prefix.size
            assert longer.chunks[:len(prefix.chunks)] == prefix.chunks
            assert longer.size <= end
            prefix = longer
        f.write(data[f.tell():])
    return _encode_file(store, path, prefix), prefix


@pytest.mark.parametrize("seed", range(4))
def test_prefix_then_rest_equals_whole(store: vfs.Store, tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    size = rng.randrange(9 * MiB, 40 * MiB)
    # Half random, half repetitive (compressible, with runs that reach max-size cuts).
    data = rng.randbytes(size // 2) + (b"vfs " * 100 + rng.randbytes(300)) * (size // 1000)
    data = data[:size]
    whole_path = tmp_path / "whole.bin"
    whole_path.write_bytes(data)
    expected = _encode_file(store, whole_path)

    steps = sorted({rng.randrange(1, size) for _ in range(rng.randrange(1, 8))})
    got, prefix = _encode_in_steps(store, tmp_path / "steps.bin", data, steps)
    assert got == expected
    assert prefix.size > 0  # the steps did encode something ahead
    ref, got_size = got
    assert got_size == size
    entry = Entry("steps.bin", FILE, 0o644, size, 0, ref)
    assert b"".join(bytes(part) for part in iter_file(store.blobs, entry)) == data


def test_a_prefix_past_the_end_is_ignored(store: vfs.Store, tmp_path: Path) -> None:
    """A head longer than the file (it was truncated since) is not used."""
    data = random.Random(7).randbytes(20 * MiB)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    prefix = _encode_prefix(store, path, EncodedPrefix(), len(data))
    assert prefix.size > 10 * MiB
    os.truncate(path, 3 * MiB)
    got = _encode_file(store, path, prefix)
    assert got == _encode_file(store, path)
    assert got[1] == 3 * MiB


def test_encode_prefix_of_too_little_is_empty(store: vfs.Store, tmp_path: Path) -> None:
    """Less than one certain cut: nothing is encoded ahead (the last chunk waits)."""
    path = tmp_path / "f.bin"
    path.write_bytes(random.Random(8).randbytes(300 << 10))
    assert _encode_prefix(store, path, EncodedPrefix(), 300 << 10).size == 0
