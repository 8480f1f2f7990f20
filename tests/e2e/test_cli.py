"""``vfsctl`` as a user runs it: the installed console script in a subprocess.

Every test gets its own store and cache under ``tmp_path`` (through ``VFS_STORE``
and ``VFS_CACHE``), and the ``vfsctl`` fixture runs ``vfsctl fsck`` on that store
when the test ends: whatever a test did, the store must still be consistent.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import vfs
from vfs.nodes import ACTIVE, NodeIdentity, record_key
from vfs.objstore.local import LocalStore
from vfs.pipeline import claims, records
from vfs.staging import new_dir
from vfs.tree import FILE, Entry, inline_ref

_SCRIPT = Path(sys.executable).with_name("vfsctl")
VFSCTL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "cli.main"]
COMMIT_ID = re.compile(r"^[0-9a-f]{64}$")


class Vfsctl:
    """Runs ``vfsctl`` against one store; ``ok``/``fails`` also check the exit status."""

    def __init__(self, tmp_path: Path, pycache: Path) -> None:
        self.tmp = tmp_path
        self.env = {
            **os.environ,
            "VFS_STORE": str(tmp_path / "store"),
            "VFS_CACHE": str(tmp_path / "cache"),
            "VFS_USER": "tester@e2e",
            # Compiled modules outside the source tree: each run need not recompile vfs.
            "PYTHONPYCACHEPREFIX": str(pycache),
        }
        for name in ("VFS_S3_ENDPOINT", "PYTHONDONTWRITEBYTECODE"):
            self.env.pop(name, None)

    def run(self, *args: str, input: bytes | str | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        data = input.encode() if isinstance(input, str) else input
        proc = subprocess.run([*VFSCTL, *args], input=data, capture_output=True,
                              env=self.env, cwd=cwd or self.tmp, timeout=60)
        proc.out = proc.stdout.decode(errors="replace")  # type: ignore[attr-defined]
        proc.err = proc.stderr.decode(errors="replace")  # type: ignore[attr-defined]
        return proc

    def ok(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        proc = self.run(*args, **kwargs)
        assert proc.returncode == 0, f"vfsctl {' '.join(args)} failed: {proc.err}"
        assert "Traceback" not in proc.err
        return proc

    def json(self, *args: str, **kwargs) -> object:
        return json.loads(self.ok(*args, "--json", **kwargs).out)

    def fails(self, *args: str, code: int = 1, **kwargs) -> str:
        """Run a command that must fail as a user error: one stderr line, no traceback."""
        proc = self.run(*args, **kwargs)
        assert proc.returncode == code, (proc.returncode, proc.out, proc.err)
        assert "Traceback" not in proc.err
        if code == 1:
            lines = proc.err.strip().splitlines()
            assert len(lines) == 1, proc.err
            assert lines[0].startswith("vfsctl: error: "), proc.err
        return proc.err

    def assert_fsck_clean(self) -> None:
        proc = self.run("fsck")
        assert proc.returncode == 0, f"fsck found problems:\n{proc.out}{proc.err}"


@pytest.fixture(scope="session")
def pycache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pycache")


@pytest.fixture
def vfsctl(tmp_path: Path, pycache: Path):
    cli = Vfsctl(tmp_path, pycache)
    cli.ok("init")
    yield cli
    cli.assert_fsck_clean()


def make_tree(root: Path) -> dict[str, bytes]:
    """A small source directory; returns relative path -> content."""
    files = {
        "README.txt": b"hello vfs\n",
        "data/numbers.csv": b"".join(b"%d,%d\n" % (i, i * i) for i in range(2000)),
        "data/empty.bin": b"",
        "data/deep/nested/blob.bin": os.urandom(1_500_000),  # several chunks
        "images/cat.png": bytes(range(256)) * 40,
    }
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    out = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory, name)
            out[str(path.relative_to(root))] = path.read_bytes()
    return out


def status_lines(cli: Vfsctl, ref: str) -> list[str]:
    return [" ".join(line.split()) for line in cli.ok("status", ref).out.splitlines()]


# -- the user story ----------------------------------------------------------------------


def test_user_story(vfsctl: Vfsctl, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = make_tree(src)

    assert "already exists" in vfsctl.ok("init").out  # idempotent
    vfsctl.ok("repo", "create", "photos", "--description", "holiday photos")
    assert "photos" in vfsctl.ok("repo", "list").out

    put = vfsctl.ok("put", "photos@main", str(src), "-r")
    assert put.out == ""
    assert re.fullmatch(
        r"5 files: 5 staged, 0 unchanged \(5 read, 0 from the files cache\), .* new data\n",
        put.err,
    )
    assert status_lines(vfsctl, "photos@main") == [f"added /{p}" for p in sorted(files)]

    first = vfsctl.ok("commit", "photos@main", "-m", "first import").out
    assert COMMIT_ID.match(first.strip()) and first.count("\n") == 1
    first = first.strip()
    assert "nothing staged" in vfsctl.ok("status", "photos@main").out

    log = vfsctl.ok("log", "photos@main").out
    assert first[:12] in log and first not in log and "first import" in log

    listing = vfsctl.ok("ls", "-l", "-R", "photos@main").out
    for rel in files:
        assert rel in listing
    assert "data/deep/nested/" in listing and "MiB" in listing and "KiB" in listing
    top = vfsctl.ok("ls", "photos@main").out.split()
    assert top == ["README.txt", "data/", "images/"]
    assert vfsctl.ok("ls", "photos@main:/data/deep").out.split() == ["nested/"]

    for rel in ("README.txt", "data/deep/nested/blob.bin", "data/empty.bin"):
        assert vfsctl.ok("cat", f"photos@main:/{rel}").stdout == files[rel]

    out = tmp_path / "out"
    vfsctl.ok("get", "photos@main", str(out))
    assert read_tree(out) == files
    vfsctl.ok("get", "photos@main:/data/numbers.csv", str(tmp_path / "numbers.csv"))
    assert (tmp_path / "numbers.csv").read_bytes() == files["data/numbers.csv"]

    # Change one file, delete another, mirror the directory again.
    (src / "README.txt").write_bytes(b"hello again\n")
    (src / "images" / "cat.png").unlink()
    put = vfsctl.ok("put", "photos@main", str(src), "-r", "--delete")
    assert "1 deleted" in put.err and "3 unchanged" in put.err
    assert status_lines(vfsctl, "photos@main") == ["modified /README.txt",
                                                   "deleted /images/cat.png"]
    second = vfsctl.ok("commit", "photos@main", "-m", "second").out.strip()

    assert vfsctl.ok("diff", "photos@main").out.splitlines() == [
        "M /README.txt", "D /images/cat.png"]
    assert vfsctl.ok("diff", f"photos@{first[:8]}", f"photos@{second}").out.splitlines() == [
        "M /README.txt", "A /images/cat.png"]

    rolled = vfsctl.ok("rollback", "photos@main", "--to", first[:10]).out.strip()
    assert COMMIT_ID.match(rolled) and rolled not in (first, second)
    assert vfsctl.ok("diff", "photos@main", f"photos@{first}").out == ""
    assert vfsctl.ok("cat", "photos@main:/images/cat.png").stdout == files["images/cat.png"]
    assert vfsctl.ok("log", "photos@main").out.count("\n") == 4  # header + 3 commits

    reflog = vfsctl.ok("reflog", "photos@main").out.splitlines()
    assert [line.split()[-1] for line in reflog[1:3]] == ["created", "commit"]
    assert "rollback" in reflog[-1] and len(reflog) == 5
    moves = vfsctl.json("reflog", "photos@main")
    assert [m["to"] for m in moves] == [None, first, second, rolled]
    assert [m["from"] for m in moves[1:]] == [m["to"] for m in moves[:-1]]

    changed = vfsctl.json("log", "photos@main:/README.txt")
    assert [c["id"] for c in changed] == [rolled, second, first]
    assert [c["id"] for c in vfsctl.json("log", "photos@main:/data")] == [first]
    assert [c["id"] for c in vfsctl.json("log", "photos@main", "-n", "1")] == [rolled]

    details = vfsctl.ok("inspect", f"photos@{second[:12]}").out
    for needle in (second, first, "second", "tester@e2e", "files", "MiB"):
        assert needle in details

    # A branch from an old commit, data from stdin, then cleaning up the branch.
    vfsctl.ok("branch", "create", "photos@dev", "--from", f"photos@{second}")
    vfsctl.ok("put", "photos@dev:/notes/today.txt", "-", input=b"from stdin\n")
    assert status_lines(vfsctl, "photos@dev") == ["added /notes/today.txt"]
    vfsctl.ok("commit", "photos@dev", "-m", "notes")
    assert vfsctl.ok("cat", "photos@dev:/notes/today.txt").stdout == b"from stdin\n"
    assert "dev" in vfsctl.ok("branch", "list", "photos").out
    vfsctl.ok("branch", "delete", "photos@dev")
    assert [b["name"] for b in vfsctl.json("branch", "list", "photos")] == ["main"]

    # rm and discard.
    vfsctl.fails("rm", "photos@main:/data")
    vfsctl.ok("rm", "photos@main:/data", "-r")
    assert "deleted /data/numbers.csv" in status_lines(vfsctl, "photos@main")
    vfsctl.ok("discard", "photos@main")
    assert "nothing staged" in vfsctl.ok("status", "photos@main").out

    assert "0 packs" in vfsctl.ok("gc", "--dry-run", "--grace", "0").out
    vfsctl.ok("gc", "--grace", "1h", "--reflog-retention", "30d")
    assert "rebuilt" in vfsctl.ok("index", "rebuild").out
    vfsctl.ok("fsck", "--deep")
    assert vfsctl.ok("cat", "photos@main:/data/deep/nested/blob.bin").stdout == \
        files["data/deep/nested/blob.bin"]


# -- JSON for scripts ------------------------------------------------------------------


def test_json_documents(vfsctl: Vfsctl, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    vfsctl.ok("repo", "create", "tables")
    put = vfsctl.json("put", "tables@main:/in", str(src), "-r")
    assert put["staged"] == 5 and put["dest"] == "/in"
    assert {"files", "read", "unchanged", "deleted", "bytes_read", "bytes_stored"} <= put.keys()

    status = vfsctl.json("status", "tables@main")
    assert status["head"] is None
    assert {c["status"] for c in status["changes"]} == {"added"}
    assert {"status", "path", "size"} <= status["changes"][0].keys()

    commit = vfsctl.json("commit", "tables@main", "-m", "one")
    assert COMMIT_ID.match(commit["id"]) and commit["parents"] == []

    (src / "README.txt").write_bytes(b"changed\n")
    vfsctl.ok("put", "tables@main:/in", str(src), "-r")
    vfsctl.ok("commit", "tables@main", "-m", "two")

    log = vfsctl.json("log", "tables@main")
    keys = {"id", "parents", "tree", "message", "author", "time", "files", "bytes", "branch",
            "provenance"}
    assert all(keys <= c.keys() for c in log)
    assert [c["message"] for c in log] == ["two", "one"]
    assert log[0]["parents"] == [commit["id"]] and len(log[0]["id"]) == 64
    assert log[0]["files"] == 5 and log[0]["author"] == "tester@e2e"

    ls = vfsctl.json("ls", "tables@main:/in", "-R")
    assert all({"path", "name", "type", "size", "mode", "mtime"} <= e.keys() for e in ls)
    by_path = {e["path"]: e for e in ls}
    assert by_path["/in/data"]["type"] == "dir"
    assert by_path["/in/README.txt"] == {**by_path["/in/README.txt"], "type": "file",
                                         "size": 8, "name": "README.txt"}

    assert vfsctl.json("diff", "tables@main") == [
        {"status": "modified", "path": "/in/README.txt", "size": 8, "old_size": 10}]
    inspect = vfsctl.json("inspect", "tables@main")
    assert inspect["id"] == log[0]["id"] and "metadata" in inspect

    repos = vfsctl.json("repo", "list")
    assert [(r["name"], r["description"]) for r in repos] == [("tables", "")]
    assert repos[0]["created"].endswith("Z")
    repo = vfsctl.json("repo", "inspect", "tables")
    assert repo["branches"] == [{"name": "main", "head": log[0]["id"]}]
    assert vfsctl.json("branch", "list", "tables") == [
        {"repo": "tables", "name": "main", "head": log[0]["id"]}]
    reflog = vfsctl.json("reflog", "tables@main")
    assert {"when", "who", "from", "to", "why"} <= reflog[0].keys()

    gc = vfsctl.json("gc", "--dry-run")
    assert gc["dry_run"] is True and {"packs_deleted", "packs_repacked", "bytes_freed",
                                      "commits_deleted"} <= gc.keys()
    fsck = vfsctl.json("fsck")
    assert fsck["problems"] == [] and fsck["commits"] == 2
    rebuilt = vfsctl.json("index", "rebuild")
    assert rebuilt["commits"] == 2 and {"packs", "blobs"} <= rebuilt.keys()


# -- what users get wrong --------------------------------------------------------------


def test_bad_names_refs_and_paths(vfsctl: Vfsctl, tmp_path: Path) -> None:
    assert "invalid repository name" in vfsctl.fails("repo", "create", "bad name!")
    vfsctl.ok("repo", "create", "r1")
    assert "already exists" in vfsctl.fails("repo", "create", "r1")
    assert "nope" in vfsctl.fails("ls", "nope@main")
    assert "r1@nope" in vfsctl.fails("ls", "r1@nope")
    assert "abcdef123456" in vfsctl.fails("ls", "r1@abcdef123456")
    assert "invalid branch name" in vfsctl.fails("branch", "create", "r1@-x")
    vfsctl.fails("log", "no-at-sign")
    vfsctl.fails("commit", "r1@main:/path")  # a branch, not a path, is committed
    assert "no commits" in vfsctl.fails("inspect", "r1@main")

    (tmp_path / "f.txt").write_bytes(b"x")
    assert "'..'" in vfsctl.fails("put", "r1@main:/a/../../etc/passwd", str(tmp_path / "f.txt"))
    vfsctl.ok("put", "r1@main:/f.txt", str(tmp_path / "f.txt"))
    vfsctl.ok("commit", "r1@main")
    assert "'..'" in vfsctl.fails("ls", "r1@main:/../x")
    assert "'..'" in vfsctl.fails("cat", "r1@main:/x/../../f.txt")
    assert "'..'" in vfsctl.fails("get", "r1@main:/..", str(tmp_path / "d"))
    assert "/missing" in vfsctl.fails("cat", "r1@main:/missing")
    assert "needs a path" in vfsctl.fails("cat", "r1@main")
    assert "history is shorter" in vfsctl.fails("ls", "r1@main~5")
    assert "not of" in vfsctl.fails("rollback", "r1@main", "--to", "r2@main")


def test_refusals_leave_things_untouched(vfsctl: Vfsctl, tmp_path: Path) -> None:
    vfsctl.ok("repo", "create", "r")
    src = tmp_path / "src"
    make_tree(src)
    assert "-r" in vfsctl.fails("put", "r@main", str(src))
    assert "nothing to commit" in vfsctl.fails("commit", "r@main")
    assert "no such file" in vfsctl.fails("put", "r@main:/x", str(tmp_path / "absent"))
    vfsctl.ok("put", "r@main", str(src), "-r")
    vfsctl.ok("commit", "r@main")
    assert "nothing to commit" in vfsctl.fails("commit", "r@main")

    target = tmp_path / "keep.txt"
    target.write_bytes(b"precious")
    before = target.stat().st_mtime_ns
    assert "refusing to overwrite" in vfsctl.fails("get", "r@main:/README.txt", str(target))
    assert target.read_bytes() == b"precious" and target.stat().st_mtime_ns == before

    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "README.txt").write_bytes(b"mine")
    assert "already exists" in vfsctl.fails("get", "r@main", str(dest))
    assert [p.name for p in dest.iterdir()] == ["README.txt"]  # nothing written at all
    assert (dest / "README.txt").read_bytes() == b"mine"

    vfsctl.ok("rm", "r@main:/README.txt")
    assert "staged changes" in vfsctl.fails("rollback", "r@main", "--to", "main")
    vfsctl.ok("discard", "r@main")
    assert vfsctl.ok("cat", "r@main:/README.txt").stdout == b"hello vfs\n"
    assert "has commits" in vfsctl.fails("repo", "delete", "r")
    vfsctl.ok("repo", "delete", "r", "--force")
    assert vfsctl.json("repo", "list") == []


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_put_of_a_fifo_or_device_is_refused_at_once(vfsctl: Vfsctl, tmp_path: Path,
                                                   kind: str) -> None:
    # Reading either would never end (a FIFO nobody writes, /dev/zero): refused up
    # front, as a user error naming the source. Vfsctl.run's timeout fails a hang.
    vfsctl.ok("repo", "create", "r")
    if kind == "fifo":
        source = tmp_path / "pipe"
        os.mkfifo(source)
    else:
        source = Path(kind)
    err = vfsctl.fails("put", "r@main:/x", str(source))
    assert str(source) in err and "not a file" in err
    assert "nothing to commit" in vfsctl.fails("commit", "r@main")


def test_put_of_a_directory_skips_special_files_with_a_note(vfsctl: Vfsctl,
                                                            tmp_path: Path) -> None:
    vfsctl.ok("repo", "create", "r")
    src = tmp_path / "src"
    make_tree(src)
    os.mkfifo(src / "data" / "pipe")
    put = vfsctl.ok("put", "r@main", str(src), "-r")
    assert f"skipped {src / 'data' / 'pipe'}" in put.err
    vfsctl.ok("commit", "r@main")
    assert "pipe" not in vfsctl.ok("ls", "r@main:/data").out
    assert vfsctl.ok("cat", "r@main:/README.txt").stdout == b"hello vfs\n"


def stored_modes(cli: Vfsctl, ref: str) -> dict[str, int]:
    """Path -> mode as the commit's trees hold it (not as any reader shows it)."""
    with vfs.open_store(cli.env["VFS_STORE"], cache_dir=cli.env["VFS_CACHE"]) as store:
        _, snapshot = store.snapshot(vfs.parse_ref(ref))
        return {path: entry.mode for path, entry in snapshot.walk()}


