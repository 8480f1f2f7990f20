#!/usr/bin/env python3
"""vfs benchmarks: every measurement is compared against a baseline taken in the same run.

Usage (from the project root)::

    .venv/bin/python benchmarks/run.py [--quick] [--only NAME[,NAME...]] [--workdir DIR]

Benchmarks (``--only`` accepts the number or the name):

  1 put       put+commit of 1 GiB of new random data vs ``cp && sync``; re-put through the
              files cache; re-put with the files cache bypassed (mtime touched)
  2 edits     store growth for three small edits in a 64 MiB file: vfs, restic, borg
  3 small     20,000 files of 1-8 KiB: put -r + commit vs ``cp -a && sync`` (files/s)
  4 cache     re-put of that tree after changing 1% of the files: vfs vs restic vs borg
  5 get       get of the 1 GiB commit vs ``cp && sync``
  6 versions  five versions of a changing dataset (source tree + big file): vfs/restic/borg
  7 memory    peak RSS of put and get of a 4 GiB file (fresh processes) vs restic/borg

``--quick`` divides the data sizes by about 8. Results: a table on stdout, and
``<workdir>/results.json`` and ``<workdir>/results.md``. Big files are deleted after
the benchmark that needs them; the work directory is left with only the results.

Every vfs measurement runs in a fresh subprocess (this script with ``--worker``) that
uses the Python API (``vfs.open_store``, ``vfs.put``, ``Store.commit``, ``vfs.get``). The
time reported for vfs is the time of the API calls inside that process (interpreter
start and ``import vfs`` excluded; the whole-process wall time is kept in the JSON as
``wall_s``). Peak memory is the child's ``ru_maxrss`` as returned by ``os.wait4``.
The page cache is dropped before every timed command when possible (root).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
BLOCK = 16 * MiB

BENCHMARKS = ["put", "edits", "small", "cache", "get", "versions", "memory"]
NUMBERS = {str(i + 1): name for i, name in enumerate(BENCHMARKS)}


# ---------------------------------------------------------------------------------------
# worker: runs vfs API steps in a fresh process and reports timings
# ---------------------------------------------------------------------------------------


def worker_main(spec_path: str, out_path: str) -> None:
    t0 = time.perf_counter()
    import vfs
    from vfs.errors import AlreadyExists, NothingToCommit

    t_import = time.perf_counter() - t0
    with open(spec_path) as f:
        steps = json.load(f)
    store = None
    report: list[dict] = []
    timed = 0.0
    for step in steps:
        do = step["do"]
        result: dict = {}
        start = time.perf_counter()
        if do == "open":
            store = vfs.open_store(step["store"], cache_dir=step["cache"],
                                   create=step.get("create", False))
        elif do == "create_repo":
            try:
                store.create_repo(step["repo"])
            except AlreadyExists:
                pass
        elif do == "put":
            r = vfs.put(store, step["repo"], step.get("branch", "main"), step["dest"],
                        step["sources"], recursive=step.get("recursive", False),
                        delete=step.get("delete", False))
            result = {"files": r.files, "read": r.read, "bytes_read": r.bytes_read,
                      "unchanged": r.unchanged, "staged": r.staged, "deleted": r.deleted,
                      "bytes_stored": r.bytes_stored}
        elif do == "commit":
            try:
                c = store.commit(step["repo"], step.get("branch", "main"),
                                 step.get("message", "bench"))
                result = {"commit": c.id, "files": c.files, "bytes": c.bytes}
            except NothingToCommit:
                result = {"commit": None, "nothing_to_commit": True}
        elif do == "get":
            r = vfs.get(store, vfs.parse_ref(step["spec"]), step["dest"])
            result = {"files": r.files, "bytes": r.bytes}
        elif do == "sync":
            os.sync()
        elif do == "close":
            store.close()
            store = None
        elif do == "size":
            pass
        else:
            raise SystemExit(f"unknown worker step {do}")
        elapsed = time.perf_counter() - start
        if do == "size":
            result = {"bytes": dir_size(step["path"])}
            elapsed = 0.0
        timed += elapsed
        report.append({"do": do, "t": elapsed, **result})
    if store is not None:
        start = time.perf_counter()
        store.close()
        timed += time.perf_counter() - start
    with open(out_path, "w") as f:
        json.dump({"t_import": t_import, "t_ops": timed, "steps": report}, f)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


@dataclass
class Record:
    bench: str
    metric: str
    value: float | None
    unit: str
    baseline: str = ""
    baseline_value: float | None = None
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Run:
    """Result of one timed child process."""

    wall_s: float
    maxrss_kib: int
    user_s: float
    sys_s: float
    out: dict = field(default_factory=dict)
    # Share of all CPUs busy with something other than the measured process during the
    # run (other users' work, but also kernel threads such as writeback).
    outside_cpu: float = 0.0

    @property
    def op_s(self) -> float:
        return self.out.get("t_ops", self.wall_s)

    def step(self, do: str, n: int = 0) -> dict:
        found = [s for s in self.out.get("steps", []) if s["do"] == do]
        return found[n]


class Ctx:
    def __init__(self, workdir: str, quick: bool, python: str, repeat: int = 5) -> None:
        self.repeat = repeat
        self.max_wait = 120.0  # seconds to wait for other processes to quiet down
        self.busy_waits = 0  # measurements started although others were busy
        self.workdir = workdir
        self.quick = quick
        self.python = python
        self.records: list[Record] = []
        self.notes: list[str] = []
        self.drop_ok: bool | None = None
        self.scale = 8 if quick else 1

    def size(self, full: int) -> int:
        return full // self.scale

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    def add(self, rec: Record) -> None:
        self.records.append(rec)
        print(f"  -> {format_record(rec)}", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def drop_caches(ctx: Ctx) -> bool:
    """sync and drop the page cache; remembers whether it works."""
    if ctx.drop_ok is False:
        os.sync()
        return False
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        ctx.drop_ok = True
    except OSError as exc:
        ctx.drop_ok = False
        ctx.note(f"cannot drop the page cache ({exc}): timings are with a warm cache")
    return ctx.drop_ok


# A tiny launcher between this script and every measured command. Linux carries the
# peak RSS of a process over exec (and this script may be large: it generates data),
# so a command started directly from here would report at least our own peak; the
# launcher is small (python -S) and reports wait4() of exactly its child.
_LAUNCHER = """
import json, os, sys, time
res, argv = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - start
code = os.waitstatus_to_exitcode(status)
with open(res, "w") as f:
    json.dump({"wall": wall, "maxrss": ru.ru_maxrss, "utime": ru.ru_utime,
               "stime": ru.ru_stime, "code": code}, f)
