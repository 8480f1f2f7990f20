"""Three vfsd nodes on one SeaweedFS bucket share every pipeline job (docs/format.md §10b).

Each node is a real vfsd with its own cache, mount and control socket, reaching the
store through its own fault proxy (tests/faultproxy.py), so that a test can delay
one node's requests or cut it off its store. Datums of the ``process`` runtime
append "<node> <datum id>" to a host file: that file counts executions. Leases
last 3 s (``--lease-ttl 3``) so that a dead node's work is taken over quickly.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import fuse_checks
import pytest
from faultproxy import FaultProxy

import vfs

if TYPE_CHECKING:
    from conftest import Mount

from conftest import daemon_log_problems, start_vfsd, stop_vfsd

# Three nodes and lease takeovers: 60 s to wait for anything.
until = functools.partial(fuse_checks.until, timeout=60)
NAMES = ("node-a", "node-b", "node-c")
# One line per try, then the datum's files copied out after a pause.
RECORDING = ('echo "$VFS_NODE $VFS_DATUM_ID" >> "$RUNS"; sleep "$PAUSE"; '
             'for f in "$VFS_PFS"/images/*; do cp "$f" "$VFS_PFS/out/$(basename "$f")"; done')


@dataclass
class Cluster:
    nodes: dict[str, Mount]
    proxies: dict[str, FaultProxy]
    url: str
    bucket: str
    endpoint: str
    runs: Path

    @property
    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint)

    def key(self, key: str) -> str:
        return f"team/{key}"

    def get_json(self, key: str) -> dict | None:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(key))["Body"]
        except self.client.exceptions.NoSuchKey:
            return None
        return json.loads(body.read())

    def ran(self) -> list[tuple[str, str]]:
        """(node, datum id) of every try so far."""
        if not self.runs.exists():
            return []
        return [tuple(line.split()) for line in self.runs.read_text().splitlines()]  # type: ignore[misc]


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, aws_env: None,
            seaweed_endpoint: str) -> Iterator[Cluster]:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this machine")
    bucket = f"pfs-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=seaweed_endpoint).create_bucket(Bucket=bucket)
    monkeypatch.setenv("VFS_S3_ENDPOINT", seaweed_endpoint)
    url = f"s3://{bucket}/team"
    with vfs.open_store(url, cache_dir=str(tmp_path / "setup"), create=True) as store:
        store.create_repo("images")
    started: dict[str, Mount] = {}
    proxies: dict[str, FaultProxy] = {}
    try:
        for name in NAMES:
            proxy = FaultProxy(seaweed_endpoint).__enter__()
            proxies[name] = proxy
            mountpoint = tmp_path / f"pfs-{name}"
            mountpoint.mkdir()
            started[name] = start_vfsd(
                url, tmp_path / f"cache-{name}", mountpoint,  # type: ignore[arg-type]
                "--node-name", name, "--s3-endpoint", proxy.endpoint, "--lease-ttl", "3",
                "--poll-interval", "0.5", "--allow-process-runtime")
        yield Cluster(started, proxies, url, bucket, seaweed_endpoint, tmp_path / "runs")
    finally:
        for mount in started.values():
            stop_vfsd(mount)
        for proxy in proxies.values():
            proxy.__exit__(None, None, None)
    with vfs.open_store(url, cache_dir=str(tmp_path / "setup")) as store:
        report = vfs.fsck.check(store, deep=True)
    assert report.ok, report.problems


def quiet(mount: Mount, *allowed: str) -> None:
    """The node's log holds no warning or error but those containing one of ``allowed``."""
    problems = [line for line in daemon_log_problems(mount.log)
                if not any(text in line for text in allowed)]
    assert not problems, f"{mount.path.name} logged:\n" + "\n".join(problems)


def create_pipeline(node: Mount, tmp_path: Path, runs: Path, *, name: str = "upper",
                    repo: str = "images", script: str = RECORDING, pause: float = 0.3,
                    runtime: str = "process", **extra) -> None:
    doc = {"pipeline": name, "input": {"repo": repo, "glob": "/*"},
           "transform": {"cmd": ["sh", "-c", script],
                         "env": {"RUNS": str(runs), "PAUSE": str(pause)}},
           "runtime": runtime, **extra}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(doc))
    node.vfsctl("pipeline", "create", "-f", str(path))


def commit_inputs(node: Mount, tmp_path: Path, count: int, *, repo: str = "images") -> str:
    src = tmp_path / f"src-{uuid.uuid4().hex[:6]}"
    src.mkdir()
    for i in range(count):
        (src / f"f{i:02d}.txt").write_text(f"file {i}\n")
    node.vfsctl("put", "-r", f"{repo}@main:/", *(str(p) for p in sorted(src.iterdir())))
    return node.commit(f"{repo}@main")


