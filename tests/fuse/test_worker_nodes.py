"""Worker nodes on one SeaweedFS bucket: names, heartbeats, cheap head polls.

Each node is a real vfsd process with its own cache, mount and control socket,
started with ``--node-name`` and a short ``--node-ttl`` (a heartbeat every second).
The requests of one node are seen by a FaultProxy between it and SeaweedFS.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit

import boto3
import pytest

import vfs

if TYPE_CHECKING:
    from conftest import Mount

from conftest import daemon_log_problems, start_vfsd, stop_vfsd
from faultproxy import FaultProxy
from fuse_checks import wait_for

PREFIX = "team"
UPPER = ('for f in "$VFS_PFS"/images/*; do n=$(basename "$f"); '
         'tr a-z A-Z < "$f" > "$VFS_PFS/out/$n.up"; done')


class Cluster:
    """vfsd nodes on one bucket; :meth:`start` adds one."""

    def __init__(self, tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch,
                 endpoint: str) -> None:
        self.tmp_path = tmp_path
        self.url = url
        self.monkeypatch = monkeypatch
        self.endpoint = endpoint
        self.nodes: dict[str, Mount] = {}
        self.expected: list[str] = []  # log lines a test expects (a restart after kill -9)

    def start(self, name: str, *extra: str, endpoint: str | None = None) -> Mount:
        """Start node ``name``; ``endpoint``: its S3 endpoint (a proxy) instead of the
        server's (its vfsctl commands still go to the server)."""
        mountpoint = self.tmp_path / f"pfs-{name}"
        mountpoint.mkdir()
        self.monkeypatch.setenv("VFS_S3_ENDPOINT", endpoint or self.endpoint)
        try:
            mount = start_vfsd(self.url, self.tmp_path / f"cache-{name}", mountpoint,  # type: ignore[arg-type]
                               "--node-name", name, "--node-ttl", "3", *extra)
        finally:
            self.monkeypatch.setenv("VFS_S3_ENDPOINT", self.endpoint)
        self.nodes[name] = mount
        return mount


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, aws_env: None,
            seaweed_endpoint: str) -> Iterator[Cluster]:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this machine")
    bucket = f"pfs-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=seaweed_endpoint).create_bucket(Bucket=bucket)
    monkeypatch.setenv("VFS_S3_ENDPOINT", seaweed_endpoint)
    url = f"s3://{bucket}/{PREFIX}"
    with vfs.open_store(url, cache_dir=str(tmp_path / "setup"), create=True) as store:
        store.create_repo("images")
    made = Cluster(tmp_path, url, monkeypatch, seaweed_endpoint)
    try:
        yield made
    finally:
        for mount in made.nodes.values():
            stop_vfsd(mount)
    for name, mount in made.nodes.items():
        problems = [line for line in daemon_log_problems(mount.log)
                    if not any(text in line for text in made.expected)]
        assert not problems, f"vfsd {name} logged:\n" + "\n".join(problems)


def nodes_of(mount: Mount) -> dict[str, dict]:
    listed = json.loads(mount.vfsctl("nodes", "--json").stdout)
    return {node["name"]: node for node in listed if node["vfsd"]}


def alive(mount: Mount) -> dict[str, bool]:
    return {name: node["alive"] for name, node in nodes_of(mount).items()}


def test_every_node_lists_every_node_and_a_killed_one_goes_not_alive(cluster) -> None:
    a, b, c = (cluster.start(name, "--no-pipelines") for name in ("node-a", "node-b", "node-c"))
    everyone = {"node-a": True, "node-b": True, "node-c": True}
    for mount in (a, b, c):
        assert wait_for(lambda m=mount: alive(m), everyone, 20) == everyone
    listed = nodes_of(b)
    assert len({node["id"] for node in listed.values()}) == 3
    assert all(node["running"] == 0 and node["ttl"] == 3 for node in listed.values()), listed
    killed_id = listed["node-c"]["id"]
    os.kill(c.process.pid, signal.SIGKILL)
    c.process.wait()
    gone = {"node-a": True, "node-b": True, "node-c": False}
    for mount in (a, b):  # after its ttl (3 s) without a heartbeat
        assert wait_for(lambda m=mount: alive(m), gone, 30) == gone
    assert nodes_of(a)["node-c"]["status"] == "stale"
    cluster.expected.append("is a stale mount of a dead daemon")
    c.start()  # its cache keeps its id: the same node is back
    assert wait_for(lambda: alive(a), everyone, 20) == everyone
    assert nodes_of(a)["node-c"]["id"] == killed_id


