#!/usr/bin/env python3
"""What the mount's POSIX work must not slow down, each against the local disk in the
same run.

Usage (from the project root, as root: FUSE mounts are made)::

    .venv/bin/python benchmarks/posix.py [--size-mib 1024] [--files 10000]
                                         [--entries 100000] [--repeat 3]

  warm    the second and later sequential reads (``dd bs=1M``) of a file written
          through a branch path and closed: the kernel's page cache kept across opens
  create  files of 4 KiB written through a branch path (open, write, close), per second
  ls      ``ls -l`` of a directory of 100,000 entries: in a commit and in the branch,
          on a freshly started vfsd (the kernel has nothing cached)

Each number is the median of ``--repeat`` runs; the local disk does the same in a
directory beside the store. Work directory: ``benchmarks/work/posix`` (deleted at the
end). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VENV_BIN = os.path.dirname(os.path.abspath(sys.executable))
VFSCTL = os.path.join(VENV_BIN, "vfsctl")


class Mount:
    def __init__(self, work: str) -> None:
        self.env = {**os.environ, "VFS_STORE": os.path.join(work, "store"),
                    "VFS_CACHE": os.path.join(work, "cache")}
        self.path = os.path.join(work, "pfs")
        self.socket = os.path.join(work, "vfsd.sock")
        self.ctl("init")
        self.ctl("repo", "create", "bench")

    def ctl(self, *args: str) -> str:
        return subprocess.run([VFSCTL, *args], env=self.env, check=True, capture_output=True,
                              text=True).stdout

    def start(self) -> None:
        self.ctl("mount", self.path, "--socket", self.socket)

    def stop(self) -> None:
        self.ctl("unmount", self.path)


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def warm_read(path: str, size: int, repeat: int) -> float:
    """GB/s of the reads after the first."""
    timed(["cat", path])
    runs = [size / timed(["dd", f"if={path}", "of=/dev/null", "bs=1M"]) / 1e9
            for _ in range(repeat)]
    return statistics.median(runs)


def create_rate(directory: str, files: int) -> float:
    os.makedirs(directory)
    data = os.urandom(4096)
    started = time.perf_counter()
    for i in range(files):
        fd = os.open(os.path.join(directory, f"f{i:06d}"), os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, data)
        os.close(fd)
    return files / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", default=os.path.join(HERE, "work", "posix"))
    args = parser.parse_args()
    work = os.path.abspath(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    local = os.path.join(work, "local")
    os.makedirs(local)
    mount = Mount(work)
    rows = []
    try:
        mount.start()
        branch = os.path.join(mount.path, "bench@main")
        size = args.size_mib << 20
        for target in (os.path.join(local, "big"), os.path.join(branch, "big")):
            subprocess.run(["dd", "if=/dev/urandom", f"of={target}", "bs=1M",
                            f"count={args.size_mib}"], check=True, capture_output=True)
        rows.append(("warm re-read of a branch file, GB/s",
                     warm_read(os.path.join(branch, "big"), size, args.repeat),
                     warm_read(os.path.join(local, "big"), size, args.repeat)))
        rates, local_rates = [], []
        for run in range(args.repeat):
            rates.append(create_rate(os.path.join(branch, f"small{run}"), args.files))
            local_rates.append(create_rate(os.path.join(local, f"small{run}"), args.files))
        rows.append(("create 4 KiB files through a branch, files/s",
                     statistics.median(rates), statistics.median(local_rates)))

        flat = os.path.join(local, "flat")
        os.makedirs(flat)
        for i in range(args.entries):
            with open(os.path.join(flat, f"f{i:06d}"), "wb") as f:
                f.write(b"%d\n" % i)
        mount.ctl("put", "bench@main:/flat", flat, "-r")
        commit = mount.ctl("commit", "bench@main", "-m", "flat").strip()
        in_commit, in_branch, on_disk = [], [], []
        for _ in range(args.repeat):
            mount.stop()
            mount.start()
            in_commit.append(timed(["ls", "-l", os.path.join(mount.path, f"bench@{commit}",
                                                             "flat")]))
            in_branch.append(timed(["ls", "-l", os.path.join(branch, "flat")]))
            on_disk.append(timed(["ls", "-l", flat]))
        rows.append((f"ls -l of {args.entries:,} entries in a commit, fresh vfsd, s",
                     statistics.median(in_commit), statistics.median(on_disk)))
        rows.append((f"ls -l of {args.entries:,} entries in the branch, fresh vfsd, s",
                     statistics.median(in_branch), statistics.median(on_disk)))
    finally:
        try:
            mount.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(work, ignore_errors=True)
    print("| measurement | vfs | local disk | ratio |")
    print("|---|---|---|---|")
    for name, ours, theirs in rows:
        print(f"| {name} | {ours:.3g} | {theirs:.3g} | {ours / theirs:.2f}x |")


if __name__ == "__main__":
    main()
