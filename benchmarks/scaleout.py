#!/usr/bin/env python3
"""Pipelines over several worker nodes on one bucket: wall time, speedup, requests.

Usage (from the project root, as root: every node mounts)::

    PYTHONPATH=$PWD .venv/bin/python benchmarks/scaleout.py [--datums 60]
        [--nodes 1,2,3] [--seconds 1] [--cpu] [--runtime bwrap] [--workdir DIR]

For each node count N: a fresh bucket on a SeaweedFS server (``weed mini``), N real
``vfsd`` processes (own cache, mount, control socket and node name), one pipeline of
``--datums`` datums with ``parallelism: 1`` whose command sleeps ``--seconds`` (or, with
``--cpu``, spins a core for that long), one commit of the input through the first node,
and ``vfsctl wait`` on the last node: the wall time from the commit to the wait's
return, as a user sees it. Reported: wall time, speedup over one node, how many times
the datums ran (each writes a line to a host file: more than ``--datums`` means
duplicated work), on how many nodes, the output commits made, and the S3 requests
counted by an HTTP proxy in front of SeaweedFS (per datum and per job, and the head
polls per minute of the idle nodes before the commit).

Nothing is asserted; the table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.seaweedserver import ACCESS_KEY, SECRET_KEY, start_seaweed_server  # noqa: E402


def _counting_proxy():
    """benchmarks/gc.py's CountingProxy (the file's name is the standard library's)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "gc_benchmark", os.path.join(ROOT, "benchmarks", "gc.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CountingProxy

PYTHON = sys.executable


def _env(endpoint: str) -> dict:
    return {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1", "VFS_S3_ENDPOINT": endpoint,
            "PYTHONPATH": ROOT}


