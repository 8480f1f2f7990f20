"""The container runtimes, run for real: process, bwrap, and runc (rootfs and OCI layout).

Every behaviour the scheduler relies on is checked by running a busybox command and
looking at what it did: outputs, logs, exit statuses, the environment, read-only
inputs, the network namespace, batching, timeouts, cancellation (nothing left running,
no runc container left behind) and limits. podman and docker are not installed on the
test machines: only their command lines are checked.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from daemon.runtimes import (
    KILLED,
    RUNTIMES,
    BwrapRuntime,
    ContainerRun,
    DatumIO,
    ProcessRuntime,
    RuncRuntime,
    Runtime,
    get_runtime,
    oci,
)
from daemon.runtimes.base import check_run, datum_env
from daemon.runtimes.bwrap import build_args as bwrap_args
from daemon.runtimes.cgroups import PidsCgroups
from daemon.runtimes.hostetc import HOST_ENTRIES, SandboxEtc
from daemon.runtimes.podman import DockerRuntime, PodmanRuntime, build_args
from daemon.runtimes.rootfs import make_busybox_rootfs, rootfs_digest
from daemon.runtimes.runc import DEFAULT_USERNS_BASE, build_config
from vfs.errors import InvalidSpec

REPO = "images"

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None,
                                 reason="bwrap is not installed (apt-get install bubblewrap)")
needs_runc = pytest.mark.skipif(shutil.which("runc") is None or os.geteuid() != 0,
                                reason="runc is not installed (apt-get install runc) "
                                       "or we are not root")


@dataclass
class Case:
    """A runtime and the image it runs the busybox commands with."""

    name: str
    runtime: Runtime
    image: str | None
    isolated: bool  # read-only inputs, own network and filesystem

    def leftover_containers(self) -> list[str]:
        if not isinstance(self.runtime, RuncRuntime):
            return []
        listing = subprocess.run(["runc", "--root", self.runtime.state_root, "list", "-q"],
                                 capture_output=True, text=True, check=True)
        return listing.stdout.split()


@pytest.fixture(params=[
    "process",
    pytest.param("bwrap", marks=needs_bwrap),
    pytest.param("runc", marks=needs_runc),
    pytest.param("runc-oci", marks=needs_runc),
])
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Case]:
    """Each runtime with its image; after the test, no runc container may be left."""
    if request.param == "process":
        yield Case("process", ProcessRuntime(allow_as_root=True), None, False)
        return
    if request.param == "bwrap":
        yield Case("bwrap", BwrapRuntime(), None, True)
        return
    runtime = RuncRuntime(cache_dir=str(tmp_path / "images"),
                          state_root=str(tmp_path / "runc-state"))
    if request.param == "runc":
        image = request.getfixturevalue("busybox_rootfs")
    else:
        image = request.getfixturevalue("oci_layout")
    runc_case = Case(request.param, runtime, str(image), True)
    yield runc_case
    assert runc_case.leftover_containers() == []


def make_run(tmp_path: Path, case: Case, script: str, *, contents: list[bytes] | None = None,
             datums: list[dict[str, dict[str, bytes]]] | None = None,
             env: dict[str, str] | None = None, **options) -> ContainerRun:
    """A run of ``sh -c script``: over one datum per item of ``contents`` (file ``a.txt``
    of input ``images``), or over ``datums``, each giving every input's name (the same
    names in the same order for all) and its files (path: content; none for an empty
    input). Input ``name`` was read from commit ``commit_of(name)``."""
    if datums is None:
        datums = [{REPO: {"a.txt": content}} for content in contents or [b"hello\n"]]
    ios = []
    for index, inputs in enumerate(datums):
        root = tmp_path / f"datum{index}"
        (root / "out").mkdir(parents=True)
        for name, files in inputs.items():
            (root / "in" / name).mkdir(parents=True)
            for path, content in files.items():
                (root / "in" / name / path).parent.mkdir(parents=True, exist_ok=True)
                (root / "in" / name / path).write_bytes(content)
        ios.append(DatumIO(f"{index:016x}", str(root / "in"), str(root / "out"),
                           str(tmp_path / f"datum{index}.log")))
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    return ContainerRun(job_id="job-1", inputs=[(name, commit_of(name)) for name in datums[0]],
                        node="worker-1",
                        cmd=["sh", "-c", script], env=env or {}, image=case.image,
                        datums=ios, workdir=str(workdir), **options)


def commit_of(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def input_of(run: ContainerRun, index: int = 0, name: str = REPO) -> Path:
    """Datum ``index``'s host directory of input ``name``."""
    return Path(run.datums[index].input_dir) / name


def log_of(run: ContainerRun, index: int = 0) -> str:
    return Path(run.datums[index].log_path).read_text()


def output_of(run: ContainerRun, index: int, name: str) -> bytes:
    return (Path(run.datums[index].out_dir) / name).read_bytes()


def processes_matching(marker: str) -> list[str]:
    """The processes whose command line has ``marker``, allowing the kernel a moment to
    finish off a pid namespace whose init just died."""
    deadline = time.monotonic() + 1
    while True:
        found = subprocess.run(["pgrep", "-a", "-f", marker], capture_output=True, text=True)
        if not found.stdout or time.monotonic() > deadline:
            return found.stdout.splitlines()
        time.sleep(0.05)


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def interfaces(proc_net_dev: str) -> set[str]:
    return {line.split(":", 1)[0].strip() for line in proc_net_dev.splitlines()[2:]
            if ":" in line}


# --- what every runtime does -------------------------------------------------------

@pytest.mark.trio
async def test_transforms_input_to_output_and_logs(case: Case, tmp_path: Path) -> None:
    run = make_run(tmp_path, case, 'tr a-z A-Z < "$VFS_PFS/images/a.txt" > '
                                   '"$VFS_PFS/out/a.txt"; echo to-stdout; echo to-stderr >&2')
    assert await case.runtime.run(run) == [0]
    assert output_of(run, 0, "a.txt") == b"HELLO\n"
    lines = log_of(run).splitlines()
    if case.name.startswith("runc"):
        # runc copies the command's stdout and stderr through two pipes of its own:
        # both arrive, but their relative order is not kept.
        lines.sort(reverse=True)
    assert lines == ["to-stdout", "to-stderr"]
    # The input is untouched and the output directory holds only what was written.
    assert (input_of(run) / "a.txt").read_bytes() == b"hello\n"
    assert os.listdir(run.datums[0].out_dir) == ["a.txt"]


