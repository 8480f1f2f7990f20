"""Pipelines run by a real vfsd, driven with the real vfsctl.

These use the ``process`` runtime, whose command sees ``$VFS_PFS`` in place of
``/pfs``: they test scheduling (incremental runs, retries, cancellation, chains,
restarts). The isolation of the real runtimes (bwrap, runc) is tested in
tests/pipeline/, and end to end with them in test_pipeline_runtimes.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import TYPE_CHECKING

import pytest
from conftest import _require_fuse, check_after, mounted

from vfs.objstore import open_object_store
from vfs.pipeline import registry
from vfs.refs import canonical_json

if TYPE_CHECKING:
    from collections.abc import Iterator

    from conftest import Mount

UPPER = ('for f in "$VFS_PFS"/images/*; do n=$(basename "$f"); '
         'tr a-z A-Z < "$f" > "$VFS_PFS/out/$n.up"; done')


def spec(tmp_path, name: str = "upper", script: str = UPPER, **extra) -> str:
    doc = {"pipeline": name, "input": {"repo": extra.pop("repo", "images"),
                                       "glob": extra.pop("glob", "/*")},
           "transform": {"cmd": ["sh", "-c", script]}, "runtime": "process", **extra}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(doc))
    return str(path)


def put_files(mount: Mount, files: dict[str, str], ref: str = "images@main") -> str:
    """Write files through the mount, commit, return the commit id."""
    branch = mount.path / ref
    for name, text in files.items():
        target = branch / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return mount.commit(ref)


def wait(mount: Mount, ref: str, *, check: bool = True, timeout: float = 60):
    return mount.vfsctl("wait", ref, "--timeout", str(timeout), check=check)


def job_json(mount: Mount, pipeline: str) -> list[dict]:
    return json.loads(mount.vfsctl("job", "list", pipeline, "--json").stdout)


def read_output(mount: Mount, repo: str = "upper") -> dict[str, str]:
    root = mount.path / f"{repo}@main"
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture
def mount(request: pytest.FixtureRequest, tmp_path) -> Iterator[Mount]:
    """The suite's mount, its vfsd allowing the process runtime (the tests run as root)."""
    _require_fuse()
    with mounted(tmp_path, "--allow-process-runtime") as m:
        yield m
    check_after(m, log=not request.node.get_closest_marker("expect_warnings"),
                fsck=not request.node.get_closest_marker("corrupts_store"))


@pytest.fixture
def images(mount: Mount) -> Mount:
    mount.vfsctl("repo", "create", "images")
    return mount


def test_commit_runs_the_pipeline_and_one_new_file_runs_one_datum(images, tmp_path) -> None:
    mount = images
    mount.vfsctl("pipeline", "create", "-f", spec(tmp_path, parallelism=2))
    first = put_files(mount, {f"f{i}.txt": f"file {i}" for i in range(5)})
    out = wait(mount, f"images@{first}").stdout.split()
    assert len(out) == 1 and out[0].startswith("upper@")
    assert read_output(mount)["f3.txt.up"] == "FILE 3"
    second = put_files(mount, {"new.txt": "new one"})
    wait(mount, f"images@{second}")
    jobs = job_json(mount, "upper")
    assert [j["state"] for j in jobs] == ["success", "success"]
    last = jobs[-1]
    assert (last["datums_processed"], last["datums_skipped"], last["datums_failed"]) == (1, 5, 0)
    assert last["started"] and last["finished"]
    assert read_output(mount)["new.txt.up"] == "NEW ONE"
    prov = json.loads(mount.vfsctl("provenance", "upper@main", "--json").stdout)
    assert prov["pipeline"] == "upper" and prov["version"] == 1
    assert prov["inputs"][0]["repo"] == "images" and prov["inputs"][0]["commit"] == second
    inspect = json.loads(mount.vfsctl("job", "inspect", last["id"], "--json").stdout)
    assert inspect["output_commit"] == out[0].split("@")[1] or inspect["state"] == "success"


