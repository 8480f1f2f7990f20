"""A slow store makes the requests that need it slow, never the whole mount.

A real vfsd on a real S3 server (moto) reaches it through a :class:`FaultProxy`
that delays requests by 2 s. While one process does something that needs the store
(a lookup after another writer moved the head, a listing of a directory whose tree
was never read, a ``vfsctl`` command through the daemon), ``stat`` and ``ls`` of paths
the daemon has in memory must answer at once: if the FUSE loop waited for the store,
they would take the 2 s too. The bound asserted is generous (the issue asks for
50 ms): it only tells "answered" from "waited for the store".
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import pytest

if TYPE_CHECKING:
    from conftest import Mount

from conftest import daemon_log_problems, start_vfsd, stop_vfsd
from faultproxy import FaultProxy
from fuse_checks import wait_for

import vfs

DELAY = 2.0
PROMPT = 0.5  # far below DELAY: answered without waiting for the store


class Writer:
    """``vfsctl`` of another node: its own cache, straight to the server (no proxy)."""

    def __init__(self, url: str, endpoint: str, cache: Path) -> None:
        self.env = {**os.environ, "VFS_STORE": url, "VFS_CACHE": str(cache),
                    "VFS_S3_ENDPOINT": endpoint}

    def __call__(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "cli.main", *args], env=self.env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"vfsctl {' '.join(args)}: {done.stderr}"
        return done.stdout


@pytest.fixture
def slow_mount(request: pytest.FixtureRequest, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch, moto_endpoint: str,
               aws_env: None) -> Iterator[tuple[Mount, FaultProxy, Writer]]:
    """A vfsd whose store is behind a FaultProxy, with ``data@main`` and ``data@other``
    filled by another node (``warm/``, ``cold/``, ``g``) before it started.

    Its log must be free of warnings, unless the test is marked ``expect_warnings``
    (then the test checks them)."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this machine")
    bucket = f"pfs-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/team"
    monkeypatch.setenv("VFS_S3_ENDPOINT", moto_endpoint)
    vfs.open_store(url, cache_dir=str(tmp_path / "setup"), create=True).close()
    writer = Writer(url, moto_endpoint, tmp_path / "writer")
    src = tmp_path / "src"
    for name in ("warm/f", "warm/sub/h", "cold/a/b/c", "cold/d/e", "g"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(name.encode())
    writer("repo", "create", "data")
    writer("put", "-r", "data@main:/", str(src / "warm"), str(src / "cold"), str(src / "g"))
    writer("commit", "data@main", "-m", "first")
    writer("branch", "create", "data@other", "--from", "data@main")
    with FaultProxy(moto_endpoint) as proxy:
        monkeypatch.setenv("VFS_S3_ENDPOINT", proxy.endpoint)
        mountpoint = tmp_path / "pfs"
        mountpoint.mkdir()
        mount = start_vfsd(url, tmp_path / "cache", mountpoint,  # type: ignore[arg-type]
                           "--no-pipelines")
        try:
            yield mount, proxy, writer
        finally:
            proxy.restore()
            stop_vfsd(mount)
    problems = daemon_log_problems(mount.log)
    if not request.node.get_closest_marker("expect_warnings"):
        assert not problems, "vfsd logged:\n" + "\n".join(problems)


def warm(mount: Mount) -> None:
    """Look up, stat and list what :func:`answers_promptly` asks again later."""
    for branch in ("data@main", "data@other"):
        os.stat(mount.path / branch / "warm" / "f")
        os.listdir(mount.path / branch / "warm")
    # The kernel asks the daemon again after a second (branch attributes time out).
    time.sleep(1.2)


def answers_promptly(mount: Mount) -> float:
    """The time ``stat`` and ``ls`` of warm paths take (on both branches)."""
    started = time.monotonic()
    for branch in ("data@other", "data@main"):
        assert os.stat(mount.path / branch / "warm" / "f").st_size == len(b"warm/f")
        assert sorted(os.listdir(mount.path / branch / "warm")) == ["f", "sub"]
        assert os.stat(mount.path / branch / "warm" / "sub").st_nlink == 2
    return time.monotonic() - started


def in_background(work: Callable[[], object]) -> tuple[threading.Thread, list]:
    """Start ``work`` in a thread; give it time to reach the daemon."""
    out: list = []

    def run() -> None:
        try:
            out.append(work())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(0.3)
    return thread, out


def test_a_head_moved_elsewhere_is_noticed_without_stopping_the_mount(slow_mount) -> None:
    mount, proxy, writer = slow_mount
    warm(mount)
    tmp = mount.path.parent / "moved"
    tmp.write_bytes(b"moved")
    writer("put", "data@main:/moved", str(tmp))
    writer("commit", "data@main", "-m", "moved")
    proxy.delay_if = b"/refs/"  # every read of a branch head waits
    proxy.delay = DELAY
    # A lookup on data@main: its head is due a check (more than a second since the last).
    thread, _ = in_background(lambda: os.path.exists(mount.path / "data@main" / "moved"))
    took = answers_promptly(mount)
    thread.join(timeout=30)
    assert took < PROMPT, f"stat and ls of warm paths took {took:.2f} s"
    # The moved head shows once the store has answered.
    assert wait_for(lambda: (mount.path / "data@main" / "moved").exists(), True, timeout=20)
    proxy.restore()
    assert (mount.path / "data@main" / "moved").read_bytes() == b"moved"


def test_a_tree_read_from_the_store_does_not_stop_the_mount(slow_mount) -> None:
    mount, proxy, _ = slow_mount
    warm(mount)
    proxy.delay_if = b"/packs/"  # every read of a tree (or chunk) waits
    proxy.delay = DELAY
    thread, out = in_background(lambda: sorted(os.listdir(mount.path / "data@main" / "cold")))
    took = answers_promptly(mount)
    thread.join(timeout=30)
    assert took < PROMPT, f"stat and ls of warm paths took {took:.2f} s"
    assert out == [["a", "d"]]  # the slow listing itself is right
    # The trees of cold/ and cold/a/ are read now (the listing counted the
    # subdirectories of a/ and d/), not that of cold/a/b/: its link count needs it.
    thread, out = in_background(lambda: os.stat(mount.path / "data@other" / "cold" / "a" / "b")
                                .st_nlink)
    took = answers_promptly(mount)
    thread.join(timeout=30)
    assert took < PROMPT, f"stat and ls of warm paths took {took:.2f} s"
    assert out == [2]


def test_a_vfsctl_command_waiting_for_the_store_does_not_stop_the_mount(slow_mount) -> None:
    mount, proxy, _ = slow_mount
    warm(mount)
    proxy.delay = DELAY  # every request
    thread, out = in_background(lambda: mount.vfsctl("rm", "data@main:/g").returncode)
    took = answers_promptly(mount)
    thread.join(timeout=60)
    assert took < PROMPT, f"stat and ls of warm paths took {took:.2f} s"
    assert out == [0]
    proxy.restore()
    assert not (mount.path / "data@main" / "g").exists()


@pytest.mark.expect_warnings
def test_an_unreachable_store_leaves_the_branches_as_they_were(slow_mount) -> None:
    mount, proxy, writer = slow_mount
    warm(mount)

    def failed() -> list[str]:
        """The branches whose failing check was logged (as a warning)."""
        return sorted(line.split("cannot check the head of ")[1].split()[0]
                      for line in daemon_log_problems(mount.log)
                      if "cannot check the head of" in line)

    proxy.cut()  # every connection refused: each check of a head fails
    took = answers_promptly(mount)
    assert took < PROMPT, f"stat and ls of warm paths took {took:.2f} s"
    # The checks fail once the store's retries give up.
    both = ["data@main", "data@other"]
    assert wait_for(failed, both, timeout=30) == both
    time.sleep(1.2)  # checked again, failing again
    took = answers_promptly(mount)
    assert took < PROMPT, f"stat and ls of warm paths took {took:.2f} s"
    proxy.restore()
    tmp = mount.path.parent / "back"
    tmp.write_bytes(b"back")
    writer("put", "data@main:/back", str(tmp))
    writer("commit", "data@main", "-m", "back")
    assert wait_for(lambda: (mount.path / "data@main" / "back").exists(), True, timeout=30)
    assert failed() == both  # said once, however often it failed
