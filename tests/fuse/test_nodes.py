"""Two vfsd nodes on one bucket (a real SeaweedFS, and moto's server): gc on one never
loses the other's data.

Each node is a real vfsd process with its own cache (index, open commits, node
record), mount and control socket; commands run as ``vfsctl`` processes talking to
their node's daemon. The reproductions of data loss through deduplication on one
node and gc on the other (docs/format.md §10) run here end to end.
"""

from __future__ import annotations

import json
import os
import random
import time
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
from fuse_checks import wait_for

MiB = 1 << 20


@pytest.fixture(params=["seaweedfs", "moto"])
def nodes(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
          aws_env: None) -> Iterator[tuple[Mount, Mount, str]]:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this machine")
    endpoint = request.getfixturevalue(
        "seaweed_endpoint" if request.param == "seaweedfs" else "moto_endpoint")
    bucket = f"pfs-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    monkeypatch.setenv("VFS_S3_ENDPOINT", endpoint)
    url = f"s3://{bucket}/team"
    with vfs.open_store(url, cache_dir=str(tmp_path / "setup"), create=True) as store:
        store.create_repo("data")
    started: list[Mount] = []
    try:
        for name in ("a", "b"):
            mountpoint = tmp_path / f"pfs-{name}"
            mountpoint.mkdir()
            started.append(start_vfsd(url, tmp_path / f"cache-{name}", mountpoint,  # type: ignore[arg-type]
                                      "--node-name", f"node-{name}", "--node-ttl", "3",
                                      "--no-pipelines"))
        for mount in started:  # a new bucket's first listings may lag a moment
            assert wait_for(lambda m=mount: (m.path / "data@main").is_dir(), True, 10)
        yield started[0], started[1], url
    finally:
        for mount in started:
            stop_vfsd(mount)
    for mount in started:
        problems = daemon_log_problems(mount.log)
        assert not problems, "vfsd logged:\n" + "\n".join(problems)
        with vfs.open_store(url, cache_dir=str(mount.cache_dir)) as store:
            report = vfs.fsck.check(store, deep=True)
        assert report.ok, report.problems


def write(path: Path, data: bytes) -> None:
    for _ in range(30):
        try:
            with open(path, "wb") as f:
                f.write(data)
                os.fsync(f.fileno())
            return
        except FileNotFoundError:
            # A name dropped by a change on another node may still look present for
            # up to a second here (noticed at the next access, then dropped), and
            # opening it without creating fails. 'discard' through this node drops
            # it before it returns (daemon/coherence.py).
            time.sleep(0.1)
    raise AssertionError(f"cannot write {path}")


def staged_paths(mount: Mount) -> list[str]:
    status = json.loads(mount.vfsctl("status", "--json", "data@main").stdout)
    return sorted(change["path"] for change in status["changes"])


def test_dedup_on_one_node_and_gc_on_the_other_keep_the_commit_readable(nodes) -> None:
    a, b, _ = nodes
    data = random.Random(1).randbytes(3 * MiB)
    write(a.path / "data@main" / "f", data)
    assert wait_for(lambda: staged_paths(a), ["/f"]) == ["/f"]
    a.vfsctl("discard", "data@main")  # its packs are garbage now
    write(a.path / "data@main" / "f", data)  # deduplicated onto that garbage
    assert wait_for(lambda: staged_paths(a), ["/f"]) == ["/f"]
    # Node b collects; node a's daemon is active and acknowledges within a heartbeat.
    out = b.vfsctl("gc", "--grace", "0", "--wait", "30s", "--json").stdout
    report = json.loads(out)
    assert report["waiting_for"] == [], report
    commit = a.commit("data@main")
    assert (b.path / f"data@{commit}" / "f").read_bytes() == data
    again = json.loads(b.vfsctl("gc", "--grace", "0", "--wait", "30s", "--json").stdout)
    assert again["packs_deleted"] == 0, again  # nothing of the commit is garbage
    assert (a.path / f"data@{commit}" / "f").read_bytes() == data


def test_reads_on_one_node_follow_the_other_nodes_repack(nodes, tmp_path: Path) -> None:
    a, b, _ = nodes
    small = random.Random(2).randbytes(200_000)
    big = random.Random(3).randbytes(3 * MiB)
    src = tmp_path / "src"
    src.mkdir()
    (src / "small").write_bytes(small)
    (src / "big").write_bytes(big)
    a.vfsctl("branch", "create", "data@tmp")
    a.vfsctl("put", "data@tmp:/", str(src / "small"), str(src / "big"))
    a.commit("data@tmp")  # one pack holds both
    write(a.path / "data@main" / "small", small)
    main = a.commit("data@main")  # needs a sliver of that pack
    assert (b.path / f"data@{main}" / "small").read_bytes() == small  # b indexes it
    a.vfsctl("branch", "delete", "data@tmp")
    time.sleep(1.5)  # S3 times have one-second steps: let the deletion be in the past
    report = json.loads(a.vfsctl("gc", "--grace", "0", "--reflog-retention", "0",
                                 "--wait", "30s", "--json").stdout)
    assert report["packs_repacked"] >= 1 and report["packs_deleted"] >= 1, report
    # Node b's index still places the file in the deleted pack: its read follows the
    # gc log to the new pack instead of failing (a fresh path: no page cache).
    assert (b.path / f"data@{main[:16]}" / "small").read_bytes() == small
    write(b.path / "data@main" / "again", small)  # deduplicated onto the new pack
    commit = b.commit("data@main")
    assert (a.path / f"data@{commit}" / "again").read_bytes() == small