def test_deleted_input_file_removes_its_output(images, tmp_path) -> None:
    mount = images
    mount.vfsctl("pipeline", "create", "-f", spec(tmp_path))
    wait(mount, "images@" + put_files(mount, {"a.txt": "a", "b.txt": "b"}))
    (mount.path / "images@main" / "a.txt").unlink()
    wait(mount, "images@" + mount.commit("images@main"))
    assert read_output(mount) == {"b.txt.up": "B"}


@pytest.mark.expect_warnings  # the failed job is logged as an error
def test_failing_datum_is_retried_then_fails_the_job_with_its_log(images, tmp_path) -> None:
    mount = images
    script = ('for f in "$VFS_PFS"/images/*; do echo "try on $(basename $f)"; '
              'case "$f" in *bad*) echo broken >&2; exit 3;; esac; '
              'cp "$f" "$VFS_PFS/out/"; done')
    mount.vfsctl("pipeline", "create", "-f", spec(tmp_path, script=script, datum_tries=2))
    commit = put_files(mount, {"good.txt": "g", "bad.txt": "b"})
    done = wait(mount, f"images@{commit}", check=False)
    assert done.returncode == 1
    assert "failed" in done.stderr and "bad.txt" in done.stderr
    job = job_json(mount, "upper")[-1]
    assert job["state"] == "failed" and job["datums_failed"] == 1
    datum = job["failed"][0]["id"]
    logs = mount.vfsctl("job", "logs", job["id"], "--datum", datum).stdout
    assert logs.count("try on bad.txt") == 2 and "broken" in logs
    # No output commit: the output branch is still empty.
    assert mount.vfsctl("log", "upper@main", "--json").stdout.strip() in ("[]", "")


def test_cancel_stops_the_datum_processes(images, tmp_path) -> None:
    mount = images
    marker = f"vfs-cancel-marker-{os.getpid()}"
    mount.vfsctl("pipeline", "create", "-f",
                 spec(tmp_path, script=f"sleep 60; echo {marker}"))
    put_files(mount, {"a.txt": "a"})
    deadline = time.monotonic() + 20
    while not _running(marker):
        assert time.monotonic() < deadline, "the datum never started"
        time.sleep(0.1)
    job = job_json(mount, "upper")[-1]
    assert job["state"] == "running"
    mount.vfsctl("job", "cancel", job["id"])
    deadline = time.monotonic() + 10
    while _running(marker) or job_json(mount, "upper")[-1]["state"] == "running":
        assert time.monotonic() < deadline, "the job did not stop"
        time.sleep(0.1)
    assert job_json(mount, "upper")[-1]["state"] == "cancelled"


def _running(marker: str) -> bool:
    return subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode == 0


def test_chained_pipelines_and_wait_follows_the_chain(images, tmp_path) -> None:
    mount = images
    mount.vfsctl("pipeline", "create", "-f", spec(tmp_path))
    count = ('cat "$VFS_PFS"/upper/* | wc -c > "$VFS_PFS/out/$(basename "$VFS_PFS"/upper/*)'
             '.count"')
    mount.vfsctl("pipeline", "create", "-f", spec(tmp_path, name="count", repo="upper",
                                                  script=count))
    commit = put_files(mount, {"a.txt": "abc", "b.txt": "hello"})
    out = wait(mount, f"images@{commit}").stdout.split()
    assert [o.split("@")[0] for o in out] == ["upper", "count"]
    assert {k: v.strip() for k, v in read_output(mount, "count").items()} == {
        "a.txt.up.count": "3", "b.txt.up.count": "5"}
    prov = mount.vfsctl("provenance", "count@main").stdout
    assert "pipeline count" in prov and "pipeline upper" in prov and commit in prov


def test_rollback_brings_back_the_old_outputs_without_rerunning(images, tmp_path) -> None:
    mount = images
    mount.vfsctl("pipeline", "create", "-f", spec(tmp_path))
    first = put_files(mount, {"a.txt": "one"})
    wait(mount, f"images@{first}")
    second = put_files(mount, {"a.txt": "two"})
    wait(mount, f"images@{second}")
    assert read_output(mount) == {"a.txt.up": "TWO"}
    rolled = json.loads(mount.vfsctl("rollback", "images@main", "--to", first,
                                     "--json").stdout)["id"]
    wait(mount, f"images@{rolled}")
    assert read_output(mount) == {"a.txt.up": "ONE"}
    job = job_json(mount, "upper")[-1]
    assert job["datums_processed"] == 0 and job["datums_reused"] == 1