sys.exit(0 if code == 0 else 1)
"""


def run_cmd(ctx: Ctx, argv: list[str] | str, *, drop: bool = True, env: dict | None = None,
            cwd: str | None = None) -> Run:
    """Run a command in a fresh process; wall time and rusage of exactly that process."""
    if isinstance(argv, str):
        argv = ["sh", "-c", argv]
    if drop:
        drop_caches(ctx)
    else:
        os.sync()  # no writeback of earlier commands inside the measurement
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    fd, res = tempfile.mkstemp(prefix="rusage-", suffix=".json", dir=ctx.workdir)
    os.close(fd)
    wait_quiet(ctx)
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            busy0 = cpu_busy_seconds()
            proc = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, res, *argv],
                                  stdout=out, stderr=err, env=full_env, cwd=cwd)
            busy1 = cpu_busy_seconds()
            if proc.returncode != 0:
                err.seek(0)
                out.seek(0)
                raise RuntimeError(f"command failed: {argv}\n"
                                   f"{out.read()[-2000:].decode(errors='replace')}\n"
                                   f"{err.read()[-4000:].decode(errors='replace')}")
        with open(res) as f:
            r = json.load(f)
    finally:
        os.unlink(res)
    outside = (busy1 - busy0) - (r["utime"] + r["stime"])
    share = max(0.0, outside) / (r["wall"] * (os.cpu_count() or 1)) if r["wall"] > 0 else 0.0
    return Run(r["wall"], r["maxrss"], r["utime"], r["stime"], outside_cpu=round(share, 3))


def cpu_busy_seconds() -> float:
    """CPU-seconds spent busy by the whole machine since boot (from /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_quiet(ctx: Ctx, threshold: float = 0.10, max_wait: float = 120.0) -> None:
    """Wait (up to ``max_wait`` s) until other processes use < ``threshold`` of the CPUs."""
    if ctx.max_wait <= 0:
        return
    start = time.monotonic()
    while True:
        busy = other_cpu_busy(0.5)
        if busy < threshold:
            return
        if time.monotonic() - start > min(max_wait, ctx.max_wait):
            ctx.busy_waits += 1
            return


def run_vfs(ctx: Ctx, steps: list[dict], *, drop: bool = True) -> Run:
    """Run vfs API steps in a fresh worker process."""
    fd, spec = tempfile.mkstemp(prefix="spec-", suffix=".json", dir=ctx.workdir)
    with os.fdopen(fd, "w") as f:
        json.dump(steps, f)
    out_path = spec[:-5] + "-out.json"
    try:
        run = run_cmd(ctx, [ctx.python, os.path.abspath(__file__), "--worker", spec, out_path],
                      drop=drop, cwd=ROOT)
        with open(out_path) as f:
            run.out = json.load(f)
    finally:
        for p in (spec, out_path):
            if os.path.exists(p):
                os.unlink(p)
    return run


def median_run(runs: list[Run]) -> Run:
    """The run with the median time (runs are ordered by the time that matters)."""
    ordered = sorted(runs, key=lambda r: r.op_s)
    return ordered[(len(ordered) - 1) // 2]


def times(runs: list[Run]) -> list[float]:
    return [round(r.op_s, 4) for r in runs]


def outside(runs: list[Run]) -> list[float]:
    """Per run, the share of the CPUs used by other processes (see Run.outside_cpu)."""
    return [r.outside_cpu for r in runs]


def read_tree(path: str) -> None:
    """Read every file below ``path`` (to warm the page cache)."""
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                while f.read(BLOCK):
                    pass


def pair_ratios(runs: list[Run], baselines: list[Run]) -> list[float]:
    """vfs time / baseline time of each alternating pair."""
    return [round(r.op_s / b.wall_s, 3) for r, b in zip(runs, baselines, strict=True)]


def dir_size(path: str) -> int:
    """Sum of the apparent sizes of the regular files below ``path``."""
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            if not os.path.islink(os.path.join(dirpath, name)):
                total += st.st_size
    return total


def rmtree(path: str) -> None:
    if os.path.lexists(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


def random_bytes(seed: str, n: int, offset: int = 0) -> bytes:
    """Deterministic pseudo-random bytes (BLAKE3 XOF, several GB/s)."""
    import blake3

    return blake3.blake3(seed.encode()).digest(n, seek=offset)


def gen_random_file(path: str, size: int, seed: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        done = 0
        while done < size:
            n = min(BLOCK, size - done)
            f.write(random_bytes(seed, n, done))
            done += n


def file_hash(path: str) -> str:
    import blake3

    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    h.update_mmap(path)
    return h.hexdigest()


def apply_edits(path: str, edits: list[tuple[int, str, int]], seed: str) -> None:
    """Apply non-overlapping edits (offset in the old file, op, length) by rewriting the file.

    op is "insert" (n new bytes before offset), "overwrite" (n bytes from offset) or
    "delete" (n bytes from offset). New bytes are pseudo-random.
    """
    tmp = path + ".edit"
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        pos = 0
        for i, (off, op, n) in enumerate(sorted(edits)):
            _copy(src, dst, off - pos)
            pos = off
            if op in ("insert", "overwrite"):
                dst.write(random_bytes(f"{seed}/{i}", n))
            if op in ("overwrite", "delete"):
                src.seek(n, os.SEEK_CUR)
                pos += n
        _copy(src, dst, -1)
    st = os.stat(path)
    os.chmod(tmp, st.st_mode)
    os.replace(tmp, path)


def _copy(src, dst, n: int) -> None:
    while n != 0:
        data = src.read(BLOCK if n < 0 else min(BLOCK, n))
        if not data:
            if n > 0:
                raise ValueError("edit beyond the end of the file")
            return
        dst.write(data)
        if n > 0:
            n -= len(data)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_value(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "B":
        return fmt_bytes(v)
    if unit == "s":
        return f"{v:.3f} s" if v < 10 else f"{v:.1f} s"
    if unit in ("files/s", "MB/s"):
        return f"{v:,.0f} {unit}"
    if unit == "MB":
        return f"{v:.0f} MB"
    return f"{v:.3g} {unit}"


def format_record(r: Record) -> str:
    met = {True: "met", False: "NOT met", None: ""}[r.met]
    ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
    base = f" | {r.baseline}: {fmt_value(r.baseline_value, r.unit)}" if r.baseline else ""
    tgt = f" | target {r.target} {met}" if r.target else ""
    return f"{r.metric}: {fmt_value(r.value, r.unit)}{base} | ratio {ratio}{tgt}"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def code_fingerprint() -> str:
    """BLAKE3 of every vfs/*.py (the code each fresh worker process will import).

    Other people may edit vfs/ while the benchmarks run; the results name the code
    they measured, and the run notes when it changed in the middle.
    """
    import blake3

    h = blake3.blake3()
    pkg = os.path.join(ROOT, "vfs")
    for dirpath, dirnames, filenames in os.walk(pkg):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                h.update(os.path.relpath(path, pkg).encode() + b"\0")
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()[:16]


def git_state() -> str:
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "vfs"],
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"
    return head + ("+uncommitted changes in vfs/" if dirty else "")


def other_cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over ``seconds`` while this script idles (others' load)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    total = total1 - total0
    return 1.0 - (idle1 - idle0) / total if total > 0 else 0.0


def machine_info(workdir: str) -> dict:
    info: dict = {"nproc": os.cpu_count(), "platform": platform.platform(),
                  "python": sys.version.split()[0]}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    info["ram_gib"] = round(int(line.split()[1]) / (1024 * 1024), 1)
    except OSError:
        pass
    try:
        df = subprocess.run(["df", "-h", "--output=source,fstype,size,avail", workdir],
                            capture_output=True, text=True, check=True).stdout
        info["disk"] = " ".join(df.strip().splitlines()[-1].split())
    except (OSError, subprocess.CalledProcessError):
        pass
    for tool, argv in (("restic", ["restic", "version"]), ("borg", ["borg", "--version"])):
        try:
            info[tool] = subprocess.run(argv, capture_output=True, text=True,
                                        check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            info[tool] = None
    try:
        from importlib.metadata import version

        import vfs  # noqa: F401

        info["vfs"] = version("vfs")
        info["deps"] = {d: version(d) for d in ("blake3", "zstandard", "pyfastcdc", "lmdb")}
    except Exception:  # noqa: BLE001
        pass
    return info


# ---------------------------------------------------------------------------------------
# restic / borg
# ---------------------------------------------------------------------------------------


class Restic:
    name = "restic"

    def __init__(self, ctx: Ctx, repo: str) -> None:
        self.ctx = ctx
        self.repo = repo
        self.cache = repo + ".cache"
        self.env = {"RESTIC_PASSWORD": "benchmark", "RESTIC_CACHE_DIR": self.cache}

    def init(self) -> None:
        # restic >= 0.17 can go without a password; older ones always encrypt.
        help_text = subprocess.run(["restic", "init", "--help"], capture_output=True,
                                   text=True).stdout
        argv = ["restic", "-r", self.repo, "init", "-q"]
        env = self.env
        if "--insecure-no-password" in help_text:
            argv.append("--insecure-no-password")
            env = {"RESTIC_CACHE_DIR": self.cache}
            self.env = env
        run_cmd(self.ctx, argv, drop=False, env=env)

    def backup(self, path: str, *, drop: bool = True) -> Run:
        return run_cmd(self.ctx, ["restic", "-r", self.repo, "backup", "-q", path],
                       drop=drop, env=self.env)

    def restore(self, target: str, *, drop: bool = True) -> Run:
        return run_cmd(self.ctx, ["restic", "-r", self.repo, "restore", "latest", "-q",
                                  "--target", target], drop=drop, env=self.env)

    def size(self) -> int:
        return dir_size(self.repo)

    def remove(self) -> None:
        rmtree(self.repo)
        rmtree(self.cache)


class Borg:
    name = "borg"

    def __init__(self, ctx: Ctx, repo: str) -> None:
        self.ctx = ctx
        self.repo = repo
        self.base = repo + ".base"
        self.env = {"BORG_BASE_DIR": self.base,
                    "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
                    "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes", "BORG_PASSPHRASE": ""}
        self.n = 0

    def init(self) -> None:
        run_cmd(self.ctx, ["borg", "init", "-e", "none", self.repo], drop=False, env=self.env)

    def backup(self, path: str, *, drop: bool = True) -> Run:
        self.n += 1
        return run_cmd(self.ctx, ["borg", "create", f"{self.repo}::a{self.n}", path],
                       drop=drop, env=self.env)

    def restore(self, target: str, *, drop: bool = True) -> Run:
        os.makedirs(target, exist_ok=True)
        return run_cmd(self.ctx, ["borg", "extract", f"{self.repo}::a{self.n}"],
                       drop=drop, env=self.env, cwd=target)

    def size(self) -> int:
        return dir_size(self.repo)

    def remove(self) -> None:
        rmtree(self.repo)
        rmtree(self.base)


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


# ---------------------------------------------------------------------------------------
# fixtures shared by benchmarks
# ---------------------------------------------------------------------------------------


def vfs_open(store: str, cache: str, create: bool = False) -> list[dict]:
    steps = [{"do": "open", "store": store, "cache": cache, "create": create}]
    if create:
        steps.append({"do": "create_repo", "repo": "bench"})
    return steps


def vfs_create(ctx: Ctx, store: str, cache: str) -> None:
    """A fresh, empty store with the repository ``bench`` (not timed)."""
    rmtree(store)
    rmtree(cache)
    run_vfs(ctx, vfs_open(store, cache, True), drop=False)


def vfs_put(dest: str, sources: list[str], *, recursive: bool = False,
            delete: bool = False) -> dict:
    return {"do": "put", "repo": "bench", "dest": dest, "sources": sources,
            "recursive": recursive, "delete": delete}


COMMIT = {"do": "commit", "repo": "bench", "message": "bench"}


class BigFixture:
    """A 1 GiB random file and a vfs store holding it in one commit (benchmarks 1 and 5)."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.dir = ctx.path("big")
        self.file = os.path.join(self.dir, "src.bin")
        self.store = os.path.join(self.dir, "store")
        self.cache = os.path.join(self.dir, "cache")
        self.size = ctx.size(GiB)
        self.committed = False

    def make_file(self) -> None:
        if not os.path.exists(self.file):
            log(f"generating {fmt_bytes(self.size)} of random data")
            gen_random_file(self.file, self.size, "big")

    def put(self, warm: bool = False) -> Run:
        """A fresh store, then (timed) open + put + commit of the file."""
        self.make_file()
        vfs_create(self.ctx, self.store, self.cache)
        if warm:
            read_tree(self.dir)
        run = run_vfs(self.ctx, [*vfs_open(self.store, self.cache),
                                 vfs_put("/big.bin", [self.file]), COMMIT], drop=not warm)
        self.committed = True
        return run

    def ensure_committed(self) -> None:
        if not self.committed:
            self.put()

    def cp(self, warm: bool = False) -> Run:
        dest = os.path.join(self.dir, "cp.bin")
        rmtree(dest)
        if warm:
            read_tree(self.dir)
        run = run_cmd(self.ctx, f"cp {self.file} {dest} && sync", drop=not warm)
        rmtree(dest)
        return run

    def remove(self) -> None:
        rmtree(self.dir)
        self.committed = False


class TreeFixture:
    """20,000 small files in 20 dirs, put into vfs, restic and borg (benchmarks 3 and 4)."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.dir = ctx.path("tree")
        self.tree = os.path.join(self.dir, "data")
        self.store = os.path.join(self.dir, "store")
        self.cache = os.path.join(self.dir, "cache")
        self.count = ctx.size(20000)
        self.files: list[str] = []
        self.ready = False
        self.changes = 0
        self.restic = Restic(ctx, os.path.join(self.dir, "restic")) if have("restic") else None
        self.borg = Borg(ctx, os.path.join(self.dir, "borg")) if have("borg") else None

    def generate(self) -> int:
        rng = random.Random(3)
        sizes = [rng.randint(1 * KiB, 8 * KiB) for _ in range(self.count)]
        data = random_bytes("tree", sum(sizes))
        pos = 0
        for i, size in enumerate(sizes):
            d = os.path.join(self.tree, f"d{i % 20:02d}")
            if i < 20:
                os.makedirs(d, exist_ok=True)
            p = os.path.join(d, f"f{i:05d}.bin")
            with open(p, "wb") as f:
                f.write(data[pos:pos + size])
            pos += size
            self.files.append(p)
        return pos

    def setup(self, record: bool) -> None:
        """Generate the tree and ingest it everywhere (timed; recorded if ``record``)."""
        if self.ready:
            return
        ctx = self.ctx
        rmtree(self.dir)
        os.makedirs(self.dir)
        log(f"generating {self.count} files")
        total = self.generate()
        n = self.count
        reps = ctx.repeat if record else 1

        cp_dest = os.path.join(self.dir, "cp")
        for warm in ((False, True) if record else (False,)):
            label = "warm cache" if warm else "cold cache"
            cps, cps_nosync, runs = [], [], []
            log(f"cp -a baseline and vfs put -r + commit ({label}), alternating (x{reps}, "
                "fresh store each)")
            # Copies are deleted only after the warm runs: ext4 scans past recently
            # deleted inodes whose inode-table blocks are cached (recently_deleted() in
            # __ext4_new_inode), which made a warm `cp -a` right after an `rm -rf` of
            # 20,000 files 10x slower. The page-cache drop of the cold runs avoids it.
            copies = []
            for _ in range(reps):
                if record:
                    for sync, out in ((True, cps), (False, cps_nosync)):
                        dest = f"{cp_dest}{len(copies)}"
                        copies.append(dest)
                        if warm:
                            read_tree(self.tree)
                        out.append(run_cmd(ctx, f"cp -a {self.tree} {dest}"
                                           + (" && sync" if sync else ""), drop=not warm))
                        if not warm:
                            rmtree(dest)
                vfs_create(ctx, self.store, self.cache)
                if warm:
                    read_tree(self.tree)
                runs.append(run_vfs(ctx, [*vfs_open(self.store, self.cache),
                                          vfs_put("/data", [self.tree], recursive=True),
                                          COMMIT], drop=not warm))
            for dest in copies:
                rmtree(dest)
            if not record:
                continue
            run = median_run(runs)
            cp = median_run(cps)
            if not warm:
                cold_cp = cp
            put = run.step("put")
            ctx.add(Record(
                "3-small", f"put -r + commit of {n} files of 1-8 KiB ({label})",
                n / run.op_s, "files/s", "cp -a && sync", n / cp.wall_s,
                ratio(n / run.op_s, n / cp.wall_s), ">= 10,000 files/s", n / run.op_s >= 10000,
                {"vfs_s": run.op_s, "vfs_runs_s": times(runs), "vfs_outside_cpu": outside(runs),
                 "vfs_wall_s": run.wall_s,
                 "vfs_put_s": put["t"], "vfs_commit_s": run.step("commit")["t"],
                 "cp_s": cp.wall_s, "cp_runs_s": times(cps), "cp_outside_cpu": outside(cps),
                 "cp_nosync_runs_s": times(cps_nosync), "bytes": total,
                 "store_bytes": dir_size(self.store), "files_read": put["read"],
                 "user_s": run.user_s, "sys_s": run.sys_s, "maxrss_kib": run.maxrss_kib}))
        for tool in (self.restic, self.borg):
            if tool is None:
                continue
            log(f"{tool.name} initial backup")
            tool.init()
            r = tool.backup(self.tree)
            if record:
                ctx.add(Record(
                    "3-small", f"{tool.name} initial backup of the same files (cold cache)",
                    n / r.wall_s, "files/s", "cp -a && sync", n / cold_cp.wall_s,
                    ratio(n / r.wall_s, n / cold_cp.wall_s), "", None,
                    {"s": r.wall_s, "repo_bytes": tool.size(), "maxrss_kib": r.maxrss_kib}))
        self.ready = True

    def change(self, count: int) -> list[str]:
        """Rewrite ``count`` files (not changed before) with new random bytes of the same size."""
        self.changes += 1
        rng = random.Random(100 + self.changes)
        chosen = rng.sample(self.files, count)
        for i, p in enumerate(chosen):
            size = os.path.getsize(p)
            with open(p, "wb") as f:
                f.write(random_bytes(f"change/{self.changes}/{i}", size))
        return chosen

    def remove(self) -> None:
        rmtree(self.dir)
        self.ready = False


# ---------------------------------------------------------------------------------------
# benchmarks
# ---------------------------------------------------------------------------------------


def bench_put(ctx: Ctx, fx: dict) -> None:
    big: BigFixture = fx["big"]
    big.make_file()
    size = big.size
    reps = ctx.repeat
    # Baseline and vfs alternate, so that both see the same state of a noisy (virtual) disk.
    log(f"cp baseline and vfs put+commit of {fmt_bytes(size)} of new data, alternating "
        f"(x{reps}, fresh store each)")
    cps, runs = [], []
    for _ in range(reps):
        cps.append(big.cp())
        runs.append(big.put())
    cp_run = median_run(cps)
    cp = cp_run.wall_s
    run = median_run(runs)
    put = run.step("put")
    ctx.add(Record(
        "1-put", f"put+commit {fmt_bytes(size)} new random data", run.op_s, "s",
        "cp && sync", cp, ratio(run.op_s, cp), "<= 1.5x cp", run.op_s <= 1.5 * cp,
        {"vfs_runs_s": times(runs), "vfs_outside_cpu": outside(runs),
         "vfs_wall_s": run.wall_s, "put_s": put["t"],
         "commit_s": run.step("commit")["t"], "MB_per_s": size / run.op_s / 1e6,
         "cp_runs_s": times(cps), "cp_outside_cpu": outside(cps),
         "pair_ratios": pair_ratios(runs, cps),
         "bytes_stored": put["bytes_stored"],
         "store_bytes": dir_size(big.store), "user_s": run.user_s, "sys_s": run.sys_s,
         "maxrss_kib": run.maxrss_kib}))

    log(f"warm page cache: cp baseline and vfs put+commit, alternating (x{reps})")
    wcps, wruns = [], []
    for _ in range(reps):
        wcps.append(big.cp(warm=True))
        wruns.append(big.put(warm=True))
    wcp = median_run(wcps).wall_s
    wrun = median_run(wruns)
    ctx.add(Record(
        "1-put", f"put+commit {fmt_bytes(size)} new random data (warm cache)", wrun.op_s, "s",
        "cp && sync", wcp, ratio(wrun.op_s, wcp), "<= 1.5x cp", wrun.op_s <= 1.5 * wcp,
        {"vfs_runs_s": times(wruns), "vfs_outside_cpu": outside(wruns), "cp_runs_s": times(wcps),
         "cp_outside_cpu": outside(wcps),
         "pair_ratios": pair_ratios(wruns, wcps), "MB_per_s": size / wrun.op_s / 1e6,
         "user_s": wrun.user_s, "sys_s": wrun.sys_s, "maxrss_kib": wrun.maxrss_kib}))

    log(f"re-put of the unchanged file (new store handle, files cache) (x{reps})")
    runs = [run_vfs(ctx, [*vfs_open(big.store, big.cache), vfs_put("/big.bin", [big.file]),
                          COMMIT]) for _ in range(reps)]
    run = median_run(runs)
    put = run.step("put")
    ctx.add(Record(
        "1-put", "re-put unchanged file (files cache) + commit", run.op_s, "s",
        "cp && sync", cp, ratio(run.op_s, cp), "< cp", run.op_s < cp,
        {"vfs_runs_s": times(runs), "vfs_outside_cpu": outside(runs),
         "vfs_wall_s": run.wall_s, "files_read": put["read"],
         "unchanged": put["unchanged"], "bytes_read": put["bytes_read"],
         "maxrss_kib": run.maxrss_kib}))

    for warm in (False, True):
        label = "warm cache" if warm else "cold cache"
        log(f"re-put with the files cache bypassed (mtime touched, {label}) (x{reps})")
        runs = []
        for _ in range(reps):
            now = time.time_ns()
            os.utime(big.file, ns=(now, now))
            if warm:
                with open(big.file, "rb") as f:
                    while f.read(BLOCK):
                        pass
            runs.append(run_vfs(ctx, [*vfs_open(big.store, big.cache),
                                      vfs_put("/big.bin", [big.file]), COMMIT], drop=not warm))
        run = median_run(runs)
        put = run.step("put")
        ctx.add(Record(
            "1-put", f"re-put touched file (re-read+hash, dedup, {label}) + commit", run.op_s,
            "s", "cp && sync", cp, ratio(run.op_s, cp), "", None,
            {"vfs_runs_s": times(runs), "vfs_outside_cpu": outside(runs), "vfs_wall_s": run.wall_s,
             "read_MB_per_s": size / put["t"] / 1e6, "files_read": put["read"],
             "bytes_stored": put["bytes_stored"], "user_s": run.user_s, "sys_s": run.sys_s,
             "maxrss_kib": run.maxrss_kib}))


def bench_get(ctx: Ctx, fx: dict) -> None:
    big: BigFixture = fx["big"]
    big.ensure_committed()
    out = os.path.join(big.dir, "out")
    reps = ctx.repeat
    log(f"cp baseline and vfs get of the {fmt_bytes(big.size)} commit into a fresh dir "
        f"(+ sync), alternating (x{reps})")
    runs, cps = [], []
    for _ in range(reps):
        cps.append(big.cp())
        rmtree(out)
        os.makedirs(out)
        runs.append(run_vfs(ctx, [*vfs_open(big.store, big.cache),
                                  {"do": "get", "spec": "bench@main:/big.bin", "dest": out},
                                  {"do": "sync"}]))
    # Verified once, after the timed runs: hashing 2 GiB between the pairs (through mmap)
    # made the next cp measurably slower on the VM this was written on.
    ok = file_hash(os.path.join(out, "big.bin")) == file_hash(big.file)
    rmtree(out)
    cp = median_run(cps).wall_s
    run = median_run(runs)
    if not ok:
        ctx.note("get produced a file that differs from the original!")
    ctx.add(Record(
        "5-get", f"get {fmt_bytes(big.size)} file into a fresh dir + sync", run.op_s, "s",
        "cp && sync", cp, ratio(run.op_s, cp), "<= 1.5x cp", run.op_s <= 1.5 * cp and ok,
        {"vfs_runs_s": times(runs), "vfs_outside_cpu": outside(runs),
         "vfs_wall_s": run.wall_s, "get_s": run.step("get")["t"],
         "sync_s": run.step("sync")["t"], "cp_runs_s": times(cps), "cp_outside_cpu": outside(cps),
         "pair_ratios": pair_ratios(runs, cps),
         "MB_per_s": big.size / run.op_s / 1e6, "identical": ok, "user_s": run.user_s,
         "sys_s": run.sys_s, "maxrss_kib": run.maxrss_kib}))


def bench_edits(ctx: Ctx, fx: dict) -> None:
    base = ctx.path("edits")
    rmtree(base)
    size = ctx.size(64 * MiB)
    src_dir = os.path.join(base, "src")
    src = os.path.join(src_dir, "data.bin")
    gen_random_file(src, size, "edits")
    original = src + ".orig"
    shutil.copyfile(src, original)
    edits = [("insert 100 B", (int(size * 0.15), "insert", 100)),
             ("overwrite 4 KiB", (int(size * 0.50), "overwrite", 4 * KiB)),
             ("delete 4 KiB", (int(size * 0.85), "delete", 4 * KiB))]

    def scenario(ingest, store_size) -> list[int]:
        shutil.copyfile(original, src)
        ingest()
        sizes = [store_size()]
        for i, (_, edit) in enumerate(edits):
            apply_edits(src, [edit], f"edit{i}")
            ingest()
            sizes.append(store_size())
        return sizes

    results: dict[str, list[int]] = {}
    store = os.path.join(base, "store")
    cache = os.path.join(base, "cache")
    vfs_create(ctx, store, cache)

    def vfs_ingest() -> None:
        run_vfs(ctx, [*vfs_open(store, cache), vfs_put("/data.bin", [src]), COMMIT])

    log("vfs: original + 3 edits")
    results["vfs"] = scenario(vfs_ingest, lambda: dir_size(store))
    for cls in (Restic, Borg):
        if not have(cls.name):
            ctx.note(f"{cls.name} is not installed: no {cls.name} comparison")
            continue
        tool = cls(ctx, os.path.join(base, cls.name))
        tool.init()
        log(f"{tool.name}: original + 3 edits")
        results[tool.name] = scenario(lambda t=tool: t.backup(src_dir), tool.size)
        tool.remove()

    growth = {k: [v[i + 1] - v[i] for i in range(3)] for k, v in results.items()}
    for i, (label, _) in enumerate(edits):
        for tool in ("restic", "borg"):
            if tool in growth:
                ctx.add(Record("2-edits", f"store growth: {label} (vs {tool})", growth["vfs"][i],
                               "B", tool, growth[tool][i], ratio(growth["vfs"][i],
                                                                 growth[tool][i]),
                               "", None, {}))
    total = {k: sum(v) for k, v in growth.items()}
    # The growth is bounded by the chunk size, not the file size: same target with --quick.
    target = 10 * MiB
    extra = {"sizes_after_each_step": results, "growth_per_edit": growth, "file_size": size}
    for tool in ("restic", "borg"):
        if tool in total:
            ctx.add(Record("2-edits", f"store growth: 3 edits total (vs {tool})", total["vfs"],
                           "B", tool, total[tool], ratio(total["vfs"], total[tool]),
                           f"< {fmt_bytes(target)}", total["vfs"] < target, extra))
    if not any(t in total for t in ("restic", "borg")):
        ctx.add(Record("2-edits", "store growth: 3 edits total", total["vfs"], "B", "", None,
                       None, f"< {fmt_bytes(target)}", total["vfs"] < target, extra))
    rmtree(base)


def bench_small(ctx: Ctx, fx: dict) -> None:
    fx["tree"].setup(record=True)


def bench_cache(ctx: Ctx, fx: dict) -> None:
    tree: TreeFixture = fx["tree"]
    tree.setup(record=False)
    n = max(1, tree.count // 100)
    tools = [t for t in (tree.restic, tree.borg) if t is not None]
    for warm in (False, True):
        label = "warm cache" if warm else "cold cache"
        log(f"re-put after changing {n} of {tree.count} files ({label}), "
            f"then {', '.join(t.name for t in tools)} (x{ctx.repeat})")
        runs: list[Run] = []
        others: dict[str, list[Run]] = {t.name: [] for t in tools}
        for _ in range(ctx.repeat):
            tree.change(n)
            runs.append(run_vfs(ctx, [*vfs_open(tree.store, tree.cache),
                                      vfs_put("/data", [tree.tree], recursive=True), COMMIT],
                                drop=not warm))
            read = runs[-1].step("put")["read"]
            if read != n:
                ctx.note(f"vfs re-put read {read} files, expected {n}")
            for tool in tools:
                others[tool.name].append(tool.backup(tree.tree, drop=not warm))
        run = median_run(runs)
        put = run.step("put")
        extra = {"vfs_runs_s": times(runs), "vfs_outside_cpu": outside(runs),
                 "vfs_wall_s": run.wall_s, "put_s": put["t"],
                 "commit_s": run.step("commit")["t"], "files_read": put["read"],
                 "unchanged": put["unchanged"], "staged": put["staged"],
                 "maxrss_kib": run.maxrss_kib,
                 **{f"{k}_runs_s": times(v) for k, v in others.items()},
                 **{f"{k}_outside_cpu": outside(v) for k, v in others.items()}}
        metric = f"re-put {tree.count} files, {n} changed, + commit ({label})"
        if not others:
            ctx.add(Record("4-cache", metric, run.op_s, "s", "", None, None, "< 0.5 s",
                           run.op_s < 0.5, extra))
        for name, oruns in others.items():
            other = median_run(oruns).wall_s
            ctx.add(Record("4-cache", f"{metric} vs {name}", run.op_s, "s", f"{name} backup",
                           other, ratio(run.op_s, other), "< 0.5 s", run.op_s < 0.5, extra))


def _source_files(limit: int) -> list[tuple[str, str]]:
    """(absolute path, relative destination) of ~limit bytes of real source-like files."""
    roots = [f"/usr/lib/python{sys.version_info.major}.{sys.version_info.minor}",
             os.path.join(sys.prefix, "lib", f"python{sys.version_info.major}."
                          f"{sys.version_info.minor}", "site-packages")]
    out: list[tuple[str, str]] = []
    total = 0
    for n, root in enumerate(roots):
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames
                                 if d not in ("__pycache__", "site-packages", "dist-packages"))
            for name in sorted(filenames):
                p = os.path.join(dirpath, name)
                if os.path.islink(p) or not os.path.isfile(p) or name.endswith((".pyc", ".so")):
                    continue
                size = os.path.getsize(p)
                if size > 4 * MiB:
                    continue
                out.append((p, os.path.join(f"r{n}", os.path.relpath(p, root))))
                total += size
                if total >= limit:
                    return out
    return out


def _mutate_tree(src: str, version: int, big_file: str, big_size: int) -> dict:
    """One new version: ~5% of files modified, ~1% added, ~1% deleted; 9 edits in big file."""
    rng = random.Random(1000 + version)
    files = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames))
    n_mod = max(1, len(files) * 5 // 100)
    n_add = max(1, len(files) // 100)
    n_del = max(1, len(files) // 100)
    picked = rng.sample(files, n_mod + n_del)
    modified, deleted = picked[:n_mod], picked[n_mod:]
    for i, p in enumerate(modified):
        with open(p, "rb") as f:
            data = f.read()
        line = (f"# v{version} edit {i}: " + random_bytes(f"v{version}/{i}", 24).hex()
                + "\n").encode()
        kind = rng.randrange(3)
        pos = rng.randrange(len(data) + 1)
        if kind == 0:  # insert a line
            data = data[:pos] + line + data[pos:]
        elif kind == 1:  # replace a span
            data = data[:pos] + line + data[pos + rng.randint(10, 400):]
        else:  # append
            data = data + line * rng.randint(1, 20)
        with open(p, "wb") as f:
            f.write(data)
    for i in range(n_add):
        template = rng.choice(files)
        if template in deleted or not os.path.exists(template):
            continue
        with open(template, "rb") as f:
            data = f.read()
        header = f"# added in version {version}, file {i}\n".encode()
        new = os.path.join(os.path.dirname(template), f"added_v{version}_{i}.py")
        with open(new, "wb") as f:
            f.write(header + data[::-1] if rng.random() < 0.5 else header + data)
    for p in deleted:
        os.unlink(p)
    # 9 small edits to the big file, at distinct places.
    slots = sorted(rng.sample(range(9 * 64), 9))
    edits = []
    for j, slot in enumerate(slots):
        off = slot * (big_size // (9 * 64 + 1)) + rng.randrange(64 * KiB)
        op = ("insert", "overwrite", "delete")[j % 3]
        edits.append((off, op, rng.choice((1, 100, 4 * KiB)) if op == "insert" else 4 * KiB))
    apply_edits(big_file, edits, f"big/v{version}")
    return {"modified": n_mod, "added": n_add, "deleted": n_del, "big_edits": len(edits)}


def bench_versions(ctx: Ctx, fx: dict) -> None:
    base = ctx.path("versions")
    rmtree(base)
    data = os.path.join(base, "data")
    src = os.path.join(data, "src")
    big_file = os.path.join(data, "big.bin")
    tree_bytes = ctx.size(40 * MiB)
    big_size = 128 * MiB if ctx.quick else 512 * MiB
    log(f"building the dataset: {fmt_bytes(tree_bytes)} of source files + "
        f"{fmt_bytes(big_size)} random file")
    sources = _source_files(tree_bytes)
    for path, rel in sources:
        dest = os.path.join(src, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(path, dest)
    gen_random_file(big_file, big_size, "versions-big")
    initial_files = len(sources)
    initial_bytes = dir_size(src)

    store = os.path.join(base, "store")
    cache = os.path.join(base, "cache")
    tools: dict[str, object] = {}
    for cls in (Restic, Borg):
        if have(cls.name):
            tool = cls(ctx, os.path.join(base, cls.name))
            tool.init()
            tools[cls.name] = tool
        else:
            ctx.note(f"{cls.name} is not installed: no {cls.name} comparison")
    names = ["vfs", *tools]
    secs: dict[str, list[float]] = {k: [] for k in names}
    big_added: dict[str, list[int]] = {k: [] for k in names}
    total_added: dict[str, list[int]] = {k: [] for k in names}
    changes = []
    for version in range(1, 6):
        if version > 1:
            changes.append(_mutate_tree(src, version, big_file, big_size))
        log(f"version {version}: vfs")
        before = dir_size(store)
        if version == 1:
            vfs_create(ctx, store, cache)
        run = run_vfs(ctx, [*vfs_open(store, cache),
                            vfs_put("/src", [src], recursive=True, delete=True),
                            {"do": "size", "path": store},
                            vfs_put("/big.bin", [big_file]),
                            {"do": "size", "path": store}, COMMIT])
        after = dir_size(store)
        secs["vfs"].append(run.op_s)
        big_added["vfs"].append(run.step("size", 1)["bytes"] - run.step("size", 0)["bytes"])
        total_added["vfs"].append(after - before)
        for name, tool in tools.items():
            log(f"version {version}: {name}")
            before = tool.size()
            r1 = tool.backup(src)
            mid = tool.size()
            r2 = tool.backup(big_file)
            after = tool.size()
            secs[name].append(r1.wall_s + r2.wall_s)
            big_added[name].append(after - mid)
            total_added[name].append(after - before)
    final = {"vfs": dir_size(store), **{k: t.size() for k, t in tools.items()}}

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    extra = {"seconds_per_version": secs, "bytes_added_per_version": total_added,
             "big_file_bytes_added_per_version": big_added, "final_store_bytes": final,
             "tree_files": initial_files, "tree_bytes": initial_bytes, "big_file": big_size,
             "changes_per_version": changes}
    for name in tools:
        ctx.add(Record("6-versions", f"first version ingest (vs {name})", secs["vfs"][0], "s",
                       f"{name}", secs[name][0], ratio(secs["vfs"][0], secs[name][0]), "", None,
                       {}))
        inc_vfs, inc_other = mean(secs["vfs"][1:]), mean(secs[name][1:])
        ctx.add(Record("6-versions", f"mean ingest time, versions 2-5 (vs {name})", inc_vfs,
                       "s", name, inc_other, ratio(inc_vfs, inc_other), "", None, {}))
        ctx.add(Record("6-versions", f"store size after 5 versions (vs {name})", final["vfs"],
                       "B", name, final[name], ratio(final["vfs"], final[name]), "", None, {}))
        b_vfs, b_other = mean(big_added["vfs"][1:]), mean(big_added[name][1:])
        ctx.add(Record("6-versions", f"big file: mean bytes added per version 2-5 (vs {name})",
                       b_vfs, "B", name, b_other, ratio(b_vfs, b_other), "", None, {}))
    ctx.add(Record("6-versions", "per-version details (see extra)", None, "", extra=extra))
    print("    " + json.dumps(extra), flush=True)
    rmtree(base)


def bench_memory(ctx: Ctx, fx: dict) -> None:
    base = ctx.path("memory")
    rmtree(base)
    size = ctx.size(4 * GiB)
    src_dir = os.path.join(base, "src")
    src = os.path.join(src_dir, "big.bin")
    log(f"generating {fmt_bytes(size)} of random data")
    gen_random_file(src, size, "memory")
    src_hash = file_hash(src)
    store = os.path.join(base, "store")
    cache = os.path.join(base, "cache")
    out = os.path.join(base, "out")

    vfs_create(ctx, store, cache)
    idle = run_vfs(ctx, vfs_open(store, cache), drop=False)
    log(f"vfs put+commit of {fmt_bytes(size)} (fresh process)")
    put = run_vfs(ctx, [*vfs_open(store, cache), vfs_put("/big.bin", [src]), COMMIT])
    os.makedirs(out)
    log(f"vfs get of {fmt_bytes(size)} (fresh process)")
    get = run_vfs(ctx, [*vfs_open(store, cache),
                        {"do": "get", "spec": "bench@main:/big.bin", "dest": out},
                        {"do": "sync"}])
    ok = file_hash(os.path.join(out, "big.bin")) == src_hash
    if not ok:
        ctx.note("memory benchmark: get produced a different file!")
    rmtree(out)
    rmtree(store)
    rmtree(cache)

    others: dict[str, tuple[Run, Run]] = {}
    for cls in (Restic, Borg):
        if not have(cls.name):
            continue
        tool = cls(ctx, os.path.join(base, cls.name))
        tool.init()
        log(f"{tool.name} backup and restore of {fmt_bytes(size)}")
        b = tool.backup(src_dir)
        r = tool.restore(out)
        rmtree(out)
        tool.remove()
        others[tool.name] = (b, r)
    target_mb = 300
    for what, run, idx in (("put+commit", put, 0), ("get", get, 1)):
        mb = run.maxrss_kib * 1024 / 1e6
        extra = {"s": run.op_s, "MB_per_s": size / run.op_s / 1e6, "user_s": run.user_s,
                 "sys_s": run.sys_s, "idle_python_import_vfs_MB": idle.maxrss_kib * 1024 / 1e6,
                 **{f"{k}_MB": v[idx].maxrss_kib * 1024 / 1e6 for k, v in others.items()},
                 **{f"{k}_s": v[idx].wall_s for k, v in others.items()}}
        if what == "get":
            extra["identical"] = ok
        if not others:
            ctx.add(Record("7-memory", f"peak RSS of {what} of a {fmt_bytes(size)} file", mb,
                           "MB", "", None, None, f"< {target_mb} MB", mb < target_mb, extra))
        for name, pair in others.items():
            other_mb = pair[idx].maxrss_kib * 1024 / 1e6
            label = ("backup" if idx == 0 else "restore")
            ctx.add(Record("7-memory", f"peak RSS of {what} of a {fmt_bytes(size)} file "
                           f"(vs {name})", mb, "MB", f"{name} {label}", other_mb,
                           ratio(mb, other_mb), f"< {target_mb} MB", mb < target_mb, extra))
    rmtree(base)


RUNNERS = {"put": bench_put, "edits": bench_edits, "small": bench_small, "cache": bench_cache,
           "get": bench_get, "versions": bench_versions, "memory": bench_memory}
# The order benchmarks run in: users of a fixture run next to each other.
ORDER = ["put", "get", "edits", "small", "cache", "versions", "memory"]
FIXTURE_USERS = {"big": {"put", "get"}, "tree": {"small", "cache"}}


# ---------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------


def table(records: list[Record], markdown: bool = False) -> str:
    head = ["bench", "measurement", "vfs", "baseline", "baseline value", "ratio", "target",
            "met"]
    rows = []
    for r in records:
        if r.value is None:
            continue
        rows.append([r.bench, r.metric, fmt_value(r.value, r.unit), r.baseline or "-",
                     fmt_value(r.baseline_value, r.unit),
                     f"{r.ratio:.2f}x" if r.ratio is not None else "-", r.target or "-",
                     {True: "yes", False: "NO", None: "-"}[r.met]])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="data sizes divided by ~8")
    parser.add_argument("--only", default="",
                        help="comma-separated benchmark names or numbers: " + ", ".join(
                            f"{i + 1}={n}" for i, n in enumerate(BENCHMARKS)))
    parser.add_argument("--workdir", default=os.path.join(HERE, "work"))
    parser.add_argument("--max-wait", type=float, default=120.0,
                        help="before each timed command, wait up to this many seconds for "
                        "other processes to use < 10%% of the CPUs (0: never wait)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="runs of each cheap measurement; the median is reported")
    args = parser.parse_args()

    selected = set()
    for item in filter(None, (s.strip() for s in args.only.split(","))):
        name = NUMBERS.get(item, item)
        if name not in RUNNERS:
            parser.error(f"unknown benchmark {item!r}: choose from {', '.join(BENCHMARKS)}")
        selected.add(name)
    if not selected:
        selected = set(BENCHMARKS)
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    python = sys.executable
    ctx = Ctx(workdir, args.quick, python, max(1, args.repeat))
    ctx.max_wait = args.max_wait
    info = machine_info(workdir)
    info["date"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    info["vfs_code"] = code_fingerprint()
    info["git"] = git_state()
    info["quick"] = args.quick
    print("machine: " + json.dumps(info, indent=1), flush=True)
    free = shutil.disk_usage(workdir).free
    need = (2 if args.quick else 15) * GiB
    if free < need:
        print(f"warning: only {fmt_bytes(free)} free under {workdir}; the full run needs "
              f"up to ~{fmt_bytes(need)}", flush=True)

    fixtures = {"big": BigFixture(ctx), "tree": TreeFixture(ctx)}
    todo = [b for b in ORDER if b in selected]
    started = time.time()
    failures = {}
    try:
        for i, name in enumerate(todo):
            code = code_fingerprint()
            info.setdefault("vfs_code_before", {})[name] = [code, git_state()]
            if code != info["vfs_code"]:
                ctx.note(f"the vfs code changed during the run (before benchmark {name}: "
                         f"{git_state()}, fingerprint {code}); earlier results measured "
                         f"{info['vfs_code']}")
                info["vfs_code"] = code
            busy = other_cpu_busy()
            log(f"=== benchmark {BENCHMARKS.index(name) + 1}: {name} (CPU used by other "
                f"processes just before: {busy:.0%})")
            if busy > 0.15:
                ctx.note(f"other processes used {busy:.0%} of the CPUs just before benchmark "
                         f"{name}: its timings may be inflated")
            info.setdefault("other_cpu_busy_before", {})[name] = round(busy, 3)
            t0 = time.time()
            try:
                RUNNERS[name](ctx, fixtures)
            except Exception as exc:  # noqa: BLE001 - keep going, report at the end
                import traceback

                traceback.print_exc()
                failures[name] = f"{type(exc).__name__}: {exc}"
                ctx.note(f"benchmark {name} failed: {exc}")
            log(f"=== {name} done in {time.time() - t0:.0f} s")
            remaining = set(todo[i + 1:])
            for fx_name, users in FIXTURE_USERS.items():
                if not users & remaining:
                    fixtures[fx_name].remove()
    finally:
        for fx in fixtures.values():
            fx.remove()
    if code_fingerprint() != info["vfs_code"]:
        ctx.note("the vfs code changed during the last benchmark")
    info["drop_caches"] = ctx.drop_ok
    info["measurements_started_while_busy"] = ctx.busy_waits
    if ctx.busy_waits:
        ctx.note(f"{ctx.busy_waits} timed commands started while other processes were busy "
                 f"(waited {ctx.max_wait:.0f} s); see outside_cpu in the JSON")
    info["elapsed_s"] = round(time.time() - started, 1)
    print()
    print(f"vfs benchmarks {'(--quick) ' if args.quick else ''}{info['date']}, vfs at "
          f"{info['git']} (code {info['vfs_code']}), on "
          f"{info.get('cpu', '?')} x{info['nproc']}, {info.get('ram_gib', '?')} GiB RAM, "
          f"disk {info.get('disk', '?')}; page cache dropped: {ctx.drop_ok}")
    print(table(ctx.records))
    for note in ctx.notes:
        print(f"note: {note}")
    results = {"machine": info, "records": [asdict(r) for r in ctx.records],
               "notes": ctx.notes, "failures": failures}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(f"Machine: {json.dumps(info)}\n\n{table(ctx.records, markdown=True)}\n")
    print(f"results written to {os.path.join(workdir, 'results.json')}")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