class Node:
    def __init__(self, work: Path, name: str, url: str, endpoint: str) -> None:
        self.name = name
        self.cache = work / f"cache-{name}"
        self.mount = work / f"pfs-{name}"
        self.socket = work / f"{name}.sock"
        self.log = work / f"vfsd-{name}.log"
        self.url = url
        self.env = {**_env(endpoint), "VFS_STORE": url, "VFS_CACHE": str(self.cache),
                    "VFS_SOCKET": str(self.socket)}
        self.mount.mkdir()
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [PYTHON, "-m", "daemon.main", "--store", url, "--cache", str(self.cache),
                 "--mount", str(self.mount), "--socket", str(self.socket),
                 "--node-name", name, "--allow-process-runtime"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 60
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vfsd {name} did not start:\n{self.log.read_text()}")
            time.sleep(0.1)

    def ctl(self, *args: str, check: bool = True) -> str:
        done = subprocess.run([PYTHON, "-m", "cli.main", *args], env=self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=3600)
        if check and done.returncode:
            raise RuntimeError(f"vfsctl {' '.join(args)} on {self.name}: {done.stderr}")
        return done.stdout

    def stop(self) -> None:
        self.ctl("unmount", str(self.mount), check=False)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        subprocess.run(["umount", "-l", str(self.mount)], capture_output=True)


def run(work: Path, endpoint: str, proxy, nodes: int, args) -> dict:
    import boto3

    bucket = f"scale-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY,
                 aws_secret_access_key=SECRET_KEY,
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/bench"
    work = work / f"n{nodes}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    runs_log = work / "runs.log"
    runs_log.touch()
    os.chmod(work, 0o755)
    os.chmod(runs_log, 0o666)
    setup = {**_env(proxy.endpoint), "VFS_STORE": url, "VFS_CACHE": str(work / "setup")}
    subprocess.run([PYTHON, "-m", "cli.main", "init"], env=setup, cwd=ROOT, check=True,
                   capture_output=True)
    started = [Node(work, f"node{i + 1}", url, proxy.endpoint) for i in range(nodes)]
    try:
        first, last = started[0], started[-1]
        first.ctl("repo", "create", "inputs")
        if args.cpu:  # a fixed amount of work, about --seconds on one idle core
            work_cmd = (f'i=0; while [ $i -lt {args.iterations} ]; do i=$((i+1)); done')
        else:
            work_cmd = f"sleep {args.seconds}"
        script = (f'started=$(date +%s.%N); {work_cmd}; '
                  f'echo "$VFS_DATUM_ID ${{VFS_NODE:-?}} $started" >> {runs_log}; '
                  'cp "$VFS_PFS"/inputs/* "$VFS_PFS/out/"')
        spec = {"pipeline": "scale", "input": {"repo": "inputs", "glob": "/*"},
                "transform": {"cmd": ["sh", "-c", script]}, "runtime": args.runtime,
                "parallelism": 1}
        (work / "spec.json").write_text(json.dumps(spec))
        first.ctl("pipeline", "create", "-f", str(work / "spec.json"))
        files = work / "files"
        files.mkdir()
        for i in range(args.datums):
            (files / f"d{i:03d}.txt").write_text(f"datum {i}\n")
        first.ctl("put", "inputs@main:/", str(files), "-r")
        time.sleep(2)  # settle, then count what idle nodes ask for
        proxy.take()
        idle_started = time.monotonic()
        time.sleep(args.idle_seconds)
        idle = proxy.take()
        idle_minutes = (time.monotonic() - idle_started) / 60
        t0 = time.monotonic()
        committed_at = time.time()
        commit = first.ctl("commit", "inputs@main", "-m", "inputs").strip()
        last.ctl("wait", f"inputs@{commit}", "--timeout", "3600")
        wall = time.monotonic() - t0
        time.sleep(1)
        busy = proxy.take()
        lines = runs_log.read_text().splitlines()
        commits = last.ctl("log", "scale@main", "--json", check=False)
        try:
            output_commits = len(json.loads(commits))
        except ValueError:
            output_commits = -1
        per_node = Counter(line.split()[1] for line in lines)
        remote = [float(line.split()[2]) for line in lines if line.split()[1] != first.name]
        first_remote = min(remote) - committed_at if remote else None
        return {"nodes": nodes, "wall": wall, "runs": len(lines),
                "distinct": len({line.split()[0] for line in lines}),
                "ran_on": dict(per_node), "output_commits": output_commits,
                "requests": busy["total"], "requests_by_op": busy["by_op"],
                "idle_requests_per_min_per_node": idle["total"] / idle_minutes / nodes,
                "first_remote_start": first_remote}
    finally:
        for node in started:
            node.stop()


def _calibrate(seconds: float) -> int:
    """Iterations of the shell loop that take about ``seconds`` on one core."""
    probe = 200_000
    started = time.monotonic()
    subprocess.run(["sh", "-c", f"i=0; while [ $i -lt {probe} ]; do i=$((i+1)); done"],
                   check=True)
    return int(probe * seconds / (time.monotonic() - started))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datums", type=int, default=60)
    parser.add_argument("--nodes", default="1,2,3")
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--cpu", action="store_true", help="spin a core instead of sleeping")
    parser.add_argument("--runtime", default="process")
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--workdir", default=os.path.join(ROOT, "benchmarks", "work", "scale"))
    args = parser.parse_args()
    args.iterations = _calibrate(args.seconds) if args.cpu else 0
    work = Path(args.workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results = []
    with start_seaweed_server(work / "seaweed") as endpoint:
        proxy = _counting_proxy()(endpoint)
        try:
            for count in [int(n) for n in args.nodes.split(",")]:
                results.append(run(work, endpoint, proxy, count, args))
                print(json.dumps(results[-1]), file=sys.stderr)
        finally:
            proxy.close()
    base = results[0]["wall"] if results else 0
    kind = "cpu-bound" if args.cpu else "sleeping"
    print(f"| nodes | wall s | speedup | datum runs ({args.datums} datums, {kind}) | "
          "ran on | output commits | S3 requests per datum | idle requests /min/node | "
          "commit to first datum on another node, s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['nodes']} | {r['wall']:.1f} | {base / r['wall']:.2f}x | {r['runs']} "
              f"({r['distinct']} distinct) | {len(r['ran_on'])} | {r['output_commits']} | "
              f"{r['requests'] / args.datums:.1f} | "
              f"{r['idle_requests_per_min_per_node']:.0f} | "
              + (f"{r['first_remote_start']:.2f} |" if r["first_remote_start"] is not None
                 else "- |"))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
