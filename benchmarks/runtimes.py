"""Per-datum overhead of the container runtimes: N trivial datums (``true``), one by one.

Run it under the benchmark lock, as root (runc needs it)::

    flock /tmp/vfs-bench.lock .venv/bin/python benchmarks/runtimes.py [--datums 200]

Each runtime runs ``true`` on N datums sequentially, one container start per datum,
and then again N datums in starts of ``--batch`` datums where batching applies. The
datums' directories are made beforehand: only :meth:`Runtime.run` is timed, which is
the cost the scheduler pays per datum on top of the command itself. runc runs a
busybox root filesystem built from ``/bin/busybox`` (busybox-static). Runtimes whose
program is missing are skipped and said so.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from daemon.runtimes import (  # noqa: E402
    BwrapRuntime,
    ContainerRun,
    DatumIO,
    ProcessRuntime,
    RuncRuntime,
    Runtime,
)
from daemon.runtimes.rootfs import make_busybox_rootfs  # noqa: E402


async def measure(runtime: Runtime, image: str | None, base: str, datums: int,
                  batch: int) -> float:
    """Seconds per datum of running ``true`` on ``datums`` datums, ``batch`` per start."""
    ios = []
    for index in range(datums):
        root = os.path.join(base, f"d{index}")
        os.makedirs(os.path.join(root, "in", "data"))
        os.makedirs(os.path.join(root, "out"))
        ios.append(DatumIO(f"{index:016x}", os.path.join(root, "in"),
                           os.path.join(root, "out"), f"{root}.log"))
    runs = []
    for start in range(0, datums, batch):
        workdir = os.path.join(base, f"work{start}")
        os.makedirs(workdir)
        runs.append(ContainerRun(job_id="bench", inputs=[("data", "0" * 64)],
                                 cmd=["true"], env={}, image=image,
                                 datums=ios[start:start + batch], workdir=workdir))
    began = time.perf_counter()
    for run in runs:
        statuses = await runtime.run(run)
        if any(statuses):
            raise SystemExit(f"{runtime.name}: a datum failed ({statuses}); see {base}")
    return (time.perf_counter() - began) / datums


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datums", type=int, default=200)
    parser.add_argument("--batch", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vfs-bench-runtimes-") as scratch:
        cases: list[tuple[str, Runtime, str | None, int]] = [
            ("process", ProcessRuntime(allow_as_root=True), None, 1)]
        if shutil.which("bwrap"):
            cases += [("bwrap", BwrapRuntime(), None, 1),
                      (f"bwrap, datum_batch={args.batch}", BwrapRuntime(), None, args.batch)]
        else:
            print("bwrap: not installed, skipped")
        if shutil.which("runc") and os.geteuid() == 0 and os.path.exists("/bin/busybox"):
            rootfs = make_busybox_rootfs(os.path.join(scratch, "rootfs"))
            runc = RuncRuntime(cache_dir=os.path.join(scratch, "images"),
                               state_root=os.path.join(scratch, "runc-state"))
            cases += [("runc", runc, rootfs, 1),
                      (f"runc, datum_batch={args.batch}", runc, rootfs, args.batch)]
        else:
            print("runc: not installed, not root, or no /bin/busybox: skipped")
        print(f"{args.datums} datums running `true`, one after the other")
        print(f"{'runtime':<24} {'ms per datum':>12}")
        for index, (label, runtime, image, batch) in enumerate(cases):
            base = os.path.join(scratch, f"case{index}")
            seconds = await measure(runtime, image, base, args.datums, batch)
            print(f"{label:<24} {seconds * 1000:>12.2f}", flush=True)


if __name__ == "__main__":
    trio.run(main)
