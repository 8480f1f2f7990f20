#!/usr/bin/env python3
"""Benchmarks of pipelines run by a real ``vfsd``, driven with the real ``vfsctl``.

Usage (from the project root, as root: runc and FUSE mounts need it; other helpers
benchmark on this machine too, hence the lock)::

    flock /tmp/vfs-bench.lock .venv/bin/python benchmarks/pipelines.py [--quick] [--only 1,3]

  1 overhead  per-datum overhead of each runtime: 200 trivial datums (``true``) run by
              ``process``, ``bwrap``, ``runc`` (a busybox root filesystem built in the
              workdir), and ``bwrap``/``runc`` with ``datum_batch: 20``, each with
              parallelism 1 and 2; ms per datum from the job record, vs 200 sequential
              starts of ``true``, of the same ``bwrap`` sandbox and of ``runc run``
  2 latency   job start latency after a one-file commit into a processed input of
              10,000 and of 100,000 files (datums of 100 files, glob ``/*``; the
              10,000 files also as 10,000 one-file datums, glob ``/*/*``): the job's
              first container start minus the input commit's time (median of 5), the
              planning part of it, and commit→wait; the first job over all datums runs
              with the ``process`` runtime, ``datum_batch: 500``
  3 e2e       a one-file change to a processed ``bwrap`` pipeline over 1,000 files:
              ``vfsctl commit`` then ``vfsctl wait`` as two CLI processes, wall time and
              its parts from the job record

``--quick``: 50 datums, 1,000 and 10,000 files, 200 files, 3 repetitions (~2-3 min; full: ~5 min).
Each case of benchmark 1, each input of benchmark 2 and benchmark 3 start a fresh
``vfsd`` (``mount.Vfsd``); every timed commit first waits for the other processes to
use < 10% of the CPUs. ``--profile`` records every vfsd with ``py-spy record`` (raw
stacks) into ``benchmarks/work/pipelines-profiles/``. Work directory ``benchmarks/work/pipelines``
(deleted at the end); results in ``benchmarks/work/pipelines-results.json`` and a table
on stdout (plain and Markdown).
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from mount import (
    ROOT,
    VFSCTL,
    Vfsd,
    cleanup,
    log,
    parse_only,
    report,
    rmtree,
    run_steps,
    start,
    wait_quiet,
)

sys.path.insert(0, ROOT)
from daemon.runtimes.rootfs import make_busybox_rootfs  # noqa: E402
from vfs.refs import parse_time  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = ["overhead", "latency", "e2e"]
BUSYBOX = "/bin/busybox"
HOST_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")


# ---------------------------------------------------------------------------------------
# context, records, helpers
# ---------------------------------------------------------------------------------------


class Ctx:
    def __init__(self, args: argparse.Namespace) -> None:
        self.quick = args.quick
        self.workdir = os.path.abspath(args.workdir)
        self.profile_dir = os.path.join(os.path.dirname(self.workdir), "pipelines-profiles") \
            if args.profile else None
        self.datums = 50 if args.quick else 200
        self.batch = 20
        self.sizes = (1_000, 10_000) if args.quick else (10_000, 100_000)
        self.e2e_files = 200 if args.quick else 1_000
        self.reps = 3 if args.quick else 5
        self.records: list[dict] = []
        self.notes: list[str] = []
        self.raw: dict = {}
        self.mounts: list[str] = []
        self.counter = 0

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    def add(self, bench: str, metric: str, value: float | None, unit: str, *,
            baseline: str = "", baseline_value: float | None = None, target: str = "",
            met: bool | None = None, detail: str = "", **extra) -> None:
        ratio = value / baseline_value if value is not None and baseline_value else None
        self.records.append({"bench": bench, "metric": metric, "value": value, "unit": unit,
                             "baseline": baseline, "baseline_value": baseline_value,
                             "ratio": ratio, "target": target, "met": met, "detail": detail,
                             "extra": extra})
        base = f" | {baseline}: {fmt(baseline_value, unit)}" if baseline else ""
        rs = f" | ratio {ratio:.2f}x" if ratio is not None else ""
        tg = f" | target {target}: {'met' if met else 'NOT met'}" if target else ""
        print(f"  -> {metric}: {fmt(value, unit)}{base}{rs}{tg}"
              + (f" | {detail}" if detail else ""), flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "ms":
        return f"{value:.1f} ms" if value < 100 else f"{value:,.0f} ms"
    if unit == "s":
        return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"
    return f"{value:.3g} {unit}"


def run_benchmarks(ctx, info: dict, benches: list, no_wait: bool) -> list:
    """Run ``benches`` (name, function of ``ctx``) in turn; record the elapsed time and
    whether vfs/, daemon/ or cli/ changed meanwhile (``info["code_fingerprint_start"]``
    set by the caller), and clean up whatever happens. Returns the failures."""
    started = time.time()
    try:
        return run_steps(ctx, info, [(name, functools.partial(bench, ctx))
                                     for name, bench in benches], no_wait)
    finally:
        info["elapsed_s"] = round(time.time() - started, 1)
        info["code_fingerprint_end"] = code_fingerprint()
        if info["code_fingerprint_end"] != info["code_fingerprint_start"]:
            ctx.note("vfs/, daemon/ or cli/ changed during the run (code fingerprint "
                     f"{info['code_fingerprint_start']} -> {info['code_fingerprint_end']})")
        cleanup(ctx)


def code_fingerprint() -> str:
    """BLAKE3 of the Python sources of vfs/, daemon/ and cli/ (they change during the day)."""
    import blake3

    h = blake3.blake3()
    for top in ("vfs", "daemon", "cli"):
        for path in sorted(glob.glob(os.path.join(ROOT, top, "**", "*.py"), recursive=True)):
            h.update(path.encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


def seconds_list(values) -> str:
    return ", ".join(f"{v:.3f}" for v in values) + " s"


def vfsctl(store: str, cache: str, *args: str, timeout: float | None = None) -> str:
    proc = subprocess.run([VFSCTL, "--store", store, "--cache", cache, *args],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"vfsctl {' '.join(args)} failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[-2000:]}")
    return proc.stdout.strip()


def write_files(directory: str, names: list[str], tag: str) -> None:
    """Tiny distinct files (``tag`` makes them differ from other runs' files)."""
    made = set()
    for name in names:
        path = os.path.join(directory, name)
        parent = os.path.dirname(path)
        if parent not in made:
            os.makedirs(parent, exist_ok=True)
            made.add(parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, f"{tag} {name}\n".encode())
        os.close(fd)


class Daemon(Vfsd):
    """A fresh vfsd whose control socket (and pipeline watcher) is ready."""

    def start(self) -> None:
        super().start()
        deadline = time.monotonic() + 60
        while not glob.glob(os.path.join(self.cache, "*", "daemon.json")):
            if self.proc.poll() is not None:
                raise RuntimeError(f"vfsd exited with {self.proc.returncode}; see "
                                   f"{self.ctx.path('vfsd.log')}")
            if time.monotonic() > deadline:
                raise RuntimeError("vfsd wrote no daemon.json within 60 s")
            time.sleep(0.02)

    def children_cpu_s(self) -> float:
        """CPU seconds of the waited-for children (the containers and their commands)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


class Pipelines:
    """One store in the workdir and the vfsctl commands the benchmarks use."""

    def __init__(self, ctx: Ctx, name: str) -> None:
        self.ctx = ctx
        self.store, self.cache = ctx.path(f"store-{name}"), ctx.path(f"cache-{name}")
        self.ctl("init")

    def ctl(self, *args: str, timeout: float | None = None) -> str:
        return vfsctl(self.store, self.cache, *args, timeout=timeout)

    def daemon(self, label: str) -> Daemon:
        # The benchmarks run as root and compare with the process runtime.
        return Daemon(self.ctx, self.store, self.cache, label,
                      extra=("--allow-process-runtime",))

    def create_pipeline(self, name: str, repo: str, glob_pattern: str, cmd: list[str],
                        runtime: str, **extra) -> None:
        doc = {"pipeline": name, "input": {"repo": repo, "glob": glob_pattern},
               "transform": {"cmd": cmd, **({"image": extra.pop("image")}
                                            if "image" in extra else {})},
               "runtime": runtime, **extra}
        path = self.ctx.path(f"{name}.json")
        with open(path, "w") as f:
            json.dump(doc, f)
        self.ctl("pipeline", "create", "-f", path)

    def jobs(self, pipeline: str) -> list[dict]:
        return json.loads(self.ctl("job", "list", pipeline, "--json"))

    def commit_time(self, repo: str, commit: str) -> float:
        return parse_time(json.loads(self.ctl("inspect", f"{repo}@{commit}", "--json"))["time"])

    def commit_and_wait(self, repo: str, timeout: float) -> dict:
        """``vfsctl commit`` then ``vfsctl wait``: wall times and the job's times."""
        t0 = time.time()
        out = vfsctl(self.store, self.cache, "commit", f"{repo}@main", "-m", "bench")
        t1 = time.time()
        commit = out.split()[-1]
        waited = vfsctl(self.store, self.cache, "wait", f"{repo}@{commit}", "--timeout",
                        str(timeout), "--json", timeout=timeout + 60)
        t2 = time.time()
        result = json.loads(waited)
        if len(result) != 1:
            raise RuntimeError(f"wait returned {result}")
        pipeline = result[0]["pipeline"]
        output = result[0]["output"].split("@", 1)[1]
        job = next(j for j in reversed(self.jobs(pipeline)) if j["output_commit"] == output)
        out_time = parse_time(json.loads(self.ctl("inspect", f"{pipeline}@{output}",
                                                  "--json"))["time"])
        return {"t0": t0, "t1": t1, "t2": t2, "commit": commit,
                "commit_time": self.commit_time(repo, commit), "output_time": out_time,
                "job": job, "started": parse_time(job["started"]),
                "first_start": parse_time(job["first_start"]) if job["first_start"] else None,
                "finished": parse_time(job["finished"]),
                "commit_cli_s": t1 - t0, "wait_cli_s": t2 - t1, "wall_s": t2 - t0}


def parts(r: dict) -> dict:
    """The successive parts of commit -> wait, on one clock (all on this machine)."""
    first = r["first_start"] if r["first_start"] is not None else r["started"]
    return {"commit_request_s": r["commit_time"] - r["t0"],
            "pickup_s": r["started"] - r["commit_time"],
            "plan_to_first_start_s": first - r["started"],
            "container_s": r["output_time"] - first,
            "output_commit_s": r["finished"] - r["output_time"],
            "wait_tail_s": r["t2"] - r["finished"]}


def timed_loop(argvs: list[list[str]], **kwargs) -> float:
    """Seconds per command of running ``argvs`` one after the other."""
    t0 = time.perf_counter()
    for argv in argvs:
        subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, **kwargs)
    return (time.perf_counter() - t0) / len(argvs)