@pytest.mark.trio
async def test_environment(case: Case, tmp_path: Path) -> None:
    run = make_run(tmp_path, case, "env", env={"THRESHOLD": "0.4"})
    assert await case.runtime.run(run) == [0]
    env = dict(line.split("=", 1) for line in log_of(run).splitlines() if "=" in line)
    assert env["VFS_DATUM_ID"] == run.datums[0].datum_id
    assert env["VFS_JOB_ID"] == "job-1"
    # One input: its commit under its own name, and under the name of the days before
    # pipelines had several inputs.
    assert env["VFS_INPUT_COMMIT"] == env["VFS_INPUT_IMAGES_COMMIT"] == commit_of(REPO)
    assert env["VFS_NODE"] == "worker-1"
    assert env["THRESHOLD"] == "0.4"
    if case.isolated:
        assert env["VFS_PFS"] == "/pfs"
        assert set(env) <= {"VFS_DATUM_ID", "VFS_JOB_ID", "VFS_INPUT_COMMIT", "VFS_PFS",
                            "VFS_INPUT_IMAGES_COMMIT", "VFS_NODE", "THRESHOLD", "PATH", "HOME",
                            "IMAGE_VAR", "PWD", "SHLVL"}
    if case.name == "runc-oci":
        assert env["IMAGE_VAR"] == "from-image"  # the image config's Env
        assert env["PATH"] == "/usr/sbin:/usr/bin:/sbin:/bin"


# Two inputs with files, and a third of which these datums have none.
THREE_INPUTS = [
    {"images": {"a.txt": b"image one\n"}, "models": {"m/weights": b"weights one\n"},
     "raw-logs": {}},
    {"images": {"a.txt": b"image two\n"}, "models": {"m/weights": b"weights two\n"},
     "raw-logs": {}},
]
# What a datum sees of its inputs, written to its output (writing to an input is tried
# in a sandbox only: the process runtime shows the host's own directories).
SEE_INPUTS = ('pfs=$VFS_PFS; ls -A "$pfs" | tr "\\n" " " > "$pfs/out/pfs"; '
              'cat "$pfs/images/a.txt" "$pfs/models/m/weights" > "$pfs/out/both"; '
              '[ -d "$pfs/raw-logs" ] && ls -A "$pfs/raw-logs" > "$pfs/out/empty"; '
              'env > "$pfs/out/env"; '
              'if [ "$ISOLATED" = yes ]; then for d in images models models/m raw-logs; do '
              '  touch "/pfs/$d/new" 2>/dev/null && echo "$d" >> /pfs/out/writable; done; '
              '  echo x >> /pfs/images/a.txt 2>/dev/null && echo a.txt >> /pfs/out/writable; '
              'fi; true')


@pytest.mark.trio
async def test_every_input_is_a_directory_under_pfs(case: Case, tmp_path: Path) -> None:
    run = make_run(tmp_path, case, SEE_INPUTS, datums=THREE_INPUTS,
                   env={"ISOLATED": "yes" if case.isolated else "no"})
    assert await case.runtime.run(run) == [0, 0]
    for index, number in enumerate(["one", "two"]):
        out = Path(run.datums[index].out_dir)
        assert (out / "pfs").read_text() == "images models out raw-logs ", log_of(run, index)
        assert (out / "both").read_text() == f"image {number}\nweights {number}\n"
        assert (out / "empty").read_text() == ""
        assert not (out / "writable").exists(), (out / "writable").read_text()
        env = dict(line.split("=", 1) for line in (out / "env").read_text().splitlines()
                   if "=" in line)
        assert env["VFS_INPUT_IMAGES_COMMIT"] == commit_of("images")
        assert env["VFS_INPUT_MODELS_COMMIT"] == commit_of("models")
        assert env["VFS_INPUT_RAW_LOGS_COMMIT"] == commit_of("raw-logs")
        assert "VFS_INPUT_COMMIT" not in env  # which input's would it be?
        # The inputs are back where they were, untouched.
        assert sorted(os.listdir(run.datums[index].input_dir)) == ["images", "models",
                                                                   "raw-logs"]
        assert (input_of(run, index) / "a.txt").read_text() == f"image {number}\n"
        assert os.listdir(input_of(run, index, "raw-logs")) == []


@pytest.mark.trio
async def test_exit_status_is_reported(case: Case, tmp_path: Path) -> None:
    run = make_run(tmp_path, case, "echo failing; exit 7")
    assert await case.runtime.run(run) == [7]
    assert "failing" in log_of(run)


@pytest.mark.trio
async def test_killed_command_reports_128_plus_signal(case: Case, tmp_path: Path) -> None:
    # Under runc the command is the pid 1 of its namespace, which no signal from inside
    # can kill: a child shell is killed instead and reports it the shell's way.
    script = "sh -c 'kill -KILL $$'; exit $?" if case.name.startswith("runc") else "kill -KILL $$"
    run = make_run(tmp_path, case, script)
    assert await case.runtime.run(run) == [KILLED]


@pytest.mark.trio
async def test_batch_runs_each_datum_separately(case: Case, tmp_path: Path) -> None:
    script = ('v=$(cat "$VFS_PFS/images/a.txt"); echo "$VFS_DATUM_ID saw $v"; '
              'ls "$VFS_PFS/out"; echo "$v" > "$VFS_PFS/out/copy"; '
              '[ "$v" != two ] || exit 3')
    run = make_run(tmp_path, case, script, contents=[b"one", b"two", b"three"])
    assert await case.runtime.run(run) == [0, 3, 0]
    for index, value in enumerate(["one", "two", "three"]):
        assert output_of(run, index, "copy") == f"{value}\n".encode()
        # Each log has its own datum's lines only, and each output dir started empty.
        assert log_of(run, index) == f"{run.datums[index].datum_id} saw {value}\n"


