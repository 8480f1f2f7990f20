"""vfsd over an S3 store: a real moto server over HTTP, a real mount.

Writes through the branch path (small files, and a large file stored ahead of its
close), a commit, then reads of the commit on a restarted daemon whose chunk
cache (on disk, as for every remote store) starts empty and then serves the
second read; gc and fsck over S3 afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import pytest

import vfs

if TYPE_CHECKING:
    from conftest import Mount

from conftest import daemon_log_problems, start_vfsd, stop_vfsd

MiB = 1 << 20


@pytest.fixture
def s3_mount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moto_endpoint: str,
             aws_env: None) -> Iterator[Mount]:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this machine")
    bucket = f"pfs-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=bucket)
    monkeypatch.setenv("VFS_S3_ENDPOINT", moto_endpoint)
    url = f"s3://{bucket}/team"
    cache = tmp_path / "cache"
    vfs.open_store(url, cache_dir=str(cache), create=True).close()
    mountpoint = tmp_path / "pfs"
    mountpoint.mkdir()
    mount = start_vfsd(url, cache, mountpoint, "--encode-ahead", "1M",  # type: ignore[arg-type]
                       "--chunk-cache-size", "64M", "--debug")
    try:
        yield mount
    finally:
        stop_vfsd(mount)
    problems = daemon_log_problems(mount.log)
    assert not problems, "vfsd logged:\n" + "\n".join(problems)
    store = vfs.open_store(url, cache_dir=str(cache))
    try:
        report = vfs.fsck.check(store, deep=True)
    finally:
        store.close()
    assert report.ok, report.problems


def chunk_cache_bytes(mount: Mount) -> int:
    return sum(p.stat().st_size for p in mount.cache_dir.rglob("chunks/**/*") if p.is_file())


def test_write_commit_and_read_back_over_s3(s3_mount: Mount) -> None:
    mount = s3_mount
    mount.vfsctl("repo", "create", "data")
    branch = mount.path / "data@main"
    rng = random.Random(11)
    small = {f"small/{i:03d}.txt": rng.randbytes(rng.randrange(1, 5000)) for i in range(50)}
    (branch / "small").mkdir()
    for name, data in small.items():
        (branch / name).write_bytes(data)
    big = rng.randbytes(24 * MiB)
    with open(branch / "big.bin", "wb") as f:
        for i in range(0, len(big), MiB):
            f.write(big[i:i + MiB])
        f.flush()
        os.fsync(f.fileno())
    assert "bytes stored ahead" in mount.log.read_text()  # stored while written, to S3
    commit = mount.commit("data@main", "over s3")
    status = json.loads(mount.vfsctl("status", "--json").stdout)
    assert status  # the daemon answers over its socket

    mount.restart()
    before = chunk_cache_bytes(mount)
    root = mount.path / f"data@{commit}"
    assert hashlib.sha256((root / "big.bin").read_bytes()).digest() == \
        hashlib.sha256(big).digest()
    for name, data in small.items():
        assert (root / name).read_bytes() == data
    assert chunk_cache_bytes(mount) > before + 8 * MiB  # the chunks came from S3 once
    # A second daemon reads the same bytes from its disk cache.
    mount.restart()
    assert (root / "big.bin").read_bytes() == big
    mount.vfsctl("gc", "--grace", "0")
