#!/usr/bin/env python3
"""Planning cost of pipelines over several inputs (cross, join), against a single input.

Usage (from the project root; benchmark 2 needs root: vfsd mounts)::

    flock /tmp/vfs-bench.lock .venv/bin/python benchmarks/inputs.py [--quick] [--only 1,2]
        [--profile] [--reps 5]

  1 plan   ``vfs.pipeline.jobs.plan_job`` in this process, on a local store whose
           pipelines have processed their inputs (the initial full job done here, each
           datum recording an empty output), after a one-file commit: the work vfsd
           does between seeing the new head and starting the first datum.
           * cross images × 10 models, 100 / 1,000 / 10,000 images (quick: 100 /
             1,000): (a) one new image (10 datums to run), with the images flat
             (glob ``/*``) and in directories of 100 (glob ``/*/*``); (b) one new
             model (one datum per image);
           * join ``left /(*).csv`` × ``right /(*).json`` on ``$1``, 1,000 / 10,000 /
             100,000 keys (quick: up to 10,000): one changed ``k7.csv`` (1 datum);
           * baseline, in the same store and after the same commit: a plain
             single-input pipeline over the images (the left files).
           Median of ``--reps`` plans (a plan writes nothing; each reads the store
           afresh). Setup times (files, the initial jobs) are reported too.
  2 vfsd   a real vfsd (``process`` runtime, parallelism 2, datum_batch 1, local
           store), a cross of 1,000 images × 10 models (quick: 200 × 10): after one
           warm-up round, one new image is committed with ``vfsctl commit``; reported:
           the time from that command's return to the first datum's own timestamp (its
           command appends ``date +%s.%N`` to a file), against a single-input pipeline
           over as many files (1,010; quick 210) and, not in quick, over 10,000 files
           (as many datums as the cross). Inputs, pipelines and the first jobs of the
           cross and of the 10,000 files are made in-process before vfsd starts (vfsd
           would take minutes over 10,000 datums); the baseline's first job is run by
           vfsd and its ms per datum reported.

Sizes keep the default run under ~15 min (``--quick``: ~3 min) on a quiet machine;
before each timed step the script waits up to 30 s for other processes to use < 10% of
the CPUs (and records what they used). Every subprocess (vfsd, vfsctl) runs this
tree's code (``PYTHONPATH`` is set to it). ``--profile`` writes a cProfile of one more
plan of every benchmark-1 case into ``benchmarks/work/inputs-profiles/``. Work
directory ``benchmarks/work/inputs`` (deleted at the end); results in
``benchmarks/work/inputs-results.json`` and a table on stdout (plain and Markdown).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import statistics
import sys
import time

from mount import ROOT, log, parse_only, report, rmtree, start, wait_quiet
from pipelines import Ctx as PipelinesCtx
from pipelines import Pipelines, code_fingerprint, run_benchmarks, seconds_list

# vfsd and vfsctl are the venv's entry points, whose editable install points at the main
# checkout: PYTHONPATH makes them (and this process) run this tree's code.
os.environ["PYTHONPATH"] = ROOT + (os.pathsep + os.environ["PYTHONPATH"]
                                   if os.environ.get("PYTHONPATH") else "")
sys.path.insert(0, ROOT)
import vfs  # noqa: E402
from vfs.pipeline import records, registry  # noqa: E402
from vfs.pipeline.jobs import commit_outputs, plan_job  # noqa: E402
from vfs.pipeline.records import DatumRecord  # noqa: E402
from vfs.pipeline.spec import parse_spec  # noqa: E402
from vfs.refs import parse_time  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = ["plan", "vfsd"]
MODELS = 10
QUIET_WAIT_S = 30.0  # the machine is shared: wait at most this for < 10% others' CPU
PER_DIR = 100


class Ctx(PipelinesCtx):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.reps = args.reps or (3 if args.quick else 5)
        self.images = (100, 1_000) if args.quick else (100, 1_000, 10_000)
        self.keys = (1_000, 10_000) if args.quick else (1_000, 10_000, 100_000)
        self.vfsd_images = 200 if args.quick else 1_000
        self.profile_dir = None  # vfsd runs without py-spy: it would slow what is timed
        self.plan_profile_dir = os.path.join(os.path.dirname(self.workdir),
                                             "inputs-profiles") if args.profile else None


def write_files(directory: str, names: list[str], tag: str) -> None:
    """Tiny files of distinct contents under ``directory`` (names may hold a ``/``)."""
    made = set()
    for name in names:
        parent = os.path.dirname(os.path.join(directory, name))
        if parent not in made:
            os.makedirs(parent, exist_ok=True)
            made.add(parent)
        fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                     0o644)
        os.write(fd, f"{tag} {name}\n".encode())
        os.close(fd)


def spec(name: str, input_doc: dict, cmd: list[str] | None = None, **extra) -> dict:
    return {"pipeline": name, "input": input_doc, "transform": {"cmd": cmd or ["true"]},
            "runtime": "process", **extra}


def cross_input(repo: str = "images", glob: str = "/*") -> dict:
    return {"cross": [{"repo": repo, "glob": glob}, {"repo": "models", "glob": "/*"}]}


def image_names(n: int) -> list[str]:
    return [f"img{i}.png" for i in range(n)]


def sharded(names: list[str]) -> list[str]:
    """The same files in directories of 100 (``d000/img0.png``...)."""
    return [f"d{i // PER_DIR:03d}/{name}" for i, name in enumerate(names)]


JOIN_INPUT = {"join": [{"repo": "left", "glob": "/(*).csv", "join_on": "$1"},
                       {"repo": "right", "glob": "/(*).json", "join_on": "$1"}]}


# ---------------------------------------------------------------------------------------
# 1. plan_job in-process
# ---------------------------------------------------------------------------------------


class PlanStore:
    """A local store with input repositories and pipelines that processed them.

    Args:
        directory: its work directory (deleted by :meth:`close`).
        store, cache: an existing store to open (default: a new one in ``directory``).
    """

    def __init__(self, ctx: Ctx, directory: str, store: str | None = None,
                 cache: str | None = None) -> None:
        self.ctx = ctx
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.store = vfs.open_store(store or os.path.join(directory, "store"),
                                    cache_dir=cache or os.path.join(directory, "cache"),
                                    create=store is None)
        self.setup: dict[str, float] = {}

    def fill(self, repo: str, names: list[str]) -> str:
        """One repository holding ``names``: one put of a directory, one commit (its id)."""
        src = os.path.join(self.dir, f"src-{repo}")
        t0 = time.perf_counter()
        write_files(src, names, repo)
        t1 = time.perf_counter()
        self.store.create_repo(repo)
        vfs.put(self.store, repo, "main", "/", [src], recursive=True)
        commit = self.store.commit(repo, "main", f"{len(names)} files")
        self.setup[f"files_{repo}_s"] = t1 - t0
        self.setup[f"put_commit_{repo}_s"] = time.perf_counter() - t1
        rmtree(src)
        return commit.id

    def change(self, repo: str, path: str, data: str) -> None:
        """Commit one new or changed file."""
        src = os.path.join(self.dir, "one-file")
        with open(src, "w") as f:
            f.write(data)
        vfs.put(self.store, repo, "main", path, [src])
        self.store.commit(repo, "main", f"one file: {path}")
        os.unlink(src)

    def create(self, name: str, input_doc: dict, cmd: list[str] | None = None,
               **extra) -> None:
        registry.create(self.store, parse_spec(spec(name, input_doc, cmd, **extra)))

    def plan(self, name: str):
        return plan_job(self.store, registry.get(self.store.objects, name),
                        image_digest="host")

    def run_job(self, name: str) -> dict:
        """Plan and 'run' a job: every datum records an empty output. Returns times."""
        t0 = time.perf_counter()
        plan = self.plan(name)
        t1 = time.perf_counter()
        ran = {}
        for task in plan.tasks:
            record = DatumRecord(task.root, plan.job.id, {})
            records.save_datum(self.store.objects, name, task.hash, record)
            ran[task.root] = record
        plan.job.datums_processed = len(ran)
        t2 = time.perf_counter()
        commit_outputs(self.store, plan, ran)  # also syncs the records written
        t3 = time.perf_counter()
        return {"datums": len(plan.tasks), "plan_s": t1 - t0, "records_s": t2 - t1,
                "commit_s": t3 - t2, "total_s": t3 - t0}

    def time_plans(self, cases: dict[str, tuple[str, int]]) -> dict[str, dict]:
        """``reps`` plans of each case, ``{label: (pipeline, datums to run)}``, the cases
        taking turns (so all see the same moments of the machine); each plan is
        checked to have that many datums to run. Returns per label: median, first,
        all runs.

        The garbage collector runs before each plan (untimed): a collection of the
        setup's garbage would otherwise land in whichever plan triggers it.
        """
        busy = wait_quiet(self.ctx, max_wait=QUIET_WAIT_S)
        runs: dict[str, list[float]] = {label: [] for label in cases}
        cpu: dict[str, list[float]] = {label: [] for label in cases}
        for _ in range(self.ctx.reps):
            for label, (name, expected) in cases.items():
                gc.collect()
                c0, t0 = time.process_time(), time.perf_counter()
                plan = self.plan(name)
                runs[label].append(time.perf_counter() - t0)
                cpu[label].append(time.process_time() - c0)
                tasks = len(plan.tasks) if plan is not None else 0
                if tasks != expected:
                    raise RuntimeError(f"{label}: the plan has {tasks} datums to run, not "
                                       f"{expected}")
        if self.ctx.plan_profile_dir:
            os.makedirs(self.ctx.plan_profile_dir, exist_ok=True)
            for label, (name, _) in cases.items():
                gc.collect()
                profiler = cProfile.Profile()
                profiler.enable()
                self.plan(name)
                profiler.disable()
                out = io.StringIO()
                stats = pstats.Stats(profiler, stream=out)
                stats.sort_stats("cumulative").print_stats(30)
                stats.sort_stats("tottime").print_stats(20)
                with open(os.path.join(self.ctx.plan_profile_dir, f"{label}.txt"), "w") as f:
                    f.write(out.getvalue())
        return {label: {"median_s": statistics.median(runs[label]), "first_s": runs[label][0],
                        "runs_s": runs[label], "cpu_median_s": statistics.median(cpu[label]),
                        "tasks": cases[label][1], "others_cpu_before": round(busy, 3)}
                for label in cases}

    def close(self, *, remove: bool = True) -> None:
        self.store.close()
        if remove:
            rmtree(self.dir)


def ms_list(values) -> str:
    return ", ".join(f"{v * 1000:.1f}" for v in values) + " ms"


def plan_cross(ctx: Ctx, images: int) -> dict:
    label = f"cross-{images}x{MODELS}"
    log(f"plan: {label}: {images:,} images (flat, and in directories of {PER_DIR}), "
        f"{MODELS} models, initial jobs")
    fx = PlanStore(ctx, ctx.path(f"plan-{label}"))
    try:
        fx.fill("images", image_names(images))
        fx.fill("shards", sharded(image_names(images)))
        fx.fill("models", [f"m{i}" for i in range(MODELS)])
        fx.create("cross", cross_input())
        fx.create("single", {"repo": "images", "glob": "/*"})
        fx.create("cross-sharded", cross_input("shards", "/*/*"))
        fx.create("single-sharded", {"repo": "shards", "glob": "/*/*"})
        initial = {name: fx.run_job(name)
                   for name in ("cross", "single", "cross-sharded", "single-sharded")}
        log(f"plan: {label}: initial jobs: " + ", ".join(
            f"{name} {r['total_s']:.1f} s ({r['datums']:,} datums)"
            for name, r in initial.items()))
        fx.change("images", f"/img{images}.png", "one new image")
        fx.change("shards", f"/d000/img{images}.png", "one new image")
        timed = fx.time_plans({
            f"{label}-a-new-image": ("cross", MODELS),
            f"{label}-single-new-image": ("single", 1),
            f"{label}-a-sharded": ("cross-sharded", MODELS),
            f"{label}-single-sharded": ("single-sharded", 1)})
        # Process the new image, then add a model: every image gets a datum.
        fx.run_job("cross")
        fx.change("models", f"/m{MODELS}", "one new model")
        timed.update(fx.time_plans({f"{label}-b-new-model": ("cross", images + 1)}))
        return {"images": images, "models": MODELS, "setup": fx.setup, "initial": initial,
                **{key: timed[f"{label}-{case}"] for key, case in (
                    ("a_new_image", "a-new-image"), ("single_new_image", "single-new-image"),
                    ("a_sharded", "a-sharded"), ("single_sharded", "single-sharded"),
                    ("b_new_model", "b-new-model"))}}
    finally:
        fx.close()


def plan_join(ctx: Ctx, keys: int) -> dict:
    label = f"join-{keys}"
    log(f"plan: {label}: {keys:,} keys in left and right, initial jobs")
    fx = PlanStore(ctx, ctx.path(f"plan-{label}"))
    try:
        fx.fill("left", [f"k{i}.csv" for i in range(keys)])
        fx.fill("right", [f"k{i}.json" for i in range(keys)])
        fx.create("join", JOIN_INPUT)
        fx.create("single", {"repo": "left", "glob": "/*"})
        initial = {"join": fx.run_job("join"), "single": fx.run_job("single")}
        log(f"plan: {label}: initial jobs: join {initial['join']['total_s']:.1f} s "
            f"({initial['join']['datums']:,} datums), single "
            f"{initial['single']['total_s']:.1f} s")
        fx.change("left", "/k7.csv", "k7 changed\n")
        timed = fx.time_plans({f"{label}-k7": ("join", 1),
                               f"{label}-single-k7": ("single", 1)})
        return {"keys": keys, "setup": fx.setup, "initial": initial,
                "join_k7": timed[f"{label}-k7"], "single_k7": timed[f"{label}-single-k7"]}
    finally:
        fx.close()


def growth(series: list[dict], key: str, size: str, case: dict, what: str = "plan") -> str:
    """``; ×10 images: plan ×2.6`` against the first of the series ("" for the first)."""
    first = series[0]
    if case is first:
        return ""
    return (f"; ×{case[size] / first[size]:g} {size}: {what} "
            f"×{case[key]['median_s'] / first[key]['median_s']:.1f}")


def add_plan(ctx: Ctx, metric: str, seconds: float, baseline: str, baseline_seconds: float,
             **kwargs) -> None:
    """A plan-time row, in ms (in s from a second on: the table prints 3 digits)."""
    unit, scale = ("s", 1) if max(seconds, baseline_seconds) >= 1 else ("ms", 1000)
    ctx.add("1-plan", metric, seconds * scale, unit, baseline=baseline,
            baseline_value=baseline_seconds * scale, **kwargs)


def flat(series: list[dict], key: str, case: dict, per: str | None = None) -> bool | None:
    """Met if the plan (per datum to run, with ``per``) takes less than twice the
    smallest size's (None for the smallest itself)."""
    first = series[0]
    if case is first:
        return None
    if per is None:
        return case[key]["median_s"] < 2 * first[key]["median_s"]
    return (case[key]["median_s"] / case[key]["tasks"]
            < 2 * first[key]["median_s"] / first[key]["tasks"])