def test_put_keeps_only_the_permission_bits(vfsctl: Vfsctl, tmp_path: Path) -> None:
    # A setuid copy of a program put as anyone must not come back out setuid-root.
    vfsctl.ok("repo", "create", "r")
    src = tmp_path / "src"
    (src / "shared").mkdir(parents=True)
    (src / "shared" / "id").write_bytes(b"\x7fELF not really")
    os.chmod(src / "shared" / "id", 0o4755)
    os.chmod(src / "shared", 0o3775)
    vfsctl.ok("put", "r@main", str(src), "-r")
    vfsctl.ok("commit", "r@main")
    assert {path: oct(mode) for path, mode in stored_modes(vfsctl, "r@main").items()} \
        == {"shared": oct(0o775), "shared/id": oct(0o755)}


def test_get_drops_setuid_bits_an_older_version_stored(vfsctl: Vfsctl,
                                                       tmp_path: Path) -> None:
    # Stores written before the bits were dropped on the way in may hold them.
    vfsctl.ok("repo", "create", "r")
    with vfs.open_store(vfsctl.env["VFS_STORE"], cache_dir=vfsctl.env["VFS_CACHE"]) as store:
        data = b"#!/bin/sh\nid\n"
        store.stage(store.head("r", "main"), {
            "tmp": new_dir("tmp", 0o1777),
            "tmp/id": Entry("id", FILE, 0o6755, len(data), 1, inline_ref(data)),
        })
        store.commit("r", "main", "written by an older version")
    assert stored_modes(vfsctl, "r@main") == {"tmp": 0o1777, "tmp/id": 0o6755}
    out = tmp_path / "out"
    vfsctl.ok("get", "r@main", str(out))
    assert oct(stat.S_IMODE(os.stat(out / "tmp" / "id").st_mode)) == oct(0o755)
    assert oct(stat.S_IMODE(os.stat(out / "tmp").st_mode)) == oct(0o777)
    vfsctl.ok("get", "r@main:/tmp/id", str(tmp_path / "one"))
    assert oct(stat.S_IMODE(os.stat(tmp_path / "one").st_mode)) == oct(0o755)
    # Listings show the mode get writes.
    assert vfsctl.ok("ls", "-l", "r@main:/tmp").out.split()[:2] == ["-", "0755"]
    assert [item["mode"] for item in vfsctl.json("ls", "r@main:/tmp")] == [0o755]