def output_commits(node: Mount, ref: str = "upper@main") -> list[dict]:
    return json.loads(node.vfsctl("log", ref, "--json").stdout or "[]")


def jobs(node: Mount, pipeline: str = "upper") -> list[dict]:
    return json.loads(node.vfsctl("job", "list", pipeline, "--json").stdout)


def test_three_nodes_run_each_datum_once_and_commit_once(cluster: Cluster, tmp_path) -> None:
    a, b, c = cluster.nodes.values()
    create_pipeline(a, tmp_path, cluster.runs, parallelism=1)
    commit = commit_inputs(a, tmp_path, 12)
    outputs = {node.path.name: node.vfsctl("wait", f"images@{commit}", "--timeout", "60")
               .stdout.split() for node in (c, b, a)}  # any node's wait returns it
    assert len({tuple(out) for out in outputs.values()}) == 1, outputs
    ran = cluster.ran()
    per_datum = Counter(datum for _, datum in ran)
    assert len(per_datum) == 12 and set(per_datum.values()) == {1}, ran
    assert len({node for node, _ in ran}) >= 2, ran  # the work spread
    assert len(output_commits(a)) == 1
    assert sorted(p.name for p in (b.path / "upper@main").iterdir()) == [
        f"f{i:02d}.txt" for i in range(12)]
    [job] = jobs(b)  # every node lists the one job
    assert job["state"] == "success" and job["datums_processed"] == 12
    inspect = json.loads(c.vfsctl("job", "inspect", job["id"], "--json").stdout)
    assert sorted(d["root"] for d in inspect["datums"]) == [f"f{i:02d}.txt" for i in range(12)]
    assert {(d["state"], d["tries"]) for d in inspect["datums"]} == {("done", 1)}
    assert Counter(d["node"] for d in inspect["datums"]) == Counter(node for node, _ in ran)
    text = a.vfsctl("job", "inspect", job["id"]).stdout
    assert "NODE" in text and "TRIES" in text
    for node in cluster.nodes.values():
        quiet(node)


@pytest.mark.expect_warnings  # the killed node's stale mount, and its lost claims
def test_a_node_killed_mid_job_is_replaced_and_rejoins(cluster: Cluster, tmp_path) -> None:
    a, b, c = cluster.nodes.values()
    create_pipeline(a, tmp_path, cluster.runs, pause=1.0, parallelism=1)
    commit = commit_inputs(a, tmp_path, 12)
    until(lambda: any(node == "node-c" for node, _ in cluster.ran()), "node-c to start a datum")
    os.kill(c.process.pid, signal.SIGKILL)
    c.process.wait()
    a.vfsctl("wait", f"images@{commit}", "--timeout", "90")
    ran = cluster.ran()
    per_datum = Counter(datum for _, datum in ran)
    assert len(per_datum) == 12, ran
    # At least once; twice only for what node-c was running when it died.
    assert sum(per_datum.values()) - 12 <= 1, ran
    assert len(output_commits(a)) == 1
    assert len(list((b.path / "upper@main").iterdir())) == 12
    c.start()  # it rejoins: nothing to redo, nothing to commit again
    assert json.loads(c.vfsctl("job", "list", "--json").stdout)[0]["state"] == "success"
    b.vfsctl("wait", f"images@{commit}", "--timeout", "30")
    time.sleep(2)  # a few of its ticks
    assert len(cluster.ran()) == len(ran)
    assert len(output_commits(c)) == 1
    [job] = jobs(c)
    retried = [d for d in json.loads(b.vfsctl("job", "inspect", job["id"], "--json").stdout)
               ["datums"] if d["tries"] > 1]
    # What node-c ran when it died (each try sleeps 1 s) was taken over, once.
    assert len(retried) == 1 and retried[0]["tries"] == 2, retried
    assert retried[0]["node"] != "node-c" and retried[0]["state"] == "done", retried
    quiet(a, "took over", "lost the claim")
    quiet(b, "took over", "lost the claim")


def _hold_output_commits(cluster: Cluster, delay: float) -> None:
    """Every node's move of the output branch waits ``delay`` s in its proxy."""
    for proxy in cluster.proxies.values():
        proxy.delay = delay
        proxy.delay_if = f"PUT /{cluster.bucket}/team/refs/upper/main".encode()


def _committer(cluster: Cluster, job_id: str) -> str:
    lease = until(lambda: cluster.get_json(f"claims/{job_id}/commit"), "a commit lease")
    return lease["node_name"]


