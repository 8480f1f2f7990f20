"""Content-defined chunking with FastCDC 2020 (the ``pyfastcdc`` library).

A cut point depends only on the bytes since the previous cut, so an insert or a
delete inside a file changes the chunks around the edit and no others. The
parameters come from the store's config (:class:`vfs.config.ChunkerParams`) and
must never change for a store: ``tests/unit/test_chunker.py`` pins the
boundaries of a fixed input.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

import pyfastcdc

from vfs.config import ChunkerParams


class Chunker:
    """Splits byte streams into content-defined chunks.

    The cutting itself runs in C without the GIL, so several threads may chunk
    different files at once; one ``Chunker`` is not shared between threads.
    """

    def __init__(self, params: ChunkerParams) -> None:
        self.params = params
        self._cdc = pyfastcdc.FastCDC(
            params.avg_size,
            min_size=params.min_size,
            max_size=params.max_size,
            normalized_chunking=params.normalization,  # type: ignore[arg-type]
            seed=params.seed,
        )

    def split_stream(self, stream: BinaryIO, *, block: int = 16 << 20) -> Iterator[memoryview]:
        """Yield the chunks of a binary stream, reading it in bounded blocks.

        Chunks are views into the block they were read into (no copy); a block is
        freed once nothing refers to its chunks. Memory stays bounded by a few
        blocks whatever the stream's length. Cut points depend only on the bytes
        since the previous cut, so the tail after a block's last cut is carried
        into the next block and cut again: boundaries equal those of
        :meth:`split_bytes` over the whole stream.
        """
        block = max(block, 2 * self.params.max_size)
        carry = b""
        while True:
            buf = bytearray(block)
            buf[: len(carry)] = carry
            filled = len(carry) + _fill(stream, memoryview(buf)[len(carry):])
            eof = filled < block
            view = memoryview(buf)[:filled]
            chunks = list(self._cdc.cut_buf(view))
            if not eof and chunks:
                last = chunks.pop()
                carry = bytes(view[last.offset:])
            for chunk in chunks:
                yield view[chunk.offset : chunk.offset + chunk.length]
            if eof:
                return

    def split_bytes(self, data: bytes | bytearray | memoryview) -> Iterator[memoryview]:
        """Yield the chunks of an in-memory buffer as views into it."""
        view = memoryview(data)
        for chunk in self._cdc.cut_buf(view):
            yield view[chunk.offset : chunk.offset + chunk.length]

    def boundaries(self, data: bytes | bytearray | memoryview) -> list[tuple[int, int]]:
        """Return ``(offset, length)`` of every chunk of ``data`` (for tests and tools)."""
        return [(chunk.offset, chunk.length) for chunk in self._cdc.cut_buf(memoryview(data))]


def _fill(stream: BinaryIO, target: memoryview) -> int:
    """Read into ``target`` until it is full or the stream ends; return the count."""
    readinto = getattr(stream, "readinto", None)
    done = 0
    while done < len(target):
        if readinto is not None:
            n = readinto(target[done:])
        else:
            data = stream.read(len(target) - done)
            n = len(data) if data else 0
            target[done : done + n] = data or b""
        if not n:
            break
        done += n
    return done
