#!/usr/bin/env python3
"""What the multi-node gc protocol costs: object-store requests and gc time.

Usage (from the project root)::

    PYTHONPATH=$PWD .venv/bin/python benchmarks/gc.py [--quick] [--only 1,2]
        [--before /work/wt-gc-before] [--workdir DIR]

Two benchmarks, each run with this tree's code ("after") and with the code of an
older checkout ("before", ``--before``, e.g. a worktree at the last release):

1 requests  S3 requests, by operation and by key area, of ``vfsctl put`` of one small
            file + ``vfsctl commit`` (as a user runs them, in a fresh process each),
            and of ``vfsctl gc --grace 0`` on a store with a few commits, a deleted
            branch and garbage. Counted at the HTTP level by a proxy (a thread of this
            script) between vfsctl and a SeaweedFS server (``weed mini``).
2 packs     ``vfsctl gc --grace 0 --reflog-retention 0`` over a store of many packs
            (10,000; a pack target of 1 byte puts every blob in its own pack), with
            nothing to collect and with half of the packs garbage (a deleted branch):
            wall time, CPU time and peak RSS of the whole process, on a local store
            and on SeaweedFS (through the counting proxy, so its requests are counted
            too).

Every vfsctl runs in a fresh process under a tiny launcher (``run.py``'s) that reports
``wait4()`` of exactly that process. Results: a table on stdout, and
``<workdir>/gc-results.json`` and ``<workdir>/gc-results.md``. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # tests.seaweedserver, vfs

from run import _LAUNCHER, machine_info  # noqa: E402

from tests.seaweedserver import ACCESS_KEY, SECRET_KEY, admin_client, start_seaweed_server  # noqa: E402
from vfs.config import StoreConfig, create_config  # noqa: E402

BUCKET = "bench"
SMALL_FILE = 4096  # above the inline limit (1 KiB): stored as a blob in a pack
OPS = ["GET", "GET range", "PUT", "PUT cond", "LIST", "HEAD", "DELETE", "other"]


# ---------------------------------------------------------------------------------------
# the counting proxy
# ---------------------------------------------------------------------------------------


def classify(method: str, path: str, headers) -> tuple[str, str]:
    """(operation, key area) of one S3 request through the proxy.

    The key area is the first component of the store key (``packs/``, ``index/``…;
    two components under ``gc/``); the store sits at ``/<bucket>/<store prefix>/``.
    """
    split = urlsplit(path)
    query = parse_qs(split.query, keep_blank_values=True)
    parts = unquote(split.path).split("/")[3:]  # drop "", bucket, store prefix
    if method == "GET" and ("list-type" in query or not parts or parts == [""]):
        op = "LIST"
        prefix = query.get("prefix", [""])[0].split("/", 1)
        parts = prefix[1].split("/") if len(prefix) > 1 else []
    elif method == "GET":
        op = "GET range" if "range" in {k.lower() for k in headers} else "GET"
    elif method == "HEAD":
        op = "HEAD"
    elif method == "PUT":
        conditional = {k.lower() for k in headers} & {"if-match", "if-none-match"}
        op = "PUT cond" if conditional else "PUT"
    elif method == "DELETE":
        op = "DELETE"
    else:
        op = "other"
    if not parts or not parts[0]:
        area = "(bucket)"
    elif parts[0] == "gc" and len(parts) > 2:
        area = f"gc/{parts[1]}/"
    elif parts[0] == "gc" and len(parts) == 2 and op != "LIST":
        area = "/".join(parts)  # gc/lease
    elif len(parts) == 1 and op != "LIST":
        area = parts[0]  # config
    else:
        area = f"{parts[0]}/"
    return op, area


class CountingProxy:
    """An HTTP proxy in a thread that forwards to ``upstream`` and counts requests.

    The Host header is forwarded unchanged: SigV4 signs it, and the client signed
    the proxy's address.
    """

    def __init__(self, upstream: str) -> None:
        split = urlsplit(upstream)
        self.upstream = (split.hostname, split.port)
        self.counts: Counter[tuple[str, str]] = Counter()
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.seconds: Counter[str] = Counter()  # time SeaweedFS took to answer, by op
        self._lock = threading.Lock()
        proxy = self

        class Handler(_ForwardingHandler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def record(self, op: str, area: str, status: int, seconds: float) -> None:
        with self._lock:
            self.seconds[op] += seconds
            self.counts[op, area] += 1
            self.statuses[op, status] += 1

    def take(self) -> dict:
        """The counts since the last call: by operation, by operation and area, and
        the answers that were not 2xx."""
        with self._lock:
            counts, self.counts = self.counts, Counter()
            statuses, self.statuses = self.statuses, Counter()
            seconds, self.seconds = self.seconds, Counter()
        by_op = Counter()
        for (op, _), n in counts.items():
            by_op[op] += n
        return {"by_op": dict(by_op),
                "by_area": {f"{op} {area}": n for (op, area), n in sorted(counts.items())},
                "not_2xx": {f"{op} {status}": n for (op, status), n in sorted(statuses.items())
                            if not 200 <= status < 300},
                "total": sum(counts.values()),
                "upstream_s": {op: round(t, 3) for op, t in sorted(seconds.items())}}

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _ForwardingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as boto3 expects
    owner: CountingProxy
    _upstream: http.client.HTTPConnection | None = None

    def setup(self) -> None:
        super().setup()
        # Headers and body leave in two writes: without this, Nagle's algorithm and
        # the client's delayed ACK add ~40 ms to many answers.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunk = self.rfile.read(size)
                self.rfile.readline()
                if size == 0:
                    break
                chunks.append(chunk)
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send_upstream(self, body: bytes) -> http.client.HTTPResponse:
        for attempt in range(2):  # the kept-alive upstream connection may have closed
            if self._upstream is None:
                self._upstream = http.client.HTTPConnection(*self.owner.upstream, timeout=120)
                self._upstream.connect()
                self._upstream.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = self._upstream
            try:
                conn.putrequest(self.command, self.path, skip_host=True,
                                skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in ("transfer-encoding", "content-length"):
                        conn.putheader(name, value)
                if body or self.command in ("PUT", "POST"):
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body or None)
                return conn.getresponse()
            except (ConnectionError, http.client.HTTPException):
                conn.close()
                self._upstream = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _forward(self) -> None:
        body = self._body()
        start = time.perf_counter()
        response = self._send_upstream(body)
        data = response.read()
        op, area = classify(self.command, self.path, self.headers)
        self.owner.record(op, area, response.status, time.perf_counter() - start)
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        if self.command == "HEAD":
            self.send_header("Content-Length", response.getheader("Content-Length", "0"))
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _forward


# ---------------------------------------------------------------------------------------
# running vfsctl
# ---------------------------------------------------------------------------------------


class Code:
    """One version of vfs: its source tree (put first on PYTHONPATH)."""

    def __init__(self, name: str, root: str) -> None:
        self.name = name
        self.root = root
        self.commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                                     capture_output=True, text=True).stdout.strip()


@contextmanager
def seaweed(workdir: Path) -> Iterator[tuple[str, CountingProxy]]:
    """A SeaweedFS server with bucket ``bench`` and a counting proxy in front of it."""
    data = workdir / "seaweed"
    shutil.rmtree(data, ignore_errors=True)
    with start_seaweed_server(data) as endpoint:
        client = admin_client(endpoint)
        client.create_bucket(Bucket=BUCKET)
        client.close()
        proxy = CountingProxy(endpoint)
        try:
            yield endpoint, proxy
        finally:
            proxy.close()
    shutil.rmtree(data, ignore_errors=True)


class Node:
    """vfsctl of one code version on one store, with its own cache (one node)."""

    def __init__(self, code: Code, store: str, cache: str, endpoint: str | None,
                 workdir: Path) -> None:
        self.code = code
        self.store = store
        self.cache = cache
        self.endpoint = endpoint
        self.workdir = workdir

    def env(self) -> dict:
        env = {**os.environ, "PYTHONPATH": self.code.root, "VFS_STORE": self.store,
               "VFS_CACHE": self.cache, "VFS_USER": "bench", "VFS_NODE_NAME": "bench",
               "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
               "AWS_DEFAULT_REGION": "us-east-1"}
        if self.endpoint:
            env["VFS_S3_ENDPOINT"] = self.endpoint
        return env

    def run(self, *args: str) -> dict:
        """Run ``vfsctl ARGS`` in a fresh process; its wall time and rusage."""
        argv = [sys.executable, "-c", "from cli.main import main; main()", *args]
        fd, res = tempfile.mkstemp(prefix="rusage-", suffix=".json", dir=self.workdir)
        os.close(fd)
        try:
            proc = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, res, *argv],
                                  capture_output=True, text=True, env=self.env(),
                                  cwd=self.workdir)
            if proc.returncode != 0:
                raise RuntimeError(f"[{self.code.name}] vfsctl {' '.join(args)} failed:\n"
                                   f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            with open(res) as f:
                r = json.load(f)
        finally:
            os.unlink(res)
        return {"wall_s": round(r["wall"], 3), "cpu_s": round(r["utime"] + r["stime"], 3),
                "user_s": round(r["utime"], 3), "sys_s": round(r["stime"], 3),
                "maxrss_mb": round(r["maxrss"] / 1024, 1), "stdout": proc.stdout.strip()}


def small_file(path: Path, rng: random.Random) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(rng.randbytes(SMALL_FILE))
    return path


# ---------------------------------------------------------------------------------------
# 1. requests per command
# ---------------------------------------------------------------------------------------


def bench_requests(codes: list[Code], workdir: Path, proxy: CountingProxy, log) -> dict:
    """Requests of put + commit, and of gc, per code version."""
    out: dict = {}
    rng = random.Random(1)
    files = workdir / "req-files"
    for code in codes:
        log(f"requests: {code.name} ({code.commit})")
        rows: dict = {}

        def counted(label: str, node: Node, *args: str, rows: dict = rows) -> None:
            proxy.take()
            run = node.run(*args)
            rows[label] = {**proxy.take(), "wall_s": run["wall_s"], "cpu_s": run["cpu_s"],
                           "stdout": run["stdout"][-300:]}

        # (a) put + commit: the first in a new store and cache, then steady state.
        node = Node(code, f"s3://{BUCKET}/{code.name}-put", str(workdir / f"{code.name}-put-cache"),
                    proxy.endpoint, workdir)
        counted("init", node, "init")
        counted("repo create", node, "repo", "create", "data")
        for i in range(4):
            f = small_file(files / f"put{i}.bin", rng)
            tag = "first" if i == 0 else f"#{i + 1}"
            counted(f"put ({tag})", node, "put", "data@main:/", str(f))
            counted(f"commit ({tag})", node, "commit", "data@main", "-m", f"c{i}")
        # (b) gc on a store with a few commits, a deleted branch and garbage.
        node = Node(code, f"s3://{BUCKET}/{code.name}-gc", str(workdir / f"{code.name}-gc-cache"),
                    proxy.endpoint, workdir)
        node.run("init")
        node.run("repo", "create", "data")
        for i in range(3):
            node.run("put", "data@main:/", str(small_file(files / f"main{i}.bin", rng)))
            node.run("commit", "data@main", "-m", f"main {i}")
        node.run("branch", "create", "data@tmp", "--from", "data@main")
        for i in range(2):
            node.run("put", "data@tmp:/", str(small_file(files / f"tmp{i}.bin", rng)))
            node.run("commit", "data@tmp", "-m", f"tmp {i}")
        node.run("branch", "delete", "data@tmp")
        for i in range(2):  # staged then discarded: its packs are garbage
            node.run("put", "data@main:/", str(small_file(files / f"junk{i}.bin", rng)))
        node.run("discard", "data@main")
        counted("gc --grace 0 (discarded put collected; deleted branch kept by the reflog)",
                node, "gc", "--grace", "0")
        counted("gc --grace 0 --reflog-retention 0 (deleted branch collected)", node,
                "gc", "--grace", "0", "--reflog-retention", "0")
        # (With the default retention again, this gc would stop: the reflog names the
        # commits the last one deleted.)
        counted("gc --grace 0 --reflog-retention 0 (nothing to collect)", node,
                "gc", "--grace", "0", "--reflog-retention", "0")
        out[code.name] = rows
    shutil.rmtree(files, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------
# 2. gc over many packs
# ---------------------------------------------------------------------------------------


def build_pack_store(url: str, cache: str, files: Path, endpoint: str | None) -> dict:
    """A store whose every blob is in its own pack: branch ``keep`` and branch ``junk``
    each hold half of the files (``files/keep``, ``files/junk``)."""
    import vfs
    from vfs.objstore import open_object_store

    start = time.perf_counter()
    objects = open_object_store(url, create=True, s3_endpoint=endpoint)
    create_config(objects, StoreConfig(pack_target_size=1))
    objects.close()
    with vfs.open_store(url, cache_dir=cache, s3_endpoint=endpoint) as store:
        store.create_repo("data")
        for branch in ("keep", "junk"):
            store.create_branch("data", branch)
            vfs.put(store, "data", branch, "/", [str(files / branch)], recursive=True)
            store.commit("data", branch, f"{branch}: many small files")
        packs = len(store.index.packs())
    return {"packs": packs, "build_s": round(time.perf_counter() - start, 1)}


def make_pack_files(files: Path, count: int) -> None:
    """``count`` small files of distinct content, half under keep/, half under junk/,
    100 per directory."""
    rng = random.Random(2)
    for i in range(count):
        branch = "keep" if i % 2 == 0 else "junk"
        n = i // 2
        small_file(files / branch / f"d{n // 100:03d}" / f"f{n % 100:02d}.bin", rng)


def bench_packs(codes: list[Code], workdir: Path, count: int, s3_count: int, repeat: int,
                endpoint: str | None, proxy: CountingProxy | None, log) -> dict:
    out: dict = {}
    gc_args = ("gc", "--grace", "0", "--reflog-retention", "0", "--json")
    files = workdir / "pack-files"
    shutil.rmtree(files, ignore_errors=True)
    make_pack_files(files, count)

    # Local store: build once, copy the pristine store and node caches for every run.
    pristine = workdir / "packs-local"
    shutil.rmtree(pristine, ignore_errors=True)
    log(f"packs/local: building a store of {count} files, one blob per pack")
    built = build_pack_store(str(pristine / "store"), str(pristine / "cache-after"), files,
                             None)
    log(f"packs/local: {built['packs']} packs in {built['build_s']} s")
    out["local"] = {"build": built, "runs": {}}
    caches = {}
    for code in codes:  # after: the builder's cache; before: its own `index rebuild`
        cache = pristine / f"cache-{code.name}"
        if code is not codes[-1]:
            Node(code, str(pristine / "store"), str(cache), None, workdir).run(
                "index", "rebuild")
        caches[code.name] = cache
    for case in ("nothing", "half"):
        for rep in range(repeat):
            for code in codes:
                run_dir = workdir / "packs-run"
                shutil.rmtree(run_dir, ignore_errors=True)
                shutil.copytree(pristine / "store", run_dir / "store", symlinks=True)
                shutil.copytree(caches[code.name], run_dir / "cache", symlinks=True)
                node = Node(code, str(run_dir / "store"), str(run_dir / "cache"), None, workdir)
                if case == "half":
                    node.run("branch", "delete", "data@junk")
                result = node.run(*gc_args)
                result["report"] = _report(result.pop("stdout"))
                log(f"packs/local {case} {code.name} #{rep + 1}: {result['wall_s']} s wall, "
                    f"{result['cpu_s']} s CPU, {result['maxrss_mb']} MB")
                out["local"]["runs"].setdefault(f"{case} {code.name}", []).append(result)
    shutil.rmtree(workdir / "packs-run", ignore_errors=True)
    shutil.rmtree(pristine, ignore_errors=True)

    if endpoint is None or proxy is None:
        return out
    # SeaweedFS: a store cannot be copied cheaply, so build one per deleting run.
    if s3_count < count:
        shutil.rmtree(files, ignore_errors=True)
        make_pack_files(files, s3_count)
    out["s3"] = {"builds": [], "runs": {}}

    def s3_build(tag: str) -> str:
        url = f"s3://{BUCKET}/packs-{tag}"
        log(f"packs/s3: building {url} from {s3_count} files")
        built = build_pack_store(url, str(workdir / f"s3-{tag}-builder"), files, endpoint)
        log(f"packs/s3: {built['packs']} packs in {built['build_s']} s")
        out["s3"]["builds"].append(built)
        return url

    def s3_gc(case: str, code: Code, url: str, tag: str) -> None:
        cache = workdir / f"s3-{tag}-{code.name}"
        if code is codes[-1]:
            cache = workdir / f"s3-{tag}-builder"
        node = Node(code, url, str(cache), proxy.endpoint, workdir)
        if not cache.exists():
            node.run("index", "rebuild")
        if case == "half":
            node.run("branch", "delete", "data@junk")
        proxy.take()
        result = node.run(*gc_args)
        result["report"] = _report(result.pop("stdout"))
        result["requests"] = proxy.take()
        log(f"packs/s3 {case} {code.name}: {result['wall_s']} s wall, {result['cpu_s']} s "
            f"CPU, {result['maxrss_mb']} MB, {result['requests']['total']} requests")
        out["s3"]["runs"].setdefault(f"{case} {code.name}", []).append(result)

    # Nothing to collect changes no data: every version runs on the same store. Then
    # each version deletes half of it, on a store of its own.
    first = s3_build("a")
    for code in codes:
        s3_gc("nothing", code, first, "a")
    for i, code in enumerate(codes):
        url = first if i == 0 else s3_build(f"b{i}")
        s3_gc("half", code, url, "a" if i == 0 else f"b{i}")
    shutil.rmtree(files, ignore_errors=True)
    return out


def _report(stdout: str) -> dict:
    try:
        return json.loads(stdout)
    except ValueError:
        return {"output": stdout[-500:]}


# ---------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------


def requests_table(results: dict, codes: list[Code]) -> list[str]:
    names = [c.name for c in codes]
    labels = [label for label in results[names[-1]] if label not in ("init", "repo create")]
    lines = []
    head = "| command | " + " | ".join(f"{op} ({'/'.join(n[0] for n in names)})"
                                       for op in OPS[:-1]) + " | total | wall s |"
    lines += [head, "|" + "---|" * (len(OPS) + 2)]
    for label in labels:
        cells = []
        for op in OPS[:-1]:
            cells.append(" / ".join(str(results[n].get(label, {}).get("by_op", {}).get(op, 0))
                                    if label in results[n] else "–" for n in names))
        total = " / ".join(str(results[n][label]["total"]) if label in results[n] else "–"
                           for n in names)
        wall = " / ".join(f"{results[n][label]['wall_s']:.2f}" if label in results[n] else "–"
                          for n in names)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {total} | {wall} |")
    return lines


def packs_table(results: dict) -> list[str]:
    lines = ["| store | case | code | packs (deleted) | wall s | CPU s | peak RSS MB | requests |",
             "|---|---|---|---|---|---|---|---|"]
    for where in ("local", "s3"):
        if where not in results:
            continue
        for key, runs in results[where]["runs"].items():
            case, code = key.split(" ")
            walls = sorted(r["wall_s"] for r in runs)
            cpus = sorted(r["cpu_s"] for r in runs)
            rss = max(r["maxrss_mb"] for r in runs)
            report = runs[-1]["report"]
            packs = f"{report.get('packs_total', '?')} ({report.get('packs_deleted', '?')})"
            mid = len(runs) // 2
            spread = f" ({walls[0]}–{walls[-1]})" if len(runs) > 1 else ""
            reqs = runs[-1].get("requests", {})
            req = ", ".join(f"{op} {n}" for op, n in sorted(reqs.get("by_op", {}).items()))
            lines.append(f"| {where} | {case} | {code} | {packs} | {walls[mid]}{spread} | "
                         f"{cpus[mid]} | {rss} | {req or '–'} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="1,000 packs instead of 10,000, one repetition")
    parser.add_argument("--only", default="", help="1/requests, 2/packs (comma-separated)")
    parser.add_argument("--before", default="/work/wt-gc-before",
                        help="source tree of the 'before' code (skipped if missing)")
    parser.add_argument("--workdir", default=os.path.join(HERE, "work", "gc"))
    parser.add_argument("--packs", type=int, help="files (= packs) on the local store")
    parser.add_argument("--s3-packs", type=int, help="files (= packs) on SeaweedFS")
    parser.add_argument("--repeat", type=int, help="runs of each local gc (median shown)")
    args = parser.parse_args()
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    wanted = {name for number, name in (("1", "requests"), ("2", "packs"))
              if not only or number in only or name in only}
    count = args.packs or (1000 if args.quick else 10000)
    s3_count = args.s3_packs or count
    repeat = args.repeat or (1 if args.quick else 3)
    # The store builders of benchmark 2 run in this process.
    os.environ.update({"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                       "AWS_DEFAULT_REGION": "us-east-1"})
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
        "packs": count, "s3_packs": s3_count, "repeat": repeat,
    }
    with seaweed(workdir) as (endpoint, proxy):
        results["seaweedfs"] = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "weed"), "version"],
            capture_output=True, text=True).stdout.strip()
        if "requests" in wanted:
            results["requests"] = bench_requests(codes, workdir, proxy, log)
        if "packs" in wanted:
            results["gc_packs"] = bench_packs(codes, workdir, count, s3_count, repeat,
                                              endpoint, proxy, log)
    lines = [f"gc protocol benchmark, {results['date']}; codes: "
             + ", ".join(f"{c.name} {c.commit}" for c in codes), ""]
    if "requests" in results:
        lines += ["S3 requests per command (" + " / ".join(c.name for c in codes) + "):", ""]
        lines += requests_table(results["requests"], codes) + [""]
    if "gc_packs" in results:
        lines += [f"gc --grace 0 --reflog-retention 0 over many packs (median of {repeat} "
                  "local runs):", ""]
        lines += packs_table(results["gc_packs"]) + [""]
    text = "\n".join(lines)
    print(text)
    (workdir / "gc-results.md").write_text(text + "\n")
    (workdir / "gc-results.json").write_text(json.dumps(results, indent=1) + "\n")
    log(f"results in {workdir}/gc-results.json and gc-results.md")


if __name__ == "__main__":
    main()