# ---------------------------------------------------------------------------------------
# baselines: the same starts without vfs
# ---------------------------------------------------------------------------------------


class Baselines:
    def __init__(self, ctx: Ctx, rootfs: str | None) -> None:
        self.ctx = ctx
        self.rootfs = rootfs
        self.dir = ctx.path("baseline")
        os.makedirs(os.path.join(self.dir, "in"), exist_ok=True)
        os.makedirs(os.path.join(self.dir, "out"), exist_ok=True)
        self.runs: dict[str, list[float]] = {}

    def label(self, runtime: str) -> str:
        return {"process": "`true`", "bwrap": "`bwrap … true`",
                "runc": "`runc run` (busybox `true`)"}[runtime]

    def bwrap_argv(self) -> list[str]:
        # The sandbox the bwrap runtime builds, started by hand.
        args = ["bwrap", "--die-with-parent", "--new-session", "--unshare-all",
                "--cap-drop", "ALL", "--hostname", "vfs"]
        for path in HOST_PATHS:
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += ["--ro-bind", path, path]
        args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
                 "--ro-bind", os.path.join(self.dir, "in"), "/pfs/in",
                 "--bind", os.path.join(self.dir, "out"), "/pfs/out",
                 "--chdir", "/", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin",
                 "--", "true"]
        return args

    def runc_bundle(self) -> str:
        bundle = os.path.join(self.dir, "bundle")
        if not os.path.exists(bundle):
            os.makedirs(bundle)
            subprocess.run(["runc", "spec"], cwd=bundle, check=True)
            with open(os.path.join(bundle, "config.json")) as f:
                config = json.load(f)
            config["process"]["terminal"] = False
            config["process"]["args"] = ["true"]
            config["root"] = {"path": self.rootfs, "readonly": True}
            with open(os.path.join(bundle, "config.json"), "w") as f:
                json.dump(config, f)
        return bundle

    def measure(self, runtime: str, n: int) -> float:
        """Seconds per start of ``n`` sequential starts (one more run is appended)."""
        wait_quiet(self.ctx)
        if runtime == "process":
            per = timed_loop([["true"]] * n)
        elif runtime == "bwrap":
            per = timed_loop([self.bwrap_argv()] * n)
        else:
            bundle = self.runc_bundle()
            state = os.path.join(self.dir, "runc-state")
            self.ctx.counter += 1
            argvs = [["runc", "--root", state, "run", "--bundle", bundle,
                      f"vfs-bench-{os.getpid()}-{self.ctx.counter}-{i}"] for i in range(n)]
            per = timed_loop(argvs, stdout=subprocess.DEVNULL)
        self.runs.setdefault(runtime, []).append(per)
        return per