def test_a_second_vfsd_may_not_take_a_running_nodes_name(cluster, tmp_path: Path) -> None:
    # A long ttl: with the cluster's 3 s, a heartbeat made late by a loaded machine
    # (S3 times are whole seconds) let node a look gone, and the second vfsd started.
    a = cluster.start("node-a", "--no-pipelines", "--node-ttl", "60")
    mountpoint = tmp_path / "pfs-clash"
    mountpoint.mkdir()
    os.kill(a.process.pid, signal.SIGSTOP)  # its heartbeat comes a few seconds late
    try:
        time.sleep(4)
        try:
            clash = start_vfsd(cluster.url, tmp_path / "cache-clash", mountpoint,  # type: ignore[arg-type]
                               "--node-name", "node-a", "--no-pipelines")
        except AssertionError as exc:
            refused = str(exc)
        else:
            stop_vfsd(clash)  # it must not outlive the test, nor leave its mount behind
            refused = "it started"
    finally:
        os.kill(a.process.pid, signal.SIGCONT)
    assert "node name 'node-a' is taken" in refused
    # It refused before mounting anything: no dead mount is left behind.
    assert str(mountpoint) not in mount_points()


def mount_points() -> set[str]:
    """Every mount point of this process's mount namespace (/proc/self/mountinfo)."""
    with open("/proc/self/mountinfo") as f:
        # Field 5 is the mount point, with space, tab, newline and backslash in octal.
        return {line.split()[4].encode().decode("unicode_escape") for line in f}


def classify(line: str) -> str:
    """What a request of an idle node is for: its key area, a listing's prefix."""
    method, target, _ = line.split(" ", 2)
    parts = urlsplit(target)
    query = parse_qs(parts.query)
    if "list-type" in query:
        return f"LIST {query.get('prefix', [''])[0].removeprefix(PREFIX + '/')}"
    key = unquote(parts.path).split("/", 2)[-1].removeprefix(PREFIX + "/")
    return f"{method} {key}"


HEARTBEAT = ("nodes/", "gc/", "pins/")  # the node's record and what gc asks it


def pipeline_spec(tmp_path: Path, name: str) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({
        "pipeline": name, "input": {"repo": "images", "glob": "/*"},
        "transform": {"cmd": ["sh", "-c", UPPER]}, "runtime": "process"}))
    return str(path)


def idle_rounds(proxy: FaultProxy, rounds: int) -> tuple[list[str], list[str]]:
    """Wait for ``rounds`` polls of the node behind ``proxy`` (its listings of refs/);
    return the requests meanwhile: heartbeat ones and the others."""
    start = len(proxy.request_lines)
    def seen() -> list[str]:
        return [classify(line) for line in proxy.request_lines[start:]]

    assert wait_for(lambda: seen().count("LIST refs/") >= rounds, True, 60)
    requests = seen()
    heartbeat = [r for r in requests if r.split(" ", 1)[1].startswith(HEARTBEAT)]
    return heartbeat, [r for r in requests if r not in heartbeat]


def test_an_idle_node_polls_every_head_with_one_request_a_round(cluster, tmp_path) -> None:
    a = cluster.start("node-a", "--no-pipelines")
    with FaultProxy(cluster.endpoint) as proxy:
        b = cluster.start("node-b", "--allow-process-runtime", "--poll-interval", "0.2",
                          endpoint=proxy.endpoint)
        created = 0
        for count in (1, 6):
            while created < count:
                a.vfsctl("pipeline", "create", "-f", pipeline_spec(tmp_path, f"p{created}"))
                created += 1
            # Node b learns of them (its listing of refs/ shows their output branches),
            # reads each one's spec once and looks at it; then it is idle.
            assert wait_for(lambda: sum(classify(line).startswith("GET pipelines/")
                                        for line in proxy.request_lines), count, 30) == count
            idle_rounds(proxy, 2)
            heartbeat, others = idle_rounds(proxy, 15)
            # One listing of refs/ a round, nothing per pipeline; pipelines/ is listed
            # again at most every 30 s when nothing changed.
            assert set(others) <= {"LIST refs/", "LIST pipelines/"}, others
            assert others.count("LIST pipelines/") <= 1, others
            assert all(r.split(" ", 1)[1].startswith(HEARTBEAT) for r in heartbeat)
        stop_vfsd(b)  # before its store goes away


def test_a_commit_on_one_node_starts_the_job_on_another(cluster, tmp_path) -> None:
    a = cluster.start("node-a", "--no-pipelines")
    b = cluster.start("node-b", "--allow-process-runtime", "--poll-interval", "0.5")
    a.vfsctl("pipeline", "create", "-f", pipeline_spec(tmp_path, "upper"))
    (a.path / "images@main" / "x.txt").write_text("hello")
    commit = a.commit("images@main")
    # Node a runs no pipeline: the job is node b's, started by its poll of the heads.
    out = a.vfsctl("wait", f"images@{commit}", "--timeout", "60").stdout.split()
    assert len(out) == 1 and out[0].startswith("upper@"), out
    assert (a.path / f"{out[0]}" / "x.txt.up").read_text() == "HELLO"
    jobs = json.loads(b.vfsctl("job", "list", "upper", "--json").stdout)
    assert [job["state"] for job in jobs] == ["success"]
    assert jobs[0]["input_commit"] == commit