@pytest.mark.expect_warnings  # the killed node's stale mount
def test_a_node_killed_during_the_output_commit_commits_nothing(cluster: Cluster,
                                                               tmp_path) -> None:
    create_pipeline(cluster.nodes["node-a"], tmp_path, cluster.runs, pause=0.1,
                    parallelism=2)
    _hold_output_commits(cluster, 12.0)  # longer than a lease: it lands after a takeover
    commit = commit_inputs(cluster.nodes["node-a"], tmp_path, 6)
    job_id = until(lambda: (cluster.get_json("jobheads/upper") or {}).get("job"), "a job")
    name = _committer(cluster, job_id)
    victim = cluster.nodes[name]
    time.sleep(1)  # merging 6 datums takes far less: its ref move waits in its proxy now
    os.kill(victim.process.pid, signal.SIGKILL)  # its ref move still waits in its proxy
    victim.process.wait()
    for other, proxy in cluster.proxies.items():
        if other != name:
            proxy.restore()
    survivor = next(m for n, m in cluster.nodes.items() if n != name)
    survivor.vfsctl("wait", f"images@{commit}", "--timeout", "60")
    made = output_commits(survivor)
    assert len(made) == 1
    # The dead node's ref move reaches the store only now, on a head that moved: refused.
    time.sleep(12)
    assert output_commits(survivor) == made
    assert len(list((survivor.path / "upper@main").iterdir())) == 6
    victim.start()
    time.sleep(2)
    assert output_commits(victim) == made
    assert [j["state"] for j in jobs(victim)] == ["success"]
    assert len(cluster.ran()) == 6  # no datum ran again
    for other, node in cluster.nodes.items():
        if other != name:
            quiet(node)


@pytest.mark.expect_warnings  # the cut node reports the store it cannot reach
def test_a_node_cut_from_the_store_loses_its_commit_lease_for_good(cluster: Cluster,
                                                                 tmp_path) -> None:
    create_pipeline(cluster.nodes["node-a"], tmp_path, cluster.runs, pause=0.1,
                    parallelism=2)
    _hold_output_commits(cluster, 8.0)
    commit = commit_inputs(cluster.nodes["node-a"], tmp_path, 6)
    job_id = until(lambda: (cluster.get_json("jobheads/upper") or {}).get("job"), "a job")
    name = _committer(cluster, job_id)
    time.sleep(1)  # its ref move waits in its proxy now
    cluster.proxies[name].cut()  # its lease can no longer be renewed: it expires
    for other, proxy in cluster.proxies.items():
        if other != name:
            proxy.restore()
    survivor = next(m for n, m in cluster.nodes.items() if n != name)
    survivor.vfsctl("wait", f"images@{commit}", "--timeout", "60")
    lease = cluster.get_json(f"claims/{job_id}/commit")
    assert lease["node_name"] != name and lease["token"] >= 2 and lease["state"] == "done"
    made = output_commits(survivor)
    assert len(made) == 1
    cluster.proxies[name].restore()  # back: its commit attempt must not land
    cut = cluster.nodes[name]
    # Its ref move, retried once the store answers again, finds the branch moved.
    until(lambda: "another node made its output commit" in cut.log.read_text()
          or "stops taking part" in cut.log.read_text(), "the cut node to give up", timeout=60)
    time.sleep(2)
    assert output_commits(cut) == made
    assert [j["state"] for j in jobs(cut)] == ["success"]
    assert len(cluster.ran()) == 6
    for other, node in cluster.nodes.items():
        if other != name:
            quiet(node)


def test_chained_pipelines_and_an_update_across_nodes(cluster: Cluster, tmp_path) -> None:
    a, b, c = cluster.nodes.values()
    create_pipeline(a, tmp_path, cluster.runs, pause=0.5, parallelism=1)
    count = ('for f in "$VFS_PFS"/upper/*; do wc -c < "$f" > '
             '"$VFS_PFS/out/$(basename "$f").count"; done')
    create_pipeline(b, tmp_path, cluster.runs, name="count", repo="upper", script=count)
    commit = commit_inputs(a, tmp_path, 6)
    until(lambda: len(cluster.ran()) >= 2, "the first datums")
    # An update made on node c while the job runs on the others: the running job ends
    # under version 1, then version 2 runs; wait (on node b) waits for version 2.
    doc = json.loads((tmp_path / "upper.json").read_text())
    doc["transform"]["cmd"][2] = RECORDING.replace('"$VFS_PFS/out/$(basename "$f")"',
                                                   '"$VFS_PFS/out/v2-$(basename "$f")"')
    (tmp_path / "upper.json").write_text(json.dumps(doc))
    c.vfsctl("pipeline", "update", "-f", str(tmp_path / "upper.json"))
    out = b.vfsctl("wait", f"images@{commit}", "--timeout", "90").stdout.split()
    assert [o.split("@")[0] for o in out] == ["upper", "count"]
    assert sorted(p.name for p in (c.path / "count@main").iterdir()) == [
        f"v2-f{i:02d}.txt.count" for i in range(6)]
    versions = [j["version"] for j in jobs(a)]
    assert versions in ([1, 2], [2]), versions
    assert all(j["state"] == "success" for j in jobs(a) + jobs(a, "count"))
    prov = a.vfsctl("provenance", "count@main").stdout
    assert "pipeline count" in prov and "pipeline upper v2" in prov and commit in prov
    for node in cluster.nodes.values():
        quiet(node)