@pytest.mark.trio
async def test_timeout_kills_and_says_so(case: Case, tmp_path: Path) -> None:
    run = make_run(tmp_path, case, "echo started; sleep 60", timeout=1)
    started = time.monotonic()
    assert await case.runtime.run(run) == [KILLED]
    assert time.monotonic() - started < 10
    assert log_of(run).startswith("started\n")
    assert "vfs: killed: the datum ran longer than its timeout (1 s)" in log_of(run)
    assert run.datums[0].timed_out


@pytest.mark.trio
async def test_batch_timeout_is_per_datum(case: Case, tmp_path: Path) -> None:
    script = '[ "$(cat "$VFS_PFS/images/a.txt")" = quick ] || sleep 60'
    run = make_run(tmp_path, case, script, contents=[b"quick", b"slow", b"quick"], timeout=2)
    assert await case.runtime.run(run) == [0, KILLED, 0]
    assert [datum.timed_out for datum in run.datums] == [False, True, False]
    assert "vfs: killed" in log_of(run, 1)
    assert "vfs:" not in log_of(run, 2)


# Each datum of a batch checks that it starts as a single datum does (real, empty
# directories, a fresh /tmp), then, in a sandbox only (the process runtime would write
# all over the host), leaves a process behind that tries for a while to write into
# every output directory it can find but its own, and into /tmp.
LONE = ('me=$VFS_DATUM_ID; pfs=$VFS_PFS; '
        'bad() { echo "$me: $1" >> "$pfs/out/wrong"; }; '
        '[ -d "$pfs/out" ] && [ ! -L "$pfs/out" ] || bad "out is not a directory"; '
        '[ -d "$pfs/images" ] && [ ! -L "$pfs/images" ] || bad "input is not a directory"; '
        '[ "$(ls -A "$pfs/out")" = "" ] || bad "out not empty: $(ls -A "$pfs/out")"; '
        '[ "$(ls -A "$pfs")" = "$(printf "images\\nout")" ] || bad "pfs: $(ls -A "$pfs")"; '
        '[ "$ISOLATED" = no ] || [ "$(ls -A /tmp)" = "" ] || bad "tmp: $(ls -A /tmp)"; '
        'touch "$pfs/out/.self"; '
        'if [ "$ISOLATED" = yes ]; then (for i in 1 2 3 4 5 6 7 8; do '
        '   for d in /proc/[0-9]*/root/pfs/out /proc/[0-9]*/cwd; do '
        '     [ -e "$d/.self" ] || echo "$me" > "$d/evil-$me"; done 2>/dev/null; '
        '   echo "$me" > /tmp/left-by-$me; sleep 0.1; done) & fi; '
        'cp "$pfs/images/a.txt" "$pfs/out/copy"; sleep 0.3')


@pytest.mark.trio
async def test_each_datum_of_a_batch_runs_alone(case: Case, tmp_path: Path) -> None:
    run = make_run(tmp_path, case, LONE, contents=[b"one", b"two", b"three"],
                   env={"ISOLATED": "yes" if case.isolated else "no"})
    assert await case.runtime.run(run) == [0, 0, 0]
    for index, value in enumerate([b"one", b"two", b"three"]):
        out = Path(run.datums[index].out_dir)
        if case.isolated:
            assert sorted(os.listdir(out)) == [".self", "copy"], log_of(run, index)
        else:  # process: no isolation, but real and empty directories all the same
            assert not (out / "wrong").exists(), (out / "wrong").read_text()
        assert (out / "copy").read_bytes() == value


@pytest.mark.trio
async def test_a_batch_has_no_size_limit_of_its_own(case: Case, tmp_path: Path) -> None:
    # bwrap refuses more than 9,000 arguments, execve more than its ARG_MAX: nothing
    # per datum may go on one command line. The long version is marked slow.
    count = 40
    run = make_run(tmp_path, case, 'cp "$VFS_PFS/images/a.txt" "$VFS_PFS/out/copy"',
                   contents=[b"%d" % i for i in range(count)])
    assert await case.runtime.run(run) == [0] * count
    assert output_of(run, count - 1, "copy") == b"%d" % (count - 1)


@pytest.mark.slow
@pytest.mark.trio
async def test_a_batch_of_1200_datums(case: Case, tmp_path: Path) -> None:
    count = 1200
    run = make_run(tmp_path, case, 'cp "$VFS_PFS/images/a.txt" "$VFS_PFS/out/copy"',
                   contents=[b"%d" % i for i in range(count)])
    assert await case.runtime.run(run) == [0] * count
    assert output_of(run, count - 1, "copy") == b"%d" % (count - 1)


@pytest.mark.trio
@pytest.mark.parametrize("datums", [1, 3])
async def test_cancellation_leaves_nothing_running(case: Case, tmp_path: Path,
                                                   datums: int) -> None:
    # A unique sleep duration marks every process of this run (sh, sleep, runc, bwrap).
    marker = f"6{uuid.uuid4().int % 10**8}.5"
    run = make_run(tmp_path, case, f"echo started; sleep {marker}",
                   contents=[b"x"] * datums)
    started = time.monotonic()
    with trio.move_on_after(1.5) as scope:
        await case.runtime.run(run)
    assert scope.cancelled_caught
    assert time.monotonic() - started < 10
    assert processes_matching(marker) == []
    assert "started" in log_of(run)
    # (the case fixture checks that no runc container is left)


# --- isolation ----------------------------------------------------------------------

@pytest.mark.trio
async def test_inputs_and_image_are_read_only(case: Case, tmp_path: Path) -> None:
    if not case.isolated:
        pytest.skip("the process runtime does not isolate anything")
    script = ('echo x > /pfs/images/new && echo WROTE-NEW; '
              'echo x >> /pfs/images/a.txt && echo WROTE-INPUT; '
              'echo x > /bin/new && echo WROTE-ROOT; '
              'echo x > /tmp/new && echo WROTE-TMP; '
              'echo ok > /pfs/out/ok')
    run = make_run(tmp_path, case, script)
    assert await case.runtime.run(run) == [0]
    log = log_of(run)
    assert "WROTE-NEW" not in log and "WROTE-INPUT" not in log and "WROTE-ROOT" not in log
    assert "Read-only file system" in log
    assert "WROTE-TMP" in log
    assert os.listdir(input_of(run)) == ["a.txt"]
    assert output_of(run, 0, "ok") == b"ok\n"