def test_update_reprocesses_everything_by_default(images, tmp_path) -> None:
    mount = images
    mount.vfsctl("pipeline", "create", "-f", spec(tmp_path))
    wait(mount, "images@" + put_files(mount, {"a.txt": "a", "b.txt": "b"}))
    lower = UPPER.replace("a-z A-Z", "a-z a-z").replace(".up", ".v2")
    mount.vfsctl("pipeline", "update", "-f", spec(tmp_path, script=lower))
    deadline = time.monotonic() + 30
    while len(job_json(mount, "upper")) < 2 or not job_json(mount, "upper")[-1]["finished"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert read_output(mount) == {"a.txt.v2": "a", "b.txt.v2": "b"}
    job = job_json(mount, "upper")[-1]
    assert job["version"] == 2 and job["full"] and job["datums_processed"] == 2


@pytest.mark.expect_warnings  # the killed daemon's stale mount is reported at restart
def test_a_daemon_killed_mid_job_rejoins_it_without_half_commits(images, tmp_path) -> None:
    mount = images
    runs = tmp_path / "runs"
    slow = ('echo "$VFS_DATUM_ID" >> "$RUNS"; for f in "$VFS_PFS"/images/*; do sleep 0.4; '
            'cp "$f" "$VFS_PFS/out/$(basename "$f").done"; done')
    path = spec(tmp_path, script=slow)
    doc = json.loads(open(path).read())
    doc["transform"]["env"] = {"RUNS": str(runs)}
    open(path, "w").write(json.dumps(doc))
    mount.vfsctl("pipeline", "create", "-f", path)
    commit = put_files(mount, {f"f{i}.txt": str(i) for i in range(8)})
    deadline = time.monotonic() + 30
    while True:  # let a few datums finish, then kill -9 the daemon
        jobs = job_json(mount, "upper")
        if jobs and jobs[-1]["datums_processed"] >= 2:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(mount.process.pid, signal.SIGKILL)
    mount.process.wait()
    assert mount.vfsctl("log", "upper@main", "--json").stdout.strip() in ("[]", "")
    started_before = runs.read_text().split()
    mount.start()
    wait(mount, f"images@{commit}")
    # The restarted node went on with the same job: no second job, and of the datums
    # only the one that ran when it died ran again (it takes its own claim back).
    jobs = job_json(mount, "upper")
    assert [j["state"] for j in jobs] == ["success"], jobs
    assert jobs[0]["datums_processed"] == 8
    ran = runs.read_text().split()
    assert len(set(ran)) == 8
    assert len(ran) <= 8 + 1 and len(started_before) >= 2
    assert len(read_output(mount)) == 8
    log = mount.vfsctl("log", "upper@main", "--json").stdout
    assert len(json.loads(log)) == 1


def test_bad_specs_are_refused_before_anything_is_stored(images, tmp_path) -> None:
    mount = images
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline: x\ninput: {repo: images}\ntransform: {cmd: [true]}\n"
                   "runtime: process\nparalelism: 2\n")
    done = mount.vfsctl("pipeline", "create", "-f", str(bad), check=False)
    assert done.returncode == 1 and "unknown key 'paralelism'" in done.stderr
    missing = mount.vfsctl("pipeline", "create", "-f", spec(tmp_path, repo="nope"),
                           check=False)
    assert missing.returncode == 1 and "input repository nope does not exist" in missing.stderr
    assert mount.vfsctl("pipeline", "list", "--json").stdout.strip() == "[]"


def test_wait_on_a_commit_no_pipeline_reads_returns_at_once(images) -> None:
    commit = put_files(images, {"a.txt": "a"})
    done = wait(images, f"images@{commit}", timeout=5)
    assert done.stdout == "" and "no pipeline reads" in done.stderr