def test_a_bwrap_pipeline_across_nodes_says_where_each_datum_ran(cluster: Cluster,
                                                                 tmp_path) -> None:
    if shutil.which("bwrap") is None:
        pytest.skip("bwrap is not installed (scripts/setup.sh installs it)")
    a, b, _ = cluster.nodes.values()
    script = ('sleep 0.3; for f in /pfs/images/*; do n=$(basename "$f"); '
              'tr a-z A-Z < "$f" > "/pfs/out/$n.up"; echo "$VFS_NODE" > "/pfs/out/$n.node"; '
              'done')
    create_pipeline(a, tmp_path, cluster.runs, script=script, runtime="bwrap",
                    parallelism=2)
    commit = commit_inputs(b, tmp_path, 12)
    a.vfsctl("wait", f"images@{commit}", "--timeout", "90")
    output = b.path / "upper@main"
    assert (output / "f03.txt.up").read_text() == "FILE 3\n"
    made_on = {p.read_text().strip() for p in output.glob("*.node")}
    assert len(list(output.glob("*.node"))) == 12 and made_on <= set(NAMES)
    [job] = jobs(a)
    inspect = json.loads(a.vfsctl("job", "inspect", job["id"], "--json").stdout)
    by_root = {d["root"]: d["node"] for d in inspect["datums"]}
    assert {root: (output / f"{root}.node").read_text().strip() for root in by_root} == by_root
    assert {(d["state"], d["tries"]) for d in inspect["datums"]} == {("done", 1)}
    assert len(output_commits(a)) == 1


def test_three_nodes_share_a_job_over_several_inputs(cluster: Cluster, tmp_path) -> None:
    """A cross of two repositories: every node reads each claimed datum's files of both
    inputs from the plan's commits; each datum runs once, one output commit."""
    a, b, c = cluster.nodes.values()
    b.vfsctl("repo", "create", "models")
    images = commit_inputs(a, tmp_path, 4)
    models = commit_inputs(b, tmp_path, 2, repo="models")
    script = ('echo "$VFS_NODE $VFS_DATUM_ID" >> "$RUNS"; sleep "$PAUSE"; '
              'i=$(ls "$VFS_PFS/images"); m=$(ls "$VFS_PFS/models"); '
              'cat "$VFS_PFS/images/$i" "$VFS_PFS/models/$m" > "$VFS_PFS/out/$i-$m"; '
              'echo "$VFS_INPUT_IMAGES_COMMIT $VFS_INPUT_MODELS_COMMIT" >> "$VFS_PFS/out/$i-$m"')
    doc = {"pipeline": "pairs", "input": {"cross": [{"repo": "images"}, {"repo": "models"}]},
           "transform": {"cmd": ["sh", "-c", script],
                         "env": {"RUNS": str(cluster.runs), "PAUSE": "0.3"}},
           "runtime": "process", "parallelism": 1}
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(doc))
    c.vfsctl("pipeline", "create", "-f", str(path))
    for node in (a, b, c):
        node.vfsctl("wait", f"models@{models}", "--timeout", "60")
    ran = cluster.ran()
    per_datum = Counter(datum for _, datum in ran)
    assert len(per_datum) == 8 and set(per_datum.values()) == {1}, ran
    assert len(output_commits(a, "pairs@main")) == 1
    out = b.path / "pairs@main" / "f03.txt-f01.txt"
    assert out.read_text() == f"file 3\nfile 1\n{images} {models}\n"
    assert len(list((c.path / "pairs@main").iterdir())) == 8
    [job] = jobs(a, "pairs")
    inspect = json.loads(c.vfsctl("job", "inspect", job["id"], "--json").stdout)
    assert {(d["state"], d["tries"]) for d in inspect["datums"]} == {("done", 1)}
    assert '"images"' in inspect["datums"][0]["root"]
    for node in cluster.nodes.values():
        quiet(node)
