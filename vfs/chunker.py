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

    def split_stream(self, stream: BinaryIO) -> Iterator[bytes]:
        """Yield the chunks of a binary stream, reading it in bounded windows.

        Memory stays bounded by a few times ``max_size`` whatever the stream's length.
        Each yielded chunk is its own ``bytes`` object.
        """
        for chunk in self._cdc.cut_stream(stream):
            # cut_stream reuses its buffer: copy before the next chunk is cut.
            yield bytes(chunk.data)

    def split_bytes(self, data: bytes | bytearray | memoryview) -> Iterator[memoryview]:
        """Yield the chunks of an in-memory buffer as views into it."""
        view = memoryview(data)
        for chunk in self._cdc.cut_buf(view):
            yield view[chunk.offset : chunk.offset + chunk.length]

    def boundaries(self, data: bytes | bytearray | memoryview) -> list[tuple[int, int]]:
        """Return ``(offset, length)`` of every chunk of ``data`` (for tests and tools)."""
        return [(chunk.offset, chunk.length) for chunk in self._cdc.cut_buf(memoryview(data))]