# ---------------------------------------------------------------------------------------
# 1. per-datum overhead of each runtime
# ---------------------------------------------------------------------------------------


def bench_overhead(ctx: Ctx) -> None:
    n = ctx.datums
    runtimes = ["process"] + [r for r in ("bwrap", "runc") if shutil.which(r)]
    for missing in {"bwrap", "runc"} - set(runtimes):
        ctx.note(f"{missing} is not installed: its cases are skipped")
    rootfs = None
    if "runc" in runtimes:
        if not os.path.exists(BUSYBOX) or os.geteuid() != 0:
            ctx.note("runc needs root and /bin/busybox (busybox-static): skipped")
            runtimes.remove("runc")
        else:
            rootfs = make_busybox_rootfs(ctx.path("busybox-rootfs"), BUSYBOX)
    bases = Baselines(ctx, rootfs)
    fx = Pipelines(ctx, "overhead")
    cases = []
    for runtime in runtimes:
        for batch in (1,) if runtime == "process" else (1, ctx.batch):
            for parallelism in (1, 2):
                cases.append((runtime, batch, parallelism))
    results = []
    for runtime, batch, parallelism in cases:
        name = f"{runtime}-b{batch}-p{parallelism}"
        log(f"overhead: {name}: baseline ({n} starts), then {n} datums through vfsd")
        base = bases.measure(runtime, n)
        repo, src = f"in-{name}", ctx.path(f"src-{name}")
        write_files(src, [f"f{i:04d}" for i in range(n)], name)
        with fx.daemon(f"overhead-{name}") as daemon:
            fx.ctl("repo", "create", repo)
            extra = {"parallelism": parallelism, "datum_batch": batch}
            if runtime == "runc":
                extra["image"] = rootfs
            fx.create_pipeline(f"p-{name}", repo, "/*", ["true"], runtime, **extra)
            fx.ctl("put", "-r", f"{repo}@main:/", src + "/")
            wait_quiet(ctx)
            cpu0, child0 = daemon.cpu_s(), daemon.children_cpu_s()
            r = fx.commit_and_wait(repo, timeout=600)
            cpu, child = daemon.cpu_s() - cpu0, daemon.children_cpu_s() - child0
            fx.ctl("pipeline", "delete", f"p-{name}")
        rmtree(src)
        job = r["job"]
        if job["datums_processed"] != n or job["state"] != "success":
            raise RuntimeError(f"{name}: job {job['id']} {job['state']}, "
                               f"{job['datums_processed']} of {n} datums processed")
        per = (r["finished"] - r["started"]) / n
        per_run = (r["finished"] - r["first_start"]) / n
        results.append({"case": name, "runtime": runtime, "batch": batch,
                        "parallelism": parallelism, "ms_per_datum": per * 1000,
                        "ms_per_datum_from_first_start": per_run * 1000,
                        "wall_s": r["wall_s"], "baseline_ms": base * 1000,
                        "vfsd_cpu_s": cpu, "children_cpu_s": child, "parts": parts(r),
                        "job": job["id"]})
        ctx.add("1-overhead", f"{runtime}, datum_batch {batch}, parallelism {parallelism}: "
                f"ms per datum, (finished − started)/{n}", per * 1000, "ms",
                baseline=f"{n}× {bases.label(runtime)}, sequential", baseline_value=base * 1000,
                detail=f"commit→wait {r['wall_s']:.2f} s; first start→finished "
                       f"{per_run * 1000:.1f} ms/datum; vfsd CPU {cpu:.1f} s, "
                       f"containers' CPU {child:.1f} s",
                wall_s=r["wall_s"], vfsd_cpu_s=cpu, children_cpu_s=child)
    ctx.raw["overhead"] = {"cases": results, "baseline_runs_s": bases.runs}
    rmtree(fx.store)
    rmtree(fx.cache)