@pytest.mark.trio
async def test_no_network_unless_asked(case: Case, tmp_path: Path) -> None:
    if not case.isolated:
        pytest.skip("the process runtime does not isolate the network")
    run = make_run(tmp_path, case, "cat /proc/net/dev")
    assert await case.runtime.run(run) == [0]
    assert interfaces(log_of(run)) == {"lo"}

    host = interfaces(Path("/proc/net/dev").read_text())
    if host == {"lo"}:
        pytest.skip("this host has only a loopback interface: network: true looks the same")
    shared = make_run(tmp_path / "shared", case, "cat /proc/net/dev", network=True)
    assert await case.runtime.run(shared) == [0]
    assert interfaces(log_of(shared)) == host


@pytest.mark.trio
async def test_sees_only_its_own_processes(case: Case, tmp_path: Path) -> None:
    if not case.isolated:
        pytest.skip("the process runtime does not isolate processes")
    run = make_run(tmp_path, case, "ls /proc | grep -c '^[0-9]'")
    assert await case.runtime.run(run) == [0]
    assert int(log_of(run)) <= 4  # bwrap's init, sh, ls and grep at most


@pytest.mark.trio
async def test_runs_as_the_unprivileged_user_without_capabilities(case: Case,
                                                                  tmp_path: Path) -> None:
    if not case.isolated:
        pytest.skip("the process runtime runs as the daemon's user")
    if os.geteuid() != 0:
        pytest.skip("only a root daemon switches users")
    script = ('id -u; id -g; grep -E "^(CapEff|CapBnd|NoNewPrivs)" /proc/self/status; '
              'cat /etc/shadow 2>/dev/null && echo READ-SHADOW; echo x > /pfs/out/mine')
    run = make_run(tmp_path, case, script, user=(4321, 4322))
    assert await case.runtime.run(run) == [0]
    # stdout only: a runtime may interleave its own stderr lines in any order
    lines = [line for line in log_of(run).split("\n")
             if line.isdigit() or line.startswith(("Cap", "NoNewPrivs", "READ-"))]
    assert lines[:2] == ["4321", "4322"], lines
    assert "CapEff:\t0000000000000000" in lines and "CapBnd:\t0000000000000000" in lines
    assert "NoNewPrivs:\t1" in lines and "READ-SHADOW" not in lines
    owner = os.stat(Path(run.datums[0].out_dir) / "mine")
    assert (owner.st_uid, owner.st_gid) == (4321, 4322)


@pytest.mark.trio
async def test_inputs_are_readable_whatever_their_mode(case: Case, tmp_path: Path) -> None:
    run = make_run(tmp_path, case, 'cat "$VFS_PFS/images/a.txt" > "$VFS_PFS/out/copy"')
    os.chmod(input_of(run) / "a.txt", 0o600)
    assert await case.runtime.run(run) == [0]
    assert output_of(run, 0, "copy") == b"hello\n"


@needs_bwrap
def test_bwrap_shows_no_host_etc(tmp_path: Path) -> None:
    case = Case("bwrap", BwrapRuntime(), None, True)
    run = make_run(tmp_path, case, "true")
    etc = SandboxEtc(str(tmp_path)).path((65534, 65534), network=False)
    args = bwrap_args(run, run.datums[0], etc=etc)
    binds = [(source, target) for flag, source, target
             in zip(args, args[1:], args[2:], strict=False) if flag in ("--ro-bind", "--bind")]
    assert (etc, "/etc") in binds
    assert not [source for source, _ in binds if source.startswith("/etc")]
    allowed = {name.split("/")[0] for name in HOST_ENTRIES} | {
        "passwd", "group", "hosts", "nsswitch.conf", "mtab"}
    names = set(os.listdir(etc))
    assert names - allowed <= {name for name in names if name.startswith("python3.")}
    assert not names & {"shadow", "gshadow", "vfs", "pip.conf", "gitconfig", "npmrc", "ssh"}
    assert "private" not in os.listdir(os.path.join(etc, "ssl"))
    assert "nobody:x:65534:65534:" in Path(etc, "passwd").read_text()
    assert not os.path.exists(os.path.join(etc, "resolv.conf"))