def test_list_inspect_history_and_delete(images, tmp_path) -> None:
    mount = images
    mount.vfsctl("pipeline", "create", "-f", spec(tmp_path))
    wait(mount, "images@" + put_files(mount, {"a.txt": "a"}))
    listed = json.loads(mount.vfsctl("pipeline", "list", "--json").stdout)
    assert [p["pipeline"] for p in listed] == ["upper"]
    assert listed[0]["last_job"]["state"] == "success"
    text = mount.vfsctl("pipeline", "inspect", "upper").stdout
    assert "images@main glob /*" in text and "process" in text
    job = job_json(mount, "upper")[-1]
    inspect = json.loads(mount.vfsctl("job", "inspect", job["id"], "--json").stdout)
    for key in ("datums_processed", "datums_skipped", "datums_failed", "state", "started",
                "finished"):
        assert key in inspect
    mount.vfsctl("pipeline", "update", "-f", spec(tmp_path, parallelism=2),
                 "--keep-outputs")
    mount.vfsctl("pipeline", "delete", "upper")
    history = json.loads(mount.vfsctl("pipeline", "inspect", "upper", "--history",
                                      "--json").stdout)
    assert [(v["version"], v["deleted"], v["keep_outputs"]) for v in history] == [
        (1, False, False), (2, False, True), (3, True, False)]
    gone = mount.vfsctl("pipeline", "inspect", "upper", check=False)
    assert gone.returncode == 1 and "does not exist" in gone.stderr
    # The output repository and its data stay.
    assert read_output(mount) == {"a.txt.up": "A"}
    # New commits no longer run anything (version 2 may have had its own job meanwhile).
    late = put_files(mount, {"b.txt": "b"})
    time.sleep(1)
    assert [j for j in job_json(mount, "upper") if j["input_commit"] == late] == []


@pytest.mark.expect_warnings  # the failed job is logged as an error
def test_a_looping_datum_is_killed_by_the_node_default_timeout(tmp_path) -> None:
    _require_fuse()
    with mounted(tmp_path, "--allow-process-runtime", "--datum-timeout", "1") as mount:
        mount.vfsctl("repo", "create", "images")
        mount.vfsctl("pipeline", "create", "-f", spec(
            tmp_path, "looping", "while :; do sleep 0.1; done", datum_tries=1))
        # The spec's own timeout wins over the node's.
        mount.vfsctl("pipeline", "create", "-f", spec(
            tmp_path, "patient", 'sleep 1.5; cp "$VFS_PFS"/images/* "$VFS_PFS/out/"',
            datum_timeout="1m"))
        commit = put_files(mount, {"a.txt": "a"})
        done = wait(mount, f"images@{commit}", check=False)
        assert done.returncode == 1
        [looping] = job_json(mount, "looping")
        assert looping["state"] == "failed"
        assert "/a.txt" in looping["error"] and "timed out after 1 s" in looping["error"]
        [patient] = job_json(mount, "patient")
        assert patient["state"] == "success"
        assert read_output(mount, "patient") == {"a.txt": "a"}
    check_after(mount, log=False)
    assert "Traceback" not in mount.log.read_text()


@pytest.mark.expect_warnings  # the failed job is logged as an error
def test_a_stored_spec_with_a_nan_fails_its_job_clearly(images, tmp_path) -> None:
    mount = images
    mount.vfsctl("pipeline", "create", "-f", spec(tmp_path, datum_timeout=60))
    # An older vfs stored a NaN as it was given (JSON's NaN).
    objects = open_object_store(str(mount.store_dir))
    version = registry.current(objects, "upper")
    document = {**version.to_dict()["spec"], "datum_timeout": float("nan")}
    objects.put(registry.version_key("upper", 2), canonical_json(
        {"version": 2, "spec": document, "created": version.created, "author": "old",
         "keep_outputs": False, "deleted": False}))
    listed = mount.vfsctl("pipeline", "list").stdout
    assert "upper" in listed
    inspected = mount.vfsctl("pipeline", "inspect", "upper").stdout
    assert "cannot run" in inspected and "'datum_timeout' must be" in inspected
    commit = put_files(mount, {"a.txt": "a"})
    done = wait(mount, f"images@{commit}", check=False)
    assert done.returncode == 1
    [job] = job_json(mount, "upper")
    assert job["state"] == "failed"
    assert "'datum_timeout' must be a positive duration" in job["error"]
    assert "pipeline update" in job["error"] and "ExceptionGroup" not in job["error"]
    assert "Traceback" not in mount.log.read_text()