def test_gc_refuses_while_a_node_is_stale_and_ignore_node_overrides(
        nodes, tmp_path: Path) -> None:
    a, b, _ = nodes
    write(a.path / "data@main" / "f", random.Random(4).randbytes(MiB))
    assert wait_for(lambda: staged_paths(a), ["/f"]) == ["/f"]
    a.vfsctl("discard", "data@main")
    os.kill(a.process.pid, 19)  # SIGSTOP: node a hangs, its record goes stale
    try:
        done = None
        for _ in range(30):  # its record is older than --node-ttl 3 within seconds
            done = b.vfsctl("gc", "--grace", "0", check=False)
            if done.returncode != 0:
                break
            time.sleep(1)
        assert done is not None and done.returncode == 3, done
        assert "node-a" in done.stderr and "--ignore-node" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        done = b.vfsctl("gc", "--grace", "0", "--ignore-node", "node-a")
    finally:
        os.kill(a.process.pid, 18)  # SIGCONT


def _bucket_and_prefix(url: str) -> tuple[str, str]:
    bucket, _, prefix = url[len("s3://"):].partition("/")
    return bucket, prefix


def test_a_file_staged_under_a_directory_the_other_node_deleted_is_a_conflict(nodes) -> None:
    a, b, _ = nodes
    (a.path / "data@main" / "e").mkdir()
    write(a.path / "data@main" / "e" / "old", b"old")
    first = a.commit("data@main")
    assert wait_for(lambda: (b.path / "data@main" / "e" / "old").exists(), True)
    write(b.path / "data@main" / "e" / "f", b"staged on node b")
    assert wait_for(lambda: staged_paths(b), ["/e/f"]) == ["/e/f"]
    a.vfsctl("rm", "-r", "data@main:/e")
    a.commit("data@main")
    done = b.vfsctl("commit", "data@main", "-m", "f", check=False)
    assert done.returncode == 1, done
    assert "/e" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert staged_paths(b) == ["/e/f"]  # nothing lost: still staged
    assert first


@pytest.mark.corrupts_store
def test_gc_on_a_cold_node_stops_on_a_damaged_commit(nodes, tmp_path: Path) -> None:
    a, b, url = nodes
    data = random.Random(5).randbytes(MiB)
    write(a.path / "data@main" / "f", data)
    first = a.commit("data@main")
    a.vfsctl("rm", "data@main:/f")
    a.commit("data@main")  # /f lives only in the first commit now
    bucket, prefix = _bucket_and_prefix(url)
    client = boto3.client("s3", endpoint_url=os.environ["VFS_S3_ENDPOINT"])
    key = f"{prefix}/commits/{first}"
    original = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    client.put_object(Bucket=bucket, Key=key, Body=original.replace(b'"test"', b'"damaged"'))
    packs = {o["Key"] for o in client.list_objects_v2(Bucket=bucket,
                                                      Prefix=f"{prefix}/packs/")["Contents"]}
    cold = {**b.env, "VFS_CACHE": str(tmp_path / "cold")}  # a node that never read it
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "cli.main", "gc", "--grace", "0"], env=cold,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and first in done.stderr, done
    assert "nothing was deleted" in done.stderr
    after = {o["Key"] for o in client.list_objects_v2(Bucket=bucket,
                                                      Prefix=f"{prefix}/packs/")["Contents"]}
    assert after == packs
    client.put_object(Bucket=bucket, Key=key, Body=original)
    assert (b.path / f"data@{first}" / "f").read_bytes() == data


def test_gc_reindexes_a_pack_whose_index_copy_went_missing(nodes) -> None:
    a, b, url = nodes
    data = random.Random(6).randbytes(MiB)
    write(a.path / "data@main" / "f", data)
    commit = a.commit("data@main")
    bucket, prefix = _bucket_and_prefix(url)
    client = boto3.client("s3", endpoint_url=os.environ["VFS_S3_ENDPOINT"])
    copies = [o["Key"] for o in client.list_objects_v2(Bucket=bucket,
                                                        Prefix=f"{prefix}/index/")["Contents"]]
    for key in copies:
        client.delete_object(Bucket=bucket, Key=key)
    report = json.loads(b.vfsctl("gc", "--grace", "0", "--json").stdout)
    assert report["packs_reindexed"] == len(copies) and report["packs_deleted"] == 0, report
    assert (b.path / f"data@{commit}" / "f").read_bytes() == data
