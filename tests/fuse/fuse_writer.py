"""A separate process that writes files into a mounted branch, for the concurrency tests.

    python fuse_writer.py DIR NAME[:SIZE]...

writes each NAME into DIR with the bytes :func:`content` gives, in pieces of
64 KiB as ``cp`` does, so a test can recompute what every file must hold.
"""

from __future__ import annotations

import os
import random
import sys

SIZES = [0, 100, 5_000, 300_000, 2_500_000]


def content(name: str, size: int | None = None) -> bytes:
    """The bytes a file called ``name`` gets (its size from SIZES unless given)."""
    rng = random.Random(name)
    return rng.randbytes(rng.choice(SIZES) if size is None else size)


def write(directory: str, name: str, size: int | None) -> None:
    data = content(name, size)
    with open(os.path.join(directory, name), "wb") as f:
        for start in range(0, len(data), 1 << 16):
            f.write(data[start : start + (1 << 16)])


def main(argv: list[str]) -> None:
    directory, *names = argv
    os.makedirs(directory, exist_ok=True)
    for spec in names:
        name, _, size = spec.partition(":")
        write(directory, name, int(size) if size else None)


if __name__ == "__main__":
    main(sys.argv[1:])