def bench_plan(ctx: Ctx) -> None:
    crosses = [plan_cross(ctx, n) for n in ctx.images]
    joins = [plan_join(ctx, n) for n in ctx.keys]
    ctx.raw["plan"] = {"cross": crosses, "join": joins, "reps": ctx.reps}
    target = "flat in images (∝ the change): < 2× the smallest's"
    for key, base, layout in (("a_new_image", "single_new_image", "flat, glob /*"),
                              ("a_sharded", "single_sharded",
                               f"in directories of {PER_DIR}, glob /*/*")):
        for r in crosses:
            n = r["images"]
            add_plan(ctx, f"cross {n:,} images ({layout}) × {MODELS} models "
                     f"({n * MODELS:,} datums), one new image: plan_job, {r[key]['tasks']} "
                     "datums to run", r[key]["median_s"],
                     f"single input over the {n:,} images, one new image",
                     r[base]["median_s"], target=target, met=flat(crosses, key, r),
                     detail=f"runs {ms_list(r[key]['runs_s'])}; single "
                            f"{ms_list(r[base]['runs_s'])}"
                            f"{growth(crosses, key, 'images', r)}"
                            f"{growth(crosses, base, 'images', r, 'single')}")
    for r in crosses:
        n = r["images"]
        b = r["b_new_model"]
        add_plan(ctx, f"cross {n:,}×{MODELS} (flat), one new model: plan_job, "
                 f"{b['tasks']:,} datums to run", b["median_s"],
                 f"single input over the {n:,} images, one new image",
                 r["single_new_image"]["median_s"],
                 target="∝ images (the change): per datum < 2× the smallest's",
                 met=flat(crosses, "b_new_model", r, per="datum"),
                 detail=f"runs {ms_list(b['runs_s'])}; {b['median_s'] / (n + 1) * 1e6:.0f} µs "
                        f"per datum to run{growth(crosses, 'b_new_model', 'images', r)}")
    for r in joins:
        n = r["keys"]
        add_plan(ctx, f"join on $1, {n:,} keys × 2 inputs, one changed k7.csv: "
                 "plan_job, 1 datum to run", r["join_k7"]["median_s"],
                 f"single input over the {n:,} left files, k7.csv changed",
                 r["single_k7"]["median_s"],
                 target="flat in keys (∝ the change)", met=flat(joins, "join_k7", r),
                 detail=f"runs {ms_list(r['join_k7']['runs_s'])}; single "
                        f"{ms_list(r['single_k7']['runs_s'])}"
                        f"{growth(joins, 'join_k7', 'keys', r)}"
                        f"{growth(joins, 'single_k7', 'keys', r, 'single')}")
    for r in crosses:
        i = r["initial"]
        ctx.add("1-plan", f"(setup) cross {r['images']:,}×{MODELS}: initial job, "
                f"{i['cross']['datums']:,} datums (plan, empty records, output commit)",
                i["cross"]["total_s"], "s",
                detail=f"plan {i['cross']['plan_s']:.2f} s, records "
                       f"{i['cross']['records_s']:.2f} s, commit {i['cross']['commit_s']:.2f} s;"
                       f" sharded {i['cross-sharded']['total_s']:.1f} s; singles "
                       f"{i['single']['total_s']:.2f} s, {i['single-sharded']['total_s']:.2f} s;"
                       f" put+commit of the images {r['setup']['put_commit_images_s']:.2f} s")
    for r in joins:
        i = r["initial"]
        ctx.add("1-plan", f"(setup) join {r['keys']:,} keys: initial job, "
                f"{i['join']['datums']:,} datums (plan, empty records, output commit)",
                i["join"]["total_s"], "s",
                detail=f"plan {i['join']['plan_s']:.2f} s, records "
                       f"{i['join']['records_s']:.2f} s, commit {i['join']['commit_s']:.2f} s;"
                       f" single: {i['single']['total_s']:.2f} s; put+commit of left + right "
                       f"{r['setup']['put_commit_left_s'] + r['setup']['put_commit_right_s']:.1f}"
                       " s")