def test_sandbox_etc_copies_of_dead_daemons_are_swept(tmp_path: Path) -> None:
    tmp_path = tmp_path / "shm"
    tmp_path.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f"vfs-etc-{dead.pid}-x1" / "ssl").mkdir(parents=True)
    (tmp_path / f"vfs-etc-{os.getppid()}-x2").mkdir()  # a live process's
    (tmp_path / "unrelated").mkdir()
    etc = SandboxEtc(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(
        [f"vfs-etc-{os.getppid()}-x2", "unrelated", os.path.basename(etc.directory)])


def test_sandbox_etc_follows_the_host(tmp_path: Path) -> None:
    host = tmp_path / "host-etc"
    (host / "ssl" / "certs").mkdir(parents=True)
    (host / "ssl" / "private").mkdir()
    (host / "ssl" / "private" / "key.pem").write_text("secret")
    (host / "ssl" / "certs" / "ca.pem").write_text("v1")
    (host / "ld.so.cache").write_text("cache")
    (host / "shadow").write_text("root:$6$...")
    (host / "resolv.conf").write_text("nameserver 10.0.0.1\n")
    (host / "localtime").symlink_to("/usr/share/zoneinfo/UTC")
    etc = SandboxEtc(str(tmp_path), etc=str(host))
    etc.recheck = 0
    first = Path(etc.path((1000, 1000), network=False))
    assert sorted(os.listdir(first)) == ["group", "hosts", "ld.so.cache", "localtime", "mtab",
                                         "nsswitch.conf", "passwd", "ssl"]
    assert os.listdir(first / "ssl") == ["certs"] and os.readlink(first / "localtime") == \
        "/usr/share/zoneinfo/UTC"
    assert etc.path((1000, 1000), network=False) == str(first)  # made once
    networked = Path(etc.path((1000, 1000), network=True))
    assert (networked / "resolv.conf").read_text() == "nameserver 10.0.0.1\n"
    (host / "ssl" / "certs" / "ca.pem").write_text("v2, longer")
    second = Path(etc.path((1000, 1000), network=False))
    assert second != first and (second / "ssl" / "certs" / "ca.pem").read_text() == "v2, longer"
    assert (first / "ssl" / "certs" / "ca.pem").read_text() == "v1"  # a sandbox may show it


@pytest.mark.trio
@needs_bwrap
async def test_bwrap_etc_has_what_programs_need(tmp_path: Path) -> None:
    case = Case("bwrap", BwrapRuntime(), None, True)
    script = ('id -un; getent hosts localhost; ls /etc/ssl/certs | head -1; '
              'awk "BEGIN { print 1 + 1 }"; test -r /etc/ld.so.cache && echo LDCACHE; '
              'ls /etc')
    run = make_run(tmp_path, case, script)
    assert await case.runtime.run(run) == [0]
    log = log_of(run)
    lines = log.split("\n")
    if os.geteuid() == 0:
        assert lines[0] == "nobody"
    assert "localhost" in lines[1] and lines[2] and lines[3] == "2" and "LDCACHE" in lines
    assert "shadow" not in lines and "vfs" not in lines


@pytest.mark.trio
@pytest.mark.parametrize("cgroups", [True, False], ids=["cgroup", "rlimit"])
async def test_pids_limit_stops_a_fork_bomb(case: Case, tmp_path: Path,
                                            cgroups: bool) -> None:
    if not case.isolated:
        pytest.skip("the process runtime does not limit processes")
    if os.geteuid() != 0:
        pytest.skip("the limits are set up by a root daemon")
    if not cgroups:
        if not isinstance(case.runtime, BwrapRuntime):
            pytest.skip("the RLIMIT_NPROC fallback is bwrap's (runc's is in its config)")
        case = Case("bwrap", BwrapRuntime(cgroups=PidsCgroups(None, "", "test")), None, True)
    elif isinstance(case.runtime, BwrapRuntime) and not case.runtime.cgroups.available:
        pytest.skip(f"no pids cgroup here: {case.runtime.cgroups.reason}")
    marker = f"7{uuid.uuid4().int % 10**8}.5"
    bomb = (f'i=0; while [ $i -lt 100 ]; do sleep {marker} & i=$((i + 1)); done; '
            'n=0; for p in /proc/[0-9]*; do n=$((n + 1)); done; echo procs=$n')
    bounded = make_run(tmp_path / "bounded", case, bomb, pids=32, timeout=60)
    assert await case.runtime.run(bounded) != [0]
    assert "fork" in log_of(bounded)
    roomy = make_run(tmp_path / "roomy", case, bomb, pids=256, timeout=60)
    assert await case.runtime.run(roomy) == [0]
    assert int(log_of(roomy).split("procs=")[1]) > 100
    assert processes_matching(marker) == []
    if isinstance(case.runtime, BwrapRuntime) and case.runtime.cgroups.available:
        parent = case.runtime.cgroups.parent
        assert parent is not None
        assert not [name for name in os.listdir(parent) if name.startswith(
            f"{case.runtime.cgroups.prefix}{os.getpid()}-")]


def test_cgroups_of_dead_daemons_are_swept() -> None:
    cgroups = PidsCgroups.find()
    if not cgroups.available:
        pytest.skip(f"no pids cgroup here: {cgroups.reason}")
    assert cgroups.parent is not None
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = os.path.join(cgroups.parent, f"{cgroups.prefix}{dead.pid}-left")
    ours = cgroups.create("kept", 10)
    os.mkdir(stale)
    try:
        assert cgroups.sweep() >= 1
        assert not os.path.exists(stale) and os.path.isdir(ours.path)
    finally:
        ours.close()
    assert not os.path.exists(ours.path)


def test_process_runtime_refuses_a_root_daemon_unless_allowed(tmp_path: Path) -> None:
    refusing = get_runtime("process")
    allowed = get_runtime("process", allow_process_as_root=True)
    allowed.check(None)
    if os.geteuid() != 0:
        refusing.check(None)  # a non-root daemon may always use it
        return
    with pytest.raises(InvalidSpec, match="--allow-process-runtime"):
        refusing.check(None)
    run = make_run(tmp_path, Case("process", refusing, None, False), "touch /tmp/x")
    with pytest.raises(InvalidSpec, match="unsandboxed"):
        trio.run(refusing.run, run)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory others can search, and all above it (as /var/lib/vfs)."""
    path = Path(tempfile.mkdtemp(prefix="vfs-userns-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.mark.trio
@needs_runc
@pytest.mark.parametrize("network", [False, True], ids=["own-network", "host-network"])
async def test_runc_user_namespace_where_the_kernel_allows(open_dir: Path,
                                                           network: bool) -> None:
    if Path("/proc/sys/user/max_user_namespaces").read_text().strip() == "0":
        pytest.skip("user namespaces are off on this kernel")
    base = DEFAULT_USERNS_BASE
    rootfs = make_busybox_rootfs(str(open_dir / "rootfs"))
    runtime = RuncRuntime(cache_dir=str(open_dir / "images"),
                          state_root=str(open_dir / "state"))
    case = Case("runc", runtime, rootfs, True)
    script = ('cat /proc/self/uid_map; id -u; cat /pfs/images/a.txt /pfs/models/m/weights; '
              'echo x > /pfs/out/made; ls -A /pfs/raw-logs; ls -n /pfs/images/a.txt')
    inputs = {"images": {"a.txt": b"hello\n"}, "models": {"m/weights": b"weights\n"},
              "raw-logs": {}}
    run = make_run(open_dir / "open", case, script, network=network, datums=[inputs])
    os.chmod(input_of(run) / "a.txt", 0o600)
    os.chmod(input_of(run, 0, "models") / "m" / "weights", 0o600)
    assert await runtime.run(run) == [0], log_of(run)
    lines = log_of(run).split("\n")
    assert lines[0].split() == ["0", str(base), "65536"]  # even its root is nobody here
    assert lines[1:4] == ["65534", "hello", "weights"]
    made = os.stat(Path(run.datums[0].out_dir) / "made")
    assert (made.st_uid, made.st_gid) == (base + 65534, base + 65534)
    assert case.leftover_containers() == []

    # A datum directory others cannot reach: no user namespace, the datum runs anyway.
    closed = open_dir / "closed"
    closed.mkdir(mode=0o700)
    run = make_run(closed, case, "cat /proc/self/uid_map; id -u", network=network)
    assert await runtime.run(run) == [0]
    lines = log_of(run).split("\n")
    assert lines[0].split() == ["0", "0", "4294967295"] and lines[1] == "65534"


# --- limits ---------------------------------------------------------------------------

@pytest.mark.trio
@needs_runc
async def test_runc_memory_limit_kills_a_greedy_command(busybox_rootfs: Path,
                                                        tmp_path: Path) -> None:
    runtime = RuncRuntime(cache_dir=str(tmp_path / "images"),
                          state_root=str(tmp_path / "runc-state"))
    if runtime.unsupported_limits(64 << 20, None):
        pytest.skip("this host's cgroups have no memory controller")
    case = Case("runc", runtime, str(busybox_rootfs), True)
    # busybox tail keeps a whole line in memory: /dev/zero is one endless line.
    greedy = make_run(tmp_path / "greedy", case,
                      "head -c 300000000 /dev/zero | tail >/dev/null", memory=64 << 20)
    modest = make_run(tmp_path / "modest", case,
                      "head -c 10000000 /dev/zero | tail >/dev/null", memory=64 << 20)
    assert await runtime.run(greedy) == [KILLED]
    assert await runtime.run(modest) == [0]
    assert case.leftover_containers() == []


@pytest.mark.trio
@needs_runc
async def test_runc_cpu_limit_is_accepted(busybox_rootfs: Path, tmp_path: Path) -> None:
    runtime = RuncRuntime(cache_dir=str(tmp_path / "images"),
                          state_root=str(tmp_path / "runc-state"))
    if runtime.unsupported_limits(None, 0.5):
        pytest.skip("this host's cgroups have no cpu controller")
    run = make_run(tmp_path, Case("runc", runtime, str(busybox_rootfs), True), "true",
                   cpus=0.5)
    assert await runtime.run(run) == [0]


def test_runc_config_carries_limits_and_namespaces(tmp_path: Path) -> None:
    case = Case("runc", RuncRuntime(), "/image", True)
    run = make_run(tmp_path, case, "true", memory=256 << 20, cpus=1.5)
    config = build_config(run, run.datums[0], image_mounts=[], image_env={}, memory_swap=True)
    assert config["linux"]["resources"]["memory"] == {"limit": 256 << 20, "swap": 256 << 20}
    assert config["linux"]["resources"]["cpu"] == {"quota": 150000, "period": 100000}
    kinds = {namespace["type"] for namespace in config["linux"]["namespaces"]}
    assert kinds == {"pid", "ipc", "uts", "mount", "network"}
    assert config["root"]["readonly"] and config["process"]["noNewPrivileges"]
    assert "CAP_SYS_ADMIN" not in config["process"]["capabilities"]["bounding"]
    binds = {mount["destination"]: mount["options"] for mount in config["mounts"]
             if mount["type"] == "bind"}
    assert binds == {"/pfs/images": ["rbind", "ro"], "/pfs/out": ["rbind", "rw"]}

    run.network = True
    unlimited = build_config(run, run.datums[0], image_mounts=[], image_env={},
                             supported=frozenset({"memory"}))
    assert "cpu" not in unlimited["linux"]["resources"]
    assert "swap" not in unlimited["linux"]["resources"]["memory"]
    assert "network" not in {ns["type"] for ns in unlimited["linux"]["namespaces"]}


@pytest.mark.trio
async def test_address_space_limit_where_there_are_no_cgroups(case: Case,
                                                              tmp_path: Path) -> None:
    if isinstance(case.runtime, RuncRuntime):
        pytest.skip("runc enforces memory with a cgroup (test above)")
    run = make_run(tmp_path, case, "ulimit -v", memory=512 << 20, cpus=1)
    assert await case.runtime.run(run) == [0]
    assert int(log_of(run)) == 512 << 10  # KiB
    assert case.runtime.unsupported_limits(512 << 20, 1) == ["cpus"]
    assert case.runtime.unsupported_limits(512 << 20, None) == []


# --- images -------------------------------------------------------------------------

def test_rootfs_digest_is_stable_and_follows_content(busybox_rootfs: Path,
                                                     tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(busybox_rootfs, copy, symlinks=True)
    runtime = RuncRuntime()
    digest = runtime.image_digest(str(busybox_rootfs))
    assert digest.startswith("blake3:")
    assert runtime.image_digest(str(busybox_rootfs)) == digest
    assert runtime.image_digest(str(copy)) == digest  # the place does not matter

    (copy / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    changed = runtime.image_digest(str(copy))
    assert changed != digest
    (copy / "etc" / "passwd").chmod(0o600)
    assert runtime.image_digest(str(copy)) not in (digest, changed)
    (copy / "bin" / "sh").unlink()
    (copy / "bin" / "sh").symlink_to("/bin/busybox")
    assert rootfs_digest(str(copy)) not in (digest, changed)


@pytest.mark.trio
@needs_runc
async def test_runc_leaves_the_image_untouched(busybox_rootfs: Path, tmp_path: Path) -> None:
    image = tmp_path / "image"
    shutil.copytree(busybox_rootfs, image, symlinks=True)
    for name in ("pfs", "proc", "dev"):  # runc would create these mount points
        (image / name).rmdir()
    before = rootfs_digest(str(image))
    case = Case("runc", RuncRuntime(state_root=str(tmp_path / "state")), str(image), True)
    # runc makes a mount point per input in the bundle's skeleton, not in the image.
    run = make_run(tmp_path, case, 'cat /pfs/images/a.txt > /pfs/out/a; ls -A /pfs/models',
                   datums=[{"images": {"a.txt": b"x"}, "models": {}}])
    assert await case.runtime.run(run) == [0], log_of(run)
    assert sorted(os.listdir(image)) == ["bin", "etc", "root", "tmp", "usr"]
    assert rootfs_digest(str(image)) == before


def test_oci_digest_is_the_manifest_digest(oci_layout: Path) -> None:
    index = json.loads((oci_layout / "index.json").read_text())
    assert RuncRuntime().image_digest(str(oci_layout)) == index["manifests"][0]["digest"]


def test_oci_layout_unpacks_layers_with_whiteouts(oci_layout: Path, tmp_path: Path) -> None:
    unpacked = oci.unpack(str(oci_layout), str(tmp_path / "cache"))
    rootfs = Path(unpacked.rootfs)
    assert (rootfs / "bin" / "busybox").read_bytes() == Path("/bin/busybox").read_bytes()
    assert os.readlink(rootfs / "bin" / "sh") == "busybox"
    assert (rootfs / "etc" / "layer2").read_text() == "upper layer\n"
    assert not (rootfs / "etc" / "removed").exists()
    assert os.listdir(rootfs / "opaque") == ["new"]
    assert os.path.samefile(rootfs / "etc" / "passwd.hard", rootfs / "etc" / "passwd")
    assert unpacked.env["IMAGE_VAR"] == "from-image"
    # A second call uses the cache.
    assert oci.unpack(str(oci_layout), str(tmp_path / "cache")) == unpacked


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_oci_layout_other_layer_compressions(compression: str, tmp_path: Path,
                                             make_layout) -> None:
    def layer(tar: tarfile.TarFile) -> None:
        add_file(tar, "etc/hello", b"hi\n")

    digest = make_layout(tmp_path / "image", [layer], [], compression=compression)
    assert RuncRuntime().image_digest(str(tmp_path / "image")) == digest
    unpacked = oci.unpack(str(tmp_path / "image"), str(tmp_path / "cache"))
    assert (Path(unpacked.rootfs) / "etc" / "hello").read_bytes() == b"hi\n"


def test_oci_layout_refuses_entries_escaping_the_image(tmp_path: Path, make_layout) -> None:
    def escaping(tar: tarfile.TarFile) -> None:
        add_file(tar, "../outside", b"x")

    def through_symlink(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("etc")
        info.type = tarfile.SYMTYPE
        info.linkname = str(tmp_path / "victim")
        tar.addfile(info)
        add_file(tar, "etc/passwd", b"x")

    (tmp_path / "victim").mkdir()
    for name, layer in (("escaping", escaping), ("symlink", through_symlink)):
        make_layout(tmp_path / name, [layer], [])
        with pytest.raises(InvalidSpec, match="outside the image|not a directory"):
            oci.unpack(str(tmp_path / name), str(tmp_path / "cache"))
    assert not (tmp_path / "outside").exists()
    assert os.listdir(tmp_path / "victim") == []


def test_oci_layout_detects_a_damaged_blob(oci_layout: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(oci_layout, damaged)
    manifest = oci.read_manifest(str(damaged))
    blob = damaged / "blobs" / "sha256" / manifest.layers[-1].digest.split(":")[1]
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # the gzip trailer: the tar still reads, the digest does not match
    blob.write_bytes(bytes(data))
    with pytest.raises(InvalidSpec, match="digest|unpacked"):
        oci.unpack(str(damaged), str(tmp_path / "cache"))
    assert [name for name in os.listdir(tmp_path / "cache")] == []


# --- check() and get_runtime() --------------------------------------------------------

def test_check_accepts_good_images(busybox_rootfs: Path, oci_layout: Path) -> None:
    if shutil.which("runc"):
        get_runtime("runc").check(str(busybox_rootfs))
        get_runtime("runc").check(str(oci_layout))
    if shutil.which("bwrap"):
        get_runtime("bwrap").check(None)
    get_runtime("process", allow_process_as_root=True).check(None)


@needs_runc
def test_check_explains_bad_images(busybox_rootfs: Path, oci_layout: Path,
                                   tmp_path: Path) -> None:
    runc = get_runtime("runc")
    with pytest.raises(InvalidSpec, match="does not exist"):
        runc.check(str(tmp_path / "missing"))
    with pytest.raises(InvalidSpec, match="needs 'transform.image'"):
        runc.check(None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidSpec, match="neither a root filesystem"):
        runc.check(str(tmp_path / "empty"))
    broken = tmp_path / "broken"
    shutil.copytree(oci_layout, broken)
    manifest = oci.read_manifest(str(broken))
    (broken / "blobs" / "sha256" / manifest.layers[0].digest.split(":")[1]).unlink()
    with pytest.raises(InvalidSpec, match="OCI image layout .* is missing"):
        runc.check(str(broken))
    (broken / "index.json").write_text("{}")
    with pytest.raises(InvalidSpec, match="no list of manifests"):
        runc.check(str(broken))
    with pytest.raises(InvalidSpec, match="runs host binaries"):
        get_runtime("process").check(str(busybox_rootfs))


def test_unknown_runtime_lists_the_known_ones() -> None:
    with pytest.raises(InvalidSpec, match="unknown runtime 'lxc': use one of runc, podman"):
        get_runtime("lxc")
    assert {name: type(get_runtime(name)).name for name in RUNTIMES} == {
        name: name for name in RUNTIMES}


@pytest.mark.parametrize("engine", ["podman", "docker"])
def test_missing_engine_is_a_clear_error(engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(InvalidSpec, match=f"needs {engine}, which is not installed"):
        get_runtime(engine).check("docker.io/library/busybox")
    with pytest.raises(InvalidSpec, match="not installed"):
        get_runtime(engine).image_digest("docker.io/library/busybox")


@pytest.mark.trio
async def test_missing_command_fails_the_datum(tmp_path: Path) -> None:
    case = Case("process", ProcessRuntime(allow_as_root=True), None, False)
    run = make_run(tmp_path, case, "")
    run.cmd = ["/nonexistent/program"]
    assert await case.runtime.run(run) == [127]
    assert "cannot run '/nonexistent/program'" in log_of(run)


@pytest.mark.trio
async def test_input_named_out_is_refused(tmp_path: Path) -> None:
    case = Case("process", ProcessRuntime(allow_as_root=True), None, False)
    run = make_run(tmp_path, case, "true")
    run.inputs = [("out", commit_of("out"))]
    with pytest.raises(InvalidSpec, match="/pfs/out is the output directory"):
        await case.runtime.run(run)


@pytest.mark.parametrize(("names", "message"), [
    (["images", "out"], "'out' cannot be shown at /pfs/out: /pfs/out is the output"),
    (["images", "images"], "two inputs are named 'images'"),
    ([""], "input name '' cannot be a directory under /pfs"),
    (["a/b"], "input name 'a/b' cannot be a directory under /pfs"),
    ([".cache"], "input name '.cache' cannot be a directory under /pfs"),
    (["a\0b"], "cannot be a directory under /pfs"),
    (["raw-logs", "raw_logs"], "'raw-logs' and 'raw_logs' would both set "
                               "VFS_INPUT_RAW_LOGS_COMMIT"),
])
def test_input_names_that_cannot_be_shown_are_refused(tmp_path: Path, names: list[str],
                                                      message: str) -> None:
    run = make_run(tmp_path, Case("process", ProcessRuntime(), None, False), "true")
    run.inputs = [(name, commit_of(name)) for name in names]
    with pytest.raises(InvalidSpec, match=re.escape(message)):
        check_run(run)
    run.inputs = []
    with pytest.raises(ValueError, match="at least one input"):
        check_run(run)


def test_commit_variable_of_an_input_with_a_dash(tmp_path: Path) -> None:
    case = Case("process", ProcessRuntime(), None, False)
    run = make_run(tmp_path, case, "true", datums=[{"raw-logs": {}}])
    env = datum_env(run, run.datums[0])
    assert env["VFS_INPUT_RAW_LOGS_COMMIT"] == env["VFS_INPUT_COMMIT"] == commit_of("raw-logs")


# --- podman and docker: the command line only ------------------------------------------

def test_podman_command_line(tmp_path: Path) -> None:
    case = Case("podman", PodmanRuntime(), "docker.io/library/python:3.12", True)
    run = make_run(tmp_path, case, "true", env={"THRESHOLD": "0.4"}, memory=1 << 30,
                   cpus=0.5)
    run.cmd = ["python3", "/code/edges.py", "--fast"]
    args = build_args(run, run.datums[0], name="vfs-x", engine="podman")
    datum = run.datums[0]
    assert args[:4] == ["podman", "run", "--rm", "--name"]
    assert "--network=none" in args
    assert args[args.index("--memory") + 1] == str(1 << 30)
    assert args[args.index("--cpus") + 1] == "0.5"
    # Never root, nothing to gain, nothing to write but /pfs/out and /tmp.
    if os.geteuid() == 0:
        assert args[args.index("--user") + 1] == "65534:65534"
    assert args[args.index("--cap-drop") + 1] == "ALL"
    assert args[args.index("--security-opt") + 1] == "no-new-privileges"
    assert "--read-only" in args and args[args.index("--pids-limit") + 1] == "512"
    volumes = [args[i + 1] for i, arg in enumerate(args) if arg == "--volume"]
    assert volumes == [f"{datum.input_dir}/images:/pfs/images:ro", f"{datum.out_dir}:/pfs/out"]
    envs = {args[i + 1] for i, arg in enumerate(args) if arg == "--env"}
    assert envs == {"THRESHOLD=0.4", f"VFS_DATUM_ID={datum.datum_id}", "VFS_JOB_ID=job-1",
                    f"VFS_INPUT_COMMIT={commit_of(REPO)}", "VFS_PFS=/pfs", "VFS_NODE=worker-1",
                    f"VFS_INPUT_IMAGES_COMMIT={commit_of(REPO)}"}
    assert args[-5:] == ["--entrypoint", "python3", "docker.io/library/python:3.12",
                         "/code/edges.py", "--fast"]

    run.network = True
    assert "--network=none" not in build_args(run, run.datums[0], name="vfs-x",
                                               engine="docker")


def test_docker_runs_each_datum_of_a_batch_in_its_own_container(tmp_path: Path) -> None:
    case = Case("docker", DockerRuntime(), "busybox", True)
    run = make_run(tmp_path, case, "true", contents=[b"a", b"b"])
    args = build_args(run, run.datums[1], name="vfs-x", engine="docker")
    volumes = [args[i + 1] for i, arg in enumerate(args) if arg == "--volume"]
    assert volumes == [f"{run.datums[1].input_dir}/images:/pfs/images:ro",
                       f"{run.datums[1].out_dir}:/pfs/out"]
    assert f"VFS_DATUM_ID={run.datums[1].datum_id}" in args
    assert args[-4:] == ["sh", "busybox", "-c", "true"]


def test_engine_command_line_has_a_read_only_volume_per_input(tmp_path: Path) -> None:
    case = Case("podman", PodmanRuntime(), "busybox", True)
    run = make_run(tmp_path, case, "true", datums=THREE_INPUTS[:1])
    datum = run.datums[0]
    for engine in ("podman", "docker"):
        args = build_args(run, datum, name="vfs-x", engine=engine)
        volumes = [args[i + 1] for i, arg in enumerate(args) if arg == "--volume"]
        assert volumes == [f"{datum.input_dir}/images:/pfs/images:ro",
                           f"{datum.input_dir}/models:/pfs/models:ro",
                           f"{datum.input_dir}/raw-logs:/pfs/raw-logs:ro",
                           f"{datum.out_dir}:/pfs/out"]
        envs = {args[i + 1] for i, arg in enumerate(args) if arg == "--env"}
        assert {f"VFS_INPUT_IMAGES_COMMIT={commit_of('images')}",
                f"VFS_INPUT_MODELS_COMMIT={commit_of('models')}",
                f"VFS_INPUT_RAW_LOGS_COMMIT={commit_of('raw-logs')}"} <= envs
        assert not [env for env in envs if env.startswith("VFS_INPUT_COMMIT=")]
