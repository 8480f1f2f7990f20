#!/usr/bin/env python3
"""What an idle worker node costs the object store: head polls and heartbeats.

Usage (from the project root, as root: vfsd mounts with FUSE)::

    PYTHONPATH=$PWD .venv/bin/python benchmarks/nodes.py [--quick] [--before DIR]
        [--pipelines 1,20] [--seconds 60] [--workdir DIR]

For each code ("before": a source tree given with ``--before``, e.g. an export of the
last release; "after": this tree) and each number of pipelines: a fresh store on a
SeaweedFS server (``weed mini``) with one input repository holding one commit and that
many pipelines reading it (``process`` runtime, one file each). One ``vfsd`` (default
options: ``--poll-interval 2``, ``--node-ttl 60``) whose S3 endpoint is a counting
proxy (``gc.py``'s) runs every pipeline's first job; once ``vfsctl wait`` says all
are done and five more seconds passed, the proxy counts every request of the idle
node for ``--seconds`` (60; 20 with ``--quick``). Requests for the node's record and
gc (``nodes/``, ``pins/``, ``gc/…``: the heartbeat) are counted apart from all the
others (the watcher's polls). Results: a table on stdout and
``<workdir>/nodes-results.json``. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from run import machine_info  # noqa: E402

from tests.seaweedserver import ACCESS_KEY, SECRET_KEY  # noqa: E402

# benchmarks/gc.py's counting proxy and SeaweedFS helpers ("import gc" is the stdlib's).
_spec = importlib.util.spec_from_file_location("gc_benchmark", os.path.join(HERE, "gc.py"))
assert _spec is not None and _spec.loader is not None
gc_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gc_benchmark)
BUCKET, Code, seaweed = gc_benchmark.BUCKET, gc_benchmark.Code, gc_benchmark.seaweed

HEARTBEAT_AREAS = ("nodes/", "pins/", "gc/")
UPPER = 'for f in "$VFS_PFS"/images/*; do tr a-z A-Z < "$f" > "$VFS_PFS/out/$(basename "$f")"; done'


def env_for(code, store: str, cache: str, endpoint: str) -> dict:
    return {**os.environ, "PYTHONPATH": code.root, "VFS_STORE": store, "VFS_CACHE": cache,
            "VFS_USER": "bench", "VFS_S3_ENDPOINT": endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1"}


def vfsctl(env: dict, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "cli.main", *args], env=env, cwd=env["PYTHONPATH"],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"vfsctl {' '.join(args)} failed: {done.stderr[-2000:]}")
    return done.stdout


def measure(code, pipelines: int, seconds: float, workdir: Path, endpoint: str,
            proxy, log) -> dict:
    """One idle vfsd of ``code`` with ``pipelines`` pipelines: its requests per minute."""
    case = workdir / f"{code.name}-{pipelines}"
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir(parents=True)
    store = f"s3://{BUCKET}/{code.name}-{pipelines}-{int(time.time())}"
    setup = env_for(code, store, str(case / "setup-cache"), endpoint)
    vfsctl(setup, "init")
    vfsctl(setup, "repo", "create", "images")
    (case / "a.txt").write_text("hello")
    vfsctl(setup, "put", "images@main:/a.txt", str(case / "a.txt"))
    vfsctl(setup, "commit", "images@main", "-m", "input")
    for i in range(pipelines):
        spec = case / f"p{i}.json"
        spec.write_text(json.dumps({"pipeline": f"p{i}", "input": {"repo": "images"},
                                    "transform": {"cmd": ["sh", "-c", UPPER]},
                                    "runtime": "process"}))
        vfsctl(setup, "pipeline", "create", "-f", str(spec))
    node = env_for(code, store, str(case / "cache"), proxy.endpoint)
    mnt = case / "mnt"
    mnt.mkdir()
    log_file = open(case / "vfsd.log", "ab")  # noqa: SIM115 - owned by the child
    vfsd = subprocess.Popen([sys.executable, "-m", "daemon.main", "--store", store, "--cache",
                             str(case / "cache"), "--mount", str(mnt), "--socket",
                             str(case / "vfsd.sock"), "--node-name", "bench",
                             "--allow-process-runtime"],
                            env=node, cwd=code.root, stdout=log_file, stderr=subprocess.STDOUT)
    log_file.close()
    try:
        deadline = time.monotonic() + 60
        while not os.path.ismount(mnt):
            if vfsd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vfsd did not start: {(case / 'vfsd.log').read_text()}")
            time.sleep(0.1)
        vfsctl(node, "wait", "images@main", "--timeout", "300")
        time.sleep(5)
        proxy.take()
        log(f"[{code.name}] {pipelines} pipelines: idle, counting for {seconds:g} s")
        time.sleep(seconds)
        counted = proxy.take()
    finally:
        vfsd.terminate()
        vfsd.wait(timeout=60)
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False,
                       capture_output=True)
    per_minute = 60.0 / seconds
    heartbeat = {k: n for k, n in counted["by_area"].items()
                 if k.split(" ")[-1].startswith(HEARTBEAT_AREAS)}
    polls = {k: n for k, n in counted["by_area"].items() if k not in heartbeat}
    return {"code": code.name, "pipelines": pipelines, "seconds": seconds,
            "poll_per_min": round(sum(polls.values()) * per_minute, 1),
            "heartbeat_per_min": round(sum(heartbeat.values()) * per_minute, 1),
            "polls": polls, "heartbeat": heartbeat, "not_2xx": counted["not_2xx"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="count for 20 s, not 60")
    parser.add_argument("--before", default="/tmp/vfs-before",
                        help="source tree of the 'before' code (skipped if missing)")
    parser.add_argument("--pipelines", default="1,20")
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--workdir", default=os.path.join(HERE, "work", "nodes"))
    args = parser.parse_args()
    seconds = args.seconds or (20.0 if args.quick else 60.0)
    counts = [int(n) for n in args.pipelines.split(",")]
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    codes = []
    if os.path.isdir(os.path.join(args.before, "vfs")):
        codes.append(Code("before", args.before))
    codes.append(Code("after", ROOT))
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:7.1f}s] {message}", file=sys.stderr, flush=True)

    results: dict = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(str(workdir)),
        "codes": {c.name: {"root": c.root, "commit": c.commit} for c in codes},
        "runs": [],
    }
    with seaweed(workdir) as (endpoint, proxy):
        for count in counts:
            for code in codes:
                results["runs"].append(measure(code, count, seconds, workdir, endpoint,
                                               proxy, log))
    lines = [f"idle node, requests per minute ({seconds:g} s counted), {results['date']}", "",
             "| code | pipelines | head polls / min | heartbeat / min | poll requests by kind |",
             "|---|---|---|---|---|"]
    for run in results["runs"]:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(run["polls"].items()))
        lines.append(f"| {run['code']} | {run['pipelines']} | {run['poll_per_min']:g} | "
                     f"{run['heartbeat_per_min']:g} | {kinds} |")
    text = "\n".join(lines)
    print(text)
    (workdir / "nodes-results.json").write_text(json.dumps(results, indent=1) + "\n")
    log(f"results in {workdir}/nodes-results.json")


if __name__ == "__main__":
    main()