# ---------------------------------------------------------------------------------------
# 2. job start latency vs the size of the input repository
# ---------------------------------------------------------------------------------------


def bench_latency(ctx: Ctx) -> None:
    fx = Pipelines(ctx, "latency")
    per_dir = 100
    small, big = ctx.sizes
    # (files, datum layout): the two sizes with one directory of 100 files per datum,
    # then the small size again with one file per datum (100x the datums, same files).
    configs = [(small, "dir"), (big, "dir"), (small, "file")]
    results: dict[str, dict] = {}
    for size, layout in configs:
        dirs = size // per_dir
        key = f"{size}-{layout}"
        repo, src, pipeline = f"in{key}", ctx.path(f"src-{key}"), f"p{key}"
        pattern, datums = ("/*/*", size) if layout == "file" else ("/*", dirs)
        log(f"latency: {size:,} files ({dirs} dirs x {per_dir}), glob {pattern}: generate, "
            "put -r, commit")
        write_files(src, [f"d{i:04d}/f{j:03d}" for i in range(dirs) for j in range(per_dir)],
                    key)
        t0 = time.perf_counter()
        fx.ctl("repo", "create", repo)
        fx.ctl("put", "-r", f"{repo}@main:/", src + "/")
        first = fx.ctl("commit", f"{repo}@main", "-m", "data").split()[-1]
        put_s = time.perf_counter() - t0
        rmtree(src)
        entry: dict = {"files": size, "glob": pattern, "datums": datums, "put_commit_s": put_s}
        with fx.daemon(f"latency-{key}") as daemon:
            log(f"latency: first job over {datums:,} datums (process runtime, "
                "datum_batch 500, parallelism 2)")
            t0 = time.perf_counter()
            cpu0 = daemon.cpu_s()
            fx.create_pipeline(pipeline, repo, pattern, ["true"], "process",
                               parallelism=2, datum_batch=500)
            fx.ctl("wait", f"{repo}@{first}", "--timeout", "900", timeout=960)
            entry["first_job_s"] = time.perf_counter() - t0
            entry["first_job_vfsd_cpu_s"] = daemon.cpu_s() - cpu0
            job = fx.jobs(pipeline)[-1]
            entry["first_job"] = job
            log(f"latency: first job {job['state']} in {entry['first_job_s']:.1f} s "
                f"({job['datums_processed']} datums processed)")
            runs = []
            for rep in range(ctx.reps):
                extra = ctx.path(f"extra-{key}-{rep}")
                with open(extra, "w") as f:
                    f.write(f"one more file {rep}\n")
                fx.ctl("put", f"{repo}@main:/new{rep}/f", extra)
                os.unlink(extra)
                wait_quiet(ctx)
                cpu0 = daemon.cpu_s()
                r = fx.commit_and_wait(repo, timeout=120)
                r["vfsd_cpu_s"] = daemon.cpu_s() - cpu0
                if r["job"]["datums_processed"] != 1:
                    raise RuntimeError(f"one-file commit ran {r['job']['datums_processed']} "
                                       "datums, not 1")
                r["latency_s"] = r["first_start"] - r["commit_time"]
                r["planning_s"] = r["started"] - r["commit_time"]
                r["parts"] = parts(r)
                runs.append(r)
                log(f"latency: {key}, run {rep + 1}: start latency {r['latency_s']:.3f} s, "
                    f"planning {r['planning_s']:.3f} s, commit→wait {r['wall_s']:.3f} s")
            fx.ctl("pipeline", "delete", pipeline)
        entry["runs"] = [{k: v for k, v in r.items() if k != "job"} | {"job": r["job"]["id"]}
                         for r in runs]
        for name in ("latency_s", "planning_s", "wall_s", "vfsd_cpu_s"):
            entry[name] = statistics.median(r[name] for r in runs)
        entry["parts"] = {name: statistics.median(r["parts"][name] for r in runs)
                          for name in runs[0]["parts"]}
        results[key] = entry
    ctx.raw["latency"] = results
    reference = results[f"{small}-dir"]
    for name, what, target in (
            ("latency_s", "job start latency (first container start − commit time)", 1.0),
            ("planning_s", "planning part (job started − commit time)", None),
            ("wall_s", "commit→wait wall time (2 CLI processes)", None)):
        for size, layout in configs:
            entry = results[f"{size}-{layout}"]
            base = None if entry is reference else reference[name]
            per = "1 file" if layout == "file" else f"{per_dir} files"
            met = None
            if target:
                met = entry[name] < target and (base is None or entry[name] < base + 0.1)
            ctx.add("2-latency", f"{what}, {size:,}-file input, {entry['datums']:,} datums of "
                    f"{per} (glob {entry['glob']}), median of {ctx.reps}", entry[name], "s",
                    baseline=f"{small:,} files in {reference['datums']} datums"
                    if base is not None else "", baseline_value=base,
                    target="< 1 s, flat in size" if target else "", met=met,
                    detail=f"runs {seconds_list(r[name] for r in entry['runs'])}"
                    + (f"; first job over all datums {entry['first_job_s']:.1f} s"
                       if name == "latency_s" else ""))
    rmtree(fx.store)
    rmtree(fx.cache)


