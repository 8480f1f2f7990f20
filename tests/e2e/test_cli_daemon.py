"""``vfsctl`` with a daemon owning the store: changes go through the control socket.

A *fake* vfsd (no FUSE: the real control server, :func:`daemon.control.serve_control`,
with a handler that calls the vfs library and writes down every request) stands in
for the daemon, so this tier needs neither /dev/fuse nor root. The same commands run
against a second store without a daemon must print the same thing; after the
daemon is killed with SIGKILL, vfsctl must notice and work directly again.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_SCRIPT = Path(sys.executable).with_name("vfsctl")
VFSCTL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "cli.main"]
FAKE_MOUNT = "/fake-vfsd-mount"

FAKE_VFSD = r'''
"""A stand-in for vfsd: the real control socket, a handler over the vfs library."""
import json
import os
import sys

import trio

import vfs
from daemon.control import serve_control
from daemon.protocol import commit_to_dict, remove_daemon_file, write_daemon_file
from vfs.names import parse_ref

store_url, cache, socket_path, record_path, mount = sys.argv[1:6]
store = vfs.open_store(store_url, cache_dir=cache)


class Handler:
    def dispatch(self, op, args):
        with open(record_path, "a") as record:
            record.write(json.dumps({"op": op, "args": args}) + "\n")
        return getattr(self, "op_" + op)(**args)

    def op_hello(self):
        return {"store_id": store.config.store_id, "pid": os.getpid(), "mount": mount}

    def op_status(self):
        return {"mount": mount, "pid": os.getpid(), "store": store.objects.url,
                "cache": {"dir": store.cache_dir, "used_bytes": 3 << 20,
                          "limit_bytes": 1 << 30},
                "open_commits": [{"repo": r, "branch": b,
                                  "changes": len(store.index.staged(r, b))}
                                 for r, b in store.index.open_commits()],
                "open_files": 2}

    def op_put(self, repo, branch, dest, sources, recursive=False, delete=False,
               stdin=False):
        if stdin:
            with open(sources[0], "rb") as f:
                result = vfs.put_stream(store, repo, branch, dest, f)
        else:
            result = vfs.put(store, repo, branch, dest, sources, recursive=recursive,
                             delete=delete)
        return {key: getattr(result, key) for key in (
            "files", "read", "cached", "unchanged", "staged", "deleted", "bytes_read",
            "bytes_stored")}

    def op_rm(self, repo, branch, path, recursive=False):
        return {"files": vfs.remove(store, repo, branch, path, recursive=recursive)}

    def op_commit(self, repo, branch, message="", author=None):
        return commit_to_dict(store.commit(repo, branch, message, author=author))

    def op_discard(self, repo, branch):
        return {"changes": store.discard(repo, branch)}

    def op_rollback(self, repo, branch, to, message="", author=None):
        target = parse_ref(to, allow_path=False)
        return commit_to_dict(store.rollback(repo, branch, target, message, author=author))

    def op_branch_create(self, repo, branch, **kwargs):
        start = kwargs.get("from")
        info = store.create_branch(repo, branch,
                                   parse_ref(start, allow_path=False) if start else None)
        return {"repo": info.repo, "branch": info.name, "head": info.head}

    def op_branch_delete(self, repo, branch):
        store.delete_branch(repo, branch)
        return {}

    def op_wait_staged(self, repo, branch):
        return {}

    def op_repo_delete(self, name, force=False):
        store.delete_repo(name, force=force)
        return {}


async def main():
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, socket_path, Handler())
        write_daemon_file(store.cache_dir, {"socket": socket_path, "pid": os.getpid(),
                                            "mount": mount,
                                            "store_id": store.config.store_id})
        print("ready", flush=True)


trio.run(main)
'''

HEX_ID = re.compile(r"\b[0-9a-f]{64}\b")
SHORT_ID = re.compile(r"\b[0-9a-f]{12}\b")
ISO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


class Vfsctl:
    """Runs ``vfsctl`` against the store and cache under one directory."""

    def __init__(self, root: Path) -> None:
        self.tmp = root
        self.env = {**os.environ, "VFS_STORE": str(root / "store"),
                    "VFS_CACHE": str(root / "cache"), "VFS_USER": "tester@e2e"}
        # No PYTHONPYCACHEPREFIX: it makes every start of vfsctl about twice as slow.
        for name in ("VFS_S3_ENDPOINT", "NOTIFY_SOCKET", "PYTHONPYCACHEPREFIX"):
            self.env.pop(name, None)

    def run(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run([*VFSCTL, *args], input=input, capture_output=True,
                              env=self.env, cwd=self.tmp, timeout=60)
        proc.out = proc.stdout.decode(errors="replace")  # type: ignore[attr-defined]
        proc.err = proc.stderr.decode(errors="replace")  # type: ignore[attr-defined]
        return proc

    def ok(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
        proc = self.run(*args, input=input)
        assert proc.returncode == 0, f"vfsctl {' '.join(args)} failed: {proc.err}"
        assert "Traceback" not in proc.err
        return proc

    def json(self, *args: str) -> object:
        return json.loads(self.ok(*args, "--json").out)

    def fails(self, *args: str) -> str:
        """A user error: exit status 1 and one line on stderr."""
        proc = self.run(*args)
        assert proc.returncode == 1, (proc.returncode, proc.out, proc.err)
        lines = proc.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vfsctl: error: "), proc.err
        return proc.err

    def assert_fsck_clean(self) -> None:
        proc = self.run("fsck")
        assert proc.returncode == 0, f"fsck found problems:\n{proc.out}{proc.err}"


class FakeDaemon:
    def __init__(self, cli: Vfsctl, script: Path, socket_path: str) -> None:
        self.cli = cli
        self.socket_path = socket_path
        self.record = cli.tmp / "requests.jsonl"
        self.process = subprocess.Popen(
            [sys.executable, str(script), cli.env["VFS_STORE"], cli.env["VFS_CACHE"],
             socket_path, str(self.record), FAKE_MOUNT],
            env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line != b"ready\n":
            self.process.kill()
            raise AssertionError(f"fake vfsd did not start: {self.process.stderr.read()}")

    def requests(self, *, hello: bool = False) -> list[dict]:
        if not self.record.exists():
            return []
        found = [json.loads(line) for line in self.record.read_text().splitlines()]
        return [r for r in found if hello or r["op"] != "hello"]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def short_dir() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="vfs-e2e-", dir="/tmp")  # socket paths are short
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def daemon_cli(tmp_path: Path, short_dir: str) -> Iterator[
        tuple[Vfsctl, FakeDaemon]]:
    root = tmp_path / "with-daemon"
    root.mkdir()
    cli = Vfsctl(root)
    cli.ok("init")
    cli.ok("repo", "create", "photos")
    script = tmp_path / "fake_vfsd.py"
    script.write_text(FAKE_VFSD)
    fake = FakeDaemon(cli, script, os.path.join(short_dir, "vfsd.sock"))
    try:
        yield cli, fake
    finally:
        fake.kill()
    cli.assert_fsck_clean()


@pytest.fixture
def direct_cli(tmp_path: Path) -> Iterator[Vfsctl]:
    root = tmp_path / "direct"
    root.mkdir()
    cli = Vfsctl(root)
    cli.ok("init")
    cli.ok("repo", "create", "photos")
    yield cli
    cli.assert_fsck_clean()


def make_source(root: Path) -> None:
    for rel, content in {"README.txt": b"hello\n", "data/numbers.csv": b"1,2\n" * 500,
                         "images/cat.png": bytes(range(256)) * 8}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        os.utime(path, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))


# Every command that changes state, with successes and user errors.
SCENARIO: list[tuple[tuple[str, ...], bytes | None]] = [
    (("put", "-r", "photos@main", "src"), None),  # a relative SRC
    (("put", "--json", "photos@main:/more/", "src/README.txt"), None),  # into a directory
    (("put", "photos@main:/notes/today.txt", "-"), b"from stdin\n"),
    (("put", "photos@main", "-"), b"no destination\n"),  # error: stdin needs a file path
    (("put", "photos@main", "src/missing.txt"), None),  # error: no such file
    (("rm", "photos@main:/images/cat.png"), None),
    (("rm", "photos@main:/data"), None),  # error: a directory without -r
    (("commit", "photos@main", "-m", "first"), None),
    (("commit", "photos@main"), None),  # error: nothing to commit
    (("branch", "create", "photos@dev", "--from", "photos@main"), None),
    (("branch", "create", "photos@dev"), None),  # error: exists
    (("put", "photos@dev:/x.txt", "-"), b"x\n"),
    (("discard", "photos@dev"), None),
    (("rm", "-r", "photos@main:/data"), None),
    (("commit", "--json", "photos@main", "-m", "second"), None),
    (("rollback", "photos@main", "--to", "main~1", "-m", "back"), None),
    (("rollback", "--json", "photos@main", "--to", "photos@main~1"), None),
    (("branch", "delete", "photos@dev"), None),
    (("repo", "delete", "photos"), None),  # error: has commits
    # A read, direct in both modes, after the daemon staged the files closed on the mount.
    (("status", "photos@main"), None),
]
EXPECTED_OPS = ["put", "put", "put", "put", "put", "rm", "rm", "commit", "commit",
                "branch_create", "branch_create", "put", "discard", "rm", "commit", "rollback",
                "rollback", "branch_delete", "repo_delete", "wait_staged"]


def normalize(text: str) -> str:
    text = ISO_TIME.sub("<TIME>", text)
    return SHORT_ID.sub("<SHORT>", HEX_ID.sub("<ID>", text))


def run_scenario(cli: Vfsctl) -> list[tuple[int, str, str]]:
    make_source(cli.tmp / "src")
    results = []
    for args, data in SCENARIO:
        proc = cli.run(*args, input=data)
        assert "Traceback" not in proc.err, proc.err
        results.append((proc.returncode, normalize(proc.out), normalize(proc.err)))
    return results


def test_changes_go_through_the_daemon(daemon_cli: tuple[Vfsctl, FakeDaemon],
                                       direct_cli: Vfsctl) -> None:
    cli, fake = daemon_cli
    through_daemon = run_scenario(cli)
    direct = run_scenario(direct_cli)
    for (args, _), got, want in zip(SCENARIO, through_daemon, direct, strict=True):
        assert got == want, f"vfsctl {' '.join(args)} differs through the daemon"
    assert [code for code, _, _ in direct].count(0) == 14  # the errors above, no others

    requests = fake.requests()
    assert [r["op"] for r in requests] == EXPECTED_OPS
    first = requests[0]["args"]
    assert first == {"repo": "photos", "branch": "main", "dest": "",
                     "sources": [str(cli.tmp / "src")], "recursive": True, "delete": False}
    assert requests[1]["args"]["dest"] == "more/"
    stdin = requests[2]["args"]
    assert stdin["stdin"] is True and stdin["dest"] == "notes/today.txt"
    assert not os.path.exists(stdin["sources"][0]), "the stdin spool file is removed"
    assert requests[9]["args"] == {"repo": "photos", "branch": "dev", "from": "photos@main"}
    # The caller, not the daemon's user, is the author of what it commits.
    assert requests[15]["args"] == {"repo": "photos", "branch": "main", "to": "photos@main~1",
                                    "message": "back", "author": "tester@e2e"}
    assert requests[18]["args"] == {"name": "photos", "force": False}
    # Reads stay direct: the daemon saw only hello for them.
    cli.ok("log", "photos@main")
    cli.ok("ls", "photos@main")
    assert len(fake.requests()) == len(requests)


def test_status_and_fallback_after_the_daemon_dies(
        daemon_cli: tuple[Vfsctl, FakeDaemon]) -> None:
    cli, fake = daemon_cli
    make_source(cli.tmp / "src")
    cli.ok("put", "-r", "photos@main", "src")
    state = cli.json("status")
    changes = state["open_commits"][0]["changes"]  # files and the directories they need
    assert changes >= 3
    assert state == {
        "running": True, "mount": FAKE_MOUNT, "pid": fake.process.pid,
        "store": cli.env["VFS_STORE"],
        "cache": {"dir": state["cache"]["dir"], "used_bytes": 3 << 20, "limit_bytes": 1 << 30},
        "open_commits": [{"repo": "photos", "branch": "main", "changes": changes}],
        "open_files": 2, "jobs": []}
    assert state["cache"]["dir"].startswith(cli.env["VFS_CACHE"])
    text = cli.ok("status").out
    assert f"pid {fake.process.pid}, mounted at {FAKE_MOUNT}" in text
    assert "3.0 MiB of 1.0 GiB" in text and f"photos@main  {changes} changes" in text

    daemon_file = Path(state["cache"]["dir"]) / "daemon.json"
    assert daemon_file.exists()
    fake.kill()
    seen = len(fake.requests())
    # vfsctl notices the dead daemon, cleans its file up and works directly.
    put = cli.ok("put", "photos@main:/again.txt", "-", input=b"again\n")
    assert "1 files: 1 staged" in put.err
    assert not daemon_file.exists()
    assert len(fake.requests()) == seen
    cli.ok("commit", "photos@main", "-m", "without the daemon")
    assert cli.ok("status").out == "no vfsd is running for this store\n" \
                                   "no open commits on this node\n"
    cli.ok("put", "photos@main:/b.txt", "-", input=b"b\n")
    text = cli.ok("status").out
    assert text == "no vfsd is running for this store\nopen commits on this node:\n" \
                   "  photos@main  1 change\n"
    state = cli.json("status")
    assert state["running"] is False and state["pid"] is None
    assert state["open_commits"] == [{"repo": "photos", "branch": "main", "changes": 1}]
    cli.ok("discard", "photos@main")


def test_unmount_without_a_mount(daemon_cli: tuple[Vfsctl, FakeDaemon], short_dir: str) -> None:
    cli, fake = daemon_cli
    err = cli.fails("unmount", short_dir)
    assert f"nothing is mounted at {short_dir}" in err and f"mounts {FAKE_MOUNT}" in err
    fake.kill()
    err = cli.fails("unmount", short_dir)
    assert err.strip() == f"vfsctl: error: nothing is mounted at {short_dir}"
    err = cli.fails("mount", "/proc")
    assert "/proc is already a mount point (proc)" in err


# -- a real vfsd -----------------------------------------------------------------------


def _can_mount() -> bool:
    return (os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None
            and os.getuid() == 0)


@pytest.mark.skipif(not _can_mount(), reason="needs /dev/fuse, fusermount3 and root")
def test_mount_and_unmount_a_real_vfsd(tmp_path: Path, short_dir: str) -> None:
    root = tmp_path / "real"
    root.mkdir()
    cli = Vfsctl(root)
    cli.ok("init")
    cli.ok("repo", "create", "photos")
    mountpoint = Path(short_dir) / "pfs"  # created by vfsctl mount
    control = os.path.join(short_dir, "vfsd.sock")  # not /run/vfs: other tests mount too
    pids: list[int] = []
    try:
        err = cli.ok("mount", str(mountpoint), "--socket", control).err
        assert err.startswith(f"mounted {root / 'store'} at {mountpoint} (vfsd pid ")
        assert os.path.ismount(mountpoint)
        state = cli.json("status")
        pids.append(state["pid"])
        assert state["running"] and state["mount"] == str(mountpoint)
        assert stat.S_IMODE(os.stat(control).st_mode) == 0o600
        assert "already mounts this store" in cli.fails("mount", str(mountpoint))

        cli.ok("put", "photos@main:/notes/a.txt", "-", input=b"through the daemon\n")
        assert (mountpoint / "photos@main" / "notes" / "a.txt").read_bytes() == \
            b"through the daemon\n"
        commit = cli.ok("commit", "photos@main", "-m", "one").out.strip()
        assert (mountpoint / f"photos@{commit}" / "notes" / "a.txt").exists()

        assert cli.ok("unmount", str(mountpoint)).err == \
            f"unmounted {mountpoint} (vfsd pid {pids[0]} stopped)\n"
        assert not os.path.ismount(mountpoint) and not os.path.exists(control)
        assert cli.ok("status").out.startswith("no vfsd is running for this store\n")

        # A daemon killed with SIGKILL leaves a stale mount: unmount clears it.
        cli.ok("mount", str(mountpoint), "--socket", control)
        pids.append(cli.json("status")["pid"])
        os.kill(pids[1], signal.SIGKILL)
        err = cli.ok("unmount", str(mountpoint)).err
        assert "stale mount of a vfsd that is gone" in err
        assert "fuse" not in (_mount_line(mountpoint) or "")
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if _mount_line(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
    cli.assert_fsck_clean()


def _mount_line(mountpoint: Path) -> str | None:
    with open("/proc/self/mountinfo") as f:
        return next((line for line in f if f" {mountpoint} " in line), None)