# ---------------------------------------------------------------------------------------
# 2. time to the first datum with a real vfsd
# ---------------------------------------------------------------------------------------


def stamps(path: str) -> list[float]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [float(line.split()[1]) for line in f if line.strip()]


def bench_vfsd(ctx: Ctx) -> None:
    images = ctx.vfsd_images
    base_repo = "files"
    singles = {base_repo: images + MODELS}
    if not ctx.quick:
        singles["files10k"] = images * MODELS
    fx = Pipelines(ctx, "vfsd")  # vfsctl init
    log_dir = ctx.path("stamps")
    os.makedirs(log_dir)
    pipelines = {"cross": ("images", cross_input())}
    pipelines.update({f"single-{repo}": (repo, {"repo": repo, "glob": "/*"})
                      for repo in singles})
    base_name = f"single-{base_repo}"
    # The inputs, the pipelines and every first job but the baseline's are made here,
    # in-process, before vfsd starts: vfsd's own first job of 10,000 datums would take
    # minutes (the baseline's first job, run by vfsd, says how many ms per datum).
    log(f"vfsd: setup: cross {images:,}×{MODELS}, single inputs of "
        f"{', '.join(f'{n:,}' for n in singles.values())} files")
    setup = PlanStore(ctx, ctx.path("vfsd-setup"), fx.store, fx.cache)
    heads = {}
    try:
        heads["images"] = setup.fill("images", image_names(images))
        heads["models"] = setup.fill("models", [f"m{i}" for i in range(MODELS)])
        for repo, n in singles.items():
            heads[repo] = setup.fill(repo, [f"f{i}" for i in range(n)])
        for name, (_, input_doc) in pipelines.items():
            command = ["sh", "-c", f'echo "$VFS_DATUM_ID $(date +%s.%N)" >> {log_dir}/{name}']
            # datum_batch stays 1 (the default): with a batch of N, the first datum
            # would also wait for the claims and inputs of the N - 1 others.
            setup.create(name, input_doc, command, parallelism=2)
        initial = {name: setup.run_job(name) for name in pipelines if name != base_name}
    finally:
        setup.close()
    results: dict[str, dict] = {name: {"runs": [], "initial_in_process": initial.get(name)}
                                for name in pipelines}
    with fx.daemon("vfsd") as daemon:
        log(f"vfsd: {base_name}: first job, run by vfsd ({singles[base_repo]:,} datums)")
        t0 = time.perf_counter()
        fx.ctl("wait", f"{base_repo}@{heads[base_repo]}", "--timeout", "900", timeout=960)
        job = fx.jobs(base_name)[-1]
        per_datum = ((parse_time(job["finished"]) - parse_time(job["started"]))
                     / max(1, job["datums_processed"]))
        results[base_name]["first_job"] = {"wall_s": time.perf_counter() - t0, "job": job,
                                           "ms_per_datum": per_datum * 1000}
        log(f"vfsd: {base_name}: first job {job['state']}, {job['datums_processed']:,} datums, "
            f"{per_datum * 1000:.1f} ms per datum")
        for name in pipelines:
            if name != base_name and fx.jobs(name):
                raise RuntimeError(f"{name}: vfsd ran a job although its inputs were processed")
        for rep in range(-1, ctx.reps):  # -1: a warm-up round, not counted
            for name, (repo, _) in pipelines.items():  # alternating: the same conditions
                new = ctx.path("one-file")
                with open(new, "w") as f:
                    f.write(f"one more {rep}\n")
                target = f"/img{images + rep + 1}.png" if repo == "images" else f"/new{rep + 1}"
                fx.ctl("put", f"{repo}@main:{target}", new)
                os.unlink(new)
                before = len(stamps(f"{log_dir}/{name}"))
                expected = MODELS if name == "cross" else 1
                busy = wait_quiet(ctx, max_wait=QUIET_WAIT_S)
                cpu0 = daemon.cpu_s()
                r = fx.commit_and_wait(repo, timeout=300)
                r["vfsd_cpu_s"] = daemon.cpu_s() - cpu0
                r["others_cpu_before"] = round(busy, 3)
                new_stamps = stamps(f"{log_dir}/{name}")[before:]
                if len(new_stamps) != expected or r["job"]["datums_processed"] != expected:
                    raise RuntimeError(f"{name}: one new file ran {len(new_stamps)} datums "
                                       f"(job: {r['job']['datums_processed']}), not {expected}")
                r["first_datum_s"] = min(new_stamps) - r["t1"]
                r["from_commit_time_s"] = min(new_stamps) - r["commit_time"]
                r["pickup_s"] = r["started"] - r["commit_time"]
                r["started_to_first_s"] = min(new_stamps) - r["started"]
                if rep < 0:
                    results[name]["warm_up"] = r["first_datum_s"]
                    continue
                results[name]["runs"].append({k: v for k, v in r.items() if k != "job"}
                                             | {"job": r["job"]["id"]})
                log(f"vfsd: {name}, run {rep + 1}: commit return → first datum "
                    f"{r['first_datum_s']:.3f} s (commit time → first datum "
                    f"{r['from_commit_time_s']:.3f} s, job started → first datum "
                    f"{r['started_to_first_s']:.3f} s)")
    for entry in results.values():
        for key in ("first_datum_s", "from_commit_time_s", "pickup_s", "started_to_first_s",
                    "wall_s", "vfsd_cpu_s"):
            entry[key] = statistics.median(run[key] for run in entry["runs"])
    ctx.raw["vfsd"] = results
    base = results[base_name]
    for name, entry in results.items():
        if name == "cross":
            what = (f"cross {images:,}×{MODELS} ({images * MODELS:,} datums), one new image "
                    f"({MODELS} datums)")
        else:
            what = f"single input over {singles[name[len('single-'):]]:,} files, one new file"
        ctx.add("2-vfsd", f"{what}: `vfsctl commit` returned → first datum's timestamp, "
                f"median of {ctx.reps}", entry["first_datum_s"], "s",
                baseline=f"single input over {singles[base_repo]:,} files"
                if entry is not base else "",
                baseline_value=base["first_datum_s"] if entry is not base else None,
                detail=f"runs {seconds_list(r['first_datum_s'] for r in entry['runs'])}; "
                       f"commit time → first datum {entry['from_commit_time_s']:.3f} s "
                       f"(pickup {entry['pickup_s']:.3f} s + job started → first datum "
                       f"{entry['started_to_first_s']:.3f} s); commit→wait "
                       f"{entry['wall_s']:.2f} s; vfsd CPU {entry['vfsd_cpu_s']:.2f} s; "
                       f"warm-up run {entry['warm_up']:.3f} s")
    first = base["first_job"]
    ctx.add("2-vfsd", f"(setup) vfsd's own first job of {base_name} "
            f"({first['job']['datums_processed']:,} datums, process runtime, parallelism 2): "
            "ms per datum, (finished − started) / datums",
            first["ms_per_datum"], "ms",
            detail=f"wall {first['wall_s']:.1f} s; the other first jobs were made in-process "
                   f"in " + ", ".join(f"{name} {r['total_s']:.1f} s"
                                      for name, r in initial.items()))
    rmtree(fx.store)
    rmtree(fx.cache)


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (~2 min)")
    parser.add_argument("--only", default="", help="comma-separated numbers or names: " +
                        ", ".join(f"{i + 1}={n}" for i, n in enumerate(BENCHMARKS)))
    parser.add_argument("--reps", type=int, default=0,
                        help="plans (1) and commits (2) per case (default 5, quick 3)")
    parser.add_argument("--workdir", default=os.path.join(HERE, "work", "inputs"))
    parser.add_argument("--results", default=os.path.join(HERE, "work", "inputs-results.json"))
    parser.add_argument("--profile", action="store_true",
                        help="cProfile one more plan of every case of benchmark 1")
    parser.add_argument("--no-wait", action="store_true",
                        help="do not wait for a running benchmarks/run.py to end")
    args = parser.parse_args()
    selected = parse_only(parser, args.only, BENCHMARKS)
    if "vfsd" in selected and os.geteuid() != 0:
        print("warning: not root: vfsd may fail to mount", file=sys.stderr)
    ctx = Ctx(args)
    info = start(parser, ctx, args)
    info["code_fingerprint_start"] = code_fingerprint()
    print(f"date: {info['date']}\nmachine: nproc {info['nproc']}, CPU {info.get('cpu')}, "
          f"RAM {info.get('ram_gib')} GiB, disk {info.get('disk')}; git {info.get('git')}, "
          f"code fingerprint {info['code_fingerprint_start']}", flush=True)
    benches = {"plan": bench_plan, "vfsd": bench_vfsd}
    failures = run_benchmarks(ctx, info, [(name, benches[name]) for name in BENCHMARKS
                                          if name in selected], args.no_wait)
    print()
    print(f"vfs several-inputs planning benchmarks {'(--quick) ' if args.quick else ''}"
          f"{info['date']}: {info.get('cpu')} x{info['nproc']}, {info.get('ram_gib')} GiB "
          f"RAM; {info['elapsed_s']:.0f} s")
    report(ctx, info, failures, args.results, detail=True)


if __name__ == "__main__":
    main()