# ---------------------------------------------------------------------------------------
# 3. end to end: a one-file change through a bwrap pipeline
# ---------------------------------------------------------------------------------------


def bench_e2e(ctx: Ctx) -> None:
    if not shutil.which("bwrap"):
        ctx.note("bwrap is not installed: benchmark e2e skipped")
        return
    n = ctx.e2e_files
    fx = Pipelines(ctx, "e2e")
    repo, src = "docs", ctx.path("src-e2e")
    names = [f"f{i:05d}.txt" for i in range(n)]
    write_files(src, names, "e2e")
    fx.ctl("repo", "create", repo)
    fx.ctl("put", "-r", f"{repo}@main:/", src + "/")
    first = fx.ctl("commit", f"{repo}@main", "-m", "data").split()[-1]
    # A real (if small) transform: copy the datum's file, upper-cased, to the output.
    cmd = ["sh", "-c", 'for f in /pfs/docs/*; do tr a-z A-Z < "$f" > "/pfs/out/${f##*/}"; '
           "done"]
    runs = []
    with fx.daemon("e2e") as daemon:
        log(f"e2e: first job over {n:,} datums (bwrap, parallelism 2)")
        t0 = time.perf_counter()
        fx.create_pipeline("upper", repo, "/*", cmd, "bwrap", parallelism=2)
        fx.ctl("wait", f"{repo}@{first}", "--timeout", "600", timeout=660)
        first_s = time.perf_counter() - t0
        log(f"e2e: first job done in {first_s:.1f} s")
        for rep in range(ctx.reps):
            changed = os.path.join(src, names[(rep * 7919) % n])
            with open(changed, "a") as f:
                f.write(f"edit {rep}\n")
            fx.ctl("put", f"{repo}@main:/{os.path.basename(changed)}", changed)
            wait_quiet(ctx)
            cpu0 = daemon.cpu_s()
            r = fx.commit_and_wait(repo, timeout=120)
            r["vfsd_cpu_s"] = daemon.cpu_s() - cpu0
            if r["job"]["datums_processed"] != 1:
                raise RuntimeError(f"one-file change ran {r['job']['datums_processed']} datums")
            r["parts"] = parts(r)
            runs.append(r)
            log(f"e2e: run {rep + 1}: commit→wait {r['wall_s']:.3f} s "
                f"(commit CLI {r['commit_cli_s']:.3f} s, wait CLI {r['wait_cli_s']:.3f} s)")
        out = os.path.join(daemon.mnt, "upper@main", os.path.basename(changed))
        with open(out) as f:
            if f"EDIT {ctx.reps - 1}" not in f.read():
                raise RuntimeError(f"{out} does not hold the last edit")
    rmtree(src)
    # What the parts cost outside vfs: a CLI process's start-up, one bwrap start.
    wait_quiet(ctx)
    cli_runs = [timed_loop([[VFSCTL, "--version"]], stdout=subprocess.DEVNULL)
                for _ in range(5)]
    bases = Baselines(ctx, None)
    bwrap_s = bases.measure("bwrap", 20)
    med = {key: statistics.median(r[key] for r in runs)
           for key in ("wall_s", "commit_cli_s", "wait_cli_s", "vfsd_cpu_s")}
    med_parts = {key: statistics.median(r["parts"][key] for r in runs)
                 for key in runs[0]["parts"]}
    ctx.raw["e2e"] = {"files": n, "first_job_s": first_s, "median": med,
                      "parts": med_parts, "vfsctl_version_s": cli_runs, "bwrap_start_s": bwrap_s,
                      "runs": [{k: v for k, v in r.items() if k != "job"}
                               | {"job": r["job"]["id"]} for r in runs]}
    cli = statistics.median(cli_runs)
    ctx.add("3-e2e", f"one-file change, bwrap pipeline over {n:,} files: `vfsctl commit` "
            f"start → `vfsctl wait` end, median of {ctx.reps}", med["wall_s"], "s",
            baseline="2× `vfsctl --version` + 1 bwrap start", baseline_value=2 * cli + bwrap_s,
            target="< 2 s", met=med["wall_s"] < 2.0,
            detail=f"runs {seconds_list(r['wall_s'] for r in runs)}; commit CLI "
                   f"{med['commit_cli_s']:.3f} s, wait CLI {med['wait_cli_s']:.3f} s; vfsd CPU "
                   f"{med['vfsd_cpu_s']:.2f} s")
    labels = {"commit_request_s": ("commit CLI start → commit made (commit time)",
                                   "`vfsctl --version`", cli),
              "pickup_s": ("watcher pickup: commit → job planned (started)", "", None),
              "plan_to_first_start_s": ("job planned → container started (first_start)",
                                        "", None),
              "container_s": ("container run, output stored and recorded, output tree "
                              "sealed (→ output commit time)",
                              "1 bwrap start", bwrap_s),
              "output_commit_s": ("output commit written → job finished", "", None),
              "wait_tail_s": ("job finished → `vfsctl wait` returned (the rest of its "
                              "start-up, its 0.1 s polls, exit)", "", None)}
    for key, (what, base_label, base_value) in labels.items():
        ctx.add("3-e2e", f"  part: {what}", med_parts[key], "s", baseline=base_label,
                baseline_value=base_value,
                detail=f"runs {seconds_list(r['parts'][key] for r in runs)}")
    rmtree(fx.store)
    rmtree(fx.cache)


