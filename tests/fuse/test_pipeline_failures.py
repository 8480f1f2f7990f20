"""Pipelines that cannot run, fail, are cancelled or die with vfsd, through a real vfsd.

What must hold: one pipeline's trouble never holds up another, ``wait`` reports
only the trouble of the pipelines it waits for, a failed or cancelled job is not
run again by a restart (only a new head or a pipeline update runs it again), a
restart goes on with the job it interrupted, and logs say when they are incomplete.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import pytest
from conftest import _require_fuse, check_after, mounted
from disks import small_tmpfs
from fuse_checks import until
from test_pipelines import job_json, put_files, read_output, spec, wait

import vfs
from vfs.pipeline import registry
from vfs.pipeline.spec import load_spec_file

if TYPE_CHECKING:
    from collections.abc import Iterator

    from conftest import Mount

COPY = 'cp "$VFS_PFS"/images/* "$VFS_PFS/out/"'


@pytest.fixture
def mount(request: pytest.FixtureRequest, tmp_path) -> Iterator[Mount]:
    """A mount whose vfsd allows the process runtime (the tests run as root)."""
    _require_fuse()
    with mounted(tmp_path, "--allow-process-runtime") as m:
        yield m
    check_after(m, log=not request.node.get_closest_marker("expect_warnings"))


def _with_env(path: str, env: dict[str, str]) -> str:
    doc = json.loads(open(path).read())
    doc["transform"]["env"] = env
    with open(path, "w") as f:
        f.write(json.dumps(doc))
    return path


def _pipelines(mount: Mount) -> dict[str, dict]:
    return {p["pipeline"]: p for p in json.loads(mount.vfsctl("pipeline", "list",
                                                              "--json").stdout)}


# -- one pipeline's trouble is its own -----------------------------------------------------


@pytest.mark.expect_warnings  # the pipelines that cannot run are logged, once each
def test_a_pipeline_whose_input_is_gone_holds_up_no_other(mount, tmp_path) -> None:
    for repo in ("images", "other", "gone"):
        mount.vfsctl("repo", "create", repo)
    mount.vfsctl("branch", "create", "images@dev")
    # Named to come first: the watcher looks at pipelines in name order.
    mount.vfsctl("pipeline", "create", "-f",
                 spec(tmp_path, name="aaa", repo="other",
                      script=COPY.replace("images", "other")))
    mount.vfsctl("pipeline", "create", "-f",
                 spec(tmp_path, name="abb", repo="gone", script=COPY))
    dev = {"pipeline": "adev", "input": {"repo": "images", "branch": "dev", "glob": "/*"},
           "transform": {"cmd": ["sh", "-c", COPY]}, "runtime": "process"}
    (tmp_path / "adev.json").write_text(json.dumps(dev))
    mount.vfsctl("pipeline", "create", "-f", str(tmp_path / "adev.json"))
    mount.vfsctl("pipeline", "create", "-f", spec(tmp_path))
    mount.vfsctl("branch", "delete", "other@main")
    mount.vfsctl("branch", "delete", "images@dev")
    mount.vfsctl("repo", "delete", "gone", "--force")

    first = put_files(mount, {"a.txt": "a"})
    out = wait(mount, f"images@{first}", timeout=30)
    assert out.stdout.split()[0].startswith("upper@")
    second = put_files(mount, {"b.txt": "b"})
    wait(mount, f"images@{second}", timeout=30)
    assert read_output(mount) == {"a.txt.up": "A", "b.txt.up": "B"}

    # Each pipeline that cannot run says why, in list and inspect; the others do not.
    listed = _pipelines(mount)
    assert "other@main" in listed["aaa"]["error"]
    assert "gone" in listed["abb"]["error"]
    assert "images@dev" in listed["adev"]["error"]
    assert listed["upper"]["error"] is None
    assert "other@main" in mount.vfsctl("pipeline", "inspect", "aaa").stdout
    table = mount.vfsctl("pipeline", "list").stdout
    assert "cannot run" in table.splitlines()[1]  # aaa's row
    # Logged once, not at every tick (several ticks ran: two jobs of upper).
    logged = [line for line in mount.log.read_text().splitlines() if "pipeline aaa" in line]
    assert len(logged) == 1, logged

    # Back: the error goes, the pipeline runs.
    mount.vfsctl("branch", "create", "other@main")
    put_files(mount, {"x.txt": "x"}, ref="other@main")
    until(lambda: job_json(mount, "aaa") and job_json(mount, "aaa")[-1]["state"] == "success",
           "pipeline aaa to run once its branch is back")
    until(lambda: _pipelines(mount)["aaa"]["error"] is None, "aaa's error to clear")


def test_the_daemon_checks_the_runtime_when_a_pipeline_is_created(tmp_path) -> None:
    """The vfsd that takes the request says whether it can run the spec: a root vfsd
    without --allow-process-runtime refuses a process pipeline at once."""
    _require_fuse()
    with mounted(tmp_path) as mount:
        mount.vfsctl("repo", "create", "images")
        refused = mount.vfsctl("pipeline", "create", "-f", spec(tmp_path), check=False)
        assert refused.returncode == 1
        assert "--allow-process-runtime" in refused.stderr, refused.stderr
        assert mount.vfsctl("pipeline", "list", "--json").stdout.strip() == "[]"
    check_after(mount, log=False)


def test_wait_says_why_a_pipeline_on_its_path_cannot_start(tmp_path) -> None:
    """The daemon refuses the process runtime (it runs as root without
    --allow-process-runtime) of a pipeline another node created: wait must say so,
    not time out."""
    _require_fuse()
    with mounted(tmp_path) as mount:
        mount.vfsctl("repo", "create", "images")
        mount.vfsctl("repo", "create", "side")
        # Created by a node that may run it (here: this process, on the store itself).
        with vfs.open_store(str(mount.store_dir), cache_dir=str(tmp_path / "other")) as other:
            registry.create(other, load_spec_file(spec(tmp_path)))
        commit = put_files(mount, {"a.txt": "a"})
        started = time.monotonic()
        done = wait(mount, f"images@{commit}", check=False, timeout=60)
        assert done.returncode == 1
        assert "pipeline upper cannot run" in done.stderr and "process" in done.stderr
        assert time.monotonic() - started < 50  # it did not wait for the timeout
        # A repository no pipeline reads is not held up by upper's trouble.
        other = put_files(mount, {"b.txt": "b"}, ref="side@main")
        assert wait(mount, f"side@{other}", timeout=10).returncode == 0
    problems = [line for line in mount.log.read_text().splitlines() if " ERROR " in line]
    assert len(problems) == 1 and "pipeline upper" in problems[0], problems


# -- restarts ---------------------------------------------------------------------------


@pytest.mark.expect_warnings  # the failed job is logged as an error
def test_failed_and_cancelled_jobs_do_not_run_again_at_restart(mount, tmp_path) -> None:
    for repo in ("images", "side"):
        mount.vfsctl("repo", "create", repo)
    mark = tmp_path / "slow-ran-once"
    slow = f'if [ ! -e "$MARK" ]; then touch "$MARK"; sleep 60; fi; {COPY}'
    mount.vfsctl("pipeline", "create", "-f", spec(tmp_path, name="bad", script="exit 3"))
    slow_spec = _with_env(spec(tmp_path, name="slow", script=slow), {"MARK": str(mark)})
    mount.vfsctl("pipeline", "create", "-f", slow_spec)
    side = 'cp "$VFS_PFS"/side/* "$VFS_PFS/out/"'
    mount.vfsctl("pipeline", "create", "-f", spec(tmp_path, name="sided", repo="side",
                                                  script=side))
    put_files(mount, {"a.txt": "a"})
    until(lambda: job_json(mount, "bad") and job_json(mount, "bad")[-1]["state"] == "failed",
           "job of bad to fail")
    running = until(lambda: mark.exists() and job_json(mount, "slow"), "slow to start")
    mount.vfsctl("job", "cancel", running[-1]["id"])
    until(lambda: job_json(mount, "slow")[-1]["state"] == "cancelled", "the cancel")

    mount.restart()
    # Once sided's job is done, the watcher has looked at every pipeline at least once.
    wait(mount, "side@" + put_files(mount, {"s.txt": "s"}, ref="side@main"), timeout=30)
    assert [j["state"] for j in job_json(mount, "bad")] == ["failed"]
    assert [j["state"] for j in job_json(mount, "slow")] == ["cancelled"]

    # How a user retries without a new commit: update the pipeline (the same spec).
    mount.vfsctl("pipeline", "update", "-f", slow_spec)
    until(lambda: job_json(mount, "slow")[-1]["state"] == "success", "slow to run again")
    assert len(job_json(mount, "slow")) == 2
    assert [j["state"] for j in job_json(mount, "bad")] == ["failed"]
    # A new head runs the failed pipeline again.
    put_files(mount, {"b.txt": "b"})
    until(lambda: len(job_json(mount, "bad")) == 2 and job_json(mount, "bad")[-1]["finished"],
           "bad to run on the new head")


def test_a_datum_cut_short_by_a_stopping_daemon_does_not_use_up_its_tries(mount,
                                                                         tmp_path) -> None:
    mount.vfsctl("repo", "create", "images")
    mark = tmp_path / "started"
    slow = f'touch "$MARK"; sleep 2; {COPY}'
    path = _with_env(spec(tmp_path, script=slow, datum_tries=1), {"MARK": str(mark)})
    mount.vfsctl("pipeline", "create", "-f", path)
    commit = put_files(mount, {"a.txt": "a"})
    until(mark.exists, "the datum to start")
    mount.restart()  # SIGTERM: this node gives its claim back, the try does not count
    wait(mount, f"images@{commit}")
    jobs = job_json(mount, "upper")
    assert [j["state"] for j in jobs] == ["success"], jobs
    assert read_output(mount) == {"a.txt": "a"}


# -- logs -------------------------------------------------------------------------------------


def test_a_cut_log_says_so_and_jobs_of_a_deleted_pipeline_are_listed(mount, tmp_path) -> None:
    mount.vfsctl("repo", "create", "images")
    loud = ('head -c 1200000 /dev/zero | tr "\\0" x; echo; echo THE-END; ' + COPY)
    mount.vfsctl("pipeline", "create", "-f", spec(tmp_path, script=loud))
    wait(mount, "images@" + put_files(mount, {"a.txt": "a"}))
    job = job_json(mount, "upper")[-1]
    logs = mount.vfsctl("job", "logs", job["id"]).stdout
    assert "bytes cut: the log keeps the last 1 MiB]" in logs.splitlines()[1]
    assert logs.rstrip().endswith("THE-END")

    mount.vfsctl("pipeline", "delete", "upper")
    listed = json.loads(mount.vfsctl("job", "list", "--json").stdout)
    assert [(j["id"], j["pipeline_deleted"]) for j in listed] == [(job["id"], True)]
    table = mount.vfsctl("job", "list").stdout
    assert job["id"] in table and "pipeline deleted" in table


@pytest.mark.expect_warnings  # a full disk is worth a warning
def test_a_log_lost_to_a_full_disk_says_so(tmp_path) -> None:
    _require_fuse()
    with small_tmpfs(tmp_path / "cache", "32m") as cache, \
            mounted(tmp_path, "--allow-process-runtime") as mount:
        mount.vfsctl("repo", "create", "images")
        filler = cache / "filler-datum"
        # The datum fills the node's disk, then prints: its words go nowhere.
        script = f'dd if=/dev/zero of={filler} bs=1M 2>/dev/null; echo lost words; {COPY}'
        mount.vfsctl("pipeline", "create", "-f", spec(tmp_path, script=script))
        commit = put_files(mount, {"a.txt": "a"})
        try:
            done = wait(mount, f"images@{commit}", check=False, timeout=60)
        finally:
            filler.unlink()
        assert done.returncode == 1
        job = job_json(mount, "upper")[-1]
        assert job["state"] == "failed"
        datum = job["failed"][0]["id"]
        # No log to point to: the error says what happened instead.
        assert "job logs" not in job["error"]
        assert "log" in job["error"] and "full" in job["error"]
        logs = mount.vfsctl("job", "logs", job["id"])
        text = logs.stdout + logs.stderr
        assert "printed nothing" not in text
        assert datum in text and "full" in text
        per_datum = mount.vfsctl("job", "logs", job["id"], "--datum", datum)
        assert per_datum.returncode == 0 and "full" in per_datum.stdout + per_datum.stderr
    check_after(mount, log=False)