def test_mount_passes_the_datum_timeout_to_vfsd(vfsctl: Vfsctl, tmp_path: Path) -> None:
    # vfsd itself judges the value: one it refuses shows that it got it.
    proc = vfsctl.run("mount", str(tmp_path / "mnt"), "--datum-timeout", "forever")
    assert proc.returncode == 1, proc.err
    assert "--datum-timeout must be a positive duration" in proc.err
    assert not os.path.ismount(tmp_path / "mnt")


def test_usage_errors_exit_2(vfsctl: Vfsctl) -> None:
    assert "No such command" in vfsctl.fails("frobnicate", code=2)
    vfsctl.fails("repo", "create", code=2)  # missing NAME
    vfsctl.fails("ls", "--bogus", "r@main", code=2)
    assert "duration" in vfsctl.fails("gc", "--grace", "5 parsecs", code=2)
    vfsctl.ok("repo", "create", "r")
    vfsctl.fails("put", "r@main:/x", "-", "other", code=2)


def test_missing_store_and_internal_errors(vfsctl: Vfsctl, tmp_path: Path) -> None:
    err = vfsctl.fails("--store", str(tmp_path / "elsewhere"), "repo", "list")
    assert "vfsctl init" in err

    # An unexpected exception is a bug: one line, and the traceback only with --debug.
    boom = ("import vfs, cli.main\n"
            "def boom(*a, **k): raise RuntimeError('kaput')\n"
            "vfs.open_store = boom\n"
            "cli.main.main()\n")
    proc = subprocess.run([sys.executable, "-c", boom, "repo", "list"], capture_output=True,
                          env=vfsctl.env, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr == ("vfsctl: internal error: RuntimeError: kaput "
                           "(rerun with --debug for the traceback)\n")
    proc = subprocess.run([sys.executable, "-c", boom, "--debug", "repo", "list"],
                          capture_output=True, env=vfsctl.env, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "kaput" in proc.stderr


def test_cat_into_a_closed_pipe_exits_quietly(vfsctl: Vfsctl, tmp_path: Path) -> None:
    vfsctl.ok("repo", "create", "r")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3_000_000))
    vfsctl.ok("put", "r@main:/big.bin", str(big))
    vfsctl.ok("commit", "r@main")
    proc = subprocess.Popen([*VFSCTL, "cat", "r@main:/big.bin"], env=vfsctl.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(10) == big.read_bytes()[:10]
    proc.stdout.close()  # like `| head -c 10`
    err = proc.stderr.read()
    proc.stderr.close()
    code = proc.wait(timeout=30)
    assert code in (141, -signal.SIGPIPE), (code, err)
    assert err == b""


def test_gc_deletes_the_claims_of_a_finished_job_and_inspect_says_so(
        vfsctl: Vfsctl, tmp_path: Path) -> None:
    import time

    objects = LocalStore(str(tmp_path / "store"))
    job_id, digest = "edges.20260101T000000000-0001", "ab" * 32
    record = records.JobRecord(job_id, "edges", 1, "in", "main", "0" * 64, state="success")
    claims.save_plan(objects, job_id, {"v": 1, "job": record.to_dict(),
                                       "tasks": [["a.txt", digest]]})
    held = claims.claim(objects, job_id, digest, NodeIdentity("a" * 32, "node-a"),
                        now=time.time(), ttl=30.0)
    claims.finish(objects, held)
    records.create_job(objects, record)
    assert "node-a" in vfsctl.ok("job", "inspect", job_id).out
    assert vfsctl.json("gc", "--dry-run", "--grace", "0")["claims_deleted"] == 0  # just ended
    past = time.time() - 7200
    for path in [*(tmp_path / "store" / "claims" / job_id).iterdir(),
                 tmp_path / "store" / "jobs" / "edges" / job_id]:
        os.utime(path, (past, past))
    dry = vfsctl.ok("gc", "--dry-run").out
    assert "2 claim objects of finished jobs would be deleted" in dry
    assert "2 claim objects of finished jobs deleted" in vfsctl.ok("gc").out
    assert list(objects.list("claims/")) == []
    text = vfsctl.ok("job", "inspect", job_id).out
    assert "collected by gc" in text and "success" in text and "node-a" not in text
    inspected = vfsctl.json("job", "inspect", job_id)
    assert inspected["claims_collected"] is True and inspected["datums"] == []


def test_gc_waits_for_an_active_node_and_refuses_while_it_is_stale(
        vfsctl: Vfsctl, tmp_path: Path) -> None:
    import time

    vfsctl.ok("repo", "create", "data")
    (tmp_path / "y.bin").write_bytes(os.urandom(200_000))
    node_a = {**vfsctl.env, "VFS_CACHE": str(tmp_path / "cache-a"), "VFS_NODE_NAME": "node-a"}
    node_b = {**vfsctl.env, "VFS_NODE_NAME": "node-b"}
    vfsctl.env = node_a
    vfsctl.ok("put", "data@main:/y.bin", str(tmp_path / "y.bin"))
    vfsctl.ok("discard", "data@main")  # garbage now
    with vfs.open_store(node_a["VFS_STORE"], cache_dir=node_a["VFS_CACHE"]) as store:
        store.presence.publish(ACTIVE)  # as if node a were in the middle of a write
        record = Path(node_a["VFS_STORE"]) / record_key(store.node.id)
    vfsctl.env = node_b
    first = vfsctl.json("gc", "--grace", "0")
    assert first["packs_condemned"] == 1 and first["packs_deleted"] == 0
    assert first["waiting_for"] == ["node-a"]
    assert "node-a" in vfsctl.ok("gc", "--grace", "0").err  # the note says who it waits for
    statuses = {n["name"]: n["status"] for n in vfsctl.json("nodes")}
    assert statuses["node-a"] == "alive"
    past = time.time() - 3600
    os.utime(record, (past, past))  # node a fell silent mid-write an hour ago
    assert {n["name"]: n["status"] for n in vfsctl.json("nodes")}["node-a"] == "stale"
    err = vfsctl.fails("gc", "--grace", "0", code=3)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "node-a" in lines[0] and "--ignore-node" in lines[0], err
    assert len(list((Path(node_a["VFS_STORE"]) / "packs").glob("*/*"))) == 1
    done = vfsctl.json("gc", "--grace", "0", "--ignore-node", "node-a")
    assert done["packs_deleted"] == 1