# ---------------------------------------------------------------------------------------
# output and main
# ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (~2-3 min)")
    parser.add_argument("--only", default="", help="comma-separated numbers or names: " +
                        ", ".join(f"{i + 1}={n}" for i, n in enumerate(BENCHMARKS)))
    parser.add_argument("--workdir", default=os.path.join(HERE, "work", "pipelines"))
    parser.add_argument("--results",
                        default=os.path.join(HERE, "work", "pipelines-results.json"))
    parser.add_argument("--profile", action="store_true",
                        help="py-spy record every vfsd into benchmarks/work/pipelines-profiles/")
    parser.add_argument("--no-wait", action="store_true",
                        help="do not wait for a running benchmarks/run.py to end")
    args = parser.parse_args()
    selected = parse_only(parser, args.only, BENCHMARKS)
    if os.geteuid() != 0:
        print("warning: not root: runc is skipped and FUSE may refuse to mount",
              file=sys.stderr)
    ctx = Ctx(args)
    info = start(parser, ctx, args)
    info["code_fingerprint_start"] = code_fingerprint()
    for tool, argv in (("bwrap", ["bwrap", "--version"]), ("runc", ["runc", "--version"]),
                       ("busybox", [BUSYBOX])):
        try:
            info[tool] = subprocess.run(argv, capture_output=True, text=True
                                        ).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            info[tool] = None
    print(f"date: {info['date']}\nmachine: nproc {info['nproc']}, CPU {info.get('cpu')}, "
          f"RAM {info.get('ram_gib')} GiB, disk {info.get('disk')}; "
          f"{info['bwrap']}; {info['runc']}; git {info.get('git')}, code fingerprint "
          f"{info['code_fingerprint_start']}", flush=True)
    benches = {"overhead": bench_overhead, "latency": bench_latency, "e2e": bench_e2e}
    failures = run_benchmarks(ctx, info, [(name, benches[name]) for name in BENCHMARKS
                                          if name in selected], args.no_wait)
    print()
    print(f"vfs pipeline benchmarks {'(--quick) ' if args.quick else ''}{info['date']}: "
          f"{info.get('cpu')} x{info['nproc']}, {info.get('ram_gib')} GiB RAM; "
          f"{info['elapsed_s']:.0f} s")
    report(ctx, info, failures, args.results, detail=True)


if __name__ == "__main__":
    main()
